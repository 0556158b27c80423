"""GGUF's block formats as modules, and float weights written into them.

BlockLinear, BlockEmbedding and BlockExperts hold GGUF blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) as
the file stores them, multiplied by ouvert's kernels (ouvert/kernels/); BlockRouter and
BlockMLAttention are the float modules the float-rows view (rows.py) swaps in. `block_plan` picks a
type per tensor (one type, or llama.cpp's *_K_M mixes), `quantize_to_blocks` encodes
(ouvert/kernels/encode.py) and swaps; `block_config` / `block_types` are config.json's record of it.
"""

from __future__ import annotations

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
from ouvert.quantize.common import (
    EXPERT_PROJS,
    HEAD,
    QuantizeError,
    dequantized_linear,
    expert_names,
    expert_shapes,
    head_name,
    is_stack,
    linear_names,
)
from ouvert.quantize.integer import QUANTIZED

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
        if is_stack(model, name):
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


def _float_rows(model: nn.Module, name: str) -> Tensor:
    """The weight a block_plan entry names: a layer's (out, in), or a stack of experts' (E, out, in)."""
    return model.get_parameter(name) if is_stack(model, name) else model.get_submodule(name).weight


def block_config(model: nn.Module, types: dict[str, str | int]) -> dict:
    """config.json's record of a block model: {"quant_method": "gguf", "tensor_types": {HF tensor
    name: GGML type name}}, one entry per tensor kept in blocks (a tied head is the embedding's)."""
    names = {}
    for name, t in types.items():
        if name == HEAD and model.config.tie_word_embeddings:
            continue
        for key in hf_names(name if is_stack(model, name) else f"{name}.weight", model.config):  # one per expert
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
