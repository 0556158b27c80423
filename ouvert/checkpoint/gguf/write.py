"""Export: a Transformer and its tokenizer written as a GGUF file llama.cpp and Ollama run.

llama.cpp's `llama` architecture for the Llama family and `deepseek2` for DeepSeek-V2/V3, with the
tokenizer and the chat template in the metadata, and every setting written explicitly rather than
left to llama.cpp's defaults: rope base and scaling, norm eps, head counts, head sizes, context
length, and for DeepSeek the expert gating function (transformers 5 leaves `scoring_func` out of
V3's config.json, and llama.cpp assumes softmax without it), expert groups, weight normalisation
and scale. DeepSeek's MTP modules are not exported: llama.cpp's deepseek2 does not run them (its
converter drops them too); `write_gguf` says so. The gguf package cannot write k-quants (q4_k_m,
...): quantize the f16 file with llama.cpp's llama-quantize, or ouvert's blocks (`ouvert quantize`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.gguf.codec import TYPES, encode_tensor, file_type, gguf_lib, tensor_type
from ouvert.checkpoint.gguf.names import ARCHITECTURES, gguf_names, llama3_rope_factors, to_gguf
from ouvert.checkpoint.gguf.vocab import tokenizer_meta, write_tokenizer_meta
from ouvert.config import ModelConfig
from ouvert.kernels import BY_ID, row_values
from ouvert.model import Transformer
from ouvert.quantize import BLOCK_SCHEMES, BlockEmbedding, BlockExperts, BlockLinear, quantize_model


def _check_exportable(cfg: ModelConfig) -> str:
    arch = ARCHITECTURES.get(cfg.model_type)
    if arch is None:
        raise CheckpointError(
            f"GGUF export of model_type {cfg.model_type!r} is not supported; ouvert exports "
            f"{', '.join(ARCHITECTURES)}"
        )
    if arch == "deepseek2" and cfg.attention_bias:
        raise CheckpointError("GGUF export: llama.cpp's deepseek2 has no attention biases (attention_bias is true)")
    if cfg.qk_norm or cfg.sliding_window:
        raise CheckpointError("GGUF export: llama.cpp's llama architecture has no q/k norm or sliding window")
    return arch


def _write_metadata(w, cfg: ModelConfig, arch: str, name: str, ftype) -> list[str]:
    """Every setting, explicitly. Returns notes for the user (what llama.cpp will do differently)."""
    g = gguf_lib()
    notes: list[str] = []
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rope_dim)
    if arch == "llama":
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    else:
        # MLA runs in llama.cpp as multi-query attention over the latent: one "KV head" of
        # kv_lora_rank + rope numbers; the per-head sizes are the *_mla keys.
        w.add_head_count_kv(1)
        w.add_kv_lora_rank(cfg.kv_lora_rank)
        # 0 says "q_proj, no compression" (V2-Lite); llama.cpp otherwise recognises it by its 27 layers
        w.add_q_lora_rank(cfg.q_lora_rank or 0)
        w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        w.add_value_length(cfg.kv_lora_rank)
        w.add_key_length_mla(cfg.qk_head_dim)
        w.add_value_length_mla(cfg.v_head_dim)
        notes += _write_moe(w, cfg)

    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    RT = g.RopeScalingType
    if kind in ("default", "llama3"):
        w.add_rope_scaling_type(RT.NONE)  # llama3's per-frequency factors travel as rope_freqs.weight
    elif kind == "linear":
        w.add_rope_scaling_type(RT.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    else:  # yarn
        old = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
        factor = rs.get("factor") or cfg.max_position_embeddings / old
        w.add_rope_scaling_type(RT.YARN)
        w.add_rope_scaling_factor(float(factor))
        w.add_rope_scaling_orig_ctx_len(int(old))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32.0))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1.0))
        if arch == "deepseek2":
            m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
            # llama.cpp's converter stores 0.1 * mscale_all_dim and its loader divides by 0.1 again.
            w.add_rope_scaling_yarn_log_mul(0.1 * float(m_all or 0.0))
            if m_all and m != m_all:
                notes.append(f"yarn mscale {m} differs from mscale_all_dim {m_all}: llama.cpp assumes them equal")
        elif rs.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(float(rs["attention_factor"]))
    return notes


def _write_moe(w, cfg: ModelConfig) -> list[str]:
    g = gguf_lib()
    notes = []
    w.add_leading_dense_block_count(cfg.first_k_dense_replace if cfg.n_routed_experts else cfg.num_hidden_layers)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if not cfg.n_routed_experts:
        w.add_expert_weights_scale(1.0)
        return notes
    if cfg.moe_layer_freq != 1:
        raise CheckpointError(f"GGUF export: llama.cpp's deepseek2 has no moe_layer_freq ({cfg.moe_layer_freq})")
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    gating = {"softmax": g.ExpertGatingFuncType.SOFTMAX, "sigmoid": g.ExpertGatingFuncType.SIGMOID}
    w.add_expert_gating_func(gating[cfg.scoring_func])
    w.add_expert_weights_norm(bool(cfg.norm_topk_prob and cfg.num_experts_per_tok > 1))
    # llama.cpp normalises (if asked) and then always scales. DeepSeek-V2's code does one or the
    # other, so a V2 that normalises is written with scale 1 (see model.Router).
    v2_norm = cfg.topk_method != "noaux_tc" and cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
    w.add_expert_weights_scale(1.0 if v2_norm else float(cfg.routed_scaling_factor))
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group > 1:
        notes.append("llama.cpp ranks expert groups by the sum of their two best scores (V3); "
                     "DeepSeek-V2's group_limited_greedy ranks them by the best one")
    return notes


def gguf_tensors(model: Transformer) -> list[tuple[str, Callable[[], Tensor], tuple[int, ...], int | None]]:
    """(GGUF name, producer, shape, block type) for every tensor the file holds, in file order; the
    block type (a GGML type id) for a weight the model keeps in GGUF's blocks, whose rows are then
    copied as they are, else None. Producers run one at a time while writing, so a large model is
    never held twice."""
    cfg = model.config
    arch = ARCHITECTURES[cfg.model_type]
    out: list[tuple[str, Callable[[], Tensor], tuple[int, ...], int | None]] = []
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        factors = llama3_rope_factors(cfg)
        out.append(("rope_freqs.weight", lambda: factors, tuple(factors.shape), None))
    for name, t in model.state_dict().items():
        if name.startswith("mtp.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        names, transform = gguf_names(name, arch)
        owner = model.get_submodule(name.rpartition(".")[0])
        qtype = owner.qtype if isinstance(owner, (BlockLinear, BlockEmbedding)) and name.endswith(".weight") else \
            owner.qtypes.get(name.rpartition(".")[2]) if isinstance(owner, BlockExperts) else None
        with torch.device("meta"):
            shapes = [tuple(x.shape) for x in to_gguf(torch.empty(t.shape, dtype=t.dtype), transform, cfg)]
        if qtype is not None:  # rows of blocks: the values a row holds, not its bytes
            shapes = [(*sh[:-1], row_values(t, qtype)) for sh in shapes]
        for k, (gname, shape) in enumerate(zip(names, shapes)):
            out.append((gname, lambda t=t, transform=transform, k=k: to_gguf(t, transform, cfg)[k], shape, qtype))
    return out


def write_gguf(model: Transformer, tokenizer, out: str | Path, type: str = "f16", name: str | None = None) -> Path:
    """Write `model` (with `tokenizer`, an ouvert Tokenizer) as one GGUF file of the given type.
    Written under a temporary name, then renamed: a failure leaves whatever was at `out`."""
    g = gguf_lib()
    cfg = model.config
    kind = type.lower()
    if kind not in TYPES and kind not in BLOCK_SCHEMES:
        raise CheckpointError(f"unknown GGUF type {type!r}; ouvert writes "
                              f"{', '.join(dict.fromkeys(TYPES + BLOCK_SCHEMES))}")
    holds_blocks = _stored_file_type(model) is not None
    if holds_blocks and kind not in ("f32", "f16", "bf16"):
        raise CheckpointError(f"GGUF type {type!r}: the model holds GGUF blocks already, which are written as they "
                              "are; load it with dtype=torch.float32 to write it in another type")
    if kind in BLOCK_SCHEMES and kind not in TYPES:  # k-quants: ouvert's own encoder, then the blocks copied
        model = quantize_model(copy.deepcopy(model), kind)
    arch = _check_exportable(cfg)
    # the float tensors' type; a model in blocks keeps its blocks, and the file says which type they are
    ftype, want = file_type(kind if kind in TYPES else "f16")
    ftype = _stored_file_type(model) or ftype
    tm = tokenizer_meta(tokenizer, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    w = g.GGUFWriter(tmp, arch)
    try:
        notes = _write_metadata(w, cfg, arch, name or out.stem, ftype)
        write_tokenizer_meta(w, tm)
        plan = []
        for gname, produce, shape, stored_type in gguf_tensors(model):
            qt = g.GGMLQuantizationType(stored_type) if stored_type is not None else tensor_type(gname, shape, want)
            block, size = g.GGML_QUANT_SIZES[qt]
            w.add_tensor_info(gname, shape, np.dtype(np.float32), math.prod(shape) // block * size, raw_dtype=qt)
            plan.append((produce, qt, stored_type is not None))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for produce, qt, as_stored in plan:
            w.write_tensor_data(produce().contiguous().numpy() if as_stored else encode_tensor(produce(), qt))
        w.close()
        tmp.replace(out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    if cfg.num_nextn_predict_layers:
        notes.append(f"{cfg.num_nextn_predict_layers} MTP module(s) not exported: "
                     "llama.cpp's deepseek2 does not run them")
    for n in notes:
        warnings.warn(f"{out}: {n}", stacklevel=2)
    return out


def _stored_file_type(model: Transformer):
    """general.file_type of a model that holds blocks: its most common block type by weights held
    (Q4_K and Q5_K as their _M mixes), or None for a float model."""
    g = gguf_lib()
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (BlockLinear, BlockEmbedding)):
            t = BY_ID[m.qtype].name
            counts[t] = counts.get(t, 0) + m.weight.numel()
        elif isinstance(m, BlockExperts):
            for w, qtype in m.qtypes.items():
                t = BY_ID[qtype].name
                counts[t] = counts.get(t, 0) + getattr(m, w).numel()
    if not counts:
        return None
    top = max(counts, key=counts.get)
    name = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_K": "MOSTLY_Q4_K_M",
            "Q5_K": "MOSTLY_Q5_K_M"}.get(top, f"MOSTLY_{top}")
    return g.LlamaFileType[name]
