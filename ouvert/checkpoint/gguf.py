"""GGUF, llama.cpp's and Ollama's format: export with the `gguf` package (the library llama.cpp's own
converter uses), and import of the files people bring.

Export (`ouvert export gguf`, `write_gguf`) writes llama.cpp's `llama` architecture for the Llama
family and `deepseek2` for DeepSeek-V2/V3, with the tokenizer (byte-level BPE: tokens, types,
merges, special ids, add_bos) and the chat template in the metadata, and every setting written
explicitly rather than left to llama.cpp's defaults: rope base and scaling, norm eps, head counts,
head sizes, context length, and for DeepSeek the expert gating function (transformers 5 leaves
`scoring_func` out of V3's config.json, and llama.cpp assumes softmax without it), expert groups,
weight normalisation and scale.

Tensors map through one declarative table per architecture (ours, GGUF's, transform), used in both
directions, as checkpoint/hf.py's. The transforms:
  rope_q / rope_k  llama.cpp rotates adjacent pairs (x0, x1) where HF and ouvert rotate halves
                   (x0, x_{d/2}); q and k rows are permuted per head (convert_hf_to_gguf.py's
                   LlamaModel.permute; the inverse on import).
  kv_b             newer llama.cpp runs MLA absorbed and wants kv_b_proj split per head into
                   attn_k_b (H, kv_lora_rank, nope), transposed, and attn_v_b (H, v, kv_lora_rank).
  rope_mla_q / rope_mla_kv  DeepSeek checkpoints already keep rotary pairs adjacent
                   (rope_interleave); one that does not has its rotary rows permuted like Llama's.
Experts are stacked (E, out, in) on both sides. DeepSeek's MTP modules are not exported: llama.cpp's
deepseek2 does not run them (its converter drops them too); `write_gguf` says so.

Types: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, the ones the gguf package can quantize. It
cannot write k-quants (q4_k_m, ...): quantize the f16 file with llama.cpp's llama-quantize. As
llama.cpp's converter does, 1-D tensors, norms, the router and rope_freqs stay f32, and a matrix
whose rows do not divide into quantization blocks falls back to f16.

Import (`load_model("model.gguf")`): architectures llama and deepseek2, tensors in F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the k-quants Q2_K..Q6_K (dequantized with gguf's quants module).
The model comes back in the file's type (general.file_type: f32, f16 or bf16), float32 for a
quantized file, unless `dtype` says otherwise. Anything else is an error naming the architecture,
or the tensor and its type. Llama 3's rope scaling, which llama.cpp keeps only as rope_freqs.weight,
is recovered as the llama3 rope_scaling that reproduces those factors. `gguf_tokenizer` rebuilds the
file's tokenizer, so `ouvert export hf --model x.gguf` gives a directory every ouvert command runs.
The header is parsed here (GGUFFile) rather than by gguf.GGUFReader, which builds a numpy view per
token string and takes about a minute on a 128k vocabulary.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import mmap
import os
import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ouvert.assets import check_asset
from ouvert.checkpoint.hf import CheckpointError, assign_weights, build_on_meta
from ouvert.checkpoint.meta import rope_halves_to_pairs, rope_pairs_to_halves
from ouvert.config import ConfigError, ModelConfig
from ouvert.kernels import BY_ID, row_bytes, row_values
from ouvert.model import Experts, Transformer
from ouvert.quantize import (
    BLOCK_SCHEMES,
    KEEP_FLOAT,
    BlockEmbedding,
    BlockExperts,
    BlockLinear,
    block_config,
    quantize_model,
    swap_for_blocks,
)


def _gguf():
    try:
        import gguf
    except ImportError:  # a runtime dependency (requirements.txt); say what to do if it is absent
        raise CheckpointError("the gguf package is not installed: pip install gguf") from None
    return gguf


# ---- the name tables ----------------------------------------------------------------------------
# (ours, GGUF's, transform). {i} is a layer; a tuple on the GGUF side is one of our tensors split in two.
_COMMON: list[tuple[str, str | tuple[str, str], str | None]] = [
    ("embed_tokens.weight", "token_embd.weight", None),
    ("norm.weight", "output_norm.weight", None),
    ("lm_head.weight", "output.weight", None),
    ("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", None),
    ("layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", None),
    ("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", None),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", None),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", None),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", None),
]
NAMES: dict[str, list[tuple[str, str | tuple[str, str], str | None]]] = {
    "llama": _COMMON + [
        ("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "rope_q"),
        ("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", "rope_k"),
        ("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", None),
        ("layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", "rope_q"),
        ("layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", "rope_k"),
        ("layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", None),
        ("layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias", None),
        ("layers.{i}.mlp.gate_proj.bias", "blk.{i}.ffn_gate.bias", None),
        ("layers.{i}.mlp.up_proj.bias", "blk.{i}.ffn_up.bias", None),
        ("layers.{i}.mlp.down_proj.bias", "blk.{i}.ffn_down.bias", None),
    ],
    "deepseek2": _COMMON + [
        ("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", "rope_mla_q"),
        ("layers.{i}.self_attn.q_a_proj.weight", "blk.{i}.attn_q_a.weight", None),
        ("layers.{i}.self_attn.q_a_layernorm.weight", "blk.{i}.attn_q_a_norm.weight", None),
        ("layers.{i}.self_attn.q_b_proj.weight", "blk.{i}.attn_q_b.weight", "rope_mla_q"),
        ("layers.{i}.self_attn.kv_a_proj_with_mqa.weight", "blk.{i}.attn_kv_a_mqa.weight", "rope_mla_kv"),
        ("layers.{i}.self_attn.kv_a_layernorm.weight", "blk.{i}.attn_kv_a_norm.weight", None),
        ("layers.{i}.self_attn.kv_b_proj.weight", ("blk.{i}.attn_k_b.weight", "blk.{i}.attn_v_b.weight"), "kv_b"),
        ("layers.{i}.mlp.gate.weight", "blk.{i}.ffn_gate_inp.weight", None),
        ("layers.{i}.mlp.gate.e_score_correction_bias", "blk.{i}.exp_probs_b.bias", None),
        ("layers.{i}.mlp.experts.gate_proj", "blk.{i}.ffn_gate_exps.weight", None),
        ("layers.{i}.mlp.experts.up_proj", "blk.{i}.ffn_up_exps.weight", None),
        ("layers.{i}.mlp.experts.down_proj", "blk.{i}.ffn_down_exps.weight", None),
        ("layers.{i}.mlp.shared_experts.gate_proj.weight", "blk.{i}.ffn_gate_shexp.weight", None),
        ("layers.{i}.mlp.shared_experts.up_proj.weight", "blk.{i}.ffn_up_shexp.weight", None),
        ("layers.{i}.mlp.shared_experts.down_proj.weight", "blk.{i}.ffn_down_shexp.weight", None),
    ],
}
ARCHITECTURES = {"llama": "llama", "deepseek_v2": "deepseek2", "deepseek_v3": "deepseek2"}  # model_type -> GGUF


def _template(t: str) -> re.Pattern:
    return re.compile(re.escape(t).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


def gguf_names(name: str, arch: str) -> tuple[tuple[str, ...], str | None]:
    """Our parameter name -> (its GGUF tensor name(s), transform)."""
    for ours, theirs, transform in NAMES[arch]:
        m = _template(ours).match(name)
        if m:
            parts = theirs if isinstance(theirs, tuple) else (theirs,)
            return tuple(p.format(**m.groupdict()) for p in parts), transform
    raise CheckpointError(f"no GGUF ({arch}) name for parameter {name!r}")


def _mla_rope_rows(t: Tensor, cfg: ModelConfig, fn: Callable[[Tensor, int], Tensor], per_head: bool) -> Tensor:
    """Apply a rotary-layout permutation to the rope rows only: the last qk_rope_head_dim rows of
    each head of q (per_head), or the last qk_rope_head_dim rows of kv_a_proj_with_mqa."""
    r = cfg.qk_rope_head_dim
    if per_head:
        h = t.view(cfg.num_attention_heads, cfg.qk_head_dim, *t.shape[1:])
        rope = fn(h[:, -r:].reshape(-1, *t.shape[1:]), cfg.num_attention_heads)
        return torch.cat([h[:, :-r], rope.view(cfg.num_attention_heads, r, *t.shape[1:])], dim=1).reshape(t.shape)
    return torch.cat([t[:-r], fn(t[-r:], 1)])


def to_gguf(t: Tensor, transform: str | None, cfg: ModelConfig) -> tuple[Tensor, ...]:
    """One of our tensors -> its GGUF tensor(s)."""
    if transform is None:
        return (t,)
    if transform in ("rope_q", "rope_k"):
        n = cfg.num_attention_heads if transform == "rope_q" else cfg.num_key_value_heads
        return (rope_halves_to_pairs(t, n),)
    if transform in ("rope_mla_q", "rope_mla_kv"):
        if cfg.rope_interleave:  # DeepSeek's own layout is llama.cpp's
            return (t,)
        return (_mla_rope_rows(t, cfg, rope_halves_to_pairs, transform == "rope_mla_q"),)
    if transform == "kv_b":
        H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv = t.view(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        return kv[:, :nope].transpose(1, 2).contiguous(), kv[:, nope:].contiguous()  # (H, r, nope), (H, v, r)
    raise ValueError(transform)


def from_gguf(ts: tuple[Tensor, ...], transform: str | None, cfg: ModelConfig) -> Tensor:
    """GGUF tensor(s) -> our tensor; the inverse of to_gguf. Files read in are in llama.cpp's
    layout, so a DeepSeek model read from GGUF has rope_interleave set."""
    if transform is None or transform in ("rope_mla_q", "rope_mla_kv"):
        if transform is not None and not cfg.rope_interleave:
            return _mla_rope_rows(ts[0], cfg, rope_pairs_to_halves, transform == "rope_mla_q")
        return ts[0]
    if transform in ("rope_q", "rope_k"):
        n = cfg.num_attention_heads if transform == "rope_q" else cfg.num_key_value_heads
        return rope_pairs_to_halves(ts[0], n)
    if transform == "kv_b":
        k_b, v_b = ts
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, cfg.kv_lora_rank)
    raise ValueError(transform)


# ---- tensor types -------------------------------------------------------------------------------
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
_READ_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def _file_type(kind: str):
    g = _gguf()
    name = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(kind, f"MOSTLY_{kind.upper()}")
    return g.LlamaFileType[name], g.GGMLQuantizationType[kind.upper()]


def tensor_type(gguf_name: str, shape: tuple[int, ...], want):
    """The type a tensor is stored in for a file of type `want`, by llama.cpp's converter's rules."""
    g = _gguf()
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
    g = _gguf()
    Q = g.GGMLQuantizationType
    x = t.detach().to(torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return x
    if qtype == Q.F16:
        return x.astype(np.float16)
    return g.quants.quantize(x, qtype)


def decode_tensor(t: GGUFTensor, path: Path) -> Tensor:
    """A GGUF tensor as a torch tensor (dequantized to float32 unless F32, F16 or BF16)."""
    g = _gguf()
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


# ---- the tokenizer ------------------------------------------------------------------------------
_PRE_TOKENIZERS: dict[str, str] = {}  # signature (JSON) -> llama.cpp's tokenizer.ggml.pre; filled below
_PRE_JSON: dict[str, dict] = {}  # llama.cpp's name -> a tokenizer.json pre_tokenizer


def _signature(pre: dict | None) -> str:
    """What decides how a byte-level BPE pre-tokenizer splits text, as a comparable string."""
    if pre is None:
        return "null"
    kind = pre.get("type")
    if kind == "Sequence":
        return "[" + ",".join(_signature(p) for p in pre["pretokenizers"]) + "]"
    if kind == "Split":
        return json.dumps(["split", pre["pattern"], pre.get("behavior"), pre.get("invert", False)])
    if kind == "ByteLevel":
        return json.dumps(["bytelevel", pre.get("use_regex", True)])
    if kind == "Digits":
        return json.dumps(["digits", pre.get("individual_digits", False)])
    return json.dumps(pre, sort_keys=True)


def _register_pre_tokenizers() -> None:
    from ouvert.tokenizer import LLAMA3_SPLIT

    def split(regex: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}

    bl = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    deepseek_v3 = [
        split(r"\p{N}{1,3}"),
        split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
        split('[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+|'
              ' ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+'),  # \r \n: the characters themselves
        bl,
    ]
    table = {
        "llama-bpe": {"type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), bl]},  # Llama 3, ouvert's BPE
        "deepseek-v3": {"type": "Sequence", "pretokenizers": deepseek_v3},
        "gpt-2": {**bl, "use_regex": True},
        "smollm": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, {**bl, "use_regex": True}]},
    }
    for name, pre in table.items():
        _PRE_TOKENIZERS[_signature(pre)] = name
        _PRE_JSON[name] = pre


def pre_tokenizer_name(tokenizer_json: dict, source: str) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a tokenizer.json's pre-tokenizer."""
    if not _PRE_TOKENIZERS:
        _register_pre_tokenizers()
    sig = _signature(tokenizer_json.get("pre_tokenizer"))
    if sig not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{source}: pre_tokenizer {sig[:200]} is not one llama.cpp knows by name to ouvert "
            f"({', '.join(sorted(set(_PRE_TOKENIZERS.values())))}); llama.cpp would split text differently"
        )
    return _PRE_TOKENIZERS[sig]


@dataclass
class TokenizerMeta:
    """What goes into tokenizer.ggml.* and tokenizer.chat_template."""

    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    ids: dict[str, int]  # bos, eos, eot, padding, unknown -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None


def tokenizer_meta(tok, cfg: ModelConfig) -> TokenizerMeta:
    """The GGUF view of an ouvert Tokenizer for a model with cfg.vocab_size embeddings: Llama-3-style
    byte-level BPE only (tokenizer.ggml.model "gpt2"). Ids the tokenizer does not use become
    [PAD{i}] tokens of type UNUSED, as llama.cpp's converter writes them."""
    g = _gguf()
    T = g.TokenType
    source = str((tok.source / "tokenizer.json") if tok.source else "tokenizer")
    j = json.loads(tok.tok.to_str())
    model = j.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (j.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(
            f"{source}: ouvert writes byte-level BPE tokenizers (Llama 3, DeepSeek) to GGUF; this one is "
            f"{model.get('type')} with decoder {(j.get('decoder') or {}).get('type')}"
        )
    pre = pre_tokenizer_name(j, source)
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= cfg.vocab_size:
        raise CheckpointError(
            f"{source}: the tokenizer has ids up to {max(vocab.values())} but the model only "
            f"{cfg.vocab_size} embeddings"
        )
    by_id = {i: s for s, i in vocab.items()}
    added = tok.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        s = by_id.get(i)
        if s is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            looks_special = (s.startswith("<|") and s.endswith("|>")) or (s.startswith("<｜") and s.endswith("｜>"))
            types.append(T.CONTROL if added[i].special or looks_special else T.USER_DEFINED)
            tokens.append(s)
        else:
            types.append(T.NORMAL)
            tokens.append(s)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    ids: dict[str, int] = {}
    bos = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else (cfg.stop_token_ids or [None])[0]
    for key, v in (("bos", bos), ("eos", eos), ("padding", tok.pad_token_id),
                   ("unknown", tok.token_to_id(tok.special_tokens.get("unk_token")))):
        if v is not None:
            ids[key] = int(v)
    stops = [i for i in [*tok.stop_token_ids, *cfg.stop_token_ids] if i != eos]
    if stops:
        ids["eot"] = int(stops[0])  # Llama 3 instruct: <|eot_id|> ends a turn, <|end_of_text|> the text

    probe = tok.encode("a", add_special_tokens=True)
    add_bos = tok.config.get("add_bos_token")
    add_bos = bool(add_bos) if isinstance(add_bos, bool) else bool(probe) and probe[0] == bos
    add_eos = tok.config.get("add_eos_token")
    add_eos = bool(add_eos) if isinstance(add_eos, bool) else bool(probe) and probe[-1] == eos and len(probe) > 1
    return TokenizerMeta(pre, tokens, [int(t) for t in types], merges, ids, add_bos, add_eos, tok.chat_template)


# ---- metadata -----------------------------------------------------------------------------------


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
    g = _gguf()
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
    g = _gguf()
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


def _write_tokenizer(w, tm: TokenizerMeta) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tm.pre)
    w.add_token_list(tm.tokens)
    w.add_token_types(tm.types)
    w.add_token_merges(tm.merges)
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "eot": w.add_eot_token_id,
              "padding": w.add_pad_token_id, "unknown": w.add_unk_token_id}
    for key, v in tm.ids.items():
        adders[key](v)
    w.add_add_bos_token(tm.add_bos)
    w.add_add_eos_token(tm.add_eos)
    if tm.chat_template:
        w.add_chat_template(tm.chat_template)


def llama3_rope_factors(cfg: ModelConfig) -> Tensor:
    """llama.cpp's rope_freqs.weight for llama3 rope scaling: per frequency, what to divide it by."""
    from ouvert.model import rope_frequencies

    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.int64).float() / cfg.rope_dim))
    scaled, _ = rope_frequencies(cfg)
    return (plain / scaled).float()


# ---- export -------------------------------------------------------------------------------------


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
    g = _gguf()
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
    ftype, want = _file_type(kind if kind in TYPES else "f16")
    ftype = _stored_file_type(model) or ftype
    tm = tokenizer_meta(tokenizer, cfg)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    w = g.GGUFWriter(tmp, arch)
    try:
        notes = _write_metadata(w, cfg, arch, name or out.stem, ftype)
        _write_tokenizer(w, tm)
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
    g = _gguf()
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


def export_gguf(
    model_dir: str | Path, out: str | Path, type: str | None = None, tokenizer_dir: str | Path | None = None
) -> Path:
    """`ouvert export gguf`: a checkpoint (any that load_model reads) and its tokenizer as one GGUF file."""
    from ouvert.checkpoint.hf import load_model
    from ouvert.tokenizer import load_tokenizer

    # A checkpoint in blocks (`ouvert quantize --scheme q4_k_m`, or a GGUF file) is copied block for
    # block when no type is asked for; asked for one, it is dequantized and written in that type.
    model = load_model(model_dir, dtype=torch.float32 if type is not None else None)
    if type is None:
        type = "f16"  # a float model's default; a model in blocks keeps them (its other tensors in f16)
    src = Path(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else src
    if not (tok_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tok_dir}: no tokenizer.json (a GGUF file carries its tokenizer); pass --tokenizer DIR")
    return write_gguf(model, load_tokenizer(tok_dir), out, type, name=src.name)


# ---- import -------------------------------------------------------------------------------------
_MISSING = object()
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


@dataclass
class GGUFTensor:
    name: str
    qtype: int  # GGMLQuantizationType
    shape: tuple[int, ...]  # PyTorch order (GGUF stores the innermost dimension first)
    data: np.ndarray  # F32 / F16: the values; any other type: the raw bytes, (..., bytes per row)


class GGUFFile:
    """A GGUF file's metadata and tensors, memory-mapped. gguf.GGUFReader builds a numpy view for
    every token and merge string, which takes a minute for a 128k vocabulary; this reads the same
    header in well under a second and leaves the tensor bytes on disk until asked for."""

    def __init__(self, path: Path):
        g = _gguf()
        self.path = path
        with open(path, "rb") as fh:
            try:
                # copy-on-write: tensors are views of the file's pages (no copy on load), and a write to
                # one (training a loaded model) copies that page privately, never reaching the file
                self.buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
            except ValueError:  # an empty file cannot be mapped
                raise CheckpointError(f"{path}: not a GGUF file (empty)") from None
        self.size = len(self.buf)
        self.pos = 0
        if self.size < 24 or self._scalar("<I") != g.GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic number)")
        version = self._scalar("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version}; ouvert reads versions 2 and 3")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.fields.get("general.alignment", g.GGUF_DEFAULT_ALIGNMENT))
        start = -(-self.pos // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            try:
                block, size = g.GGML_QUANT_SIZES[g.GGMLQuantizationType(qtype)]
            except (ValueError, KeyError):
                raise CheckpointError(f"{path}: tensor {name!r} has unknown GGML type {qtype}") from None
            shape = tuple(reversed(dims))
            n = math.prod(dims) * size // block
            begin = start + offset
            if begin + n > self.size:
                raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file; it may be truncated")
            raw = np.frombuffer(self.buf, dtype=np.uint8, count=n, offset=begin)
            if qtype in (0, 1):  # F32, F16
                raw = raw.view("<f4" if qtype == 0 else "<f2").reshape(shape)
            else:
                raw = raw.reshape(*shape[:-1], -1) if shape else raw
            self.tensors[name] = GGUFTensor(name, qtype, shape, raw)

    def _scalar(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > self.size:
            raise CheckpointError(f"{self.path}: the header ends early; the file may be truncated")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def _string(self) -> str:
        n = self._scalar("<Q")
        if self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: the header ends early; the file may be truncated")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype: int) -> Any:
        if vtype == 8:
            return self._string()
        if vtype == 9:
            sub, n = self._scalar("<I"), self._scalar("<Q")
            if sub in _NUMPY:
                arr = np.frombuffer(self.buf, dtype=_NUMPY[sub], count=n, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self._value(sub) for _ in range(n)]
        if vtype not in _SCALARS:
            raise CheckpointError(f"{self.path}: metadata value of unknown type {vtype}")
        v = self._scalar(_SCALARS[vtype])
        return float(str(np.float32(v))) if vtype == 6 else v  # float32 1e-5 reads back as 1e-5


class _Fields:
    """Access to a GGUF file's key-value metadata, with errors naming the file and key."""

    def __init__(self, f: GGUFFile):
        self.fields, self.path = f.fields, f.path
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = _MISSING) -> Any:
        key = key.replace("{arch}", getattr(self, "arch", ""))
        if key not in self.fields:
            if default is _MISSING:
                raise CheckpointError(f"{self.path}: key {key!r} is missing")
            return default
        return self.fields[key]


def _llama3_scaling(factors: Tensor, cfg: ModelConfig, path: Path) -> dict:
    """Recover llama3 rope_scaling from rope_freqs.weight (llama.cpp keeps only the factors).
    (old_len, low, high) and (old_len / low, 1, high / low) give the same factors, so low is fixed at 1."""
    f = factors.double()
    factor = float(f.max())
    dim = cfg.rope_dim
    wavelen = 2 * math.pi * cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    candidates = [(8192.0, 1.0, 4.0)]  # Meta's values, then values fitted to the factors
    mid = (f > 1 + 1e-4) & (f < factor - 1e-4)
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)  # smooth = old / (hi - lo) / wavelen - lo / (hi - lo)
    if len(s) >= 2 and factor > 1:
        A = torch.stack([1 / wavelen[mid], torch.ones_like(s)], dim=1)
        a, b = torch.linalg.lstsq(A, s.unsqueeze(1)).solution.flatten().tolist()
        if b < 0:
            candidates.append((-a / b, 1.0, 1 - 1 / b))
    elif len(s) == 1:  # one point on the ramp: keep Meta's high_freq_factor 4, solve for the length
        candidates.append((float(wavelen[mid][0] * (3 * s[0] + 1)), 1.0, 4.0))
    else:  # no point on the ramp: any length between the two groups of wavelengths
        short, long = wavelen[f <= 1 + 1e-4], wavelen[f >= factor - 1e-4]
        if len(short) and len(long):
            candidates.append((float(2 ** round(math.log2(math.sqrt(4 * short.max() * long.min())))), 1.0, 4.0))
    for old, lo, hi in candidates:
        old, hi = float(f"{old:.6g}"), float(f"{hi:.6g}")  # the fit's last digits are noise
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
              "original_max_position_embeddings": int(old) if old.is_integer() else old}
        trial = dataclasses.replace(cfg, rope_scaling=rs)
        if torch.allclose(llama3_rope_factors(trial).double(), f, rtol=1e-4):
            return rs
    raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' does not follow Llama 3's rope scaling")


def gguf_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (and, where the metadata has no key, tensor shapes)."""
    kv, path = _Fields(f), f.path
    arch = kv.arch
    if arch not in NAMES:
        raise CheckpointError(
            f"{path}: architecture {arch!r} (key 'general.architecture') is not supported; "
            f"ouvert reads {', '.join(NAMES)} GGUF files"
        )
    shapes = {name: t.shape for name, t in f.tensors.items()}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: missing tensor 'token_embd.weight'")
    heads = kv.get("{arch}.attention.head_count")
    kw: dict[str, Any] = dict(
        vocab_size=shapes["token_embd.weight"][0],
        hidden_size=kv.get("{arch}.embedding_length"),
        intermediate_size=kv.get("{arch}.feed_forward_length"),
        num_hidden_layers=kv.get("{arch}.block_count"),
        num_attention_heads=heads,
        rms_norm_eps=float(kv.get("{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=kv.get("{arch}.context_length"),
        rope_theta=float(kv.get("{arch}.rope.freq_base", 10000.0)),
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=kv.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=kv.get("tokenizer.ggml.eos_token_id", None),
        pad_token_id=kv.get("tokenizer.ggml.padding_token_id", None),
    )
    if isinstance(heads, list) or isinstance(kw["intermediate_size"], list):
        raise CheckpointError(f"{path}: per-layer head counts or feed-forward sizes are not supported")
    if arch == "llama":
        kw.update(
            model_type="llama",
            num_key_value_heads=kv.get("{arch}.attention.head_count_kv", heads),
            head_dim=kv.get("{arch}.attention.key_length", None),
            attention_bias="blk.0.attn_q.bias" in shapes,
            o_proj_bias="blk.0.attn_output.bias" in shapes,
            mlp_bias="blk.0.ffn_gate.bias" in shapes,
        )
    else:
        n_experts = kv.get("{arch}.expert_count", None)
        gating = kv.get("{arch}.expert_gating_func", 1)  # llama.cpp's default for deepseek2: softmax
        sigmoid = gating == 2
        n_group = kv.get("{arch}.expert_group_count", 1) or 1
        rope = kv.get("{arch}.rope.dimension_count")
        kw.update(
            model_type="deepseek_v3" if sigmoid else "deepseek_v2",
            num_key_value_heads=heads,
            q_lora_rank=kv.get("{arch}.attention.q_lora_rank", None) if "blk.0.attn_q_a.weight" in shapes else None,
            kv_lora_rank=kv.get("{arch}.attention.kv_lora_rank"),
            qk_rope_head_dim=rope,
            qk_nope_head_dim=kv.get("{arch}.attention.key_length_mla") - rope,
            v_head_dim=kv.get("{arch}.attention.value_length_mla"),
            rope_interleave=True,  # llama.cpp's layout
            moe_intermediate_size=kv.get("{arch}.expert_feed_forward_length"),
            n_shared_experts=kv.get("{arch}.expert_shared_count", 0),
            first_k_dense_replace=kv.get("{arch}.leading_dense_block_count", 0),
        )
        if n_experts:
            kw.update(
                n_routed_experts=n_experts,
                num_experts_per_tok=kv.get("{arch}.expert_used_count"),
                n_group=n_group,
                topk_group=kv.get("{arch}.expert_group_used_count", 1) or 1,
                scoring_func="sigmoid" if sigmoid else "softmax",
                topk_method="noaux_tc" if sigmoid else "group_limited_greedy" if n_group > 1 else "greedy",
                norm_topk_prob=bool(kv.get("{arch}.expert_weights_norm", False)),
                routed_scaling_factor=float(kv.get("{arch}.expert_weights_scale", 1.0)),
            )
            if not sigmoid and kw["norm_topk_prob"] and kw["routed_scaling_factor"] != 1.0:
                raise CheckpointError(
                    f"{path}: softmax gating with expert_weights_norm and expert_weights_scale "
                    f"{kw['routed_scaling_factor']}: DeepSeek-V2's router does not do both"
                )
    scaling = kv.get("{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        kw["rope_scaling"] = {"rope_type": "linear", "factor": float(kv.get("{arch}.rope.scaling.factor"))}
    elif scaling == "yarn":
        rs: dict[str, Any] = {
            "rope_type": "yarn", "factor": float(kv.get("{arch}.rope.scaling.factor")),
            "original_max_position_embeddings": kv.get("{arch}.rope.scaling.original_context_length"),
            "beta_fast": float(kv.get("{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": float(kv.get("{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        }
        log_mul = kv.get("{arch}.rope.scaling.yarn_log_multiplier", 0.0)
        if arch == "deepseek2" and log_mul:
            rs["mscale"] = rs["mscale_all_dim"] = round(log_mul / 0.1, 6)
        attn = kv.get("{arch}.rope.scaling.yarn_attn_factor", None)
        if attn is not None:
            rs["attention_factor"] = float(attn)
        kw["rope_scaling"] = rs
    elif scaling != "none":
        raise CheckpointError(f"{path}: rope scaling {scaling!r} (key '{arch}.rope.scaling.type') is not supported")
    try:
        cfg = ModelConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    if arch == "llama" and kv.get("{arch}.rope.dimension_count", cfg.head_dim) != cfg.head_dim:
        raise CheckpointError(f"{path}: partial rotary (key '{arch}.rope.dimension_count') is not supported")
    return cfg


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Read a GGUF file (llama or deepseek2 architecture) as a Transformer; see the module docstring.

    Without a dtype, the file runs as stored: linear layers and the embedding whose tensors are in a
    block format ouvert's kernels cover (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) keep their blocks,
    memory-mapped, in BlockLinear / BlockEmbedding (ouvert/quantize.py), and everything else is
    float. An explicit dtype dequantizes every tensor to it: the reference path."""
    g = _gguf()
    path = Path(path)
    check_asset(path)  # a file `make assets` fetches: missing or corrupted says how to fetch it again
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    f = GGUFFile(path)
    cfg = gguf_config(f)
    arch = ARCHITECTURES[cfg.model_type]
    tensors = f.tensors
    if "rope_freqs.weight" in tensors:
        cfg.rope_scaling = _llama3_scaling(decode_tensor(tensors["rope_freqs.weight"], path), cfg, path)
    as_stored = dtype is None and torch.device(device).type == "cpu"
    if dtype is None:
        ft = f.fields.get("general.file_type")
        if ft is None:  # no file type: go by the embedding's
            emb = g.GGMLQuantizationType(tensors["token_embd.weight"].qtype).name
            ft = {"F16": 1, "BF16": 32, "F32": 0}.get(emb)
        dtype = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}.get(ft, torch.float32)
    cfg.torch_dtype = str(dtype).removeprefix("torch.")

    model, expected = build_on_meta(cfg)
    used = {"rope_freqs.weight"}
    state: dict[str, Tensor] = {}
    blocks: dict[str, int] = {}  # module -> GGML type, for the weights that run as stored
    dequantized: list[str] = []  # block tensors the kernels do not cover, turned into floats
    for name, meta in expected.items():
        names, transform = gguf_names(name, arch)
        for n in names:
            if n not in tensors:
                raise CheckpointError(
                    f"{path}: missing tensor {n!r} needed by {arch} with {cfg.num_hidden_layers} layers")
        with torch.device("meta"):
            want = [tuple(x.shape) for x in to_gguf(torch.empty(meta.shape), transform, cfg)]
        if as_stored and _runs_as_stored(model, name, tensors[names[0]], transform, cfg):
            state[name] = _blocks(tensors[names[0]], want[0], path)
            state[name] = from_gguf((state[name],), transform, cfg)  # q / k row orders permute whole rows
            blocks[name.removesuffix(".weight")] = tensors[names[0]].qtype  # a stack of experts: its own name
            used.add(names[0])
            continue
        parts = []
        for n, shape in zip(names, want):
            t = decode_tensor(tensors[n], path)
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {n!r} has shape {tuple(t.shape)}, expected {shape} from the metadata")
            if as_stored and tensors[n].qtype not in (0, 1, 30):
                dequantized.append(f"{n} ({g.GGMLQuantizationType(tensors[n].qtype).name})")
            parts.append(t)
            used.add(n)
        t = from_gguf(tuple(parts), transform, cfg)
        keep = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))  # routing stays float32
        state[name] = t.to(device=device, dtype=torch.float32 if keep else dtype)
    unused = [n for n in tensors if n not in used]
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by {arch}: {', '.join(unused[:5])}", stacklevel=2)
    if dequantized:
        warnings.warn(f"{path}: {len(dequantized)} tensor(s) dequantized to {cfg.torch_dtype}, in a format or place "
                      f"ouvert's kernels do not cover: {', '.join(dequantized[:4])}", stacklevel=2)
    if blocks:
        if cfg.tie_word_embeddings and "embed_tokens" in blocks:
            blocks["lm_head"] = blocks["embed_tokens"]  # the head reads the embedding's blocks
        swap_for_blocks(model, blocks, dtype)
        cfg.extra["quantization_config"] = block_config(model, blocks)
    return assign_weights(model, state, device)


def _runs_as_stored(model: Transformer, name: str, t: GGUFTensor, transform: str | None, cfg: ModelConfig) -> bool:
    """Whether our parameter `name` keeps the GGUF tensor's blocks: a linear layer's or the embedding's
    weight, or a stack of routed experts, in a block format the kernels cover, whose transform (if
    any) only reorders rows."""
    if t.qtype not in BY_ID or t.qtype in (0, 1, 30):
        return False
    if isinstance(model.get_submodule(name.rpartition(".")[0]), Experts):
        return transform is None
    if not name.endswith(".weight"):
        return False
    module = model.get_submodule(name.removesuffix(".weight"))
    if type(module) not in (nn.Linear, nn.Embedding) or name.split(".")[-2] in KEEP_FLOAT:
        return False
    mla_rows = transform in ("rope_mla_q", "rope_mla_kv") and cfg.rope_interleave  # the identity then
    return transform in (None, "rope_q", "rope_k") or mla_rows


def _blocks(t: GGUFTensor, shape: tuple[int, ...], path: Path) -> Tensor:
    """A GGUF tensor's blocks as a (rows, bytes per row) uint8 tensor over the file's memory map."""
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {t.name!r} has shape {t.shape}, expected {tuple(shape)} "
                              "from the metadata")
    with warnings.catch_warnings():  # read-only memory: the blocks are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(t.data).view(*shape[:-1], row_bytes(t.qtype, shape[-1]))


def gguf_tokenizer(path: str | Path):
    """The tokenizer a GGUF file carries, as an ouvert Tokenizer (byte-level BPE, "gpt2", with a
    pre-tokenizer ouvert knows by name): what `ouvert export hf` writes beside the weights of a
    llama.cpp or Ollama file. Settings follow llama.cpp's reading: Llama 3's "llama-bpe" takes a
    word whole when it is in the vocabulary (ignore_merges), BOS is added when add_bos_token says so."""
    from tokenizers import Tokenizer as HFTokenizer

    from ouvert.tokenizer import Tokenizer

    g = _gguf()
    path = Path(path)
    kv = GGUFFile(path).fields
    model, pre = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.pre", "default")
    if model != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r}: ouvert reads byte-level BPE ('gpt2') tokenizers")
    if not _PRE_JSON:
        _register_pre_tokenizers()
    if pre not in _PRE_JSON:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} (key 'tokenizer.ggml.pre') is not one ouvert knows "
                              f"({', '.join(sorted(_PRE_JSON))})")
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    T = g.TokenType
    # Special tokens go into the BPE vocabulary as well: the tokenizers library numbers an added
    # token that the vocabulary lacks after the vocabulary, whatever id it was given.
    vocab = {t: i for i, t in enumerate(tokens) if types[i] != T.UNUSED}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == T.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (T.CONTROL, T.USER_DEFINED)]
    ids = {k: kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "eot", "padding", "unknown")}
    add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    post = byte_level
    if add_bos:
        bos = tokens[ids["bos"]]
        post = {"type": "Sequence", "processors": [byte_level, {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [ids["bos"]], "tokens": [bos]}}}]}
    tj = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": _PRE_JSON[pre], "post_processor": post,
        "decoder": {**byte_level, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre == "llama-bpe", "vocab": vocab, "merges": kv.get("tokenizer.ggml.merges", [])},
    }
    names = {"bos": "bos_token", "eos": "eos_token", "padding": "pad_token", "unknown": "unk_token"}
    config = {names[k]: tokens[v] for k, v in ids.items() if k in names and v is not None}
    config.update(add_bos_token=add_bos, add_eos_token=bool(kv.get("tokenizer.ggml.add_eos_token", False)),
                  tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False)
    stops = [v for k, v in ids.items() if k in ("eos", "eot") and v is not None]
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0]}
    generation = {k: v for k, v in generation.items() if v is not None}
    return Tokenizer(HFTokenizer.from_str(json.dumps(tj)), config, generation, kv.get("tokenizer.chat_template"))


# ---- command line -------------------------------------------------------------------------------


def _cli_gguf(args: argparse.Namespace) -> None:
    out = export_gguf(args.model, args.out, args.type, args.tokenizer)
    print(f"wrote {out} ({args.type or 'as stored'}, {out.stat().st_size / 2**20:.1f} MiB)")


def _cli_hf(args: argparse.Namespace) -> None:
    from ouvert.checkpoint.meta import export_hf

    print(f"wrote {export_hf(args.model, args.out, args.tokenizer)}")


def add_export_parser(sub) -> None:
    """`ouvert export gguf | hf`."""
    ex = sub.add_parser("export", help="write a checkpoint in another format").add_subparsers(
        dest="export_command", required=True)
    p = ex.add_parser("gguf", help="one GGUF file for llama.cpp and Ollama, tokenizer and chat template inside")
    p.add_argument("--model", required=True, help="checkpoint: HF directory, Meta directory or GGUF file")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"tensor type: {', '.join(dict.fromkeys(TYPES + BLOCK_SCHEMES))}. Default: a checkpoint "
                        "in GGUF blocks (ouvert quantize, a GGUF file) copies its blocks as they are; a float one f16")
    p.add_argument("--tokenizer", help="directory with tokenizer.json (default: the model's)")
    p.set_defaults(func=_cli_gguf)
    p = ex.add_parser("hf", help="a Hugging Face directory (from Meta's consolidated.*.pth, or a GGUF file)")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="directory with tokenizer.json to copy alongside")
    p.set_defaults(func=_cli_hf)
