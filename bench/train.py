"""Training speed of ouvert against a plain transformers training step, on CPU, with MFU.

One random model in a preset's shape (default SmolLM2-135M) is built by ouvert; transformers'
LlamaForCausalLM gets the very same weights (ouvert's HF state dict). Both then run the same
training step on the same random batch: forward, cross-entropy over the next tokens, backward,
AdamW (torch's default foreach implementation, same hyper-parameters), zero_grad. Per variant:
--warmup steps untimed, then the median of --steps timed steps.

  tokens/s  batch * seq_len / median step time
  MFU       achieved FLOP/s over the matmul peak measured in this run (a 2048^3 matmul in the
            variant's compute dtype, best of 5, same thread count), with FLOPs per token =
            6 * parameters (the tied head counted once) + 6 * layers * seq_len * (heads * head_dim)
            for causal attention (forward 2 matmuls of half the square, backward twice that).

Variants: float32 eager, bf16 autocast (weights and optimizer float32, as ouvert's trainer does),
and with --compile, ouvert's model under torch.compile. Ends with one JSON line.

    .venv/bin/python bench/train.py                              # SmolLM2-135M shape, seq 512
    .venv/bin/python bench/train.py --layers 2 --steps 2 --warmup 1  # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from bench_decode import matmul_peak

import ouvert
from ouvert.checkpoint.hf import hf_state_dict


def flops_per_token(cfg, params: int, seq_len: int) -> float:
    attn = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.head_dim
    return 6 * params + attn


def ouvert_step(model):
    def loss_fn(x, y):
        logits = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss_fn


def hf_step(model):
    def loss_fn(x, y):  # labels shifted by us, as ouvert's loss sees them
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss_fn


def time_training(model, loss_fn, x, y, autocast: bool, warmup: int, steps: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick checks)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time ouvert under torch.compile")
    ap.add_argument("--variants", default="float32,bf16-autocast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = ouvert.preset(args.preset)
    if args.layers:
        cfg.num_hidden_layers = args.layers
    torch.manual_seed(0)
    ours = ouvert.Transformer(cfg)
    ours.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "sdpa"
    theirs = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = theirs.load_state_dict(hf_state_dict(ours), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    theirs.tie_weights()
    ours.train()
    theirs.train()
    params = sum(p.numel() for p in ours.parameters())
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():  # same model, same numbers: a check that the comparison is fair
        d = (ours(x[:1, :32]) - theirs(input_ids=x[:1, :32]).logits).abs().max().item()
    print(f"{args.preset}: {params / 1e6:.1f}M parameters, {cfg.num_hidden_layers} layers, batch {args.batch} x "
          f"{args.seq_len}, {args.threads} threads; max logit difference ouvert vs transformers {d:.2e}")

    fpt = flops_per_token(cfg, params, args.seq_len)
    peaks = {"float32": matmul_peak(torch.float32, 5), "bf16-autocast": matmul_peak(torch.bfloat16, 5)}
    print(f"matmul peak: float32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bfloat16 {peaks['bf16-autocast'] / 1e9:.1f}")
    runs = []
    for variant in args.variants.split(","):
        libs = [("ouvert", ours, ouvert_step(ours)), ("transformers", theirs, hf_step(theirs))]
        if args.compile:
            libs.insert(1, ("ouvert+compile", ours, ouvert_step(torch.compile(ours))))
        for lib, model, fn in libs:
            times = time_training(model, fn, x, y, variant == "bf16-autocast", args.warmup, args.steps)
            t = statistics.median(times)
            tps = args.batch * args.seq_len / t
            mfu = tps * fpt / peaks[variant]
            runs.append({"lib": lib, "variant": variant, "step_s": t, "tokens_per_s": tps, "mfu": mfu})
            print(f"  {variant:14s} {lib:15s} {t:7.2f} s/step  {tps:8.1f} tokens/s  MFU {mfu:5.1%}", flush=True)
    for variant in args.variants.split(","):
        base = next(r for r in runs if r["lib"] == "transformers" and r["variant"] == variant)
        for r in runs:
            if r["variant"] == variant and r["lib"] != "transformers":
                r["vs_transformers"] = r["tokens_per_s"] / base["tokens_per_s"]
                print(f"  {variant}: {r['lib']} / transformers = {r['vs_transformers']:.2f}x")
    print(json.dumps({"bench": "train", "preset": args.preset, "layers": cfg.num_hidden_layers,
                      "seq_len": args.seq_len, "batch": args.batch, "threads": args.threads,
                      "peak_flops": peaks, "flops_per_token": fpt, "runs": runs}))


if __name__ == "__main__":
    main()
