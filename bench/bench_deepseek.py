"""DeepSeek-V3-shaped decode speed, ouvert against transformers, and the KV-cache bytes of MLA.

The model is DeepSeek-V3's architecture at ~0.87B total parameters (~0.24B active per token), chosen
so that it runs on a laptop CPU and keeps V3's proportions where they matter:

  hidden 1024, 12 layers, 16 heads; the first layer dense (intermediate 2816, V3's 2.6x hidden)
  MLA: q_lora_rank 512, kv_lora_rank 256, qk_nope 64 + qk_rope 32 per head, v 64
  MoE: 64 routed experts (8 groups, 4 kept per token), 6 active + 1 shared, expert width 256
       (V3's 0.29x hidden), sigmoid scores with noaux_tc, normalised top-k, routed scale 2.5
  V3's vocabulary (129280, untied head) and its YaRN rope (factor 40 over 4096 positions)

A random checkpoint is saved once with ouvert.save_model (model_type deepseek_v3) and loaded by
ouvert.load_model and by transformers (DeepseekV3ForCausalLM through AutoModelForCausalLM). Timing
and ceilings are bench_decode.py's (see there); at batch 1 a decode token reads 6 of the 64 routed
experts. Cache bytes per token, all layers:

  ouvert        Cache.nbytes_per_token: the latent [c_kv | k_rope], (kv_lora_rank + qk_rope) per layer
  per-head      num_heads * (qk_head_dim + v_head_dim) * layers, what an MLA without latent caching keeps
  transformers  measured on its cache after a prefill

    .venv/bin/python bench/bench_deepseek.py
    .venv/bin/python bench/bench_deepseek.py --dtypes float32 --prompt-len 64 --new-tokens 8 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import bench_decode as bd
import torch

from ouvert.checkpoint.base import num_params
from ouvert.config import ModelConfig

NAME = "deepseek-v3-small"

# A DeepSeek-V3 config.json at a small size; ModelConfig.from_hf adds the family's defaults.
CONFIG = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 12,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": 512,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 1,
    "moe_intermediate_size": 256,
    "n_group": 8,
    "topk_group": 4,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "num_nextn_predict_layers": 0,
    "max_position_embeddings": 163840,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def active_params(cfg: ModelConfig) -> float:
    return bd.decode_bytes_per_token(cfg, torch.float32, 0)["weights"] / 4


def per_head_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """A per-head K/V cache: every head's key (nope + rope) and value, in every layer."""
    size = torch.finfo(dtype).bits // 8
    return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers * size


def transformers_cache_bytes_per_token(model, T: int = 16) -> int:
    """Bytes per token that transformers' own cache holds after a T-token prefill."""
    ids = torch.zeros(1, T, dtype=torch.long)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors) // T


def cache_figures(cfg: ModelConfig):
    def extra(models: dict, dtype: str) -> dict:
        d = bd.DTYPES[dtype]
        return {"kv_bytes_per_token": {
            "ouvert_absorbed_mla": bd.kv_bytes_per_token(cfg, d),
            "per_head": per_head_bytes_per_token(cfg, d),
            "transformers": transformers_cache_bytes_per_token(models["transformers"]),
        }}

    return extra


def print_cache(rows: list[dict]) -> None:
    print(f"{'KV cache bytes/token (all layers)':34s} {'ouvert MLA':>10s} {'per-head':>9s} {'ratio':>6s} "
          f"{'transformers':>12s}")
    for r in rows:
        kv = r["kv_bytes_per_token"]
        o, h, t = kv["ouvert_absorbed_mla"], kv["per_head"], kv["transformers"]
        print(f"{r['shape'] + ' ' + r['dtype']:34s} {o:10d} {h:9d} {h / o:6.1f} {t:12d}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bd.add_common_args(p)
    args = bd.check_args(p, p.parse_args(argv))
    info = bd.setup(args)
    cfg = ModelConfig.from_hf(CONFIG)
    print(f"{NAME}: {num_params(cfg) / 1e9:.2f}B parameters, "
          f"{active_params(cfg) / 1e9:.2f}B read per decoded token", flush=True)
    t0 = time.perf_counter()
    machine = bd.Machine(args.dtypes)
    rows = bd.bench_shape(NAME, cfg, args, machine, extra=cache_figures(cfg))
    bd.add_ceilings(rows, machine)
    print()
    machine.print()
    bd.print_table(rows)
    print()
    print_cache(rows)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {info['load_average_start']:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; OMP_WAIT_POLICY={info['omp_wait_policy']}")
    print(json.dumps({"bench": "deepseek", **info, "config": CONFIG, **machine.summary(), "results": rows}))


if __name__ == "__main__":
    main()
