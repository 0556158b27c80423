"""Weight-only quantization, as a pair (gpt-fast's QuantHandler): transform the weights, swap the modules.

Rooms:
  common.py   which layers are quantized (by name), QuantizeError, dequantize-then-matmul
  integer.py  int8 per output channel, int4 in groups: modules, integer math, the state-dict transform
  blocks.py   GGUF's block formats as modules (run by ouvert's kernels), block_plan, quantize_to_blocks
  rows.py     the float-rows view: a float model on ouvert's kernels without a copy
and here the doors every scheme goes through: quantize_model, prepare_for_load (checkpoint loading's
hook), describe_quantization and quantized_numel (`ouvert info`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ouvert import kernels
from ouvert.checkpoint.base import CheckpointError
from ouvert.quantize.blocks import (
    BLOCK_KERNEL_MAX_ROWS,
    BLOCK_SCHEMES,
    BlockEmbedding,
    BlockExperts,
    BlockLinear,
    BlockMLAttention,
    BlockRouter,
    block_config,
    block_plan,
    block_types,
    prefill_on_kernels,
    quantize_to_blocks,
    swap_for_blocks,
)
from ouvert.quantize.common import (
    EXPERT_PROJS,
    HEAD,
    KEEP_FLOAT,
    QuantizeError,
    expert_names,
    head_name,
    in_features,
    linear_names,
)
from ouvert.quantize.integer import (
    HEAD_SCHEME,
    KERNEL_MAX_ROWS,
    QUANT_METHOD,
    QUANTIZED,
    Int4Experts,
    Int4Linear,
    Int8Experts,
    Int8Linear,
    check_scheme,
    choose_group_size,
    dequantize_int4,
    dequantize_int8,
    pack_for_kernels,
    pack_int4,
    quantization_config,
    quantize_int4,
    quantize_int8,
    quantize_state_dict,
    read_quantization_config,
    swap_experts,
    swap_linears,
    unpack_int4,
)
from ouvert.quantize.rows import float_rows_view

__all__ = ["block_config", "BLOCK_KERNEL_MAX_ROWS", "block_plan", "BLOCK_SCHEMES", "block_types",
    "BlockEmbedding", "BlockExperts", "BlockLinear", "BlockMLAttention", "BlockRouter", "check_scheme",
    "choose_group_size", "dequantize_int4", "dequantize_int8", "describe_quantization", "expert_names",
    "EXPERT_PROJS", "float_rows_view", "HEAD", "head_name", "HEAD_SCHEME", "in_features", "Int4Experts",
    "Int4Linear", "Int8Experts", "Int8Linear", "KEEP_FLOAT", "KERNEL_MAX_ROWS", "linear_names",
    "pack_for_kernels", "pack_int4", "prefill_on_kernels", "prepare_for_load", "QUANT_METHOD",
    "quantization_config", "quantize_int4", "quantize_int8", "quantize_model", "quantize_state_dict",
    "quantize_to_blocks", "QUANTIZED", "quantized_numel", "QuantizeError", "read_quantization_config",
    "swap_experts", "swap_for_blocks", "swap_linears", "unpack_int4"]


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
