"""The float-rows view: a float model whose Linears, experts and MLA heads multiply on ouvert's
kernels as F32 / BF16 / F16 rows, sharing the model's weights (no copy): each output row is summed
in a fixed order whatever the other rows, which is what lets the serving engine batch without
changing a request's numbers."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ouvert import kernels
from ouvert.model import Experts, MLAttention, Router
from ouvert.quantize.blocks import BlockExperts, BlockLinear, BlockMLAttention, BlockRouter
from ouvert.quantize.common import EXPERT_PROJS
from ouvert.quantize.integer import QUANTIZED

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
