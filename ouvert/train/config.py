"""A training run's configuration: the `TrainConfig` dataclass, read from a TOML file with
`--key value` overrides from the command line. Saved as train_config.json beside each checkpoint
and recorded whole in ouvert.json, so `ouvert reproduce` can run it again."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        """The config in the TOML file at `path` (defaults without one), then each `--key value`
        of `overrides` on top (`--model.KEY value` sets a ModelConfig override)."""
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
    """`--key value` and `--key=value` flags as (key, value), dashes in the key made underscores."""
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
    """A [model] override from the command line: JSON when it parses (numbers, lists), else the string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def _coerce(value: str, current: Any, key: str) -> Any:
    """A flag's string as the type of the field's current value (bool, int, float or str)."""
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
