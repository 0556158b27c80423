"""A ModelConfig recovered from a GGUF file's metadata (architectures llama and deepseek2). Llama 3's
rope scaling, which llama.cpp keeps only as rope_freqs.weight, is recovered as the llama3
rope_scaling that reproduces those factors."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.gguf.names import NAMES, llama3_rope_factors
from ouvert.checkpoint.gguf.read import GGUFFile
from ouvert.config import ConfigError, ModelConfig

_MISSING = object()


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


def llama3_scaling(factors: Tensor, cfg: ModelConfig, path: Path) -> dict:
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
