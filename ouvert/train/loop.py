"""The one training loop: every objective runs through `train(TrainConfig)`.

AdamW with decay / no-decay groups, warmup then cosine or warmup-stable-decay, gradient
accumulation and clipping, optional bf16 autocast, activation checkpointing and torch.compile;
eval loss every `eval_every` steps, sample generations every `sample_every`, a checkpoint
directory (HF layout plus train_state/) every `save_every`, the last `keep_last` kept. Resume is
exact: weights, optimizer, schedule, RNG and data position all come back, so N steps, a stop and
N more give bitwise the weights of 2N steps straight (float32, CPU).

The same code runs in one process and under torchrun (DDP or FSDP2, train/distributed.py); only
rank 0 prints and writes. What the loop runs comes from around it: the settings (config.py), the
objective (tasks.py), the checkpoints it writes and resumes from (state.py), and DeepSeek's
expert balancing (balance.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

import ouvert.train.distributed as D
import ouvert.train.lora as lora
from ouvert.checkpoint.hf import read_config
from ouvert.checkpoint.io import load_model, load_tokenizer
from ouvert.config import preset
from ouvert.data import read_manifest
from ouvert.generate import SamplingParams, generate
from ouvert.model import Transformer
from ouvert.train.balance import Balancer
from ouvert.train.config import TrainConfig
from ouvert.train.state import (
    check_resumable,
    latest_checkpoint,
    read_history,
    restore,
    run_provenance,
    save_checkpoint,
)
from ouvert.train.tasks import make_task


def lr_at(step: int, c: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    if step < c.warmup_steps:
        return c.lr * (step + 1) / c.warmup_steps
    if c.schedule == "constant":
        return c.lr
    if c.schedule == "cosine":
        progress = min(1.0, (step - c.warmup_steps) / max(1, c.max_steps - c.warmup_steps))
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * progress))
    if c.schedule == "wsd":
        decay_start = c.max_steps - int(c.decay_fraction * c.max_steps)
        if step < decay_start:
            return c.lr
        return c.lr + (c.min_lr - c.lr) * (step - decay_start + 1) / max(1, c.max_steps - decay_start)
    raise ValueError(f"schedule must be cosine, wsd or constant, got {c.schedule!r}")


CALIBRATION_STEPS = 6


def calibration_end(c: TrainConfig, step: int) -> int:
    """The step after which a max_time run fixes its length. The steps timed must lie inside warmup,
    whose learning rates do not depend on max_steps, so a replay of the fixed count runs them alike."""
    until = step + CALIBRATION_STEPS
    if c.schedule != "constant":
        until = min(until, c.warmup_steps)
    if until <= step:
        raise ValueError(f"max_time: the step count is fixed during warmup, but warmup_steps is {c.warmup_steps} "
                         f"and the run is at step {step}; set warmup_steps of at least 1, or max_steps instead")
    return until


def steps_for_time(c: TrainConfig, step: int, elapsed: float, per_step: float, d: D.Dist) -> int:
    """How many steps fit in max_time at per_step seconds each, periodic evaluation included (its
    forward passes cost about a third of a step each); at most c.max_steps, at least `step`."""
    if c.eval_every:
        per_step *= 1 + c.eval_steps / (3 * c.eval_every)
    per_step = D.all_reduce_mean(torch.tensor(per_step, device=d.device), d).item()  # one count for all ranks
    return min(c.max_steps, step + max(0, int(0.95 * (c.max_time - elapsed) / per_step)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases and embeddings do not (as in GPT-3 / Llama recipes)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed_tokens" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(c: TrainConfig, vocab_size: int, bos: int | None, eos: list[int]) -> Transformer:
    """The init_from checkpoint, or the preset with c.model's overrides, initialised from c.seed."""
    if c.init_from:
        return load_model(c.init_from, dtype=torch.float32)
    cfg = preset(c.preset)
    overrides = dict(c.model)
    overrides.setdefault("vocab_size", vocab_size)
    overrides.setdefault("bos_token_id", bos)
    overrides.setdefault("eos_token_id", eos[0] if len(eos) == 1 else eos)
    cfg = cfg.replace(**overrides)  # derives head_dim again for an overridden width or head count
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"model vocab_size {cfg.vocab_size} < tokenizer's {vocab_size}")
    model = Transformer(cfg)
    model.init_weights(std=c.init_std, generator=torch.Generator().manual_seed(c.seed))
    return model


def _tokenizer_for(c: TrainConfig):
    """Pretraining: the data's own tokenizer. Fine-tuning: c.tokenizer, else init_from's."""
    if c.objective == "pretrain":
        return load_tokenizer(read_manifest(c.data)["tokenizer"])
    src = c.tokenizer or c.init_from
    if not src:
        raise ValueError(f"objective {c.objective} needs init_from (a checkpoint) or tokenizer (a directory)")
    return load_tokenizer(src)


def train(c: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the final checkpoint directory."""
    d = D.init(c.device)
    if c.threads:
        torch.set_num_threads(c.threads)
    out = Path(c.out_dir)
    tokenizer = _tokenizer_for(c)
    torch.manual_seed(c.seed)
    random.seed(c.seed)
    np.random.seed(c.seed)

    start_ckpt = latest_checkpoint(out) if resume else None
    if resume and start_ckpt is None:
        D.print0(d, f"no checkpoint with train_state in {out}; starting from scratch")
    if start_ckpt is not None:
        check_resumable(start_ckpt)
    if start_ckpt is not None and not c.lora_rank:
        model = Transformer(read_config(start_ckpt))  # weights come with the full state below
    else:
        model = build_model(c, tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.stop_token_ids)
    if c.lora_rank:
        lora.apply_lora(model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets,
                        generator=torch.Generator().manual_seed(c.seed))
        if start_ckpt is not None:
            lora.load_adapter_weights(model, start_ckpt)
    model.to(d.device).train()
    balancer = Balancer(model, c.seq_balance_alpha)  # DeepSeek MoE: expert loads, balance loss
    if c.activation_checkpointing:
        for layer in model.layers:  # recompute each block in backward instead of keeping its activations
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    raw = model
    task = make_task(c, d, tokenizer, raw, balancer)
    for p in getattr(task, "problems", []):
        D.print0(d, f"warning: {p}", file=sys.stderr)
    model = D.wrap(model, d, c.distributed)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(raw, c.weight_decay), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)
    step, tokens_seen, wall_before = 0, 0, 0.0
    if start_ckpt is not None:
        state = restore(start_ckpt, model, optimizer, task, lora_only=bool(c.lora_rank))
        step, tokens_seen, wall_before = state["step"], state.get("tokens_seen", 0), state.get("wall_clock_s", 0.0)
        D.print0(d, f"resumed from {start_ckpt} at step {step}")
        if c.max_time and state.get("max_steps_from_time"):
            c.max_steps = state["max_steps"]  # the budget was turned into steps before the stop
    calibrate_until = calibration_end(c, step) if c.max_time and not (
        start_ckpt is not None and state.get("max_steps_from_time")) else None
    first_step, t_first = step, None
    provenance = run_provenance(c, d) if d.is_main else {}
    t_start = time.perf_counter()
    if c.compile:
        model = torch.compile(model)

    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
    metrics_file = out / "metrics.jsonl"
    history = read_history(metrics_file, step) if d.is_main else []
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=c.dtype == "bfloat16")
    bar = None
    if d.is_main and c.progress:
        from tqdm import tqdm

        bar = tqdm(total=c.max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr)
    t_last, tok_since = time.perf_counter(), 0
    last_ckpt = start_ckpt
    end = min(c.stop_at or c.max_steps, c.max_steps)
    while step < end:
        lr = lr_at(step, c)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if c.router_bias_rate:
            balancer.start_step()
        sums: dict[str, float] = {}
        for micro in range(c.grad_accum):
            batch = {k: v.to(d.device) for k, v in task.next_batch().items()}
            sync = micro == c.grad_accum - 1
            ctx = model.no_sync() if (d.active and not sync and hasattr(model, "no_sync")) else _nullctx()
            with ctx:
                with autocast:
                    loss, parts = task.loss(model, batch)
                (loss / c.grad_accum).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / c.grad_accum
            n_tokens = task.tokens(batch) * d.world_size
            tok_since += n_tokens
            tokens_seen += n_tokens
            if c.router_bias_rate:
                balancer.tally()
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if c.router_bias_rate:
            balancer.update_router_bias(c.router_bias_rate, d)
        step += 1
        if calibrate_until is not None:
            now = time.perf_counter()
            t_first = t_first or now  # the first step (allocations, warm-up) is left out of the speed
            if step >= calibrate_until:
                n = step - first_step - 1
                per_step = (now - t_first) / n if n else now - t_start
                c.max_steps = steps_for_time(c, step, wall_before + now - t_start, per_step, d)
                end = min(c.stop_at or c.max_steps, c.max_steps)
                calibrate_until = None
                provenance["train_config"] = dataclasses.asdict(c)
                D.print0(d, f"max_time {c.max_time:.0f} s: {per_step:.2f} s/step, so {c.max_steps} steps")
                if bar is not None:
                    bar.total = c.max_steps
        record: dict[str, Any] = {"step": step, "lr": lr, "grad_norm": float(grad_norm)}
        for k, v in sums.items():
            record["loss" if k == "lm_loss" else k] = D.all_reduce_mean(torch.tensor(v), d).item()
        if balancer.layers:
            record["expert_load_max_over_mean"] = balancer.load_max_over_mean()
        if step % c.log_every == 0 or step == end:
            now = time.perf_counter()
            record["tokens_per_s"] = tok_since / (now - t_last)
            t_last, tok_since = now, 0
        if c.eval_every and (step % c.eval_every == 0 or step == c.max_steps):
            model.eval()
            with torch.no_grad(), autocast:
                record.update(task.evaluate(model))
            model.train()
        if d.is_main:
            history.append(record)
            with open(metrics_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            if any(k.startswith("val_") for k in record):
                plot_losses(history, out / "loss.png")
        if bar is not None:
            post = {"loss": f"{record['loss']:.3f}", "lr": f"{lr:.2e}"}
            if "tokens_per_s" in record:
                post["tok/s"] = f"{record['tokens_per_s']:.0f}"
            for k in ("val_loss", "val_accuracy", "val_reward", "reward_mean"):
                if k in record:
                    post[k.removeprefix("val_")] = f"{record[k]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if c.sample_every and step % c.sample_every == 0 or (step == c.max_steps and c.sample_tokens > 0):
            text = sample_text(raw, tokenizer, c)
            if bar is not None:
                bar.write(f"--- sample at step {step} ---\n{text}\n---")
        if (c.save_every and step % c.save_every == 0) or step == end:
            run = {"step": step, "tokens_seen": tokens_seen,
                   "wall_clock_s": round(wall_before + time.perf_counter() - t_start, 3)}
            run["max_steps_from_time"] = bool(c.max_time) and calibrate_until is None
            last_ckpt = save_checkpoint(out, step, model, optimizer, task, c, d, tokenizer, history,
                                        {**provenance, **run})
    if bar is not None:
        bar.close()
    if d.is_main and step == c.max_steps and last_ckpt is not None:
        link = out / "final"  # out_dir/final -> the last checkpoint, replaced atomically
        tmp = out / ".final.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(last_ckpt.name)
        tmp.rename(link)
    D.shutdown()
    return last_ckpt


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sample_text(model, tokenizer, c: TrainConfig) -> str:
    """A sampled continuation of c.sample_prompt, to read beside the loss as the model learns."""
    model.eval()
    ids = tokenizer.encode(c.sample_prompt)
    params = SamplingParams(temperature=0.8, top_k=50, seed=c.seed, stop_token_ids=tokenizer.stop_token_ids)
    out = generate(model, ids, c.sample_tokens, params)
    model.train()
    return tokenizer.decode(ids + out[0], skip_special_tokens=True)


def plot_losses(history: list[dict], path: Path) -> None:
    """Train loss per step and validation loss per eval, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train", lw=1)
    ev = [r for r in history if "val_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="validation", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    acc = [r for r in history if "val_accuracy" in r]
    if acc:  # GRPO: held-out accuracy on a second axis
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in acc], [r["val_accuracy"] for r in acc], "s-", color="C2", ms=3,
                 label="held-out accuracy")
        ax2.set_ylabel("accuracy")
        ax2.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.rename(path)
