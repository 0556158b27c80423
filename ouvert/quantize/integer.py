"""int8 per output channel and int4 in groups along the input features, run by torch's own kernels.

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

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.checkpoint.base import CheckpointError
from ouvert.model import Experts, expert_counts, sorted_dispatch
from ouvert.quantize.common import (
    EXPERT_PROJS,
    QuantizeError,
    dequantized_linear,
    expert_shapes,
)

QUANT_METHOD = "ouvert"
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
DEFAULT_GROUP_SIZES = (128, 32)  # int4's default: the first that divides every quantized layer's in_features
HEAD_SCHEME = "int8"
HEAD_SCHEMES = (HEAD_SCHEME,)  # what a checkpoint's quantization_config.head may say, besides null


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


def pack_for_kernels(model: nn.Module) -> nn.Module:
    """Make the int4 kernels' packed copies (after the quantized tensors are in place)."""
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int4Experts)):
            m.pack()
    return model


def quantization_config(scheme: str, group_size: int | None, head: str | None = None) -> dict:
    """config.json's record: the body's scheme and group size, and the head's scheme (None: float)."""
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size, "head": head}


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


