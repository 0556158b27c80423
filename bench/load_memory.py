"""Peak resident memory of loading a bfloat16 Llama-3.2-1B-shaped checkpoint: ouvert against transformers.

Each load runs in a fresh Python subprocess, which reads /proc/self/status:
  baseline   VmRSS once torch and the library are imported, before loading
  peak       VmHWM (the high-water mark of RSS) once the load returns (ouvert.load_model, or
             transformers' AutoModelForCausalLM.from_pretrained with dtype=bfloat16)
  after use  VmHWM after one 16-token forward, which touches every weight: a loader that maps the
             file lazily cannot hide its cost there. RssAnon / RssFile split the resident set into
             private memory and pages of the (memory-mapped) checkpoint file.
Both ratios are printed: peak / weight bytes, and (peak - baseline) / weight bytes. The target for
ouvert is a peak below 1.5x the weight bytes. The checkpoint is bench_decode.py's (bench/out/), built
if missing; weight bytes are the parameters' bytes (the tied embedding counted once).

    .venv/bin/python bench/load_memory.py
    .venv/bin/python bench/load_memory.py --shape smollm2-135m     # a quick check
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LIBS = ("ouvert", "transformers")
FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    """This process's memory figures from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


def child(lib: str, path: str, threads: int) -> None:
    """Run in the subprocess: import, load, forward, printing one JSON line of figures."""
    import torch

    torch.set_num_threads(threads)
    if lib == "ouvert":
        import ouvert

        load = lambda: ouvert.load_model(path)
    else:
        from transformers import AutoModelForCausalLM

        load = lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    baseline = status()
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    loaded = status()
    with torch.inference_mode():
        model(torch.zeros(1, 16, dtype=torch.long))
    used = status()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"lib": lib, "baseline": baseline, "loaded": loaded, "used": used,
                      "load_s": seconds, "model_weight_bytes": weights}))


def measure(lib: str, path: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", lib, str(path), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{lib} load failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(r: dict, weight_bytes: int) -> dict:
    base = r["baseline"]["VmRSS"]
    peak, peak_used = r["loaded"]["VmHWM"], r["used"]["VmHWM"]
    return {
        "lib": r["lib"], "load_s": r["load_s"], "baseline_rss": base, "peak_rss_load": peak,
        "peak_rss_after_forward": peak_used, "rss_anon_loaded": r["loaded"]["RssAnon"],
        "rss_file_loaded": r["loaded"]["RssFile"], "rss_anon_after_forward": r["used"]["RssAnon"],
        "rss_file_after_forward": r["used"]["RssFile"],
        "ratio_load": peak / weight_bytes, "ratio_load_minus_baseline": (peak - base) / weight_bytes,
        "ratio_after_forward": peak_used / weight_bytes,
        "ratio_after_forward_minus_baseline": (peak_used - base) / weight_bytes,
    }


def print_table(rows: list[dict], weight_bytes: int) -> None:
    gb = lambda b: f"{b / 1e9:6.2f}"
    print(f"weight bytes: {weight_bytes / 1e9:.2f} GB (target for ouvert: peak below 1.5x)")
    head = (f"{'library':13s} {'load s':>6s} {'base GB':>7s} {'peak GB':>7s} {'x w':>5s} {'x w-base':>8s} "
            f"{'anon GB':>7s} {'file GB':>7s} | {'fwd peak':>8s} {'x w':>5s} {'x w-base':>8s}")
    print(head)
    print("-" * len(head))
    for s in rows:
        print(f"{s['lib']:13s} {s['load_s']:6.1f} {gb(s['baseline_rss']):>7s} {gb(s['peak_rss_load']):>7s} "
              f"{s['ratio_load']:5.2f} {s['ratio_load_minus_baseline']:8.2f} {gb(s['rss_anon_loaded']):>7s} "
              f"{gb(s['rss_file_loaded']):>7s} | {gb(s['peak_rss_after_forward']):>8s} "
              f"{s['ratio_after_forward']:5.2f} {s['ratio_after_forward_minus_baseline']:8.2f}")
    print("base: RSS after imports; peak: VmHWM once loaded; x w: / weight bytes; x w-base: (peak - base) / weight "
          "bytes;\nanon/file: RssAnon/RssFile once loaded; fwd peak: VmHWM after a 16-token forward")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.2-1b", help="ouvert preset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", nargs=2, metavar=("LIB", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child, args.threads)
        return

    import bench_decode as bd  # beside this script, so on sys.path

    import ouvert
    from ouvert.checkpoint.base import num_params

    cfg = ouvert.preset(args.shape)
    path = bd.ensure_checkpoints(cfg, args.shape, ["bfloat16"], args.seed)["bfloat16"]
    weight_bytes = num_params(cfg) * 2
    rows = []
    for lib in LIBS:
        r = measure(lib, path, args.threads)
        assert r["model_weight_bytes"] == weight_bytes, (r["model_weight_bytes"], weight_bytes)
        rows.append(summarize(r, weight_bytes))
    print(f"{args.shape} bfloat16, {num_params(cfg) / 1e9:.2f}B parameters, checkpoint {path}")
    print_table(rows, weight_bytes)
    import torch
    import transformers

    print(json.dumps({"bench": "load_memory", "shape": args.shape, "dtype": "bfloat16", "weight_bytes": weight_bytes,
                      "torch": torch.__version__, "transformers": transformers.__version__, "results": rows}))


if __name__ == "__main__":
    main()
