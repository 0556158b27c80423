"""Weight-only quantization: int8 per output channel, int4 in groups along the input features.

A pair, as gpt-fast's QuantHandler: `quantize_state_dict` turns float weights into integers and
scales, `swap_linears` puts modules that hold them in place of nn.Linear; `quantize_model` does
both on a live model. Activations stay in the model's dtype (float32, bfloat16); the matmuls run
through torch's own CPU kernels, with a dequantize-then-matmul path (`dequantize()`) elsewhere and
for the tests to hold them against.

  int8  symmetric per output channel: w[o, i] ~ weight[o, i] * weight_scale[o],
        weight int8 in [-127, 127], weight_scale = max|w[o, :]| / 127.
        Kernel: aten._weight_int8pack_mm(x, weight, weight_scale).
  int4  asymmetric per group of `group_size` input features (32, 64, 128 or 256):
        w[o, i] ~ (q[o, i] - 8) * weight_scale[o, g] + weight_zero[o, g], g = i // group_size,
        q in [0, 15] (the group's min maps to 0, its max to 15; weight_zero is the value q = 8 stands for).
        Stored portably as weight_packed uint8 (out, in/2): column 2j in the low nibble, 2j+1 in the
        high one. At load it is repacked into the layout of aten._weight_int4pack_mm_for_cpu, which is
        an implementation detail of torch and never written to disk (needs out_features % 16 == 0).

What stays in float: the embedding, the norms, the routers, lm_head (tied to the embedding in the
small Llamas, and the layer whose errors reach the logits undiluted), DeepSeek's stacked routed
experts (Experts holds (E, out, in) parameters, not nn.Linear), MLA's kv_b_proj (the absorbed
decode path reads its weight directly) and the MTP module's eh_proj. Everything else that is an
nn.Linear (attention and MLP projections, shared experts) is quantized.

A checkpoint says so in config.json: "quantization_config": {"quant_method": "ouvert",
"scheme": "int8" | "int4", "group_size": G | null}. Tensor names are the Linear's own plus these
suffixes: int8 `.weight` (int8) and `.weight_scale`; int4 `.weight_packed`, `.weight_scale` and
`.weight_zero`. Scales keep the float weights' dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

QUANT_METHOD = "ouvert"
SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
DEFAULT_GROUP_SIZES = (128, 32)  # int4's default: the first that divides every quantized layer's in_features
# nn.Linear layers left in float (see the module docstring); matched on the last part of the name.
KEEP_FLOAT = ("lm_head", "kv_b_proj", "eh_proj")


class QuantizeError(ValueError):
    """A scheme, group size or layer that cannot be quantized; the message names it."""


# ---- the modules -----------------------------------------------------------------------------


# Rows (tokens) up to which torch's CPU kernels beat dequantize-then-matmul, per activation dtype, as
# measured on AVX-512 (576 x 1536 weights, one thread): in bfloat16 the kernels are 2x faster than
# the float matmul at one row and lose to dequantizing from about 48 rows (prefill); in float32 they
# run a scalar loop, even with dequantizing at one row and far slower above it.
KERNEL_MAX_ROWS = {torch.bfloat16: 32, torch.float16: 32, torch.float32: 1}


def _cpu_kernel(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= KERNEL_MAX_ROWS.get(x.dtype, 0)


class Int8Linear(nn.Module):
    """y = x @ (weight * weight_scale[:, None]).T + bias, weight int8 (out, in), weight_scale (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=torch.float32, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.use_kernel = True

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The float weight (out, in) these integers stand for."""
        dtype = dtype or self.weight_scale.dtype
        # int8 times the scale is exact in float32 and rounds once in bfloat16: no float32 detour needed
        return self.weight.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel and _cpu_kernel(x):
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                                   self.weight_scale.to(x.dtype))
            y = y.view(*lead, self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

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
        q = unpack_int4(self.weight_packed).to(torch.int32)  # (out, in)
        self.kernel_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # (in/G, out, 2): scale and zero, transposed, as the kernel wants them
        self.kernel_scale_zero = torch.stack([self.weight_scale.T, self.weight_zero.T], dim=-1).contiguous()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        out_f, n_groups = self.weight_scale.shape
        q = unpack_int4(self.weight_packed).view(out_f, n_groups, self.group_size).float()
        w = (q - 8) * self.weight_scale.float()[..., None] + self.weight_zero.float()[..., None]
        return w.view(out_f, self.in_features).to(dtype or self.weight_scale.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_kernel and self.kernel_weight is not None and _cpu_kernel(x):
            lead = x.shape[:-1]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.kernel_weight,
                                                           self.group_size, self.kernel_scale_zero.to(x.dtype))
            y = y.view(*lead, self.out_features)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


# ---- integer math ------------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """(out, in) integers in [0, 15] -> uint8 (out, in/2), column 2j in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(p: Tensor) -> Tensor:
    """Inverse of pack_int4: uint8 (out, in/2) -> uint8 (out, in)."""
    return torch.stack([p & 0xF, p >> 4], dim=-1).view(p.shape[0], -1)


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
    """The nn.Linear layers to quantize (module names), in model order."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] not in KEEP_FLOAT]


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


def quantize_state_dict(state: dict[str, Tensor], names: list[str], scheme: str,
                        group_size: int | None = None) -> dict[str, Tensor]:
    """The transform: for each module name in `names`, `{name}.weight` (float) becomes the scheme's
    tensors (see the module docstring); every other entry passes through unchanged."""
    check_scheme(scheme, group_size)
    targets = {f"{n}.weight" for n in names}
    missing = sorted(targets - state.keys())
    if missing:
        raise QuantizeError(f"state dict has no {missing[0]!r} to quantize")
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        if key not in targets:
            out[key] = t
            continue
        prefix = key.removesuffix("weight")
        if not t.is_floating_point() or t.dim() != 2:
            raise QuantizeError(f"{key!r}: expected a 2-D float weight, got {t.dtype} {tuple(t.shape)}")
        if scheme == "int8":
            out[prefix + "weight"], out[prefix + "weight_scale"] = quantize_int8(t)
        else:
            if group_size is None or t.shape[1] % group_size:
                raise QuantizeError(f"int4 group size {group_size} does not divide in_features {t.shape[1]} "
                                    f"of {key!r}")
            packed, scale, zero = quantize_int4(t, group_size)
            out[prefix + "weight_packed"], out[prefix + "weight_scale"], out[prefix + "weight_zero"] = (
                packed, scale, zero)
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


def pack_for_kernels(model: nn.Module) -> nn.Module:
    """Make the int4 kernels' packed copies (after the quantized tensors are in place)."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.pack()
    return model


def quantization_config(scheme: str, group_size: int | None) -> dict:
    return {"quant_method": QUANT_METHOD, "scheme": scheme, "group_size": group_size}


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None) -> nn.Module:
    """Quantize a float Transformer in place (transform, swap, assign) and record the scheme in its
    config, so that save_model writes a checkpoint load_model reads back."""
    check_scheme(scheme, group_size)
    if any(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules()):
        raise QuantizeError(f"the model is quantized already ({model.config.extra.get('quantization_config')})")
    names = linear_names(model)
    if scheme == "int4":
        group_size = choose_group_size({n: model.get_submodule(n).in_features for n in names}, group_size)
    state = {}
    for n in names:
        lin = model.get_submodule(n)
        state[f"{n}.weight"] = lin.weight.detach()
        if lin.bias is not None:
            state[f"{n}.bias"] = lin.bias.detach()
    qstate = quantize_state_dict(state, names, scheme, group_size)
    swap_linears(model, names, scheme, group_size)
    model.load_state_dict(qstate, strict=False, assign=True)
    pack_for_kernels(model)
    model.config.extra["quantization_config"] = quantization_config(scheme, group_size)
    return model


def read_quantization_config(qc: dict, where: Path | str) -> tuple[str, int | None]:
    """(scheme, group_size) of an ouvert quantization_config; a CheckpointError naming the file and
    the field for anything else."""
    from ouvert.checkpoint.hf import CheckpointError

    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config.quant_method {qc.get('quant_method')!r} is not one "
                              f"ouvert reads (it reads 'fp8' and {QUANT_METHOD!r})")
    scheme, group_size = qc.get("scheme"), qc.get("group_size")
    try:
        check_scheme(scheme, group_size)
        if scheme == "int4" and group_size is None:
            raise QuantizeError("int4 needs a group_size")
    except QuantizeError as e:
        raise CheckpointError(f"{where}: quantization_config: {e}") from None
    return scheme, group_size


def prepare_for_load(model: nn.Module, qc: dict, where: Path | str) -> None:
    """load_model's hook: swap the meta model's Linears for the checkpoint's scheme."""
    scheme, group_size = read_quantization_config(qc, where)
    swap_linears(model, linear_names(model), scheme, group_size)


def cli_quantize(args) -> None:
    """`ouvert quantize --model DIR --scheme int8|int4 [--group-size G] --out DIR`."""
    from ouvert import load_model, save_model
    from ouvert.tokenizer import load_tokenizer

    check_scheme(args.scheme, args.group_size)
    model = quantize_model(load_model(args.model), args.scheme, args.group_size)
    tok = load_tokenizer(args.model) if (Path(args.model) / "tokenizer.json").is_file() else None
    lineage = {"derived_by": f"ouvert quantize --scheme {args.scheme}"}
    if Path(args.model).is_dir():  # ouvert.json names the float checkpoint it came from
        from ouvert.checkpoint.manifest import parent_record

        lineage["parent"] = parent_record(args.model)
    save_model(model, args.out, tokenizer=tok, provenance=lineage)
    g = model.config.extra["quantization_config"]["group_size"]
    n = sum(isinstance(m, (Int8Linear, Int4Linear)) for m in model.modules())
    print(f"wrote {args.out}: {args.scheme}" + (f", group size {g}" if g else "") + f", {n} linear layers quantized")


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="weight-only int8 / int4 checkpoint (HF layout)")
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--scheme", required=True, help="int8 (per output channel) or int4 (groups)")
    p.add_argument("--group-size", type=int, default=None, help="int4: 32, 64, 128 or 256 (default 128, else 32)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cli_quantize)
