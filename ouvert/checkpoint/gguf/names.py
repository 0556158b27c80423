"""GGUF's tensor names: one declarative table per architecture (ours, GGUF's, transform), used in
both directions, as checkpoint/base.py's HF table. The transforms:
  rope_q / rope_k  llama.cpp rotates adjacent pairs (x0, x1) where HF and ouvert rotate halves
                   (x0, x_{d/2}); q and k rows are permuted per head (convert_hf_to_gguf.py's
                   LlamaModel.permute; the inverse on import).
  kv_b             newer llama.cpp runs MLA absorbed and wants kv_b_proj split per head into
                   attn_k_b (H, kv_lora_rank, nope), transposed, and attn_v_b (H, v, kv_lora_rank).
  rope_mla_q / rope_mla_kv  DeepSeek checkpoints already keep rotary pairs adjacent
                   (rope_interleave); one that does not has its rotary rows permuted like Llama's.
Experts are stacked (E, out, in) on both sides.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor

from ouvert.checkpoint.base import CheckpointError, rope_halves_to_pairs, rope_pairs_to_halves
from ouvert.config import ModelConfig
from ouvert.model import rope_frequencies

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


def llama3_rope_factors(cfg: ModelConfig) -> Tensor:
    """llama.cpp's rope_freqs.weight for llama3 rope scaling: per frequency, what to divide it by."""
    plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.rope_dim, 2, dtype=torch.int64).float() / cfg.rope_dim))
    scaled, _ = rope_frequencies(cfg)
    return (plain / scaled).float()
