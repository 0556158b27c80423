"""What every scheme shares: which layers are quantized (by name), the error, and the
dequantize-then-matmul path the kernels fall back to."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.model import Experts

# nn.Linear layers left in float (see the module docstring); matched on the last part of the name.
KEEP_FLOAT = ("kv_b_proj", "eh_proj")


HEAD = "lm_head"  # the output head: quantized apart from the body, in HEAD_SCHEME, unless tied


class QuantizeError(ValueError):
    """A scheme, group size or layer that cannot be quantized; the message names it."""


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


def is_stack(model: nn.Module, name: str) -> bool:
    """Whether a block_plan entry names a stack of routed experts (`layers.3.mlp.experts.up_proj`)."""
    parent = name.rpartition(".")[0]
    return bool(parent) and isinstance(model.get_submodule(parent), Experts)


EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_shapes(dim: int, hidden: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each routed expert projection."""
    return {"gate_proj": (hidden, dim), "up_proj": (hidden, dim), "down_proj": (dim, hidden)}


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
