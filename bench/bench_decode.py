"""Prefill and decode speed of ouvert against transformers, batch 1 on CPU, with the ceilings beside.

For each shape (an ouvert preset) a random model is built once (init_weights, std 0.02), saved with
ouvert.save_model into bench/out/ in each dtype, and both libraries load that same checkpoint:
ouvert.load_model and transformers' AutoModelForCausalLM.from_pretrained. Per dtype, both models
are loaded side by side and their repeats interleave, so that load on the machine hits both alike.

  prefill tokens/s  prompt_len / time of one forward over a random prompt that fills a fresh cache
                    (ouvert: generate.decode.prefill; transformers: forward with use_cache=True and
                    logits_to_keep=1, what its generate does), best of --repeats.
  decode tokens/s   (new_tokens - 1) / time from the first generated token to the last, greedy, taken
                    from ouvert.generate's on_token callback and from a transformers streamer; no early
                    stop (ouvert: stop_token_ids=[]; transformers: min_new_tokens=max_new_tokens).

Ceilings, measured in the same run with the same thread count, at the start and before every
repeat (the best sample counts, as the best repeat does):
  decode   read bandwidth (a sum over a 2 GiB tensor, well past the L3 cache) / bytes read per
           token: every weight once (the embedding matrix once, via the head, when tied; one row of
           it when not; k of the E routed experts) plus the KV cache at the mean context.
  prefill  matmul peak (a 2048^3 matmul in that dtype) / FLOPs per token: 2 per weight (not the
           embedding, nor the head, which runs on the last position only) plus causal attention.

Weight-only int8 / int4 rows (--quant, ouvert/quantize/): the float checkpoint quantized with
quantize_model and saved beside it, loaded with ouvert.load_model; its transformers column is the float
model again, timed interleaved with it. Their decode ceiling counts the quantized bytes (integers,
scales and zeros) for the quantized Linears, routed experts and an untied head (int8 under both
schemes), float for the rest (embedding, norms, routers, kv_b_proj).

llama.cpp rows (--llama-types f32,bf16,q8_0,q4_0,q4_k_m; the PyPI package llama-cpp-python): the same
checkpoint exported with ouvert's own exporter (`python -m ouvert export gguf`, cached in bench/out/
as {shape}-seed{seed}-{type}.gguf; f32, q8_0 and q4_0 from the float32 checkpoint, bf16 from the
bfloat16 one; q4_k_m, which the gguf package cannot write, by llama.cpp's own quantizer from the f32
file, as `llama-quantize` makes it: q6_K for the output head and some value / down projections),
run in a subprocess of --llama-python (default: this python) with n_threads =
--threads: one llm.eval over the same prompt (prefill), then greedy new tokens one llm.eval at a
time, the argmax of llama_get_logits_ith; timed as ours, best of --repeats, after a warm-up. The
subprocess also reports its peak resident memory (VmHWM: the mapped GGUF pages it touched plus the
KV cache and buffers). Decode ceiling: read bandwidth / (the GGUF's tensor bytes, the untied
embedding as one row and k/E of the routed experts, plus an f16 K and V cache at the mean
context). A missing or crashing llama_cpp (a native build that uses AMX where the kernel does not
allow it dies with SIGILL; see bench/README.md) is reported and its rows skipped.

Ends with one line of JSON holding every figure.

    .venv/bin/python bench/bench_decode.py                    # full run, both shapes, both dtypes
    .venv/bin/python bench/bench_decode.py --shapes smollm2-135m --dtypes float32 \
        --prompt-len 64 --new-tokens 8 --repeats 1            # a quick check
    .venv/bin/python bench/bench_decode.py --shapes smollm2-135m --quant int8,int4  # float, int8, int4 rows
    .venv/bin/python bench/bench_decode.py --llama-python /tmp/llamavenv2/bin/python  # with llama.cpp rows
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import ouvert
from ouvert.checkpoint.base import num_params
from ouvert.config import ModelConfig
from ouvert.generate.cache import Cache
from ouvert.generate.decode import prefill
from ouvert.generate.sampling import SamplingParams
from ouvert.quantize import (
    HEAD_SCHEME,
    choose_group_size,
    expert_names,
    head_name,
    in_features,
    linear_names,
    prepare_for_load,
    quantization_config,
    quantize_model,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LIBS = ("ouvert", "transformers")


# ---- checkpoints ------------------------------------------------------------------------------


def ensure_checkpoints(cfg: ModelConfig, name: str, dtypes: list[str], seed: int = 0, rebuild: bool = False) -> dict:
    """Save a random model of `cfg` as OUT/{name}-seed{seed}-{dtype} for each dtype (all from one
    float32 init, so the dtypes hold the same model); reuse directories already there."""
    paths = {d: OUT / f"{name}-seed{seed}-{d}" for d in dtypes}
    todo = [d for d, p in paths.items() if rebuild or not (p / "config.json").is_file()]
    todo.sort(key=lambda d: -DTYPES[d].itemsize)  # float32 first: the model is cast down in place
    if not todo:
        return paths
    t0 = time.perf_counter()
    model = ouvert.Transformer(cfg)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(seed))
    for d in todo:
        ouvert.save_model(model.to(DTYPES[d]), paths[d])
    del model
    gc.collect()
    print(f"built {name} ({', '.join(todo)}) in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def ensure_quantized(path: Path, scheme: str, rebuild: bool = False) -> Path:
    """The float checkpoint at `path` quantized (default group size), saved as {path}-{scheme}."""
    out = path.with_name(f"{path.name}-{scheme}")
    if rebuild or not (out / "config.json").is_file():
        ouvert.save_model(quantize_model(ouvert.load_model(path), scheme), out)
    return out


def load(lib: str, path: Path, dtype: str):
    if lib == "ouvert":
        return ouvert.load_model(path)  # the stored dtype
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).eval()


# ---- ceilings ----------------------------------------------------------------------------------


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_bandwidth(repeats: int, nbytes: int = 2**31) -> float:
    """Bytes/s that torch reads from memory with the current thread count (a sum over a large tensor)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / best_time(lambda: x.sum(), repeats)


def copy_bandwidth(repeats: int, nbytes: int = 2**31) -> float:
    """Bytes/s moved (read + written) by a large tensor copy."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), repeats)


def matmul_peak(dtype: torch.dtype, repeats: int, n: int = 2048) -> float:
    """FLOP/s of an n^3 matmul in `dtype` with the current thread count."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best_time(lambda: a @ b, repeats)


class Machine:
    """What the ceilings divide: read bandwidth and matmul peak. Sampled at the start and before every
    timed repeat, so that they see the same load as the figures; the best sample counts, as the best
    repeat does."""

    def __init__(self, dtypes: list[str]):
        self.dtypes = dtypes
        self.read_gb_s = 0.0
        self.gflop_s = dict.fromkeys(dtypes, 0.0)
        self.samples = 0
        self.copy_gb_s = copy_bandwidth(10) / 1e9  # printed for reference only
        self.sample(10)

    def sample(self, repeats: int = 3) -> None:
        self.read_gb_s = max(self.read_gb_s, read_bandwidth(repeats) / 1e9)
        for d in self.dtypes:
            self.gflop_s[d] = max(self.gflop_s[d], matmul_peak(DTYPES[d], repeats) / 1e9)
        self.samples += 1

    def summary(self) -> dict:
        return {"read_bandwidth_gb_s": self.read_gb_s, "copy_bandwidth_gb_s": self.copy_gb_s,
                "matmul_gflop_s": self.gflop_s, "machine_samples": self.samples}

    def print(self) -> None:
        gemm = ", ".join(f"{d} {g:.0f}" for d, g in self.gflop_s.items())
        print(f"memory bandwidth (best of {self.samples} samples): read {self.read_gb_s:.1f} GB/s, "
              f"copy (read+write, at the start) {self.copy_gb_s:.1f} GB/s; matmul 2048^3 GFLOP/s: {gemm}")


def _param_groups(cfg: ModelConfig, dtype: torch.dtype | None = None, quant: str | None = None) -> dict[str, int]:
    """Parameter counts by how a decoding token uses them; bytes instead when `dtype` is given
    (the model in that dtype, its Linears quantized as `quant` says)."""
    with torch.device("meta"):
        model = ouvert.Transformer(cfg)
    if dtype is not None:
        model.to(dtype)
    if quant:  # the structure load_model gives a checkpoint that `ouvert quantize` wrote
        sizes = in_features(model, linear_names(model), expert_names(model))
        g = choose_group_size(sizes, None) if quant == "int4" else None
        prepare_for_load(model, quantization_config(quant, g, HEAD_SCHEME if head_name(model) else None), "bench")
    groups = {"embed": 0, "head": 0, "experts": 0, "other": 0}
    tensors = model.named_parameters() if dtype is None else model.state_dict(keep_vars=True).items()
    seen: set[int] = set()
    for name, p in tensors:  # a tied head shares the embedding: listed once, as embed
        if name.startswith("mtp.") or id(p) in seen:
            continue
        seen.add(id(p))
        key = "embed" if name == "embed_tokens.weight" else "head" if name.startswith("lm_head.") else (
            "experts" if ".mlp.experts." in name else "other")
        groups[key] += p.numel() if dtype is None else p.numel() * p.element_size()
    return groups


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """ouvert's cache bytes per token (Cache.nbytes_per_token on a meta-device model)."""
    with torch.device("meta"):
        model = ouvert.Transformer(cfg)
    return Cache(model, 1, 1, dtype=dtype, device="meta").nbytes_per_token()


def decode_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, context: int,
                           quant: str | None = None) -> dict[str, int]:
    g = _param_groups(cfg, dtype, quant)  # bytes
    active = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    size = torch.finfo(dtype).bits // 8
    if cfg.tie_word_embeddings:
        weights = g["embed"] + g["other"] + active * g["experts"]  # the head reads the whole embedding
    else:
        weights = cfg.hidden_size * size + g["head"] + g["other"] + active * g["experts"]  # one embedding row
    weights = int(weights)
    kv = kv_bytes_per_token(cfg, dtype) * context
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}


def prefill_flops_per_token(cfg: ModelConfig, prompt_len: int) -> float:
    g = _param_groups(cfg)
    active = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    matmul = 2 * (g["other"] + active * g["experts"])
    if cfg.is_mla:  # naive MLA over the prompt: per-head q.k and p.v
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    mean_keys = (prompt_len + 1) / 2  # causal
    attention = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (qk + v) * mean_keys
    return matmul + attention


# ---- timing ------------------------------------------------------------------------------------


class _Clock:
    """A transformers streamer that only notes when each put() comes: the prompt, then every token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


COMPILE = {"on": False}  # set per row by bench_shape: ouvert decodes through torch.compile


def run_ouvert(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    """One prefill timed alone, then one greedy generate. Returns (prefill s, decode s per token, ids)."""
    tokens = prompt.unsqueeze(0)
    cache = Cache(model, 1, tokens.shape[1])
    t0 = time.perf_counter()
    prefill(model, tokens, torch.ones_like(tokens, dtype=torch.bool), cache)
    t_prefill = time.perf_counter() - t0
    del cache
    times: list[float] = []
    out = ouvert.generate(
        model, prompt.tolist(), new_tokens, SamplingParams(stop_token_ids=[]),
        on_token=lambda _: times.append(time.perf_counter()), compile=COMPILE["on"],
    )[0]
    return t_prefill, (times[-1] - times[0]) / max(new_tokens - 1, 1), out


def run_transformers(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    ids = prompt.unsqueeze(0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=True, logits_to_keep=1)
        t_prefill = time.perf_counter() - t0
        clock = _Clock()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, streamer=clock, pad_token_id=0,
        )
    times = clock.times[1:]  # the first put() is the prompt
    return t_prefill, (times[-1] - times[0]) / max(new_tokens - 1, 1), out[0, ids.shape[1] :].tolist()


RUNNERS = {"ouvert": run_ouvert, "transformers": run_transformers}


def load_both(paths: dict[str, Path], dtype: str, prompt: torch.Tensor) -> dict:
    """Both libraries' models of one checkpoint, each warmed up (a full prefill, a few decode steps)."""
    models = {}
    for lib in LIBS:
        t0 = time.perf_counter()
        models[lib] = load(lib, paths[dtype], dtype)
        print(f"  {lib} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        RUNNERS[lib](models[lib], prompt, 4)
    return models


def measure(models: dict, prompt: torch.Tensor, new_tokens: int, repeats: int, machine: Machine) -> dict:
    """Time both models, their repeats interleaved; best and median tokens/s of each."""
    runs: dict[str, list] = {lib: [] for lib in LIBS}
    for r in range(repeats):
        machine.sample()
        for lib in LIBS:
            runs[lib].append(RUNNERS[lib](models[lib], prompt, new_tokens))
            p, d, _ = runs[lib][-1]
            print(f"  [{r + 1}/{repeats}] {lib:12s} prefill {len(prompt) / p:8.1f} tok/s  decode {1 / d:7.2f} tok/s",
                  flush=True)
    res = {lib: rates(runs[lib], len(prompt)) for lib in LIBS}
    a, b = runs["ouvert"][-1][2], runs["transformers"][-1][2]
    res["greedy_tokens_equal"] = agreeing_prefix(a, b)
    res["ouvert_greedy_ids"] = a  # the last repeat's, for llama.cpp's rows to compare with
    return res


def rates(runs: list, prompt_len: int) -> dict[str, float]:
    """Tokens/s from timed runs of (prefill s, decode s per token, ids): best and median."""
    prefill_t = [p for p, _, _ in runs]
    decode_t = [d for _, d, _ in runs]
    return {
        "prefill_tok_s": prompt_len / min(prefill_t),
        "prefill_tok_s_median": prompt_len / statistics.median(prefill_t),
        "decode_tok_s": 1 / min(decode_t),
        "decode_tok_s_median": 1 / statistics.median(decode_t),
    }


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    """How many leading new tokens two greedy runs agree on."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- llama.cpp ---------------------------------------------------------------------------------

# Which ouvert row each llama.cpp type stands beside, and the checkpoint its GGUF is exported from.
LLAMA_TYPES = {"f32": ("float32", "none"), "bf16": ("bfloat16", "none"),
               "q8_0": ("bfloat16", "int8"), "q4_0": ("bfloat16", "int4"), "q4_k_m": ("bfloat16", "int4")}
LLAMA_SOURCE = {"f32": "float32", "bf16": "bfloat16", "q8_0": "float32", "q4_0": "float32", "q4_k_m": "float32"}
# Types the gguf package cannot write (k-quants): llama.cpp's own quantizer makes them from the f32 file,
# as `llama-quantize model-f32.gguf model-q4_k_m.gguf Q4_K_M` would.
LLAMA_QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
LLAMA_QUANTIZER = r"""
import sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params)
sys.exit(rc)
"""

# Runs in --llama-python (which need not have torch): argv[1] is a JSON of settings; prints one
# JSON line: the runs (prefill s, decode s per token, greedy ids) and /proc/self/status figures.
LLAMA_WORKER = r"""
import json, sys, time
a = json.loads(sys.argv[1])

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

try:
    import numpy as np
    import llama_cpp
except Exception as e:
    print(json.dumps({"error": f"cannot import llama_cpp in {sys.executable}: {e!r}", "fatal": True}))
    sys.exit(0)
rss_base = status("VmRSS")
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=a["gguf"], n_threads=a["threads"], n_threads_batch=a["threads"],
                      n_ctx=a["n_ctx"], n_batch=a["n_batch"], n_ubatch=a["n_batch"], logits_all=False,
                      verbose=False)
t_load = time.perf_counter() - t0
n_vocab, ctx = llm.n_vocab(), llm._ctx.ctx

def argmax():
    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

def run(prompt, new):
    llm.reset()  # the next eval drops the whole KV cache
    t0 = time.perf_counter()
    llm.eval(prompt)
    t_prefill = time.perf_counter() - t0
    ids, times = [argmax()], [time.perf_counter()]
    for _ in range(new - 1):
        llm.eval([ids[-1]])
        ids.append(argmax())
        times.append(time.perf_counter())
    return t_prefill, (times[-1] - times[0]) / max(new - 1, 1), ids

run(a["prompt"], 4)  # warm-up
runs = []
for r in range(a["repeats"]):
    runs.append(run(a["prompt"], a["new_tokens"]))
    print(f"  [{r + 1}/{a['repeats']}] llama.cpp    prefill {len(a['prompt']) / runs[-1][0]:8.1f} tok/s  "
          f"decode {1 / runs[-1][1]:7.2f} tok/s", file=sys.stderr, flush=True)
print(json.dumps({"runs": runs, "load_s": t_load, "rss_base": rss_base, "rss_peak": status("VmHWM"),
                  "version": llama_cpp.__version__}))
"""


def ensure_gguf_tokenizer() -> Path:
    """A small byte-level BPE tokenizer (ouvert's trainer, on ouvert's sources), cached in OUT: a GGUF
    file must carry one. The benchmark feeds token ids, so which tokenizer does not matter; the ids
    it does not use are written as unused tokens."""
    from ouvert.tokenizer import train_tokenizer

    out = OUT / "gguf-tokenizer"
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(sorted((ROOT / "ouvert").glob("**/*.py")), 1024, out)
    return out


def ensure_gguf(cfg: ModelConfig, name: str, kind: str, seed: int = 0, llama_python: str = sys.executable) -> Path:
    """OUT/{name}-seed{seed}-{kind}.gguf, written by `python -m ouvert export gguf` from the cached
    checkpoint (built if missing, from the same seed); a k-quant by llama.cpp from the f32 file."""
    out = OUT / f"{name}-seed{seed}-{kind}.gguf"
    if kind in LLAMA_QUANTIZED:
        if not out.is_file():
            src = ensure_gguf(cfg, name, "f32", seed)
            t0 = time.perf_counter()
            tmp = out.with_suffix(".tmp")
            subprocess.run([llama_python, "-c", LLAMA_QUANTIZER, str(src), str(tmp), LLAMA_QUANTIZED[kind]],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tmp.rename(out)
            print(f"  llama.cpp quantized {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
        return out
    src_dtype = LLAMA_SOURCE[kind]
    src = ensure_checkpoints(cfg, name, [src_dtype], seed)[src_dtype]
    if not out.is_file():
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ouvert", "export", "gguf", "--model", str(src), "--out", str(out),
                        "--type", kind, "--tokenizer", str(ensure_gguf_tokenizer())], check=True)
        print(f"  exported {out.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def gguf_decode_bytes_per_token(path: Path, cfg: ModelConfig, context: int) -> dict[str, int]:
    """What llama.cpp reads per decoded token: every tensor of the GGUF in its stored type (an untied
    embedding as one row; k/E of the stacked routed experts), plus its KV cache at `context`,
    f16 K and V (llama.cpp's default) of the lengths the file declares per layer."""
    from ouvert.checkpoint.gguf import GGUFFile

    f = GGUFFile(path)
    untied = "output.weight" in f.tensors
    active = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    weights = 0.0
    for tname, t in f.tensors.items():
        n = t.data.nbytes
        if tname == "token_embd.weight" and untied:
            n = n / t.shape[0]
        elif "_exps." in tname:
            n = n * active
        weights += n
    arch = f.fields["general.architecture"]
    kv_len = f.fields[f"{arch}.attention.key_length"] + f.fields[f"{arch}.attention.value_length"]
    kv = cfg.num_hidden_layers * f.fields[f"{arch}.attention.head_count_kv"] * kv_len * 2 * context
    return {"weights": int(weights), "kv_cache": kv, "total": int(weights) + kv, "file": path.stat().st_size}


def run_llama_cpp(python: str, gguf: Path, prompt: list[int], args) -> dict:
    """Time one GGUF in a subprocess of `python`; {"error": why} when it cannot."""
    settings = {"gguf": str(gguf), "threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens,
                "repeats": args.repeats, "n_ctx": len(prompt) + args.new_tokens + 16, "n_batch": len(prompt)}
    try:
        p = subprocess.run([python, "-c", LLAMA_WORKER, json.dumps(settings)], stdout=subprocess.PIPE,
                           stderr=None, text=True, timeout=3600)
    except OSError as e:  # no such python: no row can run
        return {"error": f"cannot run {python}: {e!r}", "fatal": True}
    except subprocess.TimeoutExpired as e:
        return {"error": repr(e)}
    if p.returncode != 0:
        why = f"signal {signal.Signals(-p.returncode).name}" if p.returncode < 0 else f"exit status {p.returncode}"
        return {"error": f"{python} died with {why}"
                + (" (an illegal instruction: a native build using AMX? see bench/README.md)"
                   if p.returncode == -signal.SIGILL else "")}
    lines = p.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {"error": "no output"}


def bench_llama_cpp(name: str, cfg: ModelConfig, args, machine: Machine, ouvert_rows: list[dict]) -> list[dict]:
    """llama.cpp's rows for one shape: each type exported from the shape's checkpoint and timed."""
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed))
    mean_context = args.prompt_len + args.new_tokens // 2
    reference = {(r["dtype"], r["quant"]): r for r in ouvert_rows if not r.get("compile")}
    rows = []
    for kind in args.llama_types:
        print(f"{name} llama.cpp {kind}", flush=True)
        gguf = ensure_gguf(cfg, name, kind, args.seed, args.llama_python)
        machine.sample()
        res = run_llama_cpp(args.llama_python, gguf, prompt.tolist(), args)
        if "error" in res:
            print(f"  llama.cpp {kind}: skipped, {res['error']}", flush=True)
            rows.append({"shape": name, "lib": "llama.cpp", "type": kind, "error": res["error"]})
            if res.get("fatal"):
                break
            continue
        row = {
            "shape": name, "lib": "llama.cpp", "type": kind, "llama_cpp": res["version"], "gguf": gguf.name,
            "beside": LLAMA_TYPES[kind], "new_tokens": args.new_tokens, **rates(res["runs"], args.prompt_len),
            "load_s": res["load_s"], "rss_base_bytes": res["rss_base"], "rss_peak_bytes": res["rss_peak"],
            "decode_bytes_per_token": gguf_decode_bytes_per_token(gguf, cfg, mean_context),
        }
        ref = reference.get(LLAMA_TYPES[kind])
        if ref is not None and "ouvert_greedy_ids" in ref:
            a, b = res["runs"][-1][2], ref["ouvert_greedy_ids"]
            row["greedy_tokens_equal_ouvert"] = agreeing_prefix(a, b)
        rows.append(row)
    return rows


# ---- report ------------------------------------------------------------------------------------


def bench_shape(name: str, cfg: ModelConfig, args, machine: Machine, extra=None) -> list[dict]:
    """All dtypes of one shape: checkpoints, timings, what the ceilings need. `extra(models, dtype)`,
    if given, adds figures to each row while both models are loaded."""
    paths = ensure_checkpoints(cfg, name, args.dtypes, args.seed, args.rebuild)
    prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed))
    rows = []
    mean_context = args.prompt_len + args.new_tokens // 2
    for dtype in args.dtypes:
        print(f"{name} {dtype}", flush=True)
        models = load_both(paths, dtype, prompt)
        modes = [False] + [True] * bool(getattr(args, "compile", False))
        variants = [(q, c) for q in [None, *getattr(args, "quant", [])] for c in modes]
        for quant, compiled in variants:  # quantized rows: ouvert's model swapped, transformers' kept
            COMPILE["on"] = compiled
            if quant is not None and not compiled:
                print(f"{name} {dtype} {quant} (transformers: {dtype})", flush=True)
                models["ouvert"] = None
                gc.collect()
                models["ouvert"] = ouvert.load_model(ensure_quantized(paths[dtype], quant, args.rebuild))
                run_ouvert(models["ouvert"], prompt, 4)  # warm up
            if compiled:
                print(f"{name} {dtype} {quant or ''} compiled decode (first call compiles)", flush=True)
                t0 = time.perf_counter()
                run_ouvert(models["ouvert"], prompt, 4)
                print(f"  compiled in {time.perf_counter() - t0:.0f} s", flush=True)
            res = measure(models, prompt, args.new_tokens, args.repeats, machine)
            if extra is not None:
                res.update(extra(models, dtype))
            rows.append({
                "shape": name, "dtype": dtype, "quant": quant or "none", "compile": compiled,
                "params": num_params(cfg),
                "new_tokens": args.new_tokens, **res,
                "decode_bytes_per_token": decode_bytes_per_token(cfg, DTYPES[dtype], mean_context, quant),
                "prefill_flops_per_token": prefill_flops_per_token(cfg, args.prompt_len),
            })
        del models
        gc.collect()
    return rows


def add_ceilings(rows: list[dict], machine: Machine) -> None:
    """Ceilings from the best machine samples of the whole run."""
    for r in rows:
        r["decode_ceiling_tok_s"] = machine.read_gb_s * 1e9 / r["decode_bytes_per_token"]["total"]
        r["prefill_ceiling_tok_s"] = machine.gflop_s[r["dtype"]] * 1e9 / r["prefill_flops_per_token"]


def add_llama_ceilings(rows: list[dict], machine: Machine) -> None:
    for r in rows:
        if "error" not in r:
            r["decode_ceiling_tok_s"] = machine.read_gb_s * 1e9 / r["decode_bytes_per_token"]["total"]


def print_llama_table(llama_rows: list[dict], rows: list[dict]) -> None:
    """llama.cpp's rows beside the ouvert row of the same precision (compiled decode where there is one)."""
    if not llama_rows:
        return
    ours: dict = {}
    for r in rows:  # the compiled row, if any, comes after the eager one and wins
        ours[(r["shape"], r["dtype"], r["quant"])] = r
    head = (f"{'shape':18s} {'llama.cpp':9s} {'phase':8s} {'llama.cpp':>10s} {'ouvert':>9s} {'ouvert row':18s} "
            f"{'ratio':>6s} {'ceiling':>9s} {'llama/ceil':>10s} {'peak RSS':>9s}")
    print(head + "  (tok/s, best of repeats; ratio: ouvert / llama.cpp)")
    print("-" * len(head))
    for lr in llama_rows:
        if "error" in lr:
            print(f"{lr['shape']:18s} {lr['type']:9s} skipped: {lr['error']}")
            continue
        o = ours.get((lr["shape"], *lr["beside"]))
        label = f"{lr['beside'][0]} {lr['beside'][1]}" + ("+c" if o and o.get("compile") else "") if o else "-"
        for phase in ("prefill", "decode"):
            v = lr[f"{phase}_tok_s"]
            ov = o["ouvert"][f"{phase}_tok_s"] if o else None
            ceil = lr.get("decode_ceiling_tok_s") if phase == "decode" else None
            print(f"{lr['shape']:18s} {lr['type']:9s} {phase:8s} {v:10.1f} "
                  + (f"{ov:9.1f} {label:18s} {ov / v:6.2f}" if ov else f"{'-':>9s} {label:18s} {'-':>6s}")
                  + (f" {ceil:9.1f} {v / ceil:10.0%}" if ceil else f" {'':9s} {'':10s}")
                  + (f" {lr['rss_peak_bytes'] / 1e6:7.0f}MB" if phase == "decode" else ""))
    print()
    for lr in llama_rows:
        if "error" not in lr:
            b = lr["decode_bytes_per_token"]
            eq = lr.get("greedy_tokens_equal_ouvert")
            print(f"{lr['shape']} llama.cpp {lr['type']} ({lr['gguf']}, {b['file'] / 1e6:.0f} MB): decode reads "
                  f"{b['weights'] / 1e6:.0f} MB of weights + {b['kv_cache'] / 1e6:.1f} MB of KV cache per token; "
                  f"peak RSS {lr['rss_peak_bytes'] / 1e6:.0f} MB (after import {lr['rss_base_bytes'] / 1e6:.0f} MB)"
                  + (f"; greedy tokens equal to ouvert's: {eq}/{lr['new_tokens']}" if eq is not None else ""))


def print_table(rows: list[dict]) -> None:
    head = (f"{'shape':18s} {'dtype':9s} {'weights':7s} {'phase':8s} {'ouvert':>9s} {'transf.':>9s} {'ratio':>6s} "
            f"{'ceiling':>9s} {'ouv/ceil':>8s}  (tok/s, best of repeats; transformers in float; +c: compiled decode)")
    print(head)
    print("-" * len(head))
    for r in rows:
        q = r.get("quant", "none") + ("+c" if r.get("compile") else "")
        for phase in ("prefill", "decode"):
            o, t = r["ouvert"][f"{phase}_tok_s"], r["transformers"][f"{phase}_tok_s"]
            c = r[f"{phase}_ceiling_tok_s"]
            print(f"{r['shape']:18s} {r['dtype']:9s} {q:7s} {phase:8s} {o:9.1f} {t:9.1f} {o / t:6.2f} {c:9.1f} "
                  f"{o / c:8.0%}")
    print()
    for r in rows:
        b = r["decode_bytes_per_token"]
        print(f"{r['shape']} {r['dtype']} {r.get('quant', 'none')}: decode reads {b['weights'] / 1e6:.0f} MB of "
              f"weights + "
              f"{b['kv_cache'] / 1e6:.1f} MB of KV cache per token; prefill {r['prefill_flops_per_token'] / 1e9:.2f} "
              f"GFLOP per token; greedy tokens equal: {r['greedy_tokens_equal']}/{r['new_tokens']}")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags bench_decode.py and bench_deepseek.py share."""
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per library; the best is reported")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rebuild", action="store_true", help="rewrite the cached checkpoints in bench/out/")
    p.add_argument("--compile", action="store_true", help="also a row with ouvert's decode through torch.compile")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.dtypes = args.dtypes.split(",")
    if set(args.dtypes) - DTYPES.keys():
        p.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (decode speed is timed from the first new token to the last)")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2-135m,llama-3.2-1b", help="comma-separated ouvert presets")
    p.add_argument("--quant", default="int8,int4", help="weight-only rows beside float: int8, int4, or none")
    p.add_argument("--llama-types", default=",".join(LLAMA_TYPES),
                   help=f"llama.cpp rows: comma-separated from {', '.join(LLAMA_TYPES)}, or none")
    p.add_argument("--llama-python", default=sys.executable,
                   help="python with llama-cpp-python installed (default: this one); see bench/README.md")
    p.add_argument("--llama-only", action="store_true", help="llama.cpp's rows alone, no ouvert / transformers")
    add_common_args(p)
    args = check_args(p, p.parse_args(argv))
    args.shapes = args.shapes.split(",")
    args.quant = [] if args.quant in ("", "none") else args.quant.split(",")
    if set(args.quant) - {"int8", "int4"}:
        p.error("--quant: choose from int8, int4, none")
    args.llama_types = [] if args.llama_types in ("", "none") else args.llama_types.split(",")
    if set(args.llama_types) - LLAMA_TYPES.keys():
        p.error(f"--llama-types: choose from {', '.join(LLAMA_TYPES)}, none")
    return args


def setup(args) -> dict:
    """Thread count, versions and settings for the JSON; warns when the machine is busy already."""
    torch.set_num_threads(args.threads)
    import transformers

    load = os.getloadavg()[0]
    omp = os.environ.get("OMP_WAIT_POLICY")
    if load > 0.5:
        print(f"warning: load average {load:.1f} before the run; other processes will slow the timings"
              + ("" if omp else " (OMP_WAIT_POLICY=PASSIVE limits the damage, see bench/README.md)"), flush=True)
    return {"torch": torch.__version__, "transformers": transformers.__version__, "ouvert": ouvert.__version__,
            "threads": args.threads, "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "load_average_start": load, "omp_wait_policy": omp}


def shape_config(name: str) -> ModelConfig:
    """An ouvert preset, or deepseek-v3-small: bench_deepseek.py's DeepSeek-V3-shaped config."""
    if name == "deepseek-v3-small":
        from bench_deepseek import CONFIG

        return ModelConfig.from_hf(CONFIG)
    return ouvert.preset(name)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = setup(args)
    t0 = time.perf_counter()
    machine = Machine(args.dtypes)
    rows, llama_rows = [], []
    for name in args.shapes:
        cfg = shape_config(name)
        shape_rows = [] if args.llama_only else bench_shape(name, cfg, args, machine)
        rows += shape_rows
        llama_rows += bench_llama_cpp(name, cfg, args, machine, shape_rows)
    add_ceilings(rows, machine)
    add_llama_ceilings(llama_rows, machine)
    print()
    machine.print()
    if rows:
        print_table(rows)
        print()
    print_llama_table(llama_rows, rows)
    print(f"total {time.perf_counter() - t0:.0f} s; load average {info['load_average_start']:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; OMP_WAIT_POLICY={info['omp_wait_policy']}")
    print(json.dumps({"bench": "decode", **info, "llama_python": args.llama_python, **machine.summary(),
                      "results": rows, "llama_cpp": llama_rows}))


if __name__ == "__main__":
    main()
