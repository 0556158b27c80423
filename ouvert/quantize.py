"""Weight-only quantization: int8 per output channel, int4 in groups along the input features.

A pair, as gpt-fast's QuantHandler: `quantize_state_dict` turns float weights into integers and
scales, `swap_linears` / `swap_experts` put modules that hold them in place of nn.Linear and of
DeepSeek's stacked routed experts; `quantize_model` does both on a live model. Activations stay
in the model's dtype (float32, bfloat16); the matmuls run through torch's own CPU kernels, with a
dequantize-then-matmul path (`dequantize()`, `weights()`) elsewhere and for the tests to hold
them against.

  int8  symmetric per output channel: w[o, i] ~ weight[o, i] * weight_scale[o],
        weight int8 in [-127, 127], weight_scale = max|w[o, :]| / 127.
        Kernel: aten._weight_int8pack_mm(x, weight, weight_scale).
  int4  asymmetric per group of `group_size` input features (32, 64, 128 or 256):
        w[o, i] ~ (q[o, i] - 8) * weight_scale[o, g] + weight_zero[o, g], g = i // group_size,
        q in [0, 15] (the group's min maps to 0, its max to 15; weight_zero is the value q = 8 stands for).
        Stored portably as weight_packed uint8 (out, in/2): column 2j in the low nibble, 2j+1 in the
        high one. At load it is repacked into the layout of aten._weight_int4pack_mm_for_cpu, which is
        an implementation detail of torch and never written to disk (needs out_features % 16 == 0).

What stays in float: the embedding, the norms, the routers, MLA's kv_b_proj (the absorbed decode
path reads its weight directly) and the MTP module's eh_proj. Everything else that is an nn.Linear
(attention and MLP projections, shared experts) is quantized, and so are DeepSeek's routed experts
(most of its weights).

The output head (lm_head) is int8 per output channel under both schemes: an int4 model keeps an
int8 head, as llama.cpp keeps its output tensor at higher precision than a low-bit body (q8_0 in
q8_0 files, q6_K in q4 ones), since the head's errors reach the logits undiluted. An untied head is
worth it: DeepSeek's (129280 x 1024) costs about half a decode token in bfloat16. A tied head (the
small Llamas: lm_head.weight is embed_tokens.weight) stays float, since quantizing it would need a
second copy of the embedding; the MTP modules share the trunk's head, quantized or not.

Routed experts stay stacked, as Experts holds them: Int8Experts has, for each of gate_proj, up_proj
and down_proj, an int8 (E, out, in) tensor and its (E, out) scales; Int4Experts packed (E, out, in/2)
with (E, out, in/G) scales and zeros. Each expert is quantized alone by the same quantize_int8 /
quantize_int4 as a Linear, and its matmuls (`expert(e, x)`) take the same kernels under the same
KERNEL_MAX_ROWS rule (int4 from per-expert copies in the kernel's layout), else dequantize that
expert and matmul. Under torch.compile a decode step's `gathered` runs that same dispatch on the
kernels inside one opaque op (ouvert::int8_experts / int4_experts), or, where the kernels do not
serve, dequantizes the chosen experts in inductor's reductions.

A checkpoint says so in config.json: "quantization_config": {"quant_method": "ouvert",
"scheme": "int8" | "int4", "group_size": G | null, "head": "int8" | null}; a config without "head"
(written before the head was quantized) has a float head. Tensor names are the Linear's own plus these
suffixes: int8 `.weight` (int8) and `.weight_scale`; int4 `.weight_packed`, `.weight_scale` and
`.weight_zero`. Routed experts are written one expert at a time under HF's names, with the same
suffixes: `model.layers.L.mlp.experts.J.gate_proj.weight_scale`. An int8 head is `lm_head.weight`
(int8) and `lm_head.weight_scale`, and DeepSeek's MTP layers get copies of both as their
`shared_head.head.*`. Scales keep the float weights' dtype.
"""

from __future__ import annotations

import copy
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert import kernels
from ouvert.checkpoint.base import CheckpointError, hf_names, our_name
from ouvert.kernels.encode import quantize as encode
from ouvert.model import Experts, MLAttention, Router, expert_counts, sorted_dispatch

QUANT_METHOD = "ouvert"
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
DEFAULT_GROUP_SIZES = (128, 32)  # int4's default: the first that divides every quantized layer's in_features
# nn.Linear layers left in float (see the module docstring); matched on the last part of the name.
KEEP_FLOAT = ("kv_b_proj", "eh_proj")
HEAD = "lm_head"  # the output head: quantized apart from the body, in HEAD_SCHEME, unless tied
HEAD_SCHEME = "int8"
HEAD_SCHEMES = (HEAD_SCHEME,)  # what a checkpoint's quantization_config.head may say, besides null


class QuantizeError(ValueError):
    """A scheme, group size or layer that cannot be quantized; the message names it."""


# ---- the modules -----------------------------------------------------------------------------


# Rows (tokens) up to which torch's CPU kernels beat dequantize-then-matmul, per activation dtype, as
# measured on AVX-512 (576 x 1536 weights, one thread): in bfloat16 the kernels are 2x faster than
# the float matmul at one row and lose to dequantizing from about 48 rows (prefill); in float32 they
# run a scalar loop, even with dequantizing at one row and far slower above it.
KERNEL_MAX_ROWS = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 1}


def _cpu_kernel(x: Tensor, rows: int | None = None) -> bool:
    """Whether torch's kernels serve x (or `rows` rows of x's dtype)."""
    rows = x.numel() // x.shape[-1] if rows is None else rows
    return x.device.type == "cpu" and rows <= KERNEL_MAX_ROWS.get(x.dtype, 0)


def _experts_kernel(x: Tensor, row_tile: int | None) -> bool:
    """Whether every matmul of the sorted dispatch over x's tokens takes the kernels: an expert
    gets at most all the tokens, or a tile of row_tile rows."""
    return _cpu_kernel(x, max(x.shape[0], row_tile or 0))


# Output rows dequantized at a time where the kernels do not serve (prefill, float32): a slice of
# float weights this small is reused from the allocator's cache, where dequantizing a whole matrix
# at once faults in fresh pages on every call (Llama-3.2-1B shape, int4, 512-token prefill on this
# 2-core machine: 114 tok/s whole, 148-184 in slices of 256 rows; int8 147 against 195).
DEQUANT_ROWS = 256


def dequantized_linear(x: Tensor, dequantize, out_features: int, bias: Tensor | None) -> Tensor:
    """F.linear(x, W, bias) with W (out_features, in) dequantized DEQUANT_ROWS output rows at a time
    by `dequantize(rows)`, rows a slice (a quantized Linear's `dequantize(dtype, rows)`)."""
    y = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, DEQUANT_ROWS):
        rows = slice(start, start + DEQUANT_ROWS)
        y[..., rows] = F.linear(x, dequantize(rows), None if bias is None else bias[rows].to(x.dtype))
    return y


class Int8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight int8 (out, in), weight_scale (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.use_kernel = True

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> Tensor:
        """The float weight (out, in) these integers stand for, or those output rows of it."""
        return dequantize_int8(self.weight[rows], self.weight_scale[rows], dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel and _cpu_kernel(x):
            lead = x.shape[:-1]
            y = int8_mm(x.reshape(-1, self.in_features), self.weight, self.weight_scale)
            y = y.view(*lead, self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return dequantized_linear(x, partial(self.dequantize, x.dtype), self.out_features, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(nn.Module):
    """y = x @ w.T + bias with w[o, i] = (q[o, i] - 8) * weight_scale[o, i // G] + weight_zero[o, i // G].

    Persistent (written to checkpoints): weight_packed uint8 (out, in/2), weight_scale and
    weight_zero (out, in/G). Not persistent: the kernel's packed copy, made by `pack()`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.register_buffer("weight_zero", torch.empty(out_features, n_groups, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.register_buffer("kernel_weight", None, persistent=False)
        self.register_buffer("kernel_scale_zero", None, persistent=False)
        self.use_kernel = True

    def pack(self) -> None:
        """Repack weight_packed into the CPU kernel's layout (call after the tensors are in place)."""
        if self.weight_packed.device.type != "cpu" or self.out_features % 16:
            self.kernel_weight = self.kernel_scale_zero = None  # the dequantize path serves
            return
        self.kernel_weight, self.kernel_scale_zero = int4_kernel_layout(self.weight_packed, self.weight_scale,
                                                                        self.weight_zero)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> Tensor:
        return dequantize_int4(self.weight_packed[rows], self.weight_scale[rows], self.weight_zero[rows],
                               self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel and self.kernel_weight is not None and _cpu_kernel(x):
            lead = x.shape[:-1]
            y = int4_mm(x.reshape(-1, self.in_features), self.kernel_weight, self.group_size,
                        self.kernel_scale_zero)
            y = y.view(*lead, self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return dequantized_linear(x, partial(self.dequantize, x.dtype), self.out_features, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


# Rows up to which a BlockLinear always runs ouvert's kernel (decode steps, serving steps, the engine's
# prefill chunks); above (a whole prompt at once), whichever of the kernel in chunks of this many rows
# and dequantize-then-matmul was faster when measured on this machine (prefill_on_kernels).
BLOCK_KERNEL_MAX_ROWS = 64
_prefill_choice: dict[tuple[int, torch.dtype], bool] = {}


def prefill_on_kernels(w: Tensor, qtype: int, x: Tensor) -> bool:
    """Whether a product of many rows runs faster on the kernels (in chunks of BLOCK_KERNEL_MAX_ROWS
    rows) than through dequantize-then-matmul: timed once per block type and activation dtype, on
    the first weight that asks (at most 1024 of its rows), best of two runs each."""
    key = (qtype, x.dtype)
    if key not in _prefill_choice:
        rows = w[:1024]
        probe = torch.randn(BLOCK_KERNEL_MAX_ROWS, x.shape[-1], dtype=x.dtype)

        def best(fn) -> float:
            times = []
            for _ in range(3):  # the first run warms up
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return min(times[1:])

        every = torch.arange(rows.shape[0])
        kernel = best(lambda: kernels.block_matmul(probe, rows, qtype))
        torch_mm = best(lambda: F.linear(probe, kernels.block_rows(rows, qtype, every).to(x.dtype)))
        _prefill_choice[key] = kernel < torch_mm
    return _prefill_choice[key]


def chunked_block_matmul(x: Tensor, w: Tensor, qtype: int) -> Tensor:
    """block_matmul over many rows, BLOCK_KERNEL_MAX_ROWS at a time (their activations stay in cache)."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch.cat([kernels.block_matmul(flat[i : i + BLOCK_KERNEL_MAX_ROWS], w, qtype)
                   for i in range(0, flat.shape[0], BLOCK_KERNEL_MAX_ROWS)])
    return y.view(*x.shape[:-1], w.shape[0])


class BlockLinear(nn.Module):
    """y = x W^T + bias with W kept in one of GGUF's block formats, as the file stores it
    (ouvert/kernels): weight (out, bytes per row) uint8, in_features / block values blocks a row."""

    def __init__(self, in_features: int, out_features: int, qtype: int | str, bias: bool = False,
                 dtype=torch.float32, device=None):
        super().__init__()
        t = kernels.block_type(qtype)
        if in_features % t.values:
            raise QuantizeError(f"{t.name} needs in_features divisible by {t.values}, got {in_features}")
        self.in_features, self.out_features, self.qtype = in_features, out_features, t.id
        self.register_buffer("weight", torch.empty(out_features, kernels.row_bytes(t.id, in_features),
                                                   dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice = slice(None)) -> Tensor:
        # the kernels' row decoder (the same numbers as the twin's, bit for bit, several times faster)
        w = kernels.block_rows(self.weight, self.qtype, torch.arange(self.out_features)[rows])
        return w if dtype is None else w.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() // self.in_features <= BLOCK_KERNEL_MAX_ROWS:
            y = kernels.block_matmul(x, self.weight, self.qtype)
        elif kernels.isa() != "twin" and prefill_on_kernels(self.weight, self.qtype, x):
            y = chunked_block_matmul(x, self.weight, self.qtype)
        else:
            return dequantized_linear(x, partial(self.dequantize, x.dtype), self.out_features, self.bias)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        t = kernels.block_type(self.qtype)
        return f"in_features={self.in_features}, out_features={self.out_features}, {t.name} blocks"


class BlockEmbedding(nn.Module):
    """An embedding table kept in a GGUF block format; a lookup decodes just the rows asked for, in
    `dtype`. Its weight is the tied output head's too (a BlockLinear over the same tensor)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: int | str, dtype=torch.float32,
                 device=None):
        super().__init__()
        t = kernels.block_type(qtype)
        if embedding_dim % t.values:
            raise QuantizeError(f"{t.name} needs embedding_dim divisible by {t.values}, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim, self.qtype, self.out_dtype = num_embeddings, embedding_dim, t.id, dtype
        self.register_buffer("weight", torch.empty(num_embeddings, kernels.row_bytes(t.id, embedding_dim),
                                                   dtype=torch.uint8, device=device))

    def forward(self, ids: Tensor) -> Tensor:
        return kernels.block_rows(self.weight, self.qtype, ids).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {kernels.block_type(self.qtype).name} blocks"


class BlockExperts(Experts):
    """Routed experts with each projection stacked in one block format, as a GGUF file stores them
    (ffn_gate_exps, ...): for w in gate_proj, up_proj, down_proj, `w` uint8 (E, out, bytes per row)
    of type qtypes[w]. An expert's product runs on ouvert's kernels, whose rows do not depend on the
    other rows, so tiles (row_tile) are needed only where the twin stands in for them."""

    def __init__(self, n: int, dim: int, hidden: int, qtypes: dict[str, int | str], dtype=torch.float32,
                 device=None):
        nn.Module.__init__(self)  # not Experts': no float parameters
        self.n_experts, self.row_tile, self.out_dtype = n, None, dtype
        self.qtypes = {w: kernels.block_type(t).id for w, t in qtypes.items()}
        for w, (out_f, in_f) in expert_shapes(dim, hidden).items():
            t = kernels.block_type(self.qtypes[w])
            if in_f % t.values:
                raise QuantizeError(f"experts' {w}: {t.name} needs rows divisible by {t.values}, got {in_f}")
            self.register_buffer(w, torch.empty(n, out_f, kernels.row_bytes(t.id, in_f), dtype=torch.uint8,
                                                device=device))

    def weights(self, w: str, idx, dtype: torch.dtype | None = None) -> Tensor:
        blocks = getattr(self, w)[idx]  # (..., out, bytes)
        flat = blocks.reshape(-1, blocks.shape[-1]).contiguous()
        rows = kernels.block_rows(flat, self.qtypes[w], torch.arange(flat.shape[0]))
        return rows.view(*blocks.shape[:-1], -1).to(dtype or self.out_dtype)

    def proj(self, w: str, e: int, x: Tensor) -> Tensor:  # (forward's Python dispatch: the twin's products)
        return kernels.block_matmul(x, getattr(self, w)[e], self.qtypes[w])

    def forward(self, x: Tensor, expert_idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        # the whole dispatch in C++ (one opaque op: a compiled decode step stays one graph), or, where
        # the kernels do not run, in Python with the twin's products (in tiles, if the engine set them)
        y = kernels.block_experts(x.float(), expert_idx, weight, self.gate_proj, self.up_proj, self.down_proj,
                                  [self.qtypes[w] for w in EXPERT_PROJS])
        if y is not None:
            return y.to(x.dtype), expert_counts(expert_idx, self.n_experts)
        return sorted_dispatch(x, expert_idx, weight, self.n_experts, self.expert, self.row_tile)

    def extra_repr(self) -> str:
        types = ", ".join(f"{w} {kernels.block_type(t).name}" for w, t in self.qtypes.items())
        return f"n_experts={self.n_experts}, {types} blocks"


class BlockRouter(Router):
    """A Router whose affinities run on ouvert's kernels over its float rows (`rows`, a uint8 view
    of its weight, of type `qtype`): row-invariant, as the serving engine's decode needs."""

    rows: Tensor
    qtype: int

    def logits(self, x: Tensor) -> Tensor:
        return kernels.block_matmul(x.float(), self.rows, self.qtype)

    def scores(self, logits: Tensor) -> Tensor:
        # torch's elementwise kernels take a tensor in steps of 32 floats and the remainder in scalar
        # code, whose sigmoid rounds differently: whole steps in every row keep rows invariant
        if self.scoring_func != "sigmoid":
            return super().scores(logits)  # softmax works row by row
        E = logits.shape[-1]
        return super().scores(F.pad(logits, (0, -E % 32)))[..., :E]


class BlockMLAttention(MLAttention):
    """MLA whose absorbed decode multiplies by kv_b_proj's halves head by head on ouvert's kernels:
    `uk_rows` (H, r, nope) is the key half transposed (a copy, kv_lora_rank x qk_nope_head_dim per
    head), `uv_rows` (H, v, r) the value half, a view of kv_b_proj's rows; both of type `qtype`."""

    uk_rows: Tensor
    uv_rows: Tensor
    qtype: int

    def absorb_query(self, q_nope: Tensor) -> Tensor:
        return kernels.block_matmul_heads(q_nope, self.uk_rows, self.qtype)

    def absorb_output(self, o: Tensor) -> Tensor:
        return kernels.block_matmul_heads(o, self.uv_rows, self.qtype).transpose(1, 2)


def swap_for_blocks(model: nn.Module, types: dict[str, int], dtype: torch.dtype) -> None:
    """Put BlockLinear / BlockEmbedding in place of the nn.Linear / nn.Embedding named in `types`
    (module name -> GGML type), on the meta device, before the blocks are assigned; BlockExperts in
    place of the routed experts whose three stacks are named (`layers.3.mlp.experts.gate_proj`...)."""
    stacks: dict[str, dict[str, int]] = {}
    for name, qtype in types.items():
        parent, _, attr = name.rpartition(".")
        if _is_stack(model, name):
            stacks.setdefault(parent, {})[attr] = qtype
            continue
        m = model.get_submodule(name)
        if isinstance(m, nn.Embedding):
            new = BlockEmbedding(m.num_embeddings, m.embedding_dim, qtype, dtype, device="meta")
        else:
            new = BlockLinear(m.in_features, m.out_features, qtype, m.bias is not None, dtype, device="meta")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    for name, qtypes in stacks.items():
        ex = model.get_submodule(name)
        if set(qtypes) != set(EXPERT_PROJS):
            raise QuantizeError(f"{name}: routed experts in blocks need types for {', '.join(EXPERT_PROJS)}, "
                                f"got {', '.join(qtypes)}")
        dim, hidden = ex.down_proj.shape[1:]
        model.set_submodule(name, BlockExperts(ex.n_experts, dim, hidden, qtypes, dtype, device="meta"))


FLOAT_ROWS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def float_rows_view(model: nn.Module) -> nn.Module | None:
    """The same model with every float product run by ouvert's kernels over its own rows, so that a
    decode step of up to BLOCK_KERNEL_MAX_ROWS rows gives each row the same numbers whatever the
    others (the serving engine's live-rows-only decode). Linear layers become BlockLinear of type
    F32 / BF16 / F16, routed experts BlockExperts, routers BlockRouter, MLA BlockMLAttention, each
    over a uint8 view of the float weights: nothing is copied but MLA's transposed key half, and the
    original model is left as it is. None where that cannot hold: int8 / int4 layers."""
    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        return None
    kinds = (nn.Linear, Experts, Router, MLAttention)
    names = [n for n, m in model.named_modules() if type(m) in kinds and _float_weight(m) in FLOAT_ROWS]
    if not names:
        return None
    # modules copied, tensors shared: weights, buffers and any tensor a module holds (a loss kept for the
    # optimizer, which deepcopy could not copy anyway)
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    shared.update((id(v), v) for m in model.modules() for v in vars(m).values() if isinstance(v, Tensor))
    view = copy.deepcopy(model, shared)
    for name in names:
        m = view.get_submodule(name)
        qtype = kernels.block_type(FLOAT_ROWS[_float_weight(m)]).id
        if type(m) is nn.Linear:
            b = BlockLinear(m.in_features, m.out_features, qtype, m.bias is not None, dtype=m.weight.dtype,
                            device="meta")
            b.weight, b.bias = _rows(m.weight), m.bias
            view.set_submodule(name, b)
        elif type(m) is Experts:
            dim, hidden = m.down_proj.shape[1], m.down_proj.shape[2]
            b = BlockExperts(m.n_experts, dim, hidden, dict.fromkeys(EXPERT_PROJS, qtype), m.down_proj.dtype,
                             device="meta")
            for w in EXPERT_PROJS:
                setattr(b, w, _rows(getattr(m, w)))
            view.set_submodule(name, b)
        elif type(m) is Router:  # the copy becomes its kernel subclass: same tensors, another product
            m.__class__, m.rows, m.qtype = BlockRouter, _rows(m.weight), qtype
        else:  # MLAttention, whose kv_b_proj is among the linears (the naive path, prefill)
            w_uk, w_uv = m._kv_b_halves()
            m.__class__, m.qtype = BlockMLAttention, qtype
            m.uk_rows, m.uv_rows = _rows(w_uk.transpose(1, 2)), _rows(w_uv)
    return view


def _float_weight(m: nn.Module) -> torch.dtype:
    w = m.down_proj if isinstance(m, Experts) else m.kv_b_proj.weight if isinstance(m, MLAttention) else m.weight
    return w.dtype


def _rows(w: Tensor) -> Tensor:
    """Float rows as the kernels read them: a uint8 view (no copy where w is contiguous)."""
    return w.detach().contiguous().view(torch.uint8)


# ---- GGUF's block formats written from float weights (ouvert/kernels/encode.py) ------------------

# `ouvert quantize --scheme` values that write block formats, and the type of each tensor they give:
# one type everywhere, or a mix after llama.cpp's *_K_M recipes (see block_plan).
BLOCK_SCHEMES = ("q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m")
# A k-quant needs rows in whole super-blocks of 256; a row that is not (SmolLM2's 576 features)
# falls back to a format of 32-value blocks the kernels cover. llama.cpp falls back to Q5_0 / Q5_1,
# which ouvert's kernels do not run; Q4_1 and Q8_0 are the nearest they do.
K_FALLBACK = {"Q4_K": "Q4_1", "Q5_K": "Q8_0", "Q6_K": "Q8_0"}


def _more_bits(layer: int, n_layers: int) -> bool:
    """The layers a *_K_M mix gives more bits to (llama.cpp's rule): the first and last eighth of
    the stack, and every third layer in between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= n_layers - eighth or (layer - eighth) % 3 == 2


def block_plan(model: nn.Module, scheme: str) -> dict[str, str]:
    """module name -> block type name, for every float linear layer of the body, the embedding and
    an untied head. Plain schemes put the body and the embedding in their one type and the output
    head (the embedding too when it is tied) in Q8_0 for q8_0, else Q6_K, since the head's errors
    reach the logits undiluted. The _m mixes put attention's v_proj and the MLP's down_proj (the
    routed experts' too) of the `_more_bits` layers in Q6_K and the rest in Q4_K (Q5_K). DeepSeek's
    stacked routed experts get an entry per projection (`layers.3.mlp.experts.down_proj`); MLA's
    kv_b_proj and the MTP module's eh_proj stay float."""
    if scheme not in BLOCK_SCHEMES:
        raise QuantizeError(f"unknown block scheme {scheme!r}; choose from {', '.join(BLOCK_SCHEMES)}")
    base = scheme.removesuffix("_m").upper()
    head_type = "Q8_0" if scheme == "q8_0" else "Q6_K"
    n_layers = model.config.num_hidden_layers
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    plan: dict[str, str] = {}
    stacks = [f"{e}.{w}" for e in expert_names(model) for w in EXPERT_PROJS]
    for name in [*linear_names(model), *stacks]:
        t = base
        if scheme.endswith("_m") and name.rsplit(".", 1)[-1] in ("v_proj", "down_proj"):
            parts = name.split(".")
            if parts[0] == "layers" and _more_bits(int(parts[1]), n_layers):
                t = "Q6_K"
        plan[name] = t
    if isinstance(getattr(model, "embed_tokens", None), nn.Embedding):
        plan["embed_tokens"] = head_type if tied else base
    if head_name(model):
        plan[HEAD] = head_type
    for name, t in plan.items():  # rows that do not split into the type's blocks
        k = _float_rows(model, name).shape[-1]
        if k % kernels.TYPES[t].values:
            t = K_FALLBACK.get(t, t)
        if k % kernels.TYPES[t].values:
            raise QuantizeError(f"{name!r} has rows of {k} values, not a multiple of {t}'s blocks of "
                                f"{kernels.TYPES[t].values}")
        plan[name] = t
    return plan


def quantize_to_blocks(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize a float Transformer in place into GGUF's block formats (block_plan): encode, swap
    for BlockLinear / BlockEmbedding, assign; the tensor types go into its quantization_config, so
    that save_model writes them and load_model (and `ouvert export gguf`) reads them back."""
    if any(isinstance(m, (*QUANTIZED, BlockLinear, BlockEmbedding, BlockExperts)) for m in model.modules()):
        raise QuantizeError(f"the model is quantized already ({model.config.extra.get('quantization_config')})")
    plan = block_plan(model, scheme)
    dtype = model.embed_tokens.weight.dtype
    state = {}
    for name, t in plan.items():
        w = _float_rows(model, name).detach()
        if w.dim() == 3:  # a stack of routed experts, each encoded alone
            state[name] = torch.stack([encode(we, t) for we in w])
            continue
        m = model.get_submodule(name)
        state[f"{name}.weight"] = encode(w, t)
        if getattr(m, "bias", None) is not None:
            state[f"{name}.bias"] = m.bias.detach()
    types = {n: kernels.TYPES[t].id for n, t in plan.items()}
    tied = model.config.tie_word_embeddings and "embed_tokens" in types
    if tied:
        types[HEAD] = types["embed_tokens"]  # the head reads the embedding's blocks
    swap_for_blocks(model, types, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    model.config.extra["quantization_config"] = block_config(model, plan)
    return model


def _is_stack(model: nn.Module, name: str) -> bool:
    """Whether a block_plan entry names a stack of routed experts (`layers.3.mlp.experts.up_proj`)."""
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), Experts)


def _float_rows(model: nn.Module, name: str) -> Tensor:
    """The weight a block_plan entry names: a layer's (out, in), or a stack of experts' (E, out, in)."""
    return model.get_parameter(name) if _is_stack(model, name) else model.get_submodule(name).weight


def block_config(model: nn.Module, types: dict[str, str | int]) -> dict:
    """config.json's record of a block model: {"quant_method": "gguf", "tensor_types": {HF tensor
    name: GGML type name}}, one entry per tensor kept in blocks (a tied head is the embedding's)."""
    names = {}
    for name, t in types.items():
        if name == HEAD and model.config.tie_word_embeddings:
            continue
        for key in hf_names(name if _is_stack(model, name) else f"{name}.weight", model.config):  # one per expert
            names[key] = kernels.block_type(t).name
    return {"quant_method": "gguf", "tensor_types": dict(sorted(names.items()))}


def block_types(qc: dict, cfg, where: Path | str) -> dict[str, int]:
    """block_config's inverse on a model config: our module name -> GGML type id (the tied head
    added), a CheckpointError naming the file and the entry for anything ouvert cannot run."""
    out: dict[str, int] = {}
    stacks: dict[str, dict[int, int]] = {}  # routed experts: stack name -> {expert: type}
    tensor_types = qc.get("tensor_types")
    if not isinstance(tensor_types, dict) or not tensor_types:
        raise CheckpointError(f"{where}: quantization_config: quant_method 'gguf' needs a tensor_types table "
                              "(HF tensor name -> GGML type)")
    for key, t in tensor_types.items():
        named = our_name(key, cfg)
        if named is None or (named[1] is None and not named[0].endswith(".weight")):
            raise CheckpointError(f"{where}: quantization_config.tensor_types: {key!r} is not a weight that "
                                  "ouvert keeps in blocks")
        try:
            qtype = kernels.block_type(str(t)).id
        except ValueError as e:
            raise CheckpointError(f"{where}: quantization_config.tensor_types[{key!r}]: {e}") from None
        if named[1] is None:
            out[named[0].removesuffix(".weight")] = qtype
        else:
            stacks.setdefault(named[0], {})[named[1]] = qtype
    for name, per_expert in stacks.items():  # a stack holds one type: every expert's entry, alike
        if len(per_expert) != cfg.n_routed_experts or len(set(per_expert.values())) != 1:
            raise CheckpointError(f"{where}: quantization_config.tensor_types: the routed experts' {name!r} need "
                                  f"one entry of the same type for each of the {cfg.n_routed_experts} experts")
        out[name] = next(iter(per_expert.values()))
    if cfg.tie_word_embeddings and "embed_tokens" in out:
        out[HEAD] = out["embed_tokens"]
    return out


class Int8Experts(Experts):
    """Routed experts with int8 weights, stacked as Experts' are: for w in gate_proj, up_proj and
    down_proj, `w` int8 (E, out, in) and `w_scale` (E, out), each expert quantized as Int8Linear."""

    def __init__(self, n: int, dim: int, hidden: int, dtype=torch.float32, device=None):
        nn.Module.__init__(self)  # not Experts': no float parameters
        self.n_experts, self.row_tile, self.use_kernel = n, None, True
        for w, (out_f, in_f) in expert_shapes(dim, hidden).items():
            self.register_buffer(w, torch.empty(n, out_f, in_f, dtype=torch.int8, device=device))
            self.register_buffer(f"{w}_scale", torch.empty(n, out_f, dtype=dtype, device=device))

    def weights(self, w: str, idx, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int8(getattr(self, w)[idx], getattr(self, f"{w}_scale")[idx], dtype)

    def proj(self, w: str, e: int, x: Tensor) -> Tensor:
        if self.use_kernel and _cpu_kernel(x):
            return int8_mm(x, getattr(self, w)[e], getattr(self, f"{w}_scale")[e])
        return x @ self.weights(w, e, x.dtype).T

    def gathered(self, x: Tensor, expert_idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        if not (self.use_kernel and _experts_kernel(x, self.row_tile)):
            return super().gathered(x, expert_idx, weight)
        tensors = [getattr(self, f"{w}{part}") for w in EXPERT_PROJS for part in ("", "_scale")]
        y = torch.ops.ouvert.int8_experts(x, expert_idx, weight, *tensors, self.row_tile or 0)
        return y, expert_counts(expert_idx, self.n_experts)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, int8 per channel"


class Int4Experts(Experts):
    """Routed experts with int4 weights, stacked: for w in gate_proj, up_proj and down_proj,
    `w_packed` uint8 (E, out, in/2), `w_scale` and `w_zero` (E, out, in/G), each expert as Int4Linear.
    Not persistent: the kernel's per-expert copies `w_kernel`, `w_kernel_sz`, made by `pack()`."""

    def __init__(self, n: int, dim: int, hidden: int, group_size: int, dtype=torch.float32, device=None):
        nn.Module.__init__(self)
        self.n_experts, self.row_tile, self.use_kernel, self.group_size = n, None, True, group_size
        for w, (out_f, in_f) in expert_shapes(dim, hidden).items():
            self.register_buffer(f"{w}_packed", torch.empty(n, out_f, in_f // 2, dtype=torch.uint8, device=device))
            for part in ("scale", "zero"):
                self.register_buffer(f"{w}_{part}", torch.empty(n, out_f, in_f // group_size, dtype=dtype,
                                                                device=device))
            self.register_buffer(f"{w}_kernel", None, persistent=False)
            self.register_buffer(f"{w}_kernel_sz", None, persistent=False)

    def pack(self) -> None:
        """Each expert's weights in the CPU kernel's layout, stacked (after the tensors are in place)."""
        for w in EXPERT_PROJS:
            packed, scale, zero = (getattr(self, f"{w}_{part}") for part in ("packed", "scale", "zero"))
            kernel = sz = None
            if packed.device.type == "cpu" and packed.shape[1] % 16 == 0:
                kernel, sz = (torch.stack(t) for t in zip(*map(int4_kernel_layout, packed, scale, zero)))
            setattr(self, f"{w}_kernel", kernel)
            setattr(self, f"{w}_kernel_sz", sz)

    def weights(self, w: str, idx, dtype: torch.dtype | None = None) -> Tensor:
        return dequantize_int4(getattr(self, f"{w}_packed")[idx], getattr(self, f"{w}_scale")[idx],
                               getattr(self, f"{w}_zero")[idx], self.group_size, dtype)

    def proj(self, w: str, e: int, x: Tensor) -> Tensor:
        kernel = getattr(self, f"{w}_kernel")
        if self.use_kernel and kernel is not None and _cpu_kernel(x):
            return int4_mm(x, kernel[e], self.group_size, getattr(self, f"{w}_kernel_sz")[e])
        return x @ self.weights(w, e, x.dtype).T

    def gathered(self, x: Tensor, expert_idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        if not (self.use_kernel and self.gate_proj_kernel is not None and _experts_kernel(x, self.row_tile)):
            return super().gathered(x, expert_idx, weight)
        tensors = [getattr(self, f"{w}{part}") for w in EXPERT_PROJS for part in ("_kernel", "_kernel_sz")]
        y = torch.ops.ouvert.int4_experts(x, expert_idx, weight, *tensors, self.group_size, self.row_tile or 0)
        return y, expert_counts(expert_idx, self.n_experts)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, int4 group_size={self.group_size}"


# Under torch.compile a decode step's routed experts would otherwise take Experts.gathered, whose
# dequantizing reductions inductor compiles into loops slower than torch's kernels (int4: 15 against
# 22 tok/s eager on the DeepSeek-V3 bench shape). These ops are the eager sorted dispatch on the
# kernels, opaque to the compiler: the step stays one graph, and compiled equals eager exactly.


@torch.library.custom_op("ouvert::int8_experts", mutates_args=())
def _int8_experts(x: Tensor, expert_idx: Tensor, weight: Tensor, gate: Tensor, gate_scale: Tensor,
                  up: Tensor, up_scale: Tensor, down: Tensor, down_scale: Tensor, row_tile: int) -> Tensor:
    def expert(e: int, xe: Tensor) -> Tensor:
        h = F.silu(int8_mm(xe, gate[e], gate_scale[e])) * int8_mm(xe, up[e], up_scale[e])
        return int8_mm(h, down[e], down_scale[e])

    return sorted_dispatch(x, expert_idx, weight, gate.shape[0], expert, row_tile or None)[0]


@torch.library.custom_op("ouvert::int4_experts", mutates_args=())
def _int4_experts(x: Tensor, expert_idx: Tensor, weight: Tensor, gate: Tensor, gate_sz: Tensor, up: Tensor,
                  up_sz: Tensor, down: Tensor, down_sz: Tensor, group_size: int, row_tile: int) -> Tensor:
    def expert(e: int, xe: Tensor) -> Tensor:
        h = F.silu(int4_mm(xe, gate[e], group_size, gate_sz[e])) * int4_mm(xe, up[e], group_size, up_sz[e])
        return int4_mm(h, down[e], group_size, down_sz[e])

    return sorted_dispatch(x, expert_idx, weight, gate.shape[0], expert, row_tile or None)[0]


@_int8_experts.register_fake
def _(x, *args):
    return torch.empty_like(x)


@_int4_experts.register_fake
def _(x, *args):
    return torch.empty_like(x)


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_shapes(dim: int, hidden: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each routed expert projection."""
    return {"gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}


# ---- integer math ------------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """(..., out, in) integers in [0, 15] -> uint8 (..., out, in/2), column 2j in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of pack_int4: uint8 (..., out, in/2) -> uint8 (..., out, in)."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).view(*p.shape[:-1], -1)


def dequantize_int8(weight: Tensor, scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """int8 (..., out, in) and scale (..., out) -> the float weight, in dtype (default the scale's)."""
    dtype = dtype or scale.dtype
    # int8 times the scale is exact in float32 and rounds once in bfloat16: no float32 detour needed
    return weight.to(dtype) * scale.to(dtype)[..., None]


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, group_size: int,
                    dtype: torch.dtype | None = None) -> Tensor:
    """packed uint8 (..., out, in/2), scale and zero (..., out, in/G) -> the float weight (..., out, in)."""
    *lead, out_f, n_groups = scale.shape
    w = unpack_int4(packed).view(*lead, out_f, n_groups, group_size).float()
    w.sub_(8).mul_(scale.float()[..., None]).add_(zero.float()[..., None])  # in place: one float32 buffer
    return w.view(*lead, out_f, n_groups * group_size).to(dtype or scale.dtype)


def int8_mm(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """x (n, in) @ (weight * scale[:, None]).T by torch's CPU kernel."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scale.to(x.dtype))


def int4_kernel_layout(packed: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """One (out, in) int4 weight in the CPU kernel's layout: its packed weight, and scale and zero
    transposed and interleaved, (in/G, out, 2), as the kernel wants them (needs out % 16 == 0)."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)
    return weight, torch.stack([scale.T, zero.T], dim=-1).contiguous()


def int4_mm(x: Tensor, kernel_weight: Tensor, group_size: int, scale_zero: Tensor) -> Tensor:
    """x (n, in) @ w.T by torch's CPU kernel, w in int4_kernel_layout's form."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel_weight, group_size, scale_zero.to(x.dtype))


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (out, in) float -> int8 weight (out, in), scale (out,) in w's dtype."""
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12).to(w.dtype)  # round the scale first, then divide by it
    q = (wf / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in) float -> packed uint8 (out, in/2), scale and zero (out, in/group_size) in w's dtype."""
    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(w.dtype)
    zero = (lo + 8 * scale.float()).to(w.dtype)  # the value q = 8 stands for
    s, z = scale.float()[..., None], zero.float()[..., None]
    q = ((g - z) / s + 8).round().clamp(0, 15).view(out_f, in_f)
    return pack_int4(q), scale, zero


# ---- the pair: state-dict transform, module swap ----------------------------------------------------


def linear_names(model: nn.Module) -> list[str]:
    """The nn.Linear layers of the body to quantize in the model's scheme (module names), in model
    order: the head is not one of them (see head_name)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name != HEAD and name.rsplit(".", 1)[-1] not in KEEP_FLOAT]


def head_name(model: nn.Module) -> str | None:
    """HEAD when the model has a float head of its own to quantize (in HEAD_SCHEME); None when
    there is none or it is tied to the embedding (its weight is embed_tokens.weight)."""
    head = getattr(model, HEAD, None)
    if type(head) is not nn.Linear:
        return None
    embed = getattr(model, "embed_tokens", None)
    if getattr(model.config, "tie_word_embeddings", False) or (embed is not None and head.weight is embed.weight):
        return None
    return HEAD


def expert_names(model: nn.Module) -> list[str]:
    """The float routed experts (Experts modules) to quantize, in model order."""
    return [name for name, m in model.named_modules() if type(m) is Experts]


def in_features(model: nn.Module, names: list[str], experts: list[str] = ()) -> dict[str, int]:
    """in_features of each layer to quantize: the Linears by module name, the experts' projections
    as `{module}.{projection}`."""
    out = {n: model.get_submodule(n).in_features for n in names}
    for n in experts:
        out.update((f"{n}.{w}", getattr(model.get_submodule(n), w).shape[-1]) for w in EXPERT_PROJS)
    return out


def check_scheme(scheme: str, group_size: int | None) -> None:
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    if scheme == "int8" and group_size is not None:
        raise QuantizeError("int8 is per output channel and takes no group size")
    if scheme == "int4" and group_size is not None and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size {group_size} is not one of {', '.join(map(str, GROUP_SIZES))} "
                            "(what torch's int4 kernel supports)")


def choose_group_size(in_features: dict[str, int], group_size: int | None) -> int:
    """The given int4 group size, checked against every layer; by default 128 when it divides every
    in_features, else 32. Errors name the first layer it does not divide."""
    for g in (group_size,) if group_size is not None else DEFAULT_GROUP_SIZES:
        bad = [(n, k) for n, k in in_features.items() if k % g]
        if not bad:
            return g
    name, k = bad[0]
    raise QuantizeError(f"int4 group size {g} does not divide in_features {k} of layer {name!r}"
                        + (f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""))


# What a quantized weight `key` becomes: `key + suffix` for each of the scheme's tensors.
SUFFIXES = {"int8": ("", "_scale"), "int4": ("_packed", "_scale", "_zero")}


def quantize_state_dict(state: dict[str, Tensor], names: list[str], scheme: str,
                        group_size: int | None = None, experts: list[str] = ()) -> dict[str, Tensor]:
    """The transform: for each module name in `names`, `{name}.weight` (float, 2-D) becomes the
    scheme's tensors (see the module docstring); for each routed-experts module in `experts`,
    `{name}.{w}` (float, stacked (E, out, in)) becomes the same tensors stacked, one expert at a
    time; every other entry passes through unchanged."""
    check_scheme(scheme, group_size)
    targets = {f"{n}.weight": 2 for n in names} | {f"{n}.{w}": 3 for n in experts for w in EXPERT_PROJS}
    missing = sorted(targets.keys() - state.keys())
    if missing:
        raise QuantizeError(f"state dict has no {missing[0]!r} to quantize")
    quantize = quantize_int8 if scheme == "int8" else partial(quantize_int4, group_size=group_size)
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key not in targets:
            out[key] = t
            continue
        if not t.is_floating_point() or t.dim() != targets[key]:
            raise QuantizeError(f"{key!r}: expected a {targets[key]}-D float weight, got {t.dtype} {tuple(t.shape)}")
        if scheme == "int4" and (group_size is None or t.shape[-1] % group_size):
            raise QuantizeError(f"int4 group size {group_size} does not divide in_features {t.shape[-1]} "
                                f"of {key!r}")
        parts = quantize(t) if t.dim() == 2 else [torch.stack(p) for p in zip(*map(quantize, t))]
        out.update(zip((key + s for s in SUFFIXES[scheme]), parts))
    return out


def swap_linears(model: nn.Module, names: list[str], scheme: str, group_size: int | None,
                 device: torch.device | str = "meta") -> None:
    """The swap: replace each named nn.Linear with an empty Int8Linear / Int4Linear (on `device`,
    meta by default, to be filled with load_state_dict(assign=True)), keeping its dtype."""
    check_scheme(scheme, group_size)
    for name in names:
        lin = model.get_submodule(name)
        if type(lin) is not nn.Linear:
            raise QuantizeError(f"{name!r} is {type(lin).__name__}, not nn.Linear")
        args = (lin.in_features, lin.out_features, lin.bias is not None)
        kw = dict(dtype=lin.weight.dtype, device=device)
        q = Int8Linear(*args, **kw) if scheme == "int8" else Int4Linear(*args, group_size, **kw)
        model.set_submodule(name, q)


def swap_experts(model: nn.Module, names: list[str], scheme: str, group_size: int | None,
                 device: torch.device | str = "meta") -> None:
    """swap_linears for routed experts: each named Experts becomes an empty Int8Experts /
    Int4Experts of the same shapes, dtype and row_tile."""
    check_scheme(scheme, group_size)
    for name in names:
        ex = model.get_submodule(name)
        if type(ex) is not Experts:
            raise QuantizeError(f"{name!r} is {type(ex).__name__}, not Experts")
        n, hidden, dim = ex.gate_proj.shape
        kw = dict(dtype=ex.gate_proj.dtype, device=device)
        q = Int8Experts(n, dim, hidden, **kw) if scheme == "int8" else Int4Experts(n, dim, hidden, group_size, **kw)
        q.row_tile = ex.row_tile
        model.set_submodule(name, q)


QUANTIZED = (Int8Linear, Int4Linear, Int8Experts, Int4Experts)


def quantized_numel(model: nn.Module) -> int:
    """How many weights the quantized modules stand for (they hold buffers, not parameters); a
    tied head that reads the embedding's blocks is counted once."""
    n, seen = 0, set()
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            n += m.in_features * m.out_features
        elif isinstance(m, Int8Experts):
            n += sum(getattr(m, w).numel() for w in EXPERT_PROJS)
        elif isinstance(m, Int4Experts):
            n += sum(2 * getattr(m, f"{w}_packed").numel() for w in EXPERT_PROJS)
        elif isinstance(m, (BlockLinear, BlockEmbedding)) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.shape[0] * kernels.row_values(m.weight, m.qtype)
    return n


def describe_quantization(model: nn.Module) -> str | None:
    """One line on what is quantized (`ouvert info`, `ouvert quantize`), or None for a float model."""
    qc = model.config.extra.get("quantization_config") or {}
    if qc.get("quant_method") == "gguf":
        n = sum(isinstance(m, BlockLinear) for m in model.modules())
        e = sum(isinstance(m, BlockExperts) for m in model.modules())
        emb = " and the embedding" if isinstance(getattr(model, "embed_tokens", None), BlockEmbedding) else ""
        kinds = ", ".join(sorted(set(qc["tensor_types"].values())))
        experts = f", {e} routed-expert layers" if e else ""
        return f"GGUF blocks ({kinds}) run as stored: {n} linear layers{experts}{emb}"
    if qc.get("quant_method") != QUANT_METHOD:
        return None
    g = qc.get("group_size")
    n = sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    e = sum(isinstance(m, (Int8Experts, Int4Experts)) for m in model.modules())
    head = getattr(model, HEAD, None)
    if isinstance(head, Int8Linear):
        head_note = " (the output head in int8)"
    elif head is not None and head.weight is getattr(model, "embed_tokens", head).weight:
        head_note = " (the output head, tied to the embedding, in float)"
    else:
        head_note = " (the output head in float)"
    return (f"{qc.get('scheme')}" + (f", group size {g}" if g else "") + f", {n} linear layers{head_note}"
            + (f" and {e} routed-expert layers" if e else "") + " quantized")


def pack_for_kernels(model: nn.Module) -> nn.Module:
    """Make the int4 kernels' packed copies (after the quantized tensors are in place)."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int4Experts)):
            m.pack()
    return model


def quantization_config(scheme: str, group_size: int | None, head: str | None = None) -> dict:
    """config.json's record: the body's scheme and group size, and the head's scheme (None: float)."""
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size, "head": head}


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None) -> nn.Module:
    """Quantize a float Transformer in place (transform, swap, assign) and record the scheme in its
    config, so that save_model writes a checkpoint load_model reads back."""
    if scheme in BLOCK_SCHEMES:
        if group_size is not None:
            raise QuantizeError(f"{scheme} has its own block size and takes no group size")
        return quantize_to_blocks(model, scheme)
    check_scheme(scheme, group_size)
    if any(isinstance(m, QUANTIZED) for m in model.modules()):
        raise QuantizeError(f"the model is quantized already ({model.config.extra.get('quantization_config')})")
    names, experts, head = linear_names(model), expert_names(model), head_name(model)
    if scheme == "int4":
        group_size = choose_group_size(in_features(model, names, experts), group_size)

    def linear_state(names: list[str]) -> dict[str, Tensor]:
        state = {}
        for n in names:
            lin = model.get_submodule(n)
            state[f"{n}.weight"] = lin.weight.detach()
            if lin.bias is not None:
                state[f"{n}.bias"] = lin.bias.detach()
        return state

    state = linear_state(names)
    for n in experts:
        state.update((f"{n}.{w}", getattr(model.get_submodule(n), w).detach()) for w in EXPERT_PROJS)
    qstate = quantize_state_dict(state, names, scheme, group_size, experts)
    heads = [head] if head else []
    qstate.update(quantize_state_dict(linear_state(heads), heads, HEAD_SCHEME))
    swap_linears(model, names, scheme, group_size)
    swap_linears(model, heads, HEAD_SCHEME, None)
    swap_experts(model, experts, scheme, group_size)
    model.load_state_dict(qstate, strict=False, assign=True)
    pack_for_kernels(model)
    model.config.extra["quantization_config"] = quantization_config(scheme, group_size,
                                                                    HEAD_SCHEME if head else None)
    return model


def read_quantization_config(qc: dict, where: Path | str) -> tuple[str, int | None, str | None]:
    """(scheme, group_size, head) of an ouvert quantization_config, head None for a float head (and
    for configs written before the head was quantized, which have no "head"); a CheckpointError
    naming the file and the field for anything else."""
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not one "
                              f"ouvert reads (it reads 'fp8' and {QUANT_METHOD!r})")
    scheme, group_size, head = qc.get("scheme"), qc.get("group_size"), qc.get("head")
    try:
        check_scheme(scheme, group_size)
        if scheme == "int4" and group_size is None:
            raise QuantizeError("int4 needs a group_size")
        if head is not None and head not in HEAD_SCHEMES:
            raise QuantizeError(f"head {head!r} is not one ouvert reads ({', '.join(HEAD_SCHEMES)} or null)")
    except QuantizeError as e:
        raise CheckpointError(f"{where}: quantization_config: {e}") from None
    return scheme, group_size, head


def prepare_for_load(model: nn.Module, qc: dict, where: Path | str) -> None:
    """load_model's hook: swap the meta model's Linears and routed experts for the checkpoint's
    scheme, and its head for the head's scheme if it has one (else the head stays float)."""
    if qc.get("quant_method") == "gguf":
        dtype = getattr(torch, model.config.torch_dtype or "float32")  # the activations' (norms stay float)
        swap_for_blocks(model, block_types(qc, model.config, where), dtype)
        return
    scheme, group_size, head = read_quantization_config(qc, where)
    swap_linears(model, linear_names(model), scheme, group_size)
    swap_experts(model, expert_names(model), scheme, group_size)
    if head is not None:
        if head_name(model) is None:
            raise CheckpointError(f"{where}: quantization_config: head {head!r}, but the model's head is tied "
                                  "to the embedding (tie_word_embeddings), which stays float")
        swap_linears(model, [HEAD], head, None)


