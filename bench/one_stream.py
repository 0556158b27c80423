"""One stream through the serving engine against generate(), at --max-batch 1, 8 and 32.

The engine pads every decode step to max_batch rows unless each row's numbers cannot depend on the
others; with ouvert's kernels (GGUF blocks as stored, and dense float models through their float
rows) it runs the live rows only, so one stream should cost what generate() costs whatever
max_batch is. The real SmolLM2-135M-Instruct (the Q4_1 GGUF scripts/fetch_assets.sh fetches), as
stored and dequantized to float32; greedy, the same prompt, --new-tokens tokens; the engine is
driven in process (engine.step(), no HTTP), so what is measured is its scheduling and its forwards.
With --http, also through `ouvert serve` itself: a server process per --max-batch on the same file
(as stored), one streaming chat request at a time from the official openai client, greedy,
ignore_eos, rate = completion tokens / the request's wall time (prefill and HTTP included, as
generate()'s rate includes its prefill). Each rate is the best of 3 runs after a warm-up. The
read-bandwidth bound per token is printed beside: the weight bytes one decode step reads.

    .venv/bin/python bench/one_stream.py [--new-tokens 128] [--threads 2] [--http]

Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from smollm2_gguf import read_bandwidth  # bench/, beside this script

import ouvert
from ouvert.generate.sampling import SamplingParams
from ouvert.serve.engine import Engine, Request

GGUF = Path(__file__).resolve().parent.parent / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper."}]


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every weight once (the tied head's embedding counted once)."""
    seen, n = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen and t.dim() >= 2:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


REPEATS = 3  # each rate is the best of this many runs, after a warm-up (first touches of memory)


def generate_rate(model, prompt: list[int], n: int) -> float:
    greedy = SamplingParams(temperature=0, stop_token_ids=[])
    ouvert.generate(model, prompt, 8, greedy)  # warm-up
    best = 0.0
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = ouvert.generate(model, prompt, n, greedy)[0]
        best = max(best, len(out) / (time.perf_counter() - t))
    return best


def engine_rate(model, tok, prompt: list[int], n: int, max_batch: int) -> tuple[float, bool]:
    engine = Engine(model, tok, max_batch=max_batch, chunk=64)
    best = 0.0
    for tokens in (8, *[n] * REPEATS):  # a warm-up, then the runs
        outs: list = []
        t = time.perf_counter()
        engine.submit(Request(prompt, tokens, SamplingParams(temperature=0), ignore_eos=True), outs.append)
        while engine.step():
            pass
        if tokens == n:
            best = max(best, sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t))
    return best, engine.live_rows_only


def http_rate(n: int, max_batch: int, threads: int) -> float:
    """Tokens/s of one streaming greedy chat request through `ouvert serve --max-batch max_batch` on the
    Q4_1 file as stored (a server process of its own, OMP_NUM_THREADS=threads), best of REPEATS."""
    import sys

    import openai
    from serve import free_port, start_server, stop_server  # bench/serve.py

    port = free_port()
    log = Path(__file__).resolve().parent / "out" / f"one-stream-serve-{max_batch}.log"
    log.parent.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "ouvert", "serve", "--model", str(GGUF), "--port", str(port),
           "--max-batch", str(max_batch)]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    proc = start_server(cmd, port, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        model = client.models.list().data[0].id
        best = 0.0
        for tokens in (8, *[n] * REPEATS):
            t = time.perf_counter()
            got = 0
            stream = client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.usage:
                    got = chunk.usage.completion_tokens
            if tokens == n:
                best = max(best, got / (time.perf_counter() - t))
        return best
    finally:
        stop_server(proc)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--http", action="store_true", help="also one stream through `ouvert serve` (Q4_1 as stored)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = ouvert.load_tokenizer(GGUF)
    prompt = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True)
    load = os.getloadavg()[0]
    bw = read_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s")
    rows = []
    for name, model in (("Q4_1 as stored", ouvert.load_model(GGUF)),
                        ("float32", ouvert.load_model(GGUF, dtype=torch.float32))):
        bound = bw * 1e9 / weight_bytes(model)
        ref = generate_rate(model, prompt, args.new_tokens)
        print(f"{name}: generate() {ref:.1f} tok/s (read-bandwidth bound {bound:.0f} tok/s)")
        rows.append({"model": name, "path": "generate", "tok_s": ref, "bound_tok_s": bound})
        for mb in (1, 8, 32):
            rate, live = engine_rate(model, tok, prompt, args.new_tokens, mb)
            print(f"  engine --max-batch {mb:>2}: {rate:.1f} tok/s = {rate / ref:.2f}x generate()"
                  f" ({'live rows only' if live else 'padded to max_batch'})")
            rows.append({"model": name, "path": f"engine max_batch {mb}", "tok_s": rate, "vs_generate": rate / ref,
                         "live_rows_only": live})
            if args.http and name == "Q4_1 as stored":
                rate = http_rate(args.new_tokens, mb, args.threads)
                print(f"  ouvert serve --max-batch {mb:>2}: {rate:.1f} tok/s = {rate / ref:.2f}x generate() (HTTP)")
                rows.append({"model": name, "path": f"ouvert serve max_batch {mb}", "tok_s": rate,
                             "vs_generate": rate / ref})
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(json.dumps({"bench": "one_stream", "cpu": cpu, "threads": args.threads, "load_before": load, "read_gb_s": bw,
                      "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
