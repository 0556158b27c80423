"""The one training loop: every objective runs through `train(TrainConfig)`.

AdamW with decay / no-decay groups, warmup then cosine or warmup-stable-decay, gradient
accumulation and clipping, optional bf16 autocast, activation checkpointing and torch.compile;
eval loss every `eval_every` steps, sample generations every `sample_every`, a checkpoint
directory (HF layout plus train_state/) every `save_every`, the last `keep_last` kept. Resume is
exact: weights, optimizer, schedule, RNG and data position all come back, so N steps, a stop and
N more give bitwise the weights of 2N steps straight (float32, CPU).

The same code runs in one process and under torchrun (DDP or FSDP2, train/distributed.py); only
rank 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import shutil
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ouvert.checkpoint import manifest
from ouvert.checkpoint.hf import CheckpointError, load_model, read_config, save_model
from ouvert.config import preset
from ouvert.data import read_manifest
from ouvert.model import Transformer
from ouvert.tokenizer import load_tokenizer
from ouvert.train import distributed as D
from ouvert.train.objectives import moe_layers, update_router_bias


@dataclass
class TrainConfig:
    """Everything a run needs, read from TOML (top-level keys, plus a [model] table of ModelConfig
    overrides) and `--key value` flags. Saved as train_config.json beside each checkpoint."""

    data: str = ""  # a directory made by `ouvert data prepare`
    out_dir: str = "runs/run"
    preset: str = "tiny-llama"  # model shape, unless init_from is set
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides on the preset
    init_from: str = ""  # start from this checkpoint directory instead of random weights
    objective: str = "pretrain"  # pretrain | sft | dpo | grpo
    val_data: str = ""  # sft / dpo / grpo: held-out JSONL
    tokenizer: str = ""  # sft / dpo / grpo: default the init_from checkpoint's
    seed: int = 0
    # batch: each step sees batch_size * grad_accum * world_size sequences of seq_len tokens
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    # a time budget in seconds instead of a step count (0: off): the first steps' speed sets max_steps
    # (at most the value above), fixed from then on and recorded, so `reproduce` replays that many
    max_time: float = 0.0
    stop_at: int = 0  # end this invocation (with a checkpoint) at this step; resume later. 0: max_steps
    # optimizer and schedule
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    init_std: float = 0.02
    # precision and speed
    dtype: str = "float32"  # float32 | bfloat16 (autocast; weights and optimizer stay float32)
    compile: bool = False
    activation_checkpointing: bool = False
    threads: int = 0  # torch threads per process; 0 leaves torch's default
    # DeepSeek specifics
    router_bias_rate: float = 0.0  # auxiliary-loss-free balancing speed (V3 uses 0.001); 0 is off
    seq_balance_alpha: float = 0.0  # sequence-wise balance loss weight (V3: 0.0001); 0 is off
    mtp_weight: float = 0.0  # weight of the multi-token prediction loss (V3: 0.3 then 0.1); 0 is off
    # LoRA: adapters on the linear layers named in lora_targets ("q_proj,v_proj" or "all-linear")
    lora_rank: int = 0  # 0 is off: every weight trains
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,v_proj"
    # preference and RL objectives
    beta: float = 0.1  # DPO temperature / GRPO KL weight
    group_size: int = 8  # GRPO: completions per prompt
    grpo_updates: int = 2  # GRPO: optimizer steps per batch of rollouts
    clip_eps: float = 0.2  # GRPO: policy ratio clip
    rewards: str = "exact_answer,format"  # GRPO: registered reward functions, summed
    max_new_tokens: int = 16  # GRPO rollouts
    rollout_temperature: float = 1.0
    # bookkeeping
    eval_every: int = 100
    eval_steps: int = 10
    sample_every: int = 0  # 0: only at the end
    sample_prompt: str = "\n"
    sample_tokens: int = 64
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    progress: bool = True
    distributed: str = "ddp"  # ddp | fsdp, under torchrun
    device: str = "auto"

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ValueError(f"{path}: no such config file")
            with open(path, "rb") as f:
                data = tomllib.load(f)
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
        cfg = cls(**data)
        for key, value in _pairs(overrides or []):
            if key.startswith("model."):
                cfg.model[key[6:]] = _parse_value(value)
                continue
            if key not in names:
                raise ValueError(f"unknown option --{key.replace('_', '-')}")
            current = getattr(cfg, key)
            setattr(cfg, key, _coerce(value, current, key))
        return cfg


def _pairs(args: list[str]) -> list[tuple[str, str]]:
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise ValueError(f"expected --key value, got {a!r}")
        a = a[2:].replace("-", "_")
        if "=" in a:
            k, v = a.split("=", 1)
            i += 1
        elif i + 1 < len(args):
            k, v = a, args[i + 1]
            i += 2
        else:
            raise ValueError(f"--{a} needs a value")
        out.append((k, v))
    return out


def _parse_value(v: str) -> Any:
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _coerce(value: str, current: Any, key: str) -> Any:
    try:
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        if isinstance(current, int):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ValueError(f"--{key.replace('_', '-')}: expected a {type(current).__name__}, got {value!r}") from None
    return value


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


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in out_dir.glob("step-*") if (p / "train_state" / "state.json").is_file())
    return done[-1] if done else None


def build_model(c: TrainConfig, vocab_size: int, bos: int | None, eos: list[int]) -> Transformer:
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


def make_task(c: TrainConfig, d: D.Dist, tokenizer, model):
    from ouvert.train.objectives import PretrainTask, SFTTask

    if c.objective == "pretrain":
        return PretrainTask(c, d)
    if c.objective == "sft":
        return SFTTask(c, d, tokenizer)
    if c.objective == "dpo":
        from ouvert.train.preference import DPOTask

        return DPOTask(c, d, tokenizer, model)
    if c.objective == "grpo":
        from ouvert.train.grpo import GRPOTask

        return GRPOTask(c, d, tokenizer, model)
    raise ValueError(f"objective must be pretrain, sft, dpo or grpo, got {c.objective!r}")


def _tokenizer_for(c: TrainConfig):
    if c.objective == "pretrain":
        return load_tokenizer(read_manifest(c.data)["tokenizer"])
    src = c.tokenizer or c.init_from
    if not src:
        raise ValueError(f"objective {c.objective} needs init_from (a checkpoint) or tokenizer (a directory)")
    return load_tokenizer(src)


def train(c: TrainConfig, resume: bool = False) -> Path:
    """Run (or resume) a training run; returns the final checkpoint directory."""
    from ouvert.train import lora

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
    moes = moe_layers(model)
    for m in moes:
        m.seq_balance_alpha = c.seq_balance_alpha
    if c.activation_checkpointing:
        for layer in model.layers:  # recompute each block in backward instead of keeping its activations
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    raw = model
    task = make_task(c, d, tokenizer, raw)
    for p in getattr(task, "problems", []):
        D.print0(d, f"warning: {p}", file=sys.stderr)
    model = D.wrap(model, d, c.distributed)
    trainable = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(raw, c.weight_decay), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.eps)
    step, tokens_seen, wall_before = 0, 0, 0.0
    if start_ckpt is not None:
        state = _restore(start_ckpt, model, optimizer, task, d, lora_only=bool(c.lora_rank))
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
    history = _read_history(metrics_file, step) if d.is_main else []
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
        counts = [torch.zeros_like(m.gate.e_score_correction_bias) for m in moes] if c.router_bias_rate else []
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
            for acc, m in zip(counts, moes):
                if m.last_counts is not None:  # an MTP module's MoE only runs with the MTP loss on
                    acc += m.last_counts.to(acc.dtype)
        max_norm = c.grad_clip if c.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if counts:
            update_router_bias(moes, [D.all_reduce_sum(cnt, d) for cnt in counts], c.router_bias_rate)
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
        if moes:
            loads = [m.last_counts.float() for m in moes if m.last_counts is not None]
            record["expert_load_max_over_mean"] = float(torch.stack([lc.max() / lc.mean() for lc in loads]).mean())
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
    from ouvert.generate import generate

    model.eval()
    ids = tokenizer.encode(c.sample_prompt)
    out = generate(model, ids, c.sample_tokens, temperature=0.8, top_k=50, seed=c.seed,
                   stop_token_ids=tokenizer.stop_token_ids)
    model.train()
    return tokenizer.decode(ids + out[0], skip_special_tokens=True)


def run_provenance(c: TrainConfig, d: D.Dist) -> dict[str, Any]:
    """What ouvert.json records of a training run, beside the model and weights: the whole config,
    the data by hash, seed, world size, hardware, and the parent checkpoint of a fine-tune."""
    rec: dict[str, Any] = {"train_config": dataclasses.asdict(c), "seed": c.seed, "world_size": d.world_size,
                           "hardware": manifest.hardware(d.device), "data": data_provenance(c)}
    if c.init_from:
        rec["parent"] = manifest.parent_record(c.init_from)
    return rec


def data_provenance(c: TrainConfig) -> dict[str, Any]:
    """Pretraining: the token shards as `ouvert data prepare` hashed them, and the manifest's own
    hash. Fine-tuning: the sha256 of the JSONL files."""
    if c.objective == "pretrain":
        m = read_manifest(c.data)
        shards = [{"split": split, **s} for split in ("train", "val") for s in m[split]]
        return {"dir": str(Path(c.data).resolve()),
                "manifest_sha256": manifest.sha256_file(Path(c.data) / "manifest.json"),
                "tokenizer_sha256": m["tokenizer_sha256"], "train_tokens": m["train_tokens"],
                "val_tokens": m["val_tokens"], "shards": shards, "sources": m["sources"]}
    files = [(role, p) for role, p in (("train", c.data), ("val", c.val_data)) if p]
    return {"files": [{"role": role, "path": str(Path(p).resolve()), "sha256": manifest.sha256_file(p)}
                      for role, p in files]}


def final_metrics(history: list[dict]) -> dict[str, float]:
    """The latest value of every metric logged (val_* come from the last evaluation)."""
    out: dict[str, float] = {}
    for r in history:
        out.update({k: v for k, v in r.items() if k not in ("step", "lr")})
    return out


def save_checkpoint(out: Path, step: int, model, optimizer, task, c: TrainConfig, d: D.Dist, tokenizer,
                    history: list[dict], provenance: dict[str, Any]) -> Path:
    """step-NNNNNN/: HF layout (or, with LoRA, the adapter in PEFT's layout) + train_state/
    (optimizer, data position, RNG) + ouvert.json (provenance) + metrics.jsonl (the history so far,
    for the model card's loss curve). Atomic; keeps the last few."""
    from ouvert.checkpoint.hf import write_atomically
    from ouvert.train import lora

    msd, osd = D.full_state(model, optimizer)
    path = out / f"step-{step:06d}"
    if d.is_main:
        raw = D.unwrap(model)

        def write_state(tmp: Path) -> None:
            ts = tmp / "train_state"
            ts.mkdir()
            torch.save(osd, ts / "optimizer.pt")
            torch.save(rng_state(), ts / "rng.pt")
            state = {"step": step, "task": task.state_dict(), "world_size": d.world_size,
                     "max_steps": c.max_steps, "max_steps_from_time": provenance.get("max_steps_from_time", False),
                     "tokens_seen": provenance["tokens_seen"], "wall_clock_s": provenance["wall_clock_s"],
                     "metrics": history[-1] if history else {}}
            (ts / "state.json").write_text(json.dumps(state, indent=2))
            (tmp / "train_config.json").write_text(json.dumps(dataclasses.asdict(c), indent=2))
            (tmp / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

        fields = {**provenance, "metrics": final_metrics(history)}
        if lora.lora_modules(raw):
            def write_adapter(tmp: Path) -> None:
                lora.save_adapter(raw, tmp, base=c.init_from, state=msd)
                tokenizer.save(tmp)
                write_state(tmp)
                manifest.write(tmp, manifest.build(tmp, raw.config.to_hf(), fields))

            write_atomically(path, write_adapter)
        else:
            save_model(raw, path, tokenizer=tokenizer, state_dict=msd, extra=write_state, provenance=fields)
        kept = sorted(p for p in out.glob("step-*") if p.is_dir())
        for old in kept[: -c.keep_last] if c.keep_last > 0 else []:
            shutil.rmtree(old)
    if d.active:
        torch.distributed.barrier()
    return path


def rng_state() -> dict[str, Any]:
    """torch's, numpy's and Python's generators as tensors and plain values only, so that resume
    can read them with torch.load(weights_only=True), which never runs code from the file."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def load_plain(path: Path) -> Any:
    """torch.load that only rebuilds tensors and plain containers: a file holding anything else
    (a pickled object whose loading would run code) is refused, naming the file."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; cannot resume from this checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not plain tensor data, refused without unpickling it ({first})") from None


def check_resumable(ckpt: Path) -> None:
    """Before anything in `ckpt` is loaded: its weights and train_state/ must match ouvert.json."""
    try:
        problems = manifest.verify(ckpt)
    except manifest.ManifestError as e:
        raise CheckpointError(f"cannot resume: {e}") from None
    if problems:
        raise CheckpointError(f"cannot resume from {ckpt}: " + "; ".join(problems))


def _restore(ckpt: Path, model, optimizer, task, d: D.Dist, lora_only: bool = False) -> dict:
    from safetensors.torch import load_file

    from ouvert.checkpoint.hf import hf_state_dict_to_ours

    state = json.loads((ckpt / "train_state" / "state.json").read_text())
    osd = load_plain(ckpt / "train_state" / "optimizer.pt")
    if lora_only:  # adapters were loaded with the model; the base is frozen and unchanged
        D.load_full_state(model, optimizer, D.unwrap(model).state_dict(), osd)
    else:
        hf = {}
        for f in sorted(ckpt.glob("model*.safetensors")):
            hf.update(load_file(f))
        msd = hf_state_dict_to_ours(hf, D.unwrap(model).config)
        D.load_full_state(model, optimizer, msd, osd)
    task.load_state_dict(state["task"])
    set_rng_state(load_plain(ckpt / "train_state" / "rng.pt"))
    return state


def _read_history(path: Path, step: int) -> list[dict]:
    """Earlier metrics of a resumed run, up to its checkpoint (lines past it are dropped)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


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
