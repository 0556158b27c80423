"""ouvert's CPU kernels: matrix products over weights stored in GGUF's block formats (and float32,
float16, bfloat16), without turning the weights into floats in memory.

Rooms:
  csrc/blocks.h        each block format drawn byte by byte, with the plain loop that decodes it
  csrc/impl.h          the product, written once, included per instruction set
  csrc/kernels_*.cpp   scalar (any CPU), AVX2 + FMA + F16C, AVX-512, AVX-512 with VNNI, and with
                       VNNI and BF16; chosen at load (csrc/ops.cpp)
  formats.py           the PyTorch twin: the same decoding in tensor ops, the reference in tests
  encode.py            float weights into the block formats (ouvert quantize), in tensor ops

The C++ extension (ouvert._kernels, built by `pip install -e .` when g++ is there) registers the ops
`ouvert::block_matmul(x, w, qtype)`, `ouvert::block_matmul_heads` (one weight per head),
`ouvert::block_rows(w, qtype, rows)` and `ouvert::block_experts`
(DeepSeek's routed experts in blocks, the dispatch in C++), threaded through
torch's pool. Without it, the same functions below run the twin (dequantize, then F.linear), and
ouvert says so once. Rows are independent by construction: an output row's numbers do not depend on
the other rows of x, so a batch gives each request what it would get alone.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from ouvert.kernels.formats import (
    BY_ID,
    INTEGER_TYPES,
    TYPES,
    BlockType,
    block_type,
    dequantize,
    integer_matmul,
    quantize_activations,
    row_bytes,
    row_values,
)

__all__ = [
    "BY_ID", "INTEGER_TYPES", "TYPES", "BlockType", "available", "block_experts", "block_matmul",
    "block_matmul_heads", "block_rows",
    "block_type",
    "dequantize", "float_matmul", "integer_dots", "integer_matmul", "isa", "quantize_activations", "row_bytes",
    "row_values",
    "set_isa", "twin_matmul", "use_integer_dots", "use_twin",
]


def _load():
    try:
        from ouvert import _kernels
    except ImportError as e:
        warnings.warn(f"ouvert's C++ kernels are not built ({e}); running the plain PyTorch path, which is "
                      "slower. Install g++ and run `pip install --no-build-isolation -e .` again.", stacklevel=3)
        return None

    @torch.library.register_fake("ouvert::block_matmul")
    def _(x: Tensor, w: Tensor, qtype: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[0]))

    @torch.library.register_fake("ouvert::block_experts")
    def _(x: Tensor, expert_idx: Tensor, weight: Tensor, gate: Tensor, up: Tensor, down: Tensor,
          qtypes: list[int]) -> Tensor:
        return torch.empty_like(x)

    @torch.library.register_fake("ouvert::block_matmul_heads")
    def _(x: Tensor, w: Tensor, qtype: int) -> Tensor:
        return x.new_empty((*x.shape[:-1], w.shape[1]))

    @torch.library.register_fake("ouvert::block_rows")
    def _(w: Tensor, qtype: int, rows: Tensor) -> Tensor:
        return w.new_empty((*rows.shape, row_values(w, qtype)), dtype=torch.float32)

    return _kernels


_EXT = _load()  # the extension module, or None (said once, here)
_twin_only = False


def use_twin(on: bool = True) -> None:
    """Run the PyTorch twin even where the kernels are built (tests, benchmarks)."""
    global _twin_only
    _twin_only = on


def available() -> list[str]:
    """The instruction sets the kernels can run on this CPU, best first ([] without the extension)."""
    return _EXT.available() if _EXT else []


def isa() -> str:
    """The instruction set the kernels run on now: avx512_bf16, avx512_vnni, avx512, avx2, scalar, or
    twin."""
    return _EXT.isa() if _EXT and not _twin_only else "twin"


def set_isa(name: str) -> None:
    """Force an instruction set this CPU has (OUVERT_ISA=name does the same at start)."""
    if _EXT is None:
        raise RuntimeError("ouvert's C++ kernels are not built")
    _EXT.set_isa(name)


_int_dots = True


def integer_dots() -> bool:
    """Whether Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K products quantize the activations to 8 bits per
    block of 32 and multiply in integers, as llama.cpp does (the default; OUVERT_INT_DOTS=0 turns it off
    at start). The float formats multiply in float32 (bfloat16 pairs on AVX-512 BF16)."""
    return _EXT.integer_dots() if _EXT is not None else _int_dots


def use_integer_dots(on: bool = True) -> None:
    global _int_dots
    _int_dots = on
    if _EXT is not None:
        _EXT.use_integer_dots(on)


def float_matmul(x: Tensor, w: Tensor, qtype: int) -> Tensor:
    """Dequantize W, then torch's matmul in float32; the result in x's dtype."""
    return F.linear(x.float(), dequantize(w, qtype)).to(x.dtype)


def twin_matmul(x: Tensor, w: Tensor, qtype: int) -> Tensor:
    """The kernel's twin: the same math in plain PyTorch (integer_matmul where the kernel multiplies
    in integers, x rounded to bfloat16 where it takes AVX-512 BF16's pairs, else float_matmul); the
    result in x's dtype."""
    name = block_type(qtype).name
    if name in INTEGER_TYPES and integer_dots():
        return integer_matmul(x.float(), w, name).to(x.dtype)
    if name == "BF16" and isa() == "avx512_bf16":
        return F.linear(x.bfloat16().float(), dequantize(w, qtype)).to(x.dtype)
    return float_matmul(x, w, qtype)


def block_matmul(x: Tensor, w: Tensor, qtype: int) -> Tensor:
    """y = x W^T with W as rows of blocks: x (..., K) float32 / bfloat16, w (N, bytes) uint8."""
    if _twin_only or x.device.type != "cpu" or _EXT is None:
        return twin_matmul(x, w, qtype)
    return torch.ops.ouvert.block_matmul(x, w, qtype)


def block_matmul_heads(x: Tensor, w: Tensor, qtype: int) -> Tensor:
    """Head by head, y[:, h] = x[:, h] W_h^T: x (B, H, T, K), w (H, N, bytes) uint8 (each head's rows
    contiguous); y (B, H, T, N) in x's dtype. One op for MLA's absorbed heads."""
    if _twin_only or x.device.type != "cpu" or _EXT is None:
        return torch.stack([twin_matmul(x[:, h], w[h], qtype) for h in range(w.shape[0])], dim=1)
    return torch.ops.ouvert.block_matmul_heads(x, w, qtype)


def block_experts(x: Tensor, expert_idx: Tensor, weight: Tensor, gate: Tensor, up: Tensor, down: Tensor,
                  qtypes: list[int]) -> Tensor | None:
    """Routed experts stacked in blocks, all in C++ (csrc/ops.cpp says the order of every sum); x
    (N, D) float32. None where the kernels do not run (the twin, no extension): the caller then
    dispatches in Python."""
    if _twin_only or x.device.type != "cpu" or _EXT is None:
        return None
    return torch.ops.ouvert.block_experts(x, expert_idx, weight, gate, up, down, qtypes)


def block_rows(w: Tensor, qtype: int, rows: Tensor) -> Tensor:
    """Rows `rows` of W as float32, shape (*rows.shape, K): an embedding lookup from blocks."""
    if _twin_only or w.device.type != "cpu" or _EXT is None:
        return dequantize(w[rows.reshape(-1)], qtype).reshape(*rows.shape, -1)
    return torch.ops.ouvert.block_rows(w, qtype, rows)
