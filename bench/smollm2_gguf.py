"""The real SmolLM2-135M-Instruct Q4_1 GGUF (scripts/fetch_assets.sh) run three ways on the same
file, in one run: ouvert as stored (its kernels over the Q4_1 / Q8_0 blocks), ouvert dequantized to
float32 (torch's matmuls), and llama.cpp (cyllama's prebuilt build, AVX2; with --llama-bench also
llama.cpp's own llama-bench, built for this CPU by bench/llama_bench.py, the reference the ratios
are then taken against). Decode and prefill
tokens/s, the read-bandwidth bound beside decode, teacher-forced top-1 agreement over 400 positions
of Shakespeare, and the peak memory of loading the file, each in a fresh process. Ends with one line
of JSON.

    .venv/bin/python bench/smollm2_gguf.py [--threads 2] [--new-tokens 128] [--repeats 2] [--llama-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one sentence."


def cpu_name() -> str:
    flags = open("/proc/cpuinfo").read()
    model = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "?")
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "fma") if f" {f} " in flags]
    return f"{model} ({', '.join(isa)})"


def read_bandwidth(nbytes: int = 2**30) -> float:
    """GB/s of a sum over a buffer far larger than the caches: the ceiling for decode."""
    x = torch.ones(nbytes // 4)
    x.sum()
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        x.sum()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ouvert_rates(model, prompt: list[int], n: int, prefill_ids: list[int], compile: bool = False
                 ) -> tuple[float, float]:
    """(decode tokens/s over n greedy tokens after prompt, prefill tokens/s of prefill_ids)."""
    from ouvert.generate import SamplingParams, stream

    times = []
    for _ in stream(model, prompt, n, SamplingParams(stop_token_ids=[]), compile=compile):
        times.append(time.perf_counter())
    decode = (len(times) - 1) / (times[-1] - times[0])
    with torch.no_grad():
        t = time.perf_counter()
        model(torch.tensor([prefill_ids]))
        prefill = len(prefill_ids) / (time.perf_counter() - t)
    return decode, prefill


def chunked_logits(model, ids: torch.Tensor, chunk: int = 50) -> torch.Tensor:
    """Teacher-forced logits through the cache, chunk rows at a time (each product takes the kernels)."""
    from ouvert.generate.cache import Cache

    cache = Cache(model, 1, ids.shape[1])
    return torch.cat([model(ids[:, i : i + chunk], cache=cache) for i in range(0, ids.shape[1], chunk)], 1)


def llama_cpp(threads: int, path: Path = GGUF):
    """llama.cpp (cyllama) on the file at `path`: its C API module, the model, and a context maker."""
    import cyllama.llama.llama_cpp as cp

    cp.disable_logging()
    cp.ggml_backend_load_all()

    class Model(cp.LlamaModel):  # cyllama 0.2.18: get_logits_ith asks the model for n_vocab
        n_vocab = property(lambda self: self.get_vocab().n_vocab)

    model = Model(str(path), cp.LlamaModelParams())

    def context(n_ctx: int):
        p = cp.LlamaContextParams()
        p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
        p.n_threads = p.n_threads_batch = threads
        p.flash_attn_type = 0
        return cp.LlamaContext(model, p)

    return cp, model, context


def llama_cpp_rates(threads: int, prompt: list[int], n: int, prefill_ids: list[int], path: Path = GGUF
                    ) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) as llama-bench's tg and pp measure them: greedy steps of one
    token, then one batch of prefill_ids into a fresh context."""
    cp, model, context = llama_cpp(threads, path)
    ctx = context(len(prompt) + n + 8)
    ctx.decode(cp.llama_batch_get_one(prompt))
    tok = int(np.array(ctx.get_logits_ith(-1)).argmax())
    t0 = time.perf_counter()
    for i in range(n - 1):
        ctx.decode(cp.llama_batch_get_one([tok], len(prompt) + i))
        tok = int(np.array(ctx.get_logits_ith(-1)).argmax())
    decode = (n - 1) / (time.perf_counter() - t0)
    ctx = context(len(prefill_ids))
    t = time.perf_counter()
    ctx.decode(cp.llama_batch_get_one(prefill_ids))
    return decode, len(prefill_ids) / (time.perf_counter() - t)


def llama_cpp_logits(threads: int, tokens: list[int]) -> np.ndarray:
    cp, model, context = llama_cpp(threads)
    ctx = context(len(tokens))
    batch = cp.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1)
    for i, t in enumerate(tokens):
        batch.add(t, i, [0], True)
    ctx.decode(batch)
    return np.stack([np.array(ctx.get_logits_ith(i)) for i in range(len(tokens))])


PEAK = """
import sys, torch, ouvert
from ouvert.checkpoint.base import build_on_meta
from ouvert.config import preset
build_on_meta(preset("tiny-llama"))  # torch's first model on the meta device costs ~80 MB, once a process
def status(key):
    return next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
base = status("VmRSS:")
m = ouvert.load_model(sys.argv[1], **({{"dtype": torch.float32}} if sys.argv[2] == "float32" else {{}}))
with torch.no_grad():
    m(torch.tensor([[1, 2, 3]]))
print(status("VmHWM:") - base)
"""


def peak_load_bytes(kind: str, path: Path = GGUF) -> int:
    """Peak resident memory a fresh process adds, after its imports and a first tiny model built on
    the meta device (torch's one-time cost), by loading the file and running one forward (the file's
    pages that are read count: they are resident while mapped)."""
    out = subprocess.run([sys.executable, "-c", PEAK.format(), str(path), kind], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-bench", action="store_true", help="also llama.cpp's llama-bench binary (built once)")
    args = ap.parse_args()
    if not GGUF.is_file():
        sys.exit(f"{GGUF}: missing; run `make assets`")
    torch.set_num_threads(args.threads)

    import ouvert
    from ouvert import kernels

    tok = ouvert.load_tokenizer(GGUF)
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=True)
    text = sorted((ROOT / ".cache/corpus/shakespeare").glob("*.txt"))[0].read_text()[20_000:40_000]
    held = tok.encode(text)
    prefill_ids, forced = held[: args.prefill], held[:400]
    load = os.getloadavg()[0]

    stored = ouvert.load_model(GGUF)
    dense = ouvert.load_model(GGUF, dtype=torch.float32)
    rows: dict[str, list[tuple[float, float]]] = {"ouvert (kernels, as stored)": [], "ouvert (kernels, compiled)": [],
                                                  "ouvert float32": [], "llama.cpp": []}
    for _ in range(2):  # compile the decode step (dynamic shapes: two calls) before timing
        ouvert_rates(stored, prompt, 8, prefill_ids[:8], compile=True)
    for _ in range(args.repeats):  # interleaved, best of repeats
        rows["ouvert (kernels, as stored)"].append(ouvert_rates(stored, prompt, args.new_tokens, prefill_ids))
        rows["ouvert (kernels, compiled)"].append(
            ouvert_rates(stored, prompt, args.new_tokens, prefill_ids, compile=True))
        rows["ouvert float32"].append(ouvert_rates(dense, prompt, args.new_tokens, prefill_ids))
        rows["llama.cpp"].append(llama_cpp_rates(args.threads, prompt, args.new_tokens, prefill_ids))
    best = {k: (max(r[0] for r in v), max(r[1] for r in v)) for k, v in rows.items()}
    if args.llama_bench:  # decode after the chat prompt, prefill of the same length into an empty context
        import llama_bench

        lb = llama_bench.run(GGUF, args.threads, len(prefill_ids), args.new_tokens, args.repeats,
                             depth=len(prompt))
        best["llama-bench"] = (lb["tg_tok_s"], lb["pp_tok_s"])

    with torch.no_grad():
        a = chunked_logits(stored, torch.tensor([forced])).argmax(-1)[0].numpy()  # the kernels: <= 64 rows
        b = dense(torch.tensor([forced])).argmax(-1)[0].numpy()
    c = llama_cpp_logits(args.threads, forced).argmax(-1)
    agree = {"kernels vs float32": float((a == b).mean()), "kernels vs llama.cpp": float((a == c).mean()),
             "float32 vs llama.cpp": float((b == c).mean())}

    bw = read_bandwidth()
    file_bytes = GGUF.stat().st_size
    bound = bw * 1e9 / file_bytes  # every weight read once per token (the tied head is the embedding)
    peaks = {k: peak_load_bytes(k) for k in ("stored", "float32")}
    load_end = os.getloadavg()[0]

    print(f"SmolLM2-135M-Instruct Q4_1 ({file_bytes / 1e6:.0f} MB), {args.threads} threads, {cpu_name()}")
    print(f"kernels: {kernels.isa()}; read bandwidth {bw:.1f} GB/s, decode bound {bound:.0f} tok/s; "
          f"load average {load:.1f} -> {load_end:.1f}")
    ref_name = "llama-bench" if args.llama_bench else "llama.cpp"
    ref = best[ref_name]
    print(f"{'':30} {'decode tok/s':>13} {'x ' + ref_name:>12} {'% bound':>8} {'prefill tok/s':>14} "
          f"{'x ' + ref_name:>12}")
    for k, (d, p) in best.items():
        print(f"{k:30} {d:13.1f} {d / ref[0]:12.2f} {100 * d / bound:8.0f} {p:14.0f} {p / ref[1]:12.2f}")
    for k, v in agree.items():
        print(f"teacher-forced top-1 agreement over {len(forced)} positions, {k}: {100 * v:.2f}%")
    for k, v in peaks.items():
        print(f"peak memory loading ({k}): {v / 1e6:.0f} MB ({v / file_bytes:.2f}x the file)")
    print(json.dumps({"bench": "smollm2_gguf", "cpu": cpu_name(), "machine": platform.machine(),
                      "threads": args.threads, "isa": kernels.isa(), "bandwidth_gbs": bw, "decode_bound": bound,
                      "rates": {k: {"decode": d, "prefill": p} for k, (d, p) in best.items()},
                      "agreement": agree, "peak_load_bytes": peaks, "file_bytes": file_bytes,
                      "load_average": [load, load_end]}))


if __name__ == "__main__":
    main()
