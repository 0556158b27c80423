"""ouvert against llama.cpp on the same GGUF file, at three model shapes and three formats: the
SmolLM2-135M, Llama-3.2-1B and DeepSeek-V3-small shapes (random weights, seed 0) in bf16, q8_0 and
q4_k_m, each written once by ouvert (its own k-quant encoder; the blocks llama.cpp reads are the ones
ouvert runs) into bench/out/. Decode tokens/s (greedy, one token a step, as llama-bench's tg) and
prefill tokens/s (one batch, as llama-bench's pp), the read-bandwidth bound beside decode, the peak
memory loading the file adds, one JSON line at the end.

    .venv/bin/python bench/blocks.py [--shapes smollm2-135m,llama-3.2-1b,deepseek-v3-small]
        [--types bf16,q8_0,q4_k_m] [--prompt-len 256] [--new-tokens 64] [--repeats 2] [--threads 2]
        [--compile] [--llama-bench]

llama.cpp is cyllama's prebuilt build (AVX2, flash attention off), its pp / tg method measured through
the C API; --llama-bench also runs llama.cpp's own llama-bench binary on each file (pp and tg beside
cyllama's), built from source by bench/llama_bench.py the first time (about 8 minutes).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_decode as bd  # noqa: E402
import llama_bench  # noqa: E402
from smollm2_gguf import cpu_name, llama_cpp_rates, peak_load_bytes, read_bandwidth  # noqa: E402

import ouvert  # noqa: E402
from ouvert import kernels  # noqa: E402
from ouvert.checkpoint.gguf import write_gguf  # noqa: E402
from ouvert.generate.cache import Cache  # noqa: E402
from ouvert.generate.decode import compiled_decode_step, decode_model, decode_step, prefill  # noqa: E402
from ouvert.quantize import quantize_model  # noqa: E402

SHAPES = ("smollm2-135m", "llama-3.2-1b", "deepseek-v3-small")
TYPES = ("bf16", "q8_0", "q4_k_m")


def ensure_ggufs(shape: str, types: list[str], seed: int = 0) -> dict[str, Path]:
    """bench/out/blocks-{shape}-seed{seed}-{type}.gguf for each type, from one float32 model."""
    paths = {t: bd.OUT / f"blocks-{shape}-seed{seed}-{t}.gguf" for t in types}
    todo = [t for t, p in paths.items() if not p.is_file()]
    if not todo:
        return paths
    bd.OUT.mkdir(parents=True, exist_ok=True)
    cfg = bd.shape_config(shape)
    tok = ouvert.load_tokenizer(bd.ensure_gguf_tokenizer())
    t0 = time.perf_counter()
    model = ouvert.Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    for t in todo:
        m = copy.deepcopy(model).to(torch.bfloat16) if t == "bf16" else quantize_model(copy.deepcopy(model), t)
        write_gguf(m, tok, paths[t], "bf16" if t == "bf16" else "f16")
        del m
        gc.collect()
        print(f"  wrote {paths[t].name} ({paths[t].stat().st_size / 1e6:.0f} MB) at {time.perf_counter() - t0:.0f} s",
              flush=True)
    return paths


def ouvert_rates(model, prompt: list[int], n: int, compile: bool = False) -> tuple[float, float]:
    """(decode tokens/s over n greedy one-token steps after prompt, prefill tokens/s of prompt), the
    way generate() runs them: prefill on the model, decode steps on decode_model(model, 1), compiled
    (generate(compile=True)'s step) when asked."""
    tokens = torch.tensor([prompt])
    cache = Cache(model, 1, len(prompt) + n)
    t = time.perf_counter()
    with torch.inference_mode():
        logits, pos = prefill(model, tokens, torch.ones_like(tokens, dtype=torch.bool), cache)
    t_prefill = time.perf_counter() - t
    view = decode_model(model, 1)
    step = compiled_decode_step(view) if compile else partial(decode_step, view)
    tok = logits.argmax(-1)
    t = time.perf_counter()
    for _ in range(n - 1):
        tok = step(tok, pos, cache).argmax(-1)
        pos = pos + 1
    return (n - 1) / (time.perf_counter() - t), len(prompt) / t_prefill


def best(repeats: int, fn, *args) -> tuple[float, float]:
    runs = [fn(*args) for _ in range(repeats)]
    return max(r[0] for r in runs), max(r[1] for r in runs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--types", default=",".join(TYPES))
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also ouvert's decode step through torch.compile")
    p.add_argument("--llama-bench", action="store_true", help="also llama.cpp's llama-bench binary (built once)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.llama_bench:
        llama_bench.build()
    load = [os.getloadavg()[0]]
    bandwidth = read_bandwidth()
    print(f"{cpu_name()}, {args.threads} threads, kernels {kernels.isa()}, read bandwidth {bandwidth:.1f} GB/s, "
          f"load average {load[0]:.1f}", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        types = args.types.split(",")
        paths = ensure_ggufs(shape, types)
        cfg = bd.shape_config(shape)
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
        for t in types:
            path = paths[t]
            read = bd.gguf_decode_bytes_per_token(path, cfg, args.prompt_len + args.new_tokens // 2)["total"]
            model = ouvert.load_model(path)
            ouvert_rates(model, prompt[:32], 4)  # warm-up
            ours = best(args.repeats, ouvert_rates, model, prompt, args.new_tokens)
            compiled = None
            if args.compile:
                ouvert_rates(model, prompt[:32], 4, True)  # compiles
                compiled = best(args.repeats, ouvert_rates, model, prompt, args.new_tokens, True)[0]
            del model
            gc.collect()
            theirs = best(args.repeats, llama_cpp_rates, args.threads, prompt[:32], args.new_tokens, prompt, path)
            lb = (llama_bench.run(path, args.threads, args.prompt_len, args.new_tokens, args.repeats)
                  if args.llama_bench else None)
            peak = peak_load_bytes("stored", path)
            bound = bandwidth * 1e9 / read
            row = {"shape": shape, "type": t, "file_bytes": path.stat().st_size, "bytes_per_token": read,
                   "ouvert": {"decode": ours[0], "prefill": ours[1], "decode_compiled": compiled},
                   "llama.cpp": {"decode": theirs[0], "prefill": theirs[1]},
                   "decode_ratio": ours[0] / theirs[0], "prefill_ratio": ours[1] / theirs[1],
                   "llama-bench": lb and {"decode": lb["tg_tok_s"], "prefill": lb["pp_tok_s"]},
                   "decode_bound": bound, "peak_load_bytes": peak}
            rows.append(row)
            print(f"{shape:18s} {t:7s} decode {ours[0]:7.1f} vs {theirs[0]:7.1f} tok/s ({row['decode_ratio']:.2f}x, "
                  f"{ours[0] / bound:.0%} of {bound:.0f})  prefill {ours[1]:7.1f} vs {theirs[1]:7.1f} "
                  f"({row['prefill_ratio']:.2f}x)  peak load {peak / 1e6:.0f} MB = {peak / row['file_bytes']:.2f}x "
                  "the file" + (f"; compiled decode {compiled:.1f} ({compiled / theirs[0]:.2f}x)" if compiled else "")
                  + (f"; llama-bench pp {lb['pp_tok_s']:.1f} tg {lb['tg_tok_s']:.1f}" if lb else ""),
                  flush=True)
    load.append(os.getloadavg()[0])
    print(f"load average {load[0]:.1f} -> {load[1]:.1f}")
    print(json.dumps({"bench": "blocks", "cpu": cpu_name(), "isa": kernels.isa(), "threads": args.threads,
                      "bandwidth_gbs": bandwidth, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "load_average": load, "rows": rows}))


if __name__ == "__main__":
    main()
