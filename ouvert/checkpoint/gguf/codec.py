"""GGUF's tensor types, written and read with the gguf package (the library llama.cpp's own converter
uses): f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are the ones it can quantize; reading also takes
the k-quants Q2_K..Q6_K (dequantized with gguf's quants module). As llama.cpp's converter does,
1-D tensors, norms, the router and rope_freqs stay f32, and a matrix whose rows do not divide into
quantization blocks falls back to f16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ouvert.checkpoint.base import CheckpointError


def gguf_lib():
    """The gguf package (llama.cpp's own Python library), or a CheckpointError saying how to get it."""
    try:
        import gguf
    except ImportError:  # a runtime dependency (requirements.txt); say what to do if it is absent
        raise CheckpointError("the gguf package is not installed: pip install gguf") from None
    return gguf


TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


_READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def file_type(kind: str):
    g = gguf_lib()
    name = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(kind, f"MOSTLY_{kind.upper()}")
    return g.LlamaFileType[name], g.GGMLQuantizationType[kind.upper()]


def tensor_type(gguf_name: str, shape: tuple[int, ...], want):
    """The type a tensor is stored in for a file of type `want`, by llama.cpp's converter's rules."""
    g = gguf_lib()
    Q = g.GGMLQuantizationType
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or ".ffn_gate_inp." in gguf_name:
        return Q.F32
    if want in (Q.F32, Q.F16, Q.BF16):
        return want
    if shape[-1] % g.GGML_QUANT_SIZES[want][0]:
        return Q.F16  # rows that do not split into whole blocks: llama.cpp's converter falls back to f16
    return want


def encode_tensor(t: Tensor, qtype) -> np.ndarray:
    """A tensor as the bytes GGUF stores for `qtype` (float arrays for F32 / F16, uint8 otherwise)."""
    g = gguf_lib()
    Q = g.GGMLQuantizationType
    x = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return g.quants.quantize(x, qtype)


def decode_tensor(t: GGUFTensor, path: Path) -> Tensor:
    """A GGUF tensor as a torch tensor (dequantized to float32 unless F32, F16 or BF16)."""
    g = gguf_lib()
    Q = g.GGMLQuantizationType
    qt = Q(t.qtype)
    if qt.name not in _READ_TYPES:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} is {qt.name}, a quantization type ouvert does not read; "
            f"it reads {', '.join(_READ_TYPES)}"
        )
    if qt in (Q.F32, Q.F16):  # views of the file's pages (copy-on-write): no copy
        return torch.from_numpy(t.data).reshape(t.shape)
    if qt == Q.BF16:
        return torch.from_numpy(t.data).view(torch.bfloat16).reshape(t.shape)
    return torch.from_numpy(g.quants.dequantize(np.asarray(t.data), qt)).reshape(t.shape)


@dataclass
class GGUFTensor:
    name: str
    qtype: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (GGUF stores the innermost dimension first)
    data: np.ndarray  # F32 / F16: the values; any other type: the raw bytes, (..., bytes per row)
