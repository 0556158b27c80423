"""A run's state on disk: the checkpoint directory the loop writes every `save_every` steps, and
how a resumed run reads it back.

step-NNNNNN/ holds the model in HF layout (or, with LoRA, the adapter in PEFT's layout) through
the checkpoint API, plus train_state/ (optimizer, data position, RNG, step counters), the config,
the metrics so far, and ouvert.json (provenance: config, data by hash, hardware, parent). Resume
is exact: weights, optimizer, schedule, RNG and data position all come back. Nothing in
train_state/ is unpickled: tensors and plain containers only, and only after every file's hash
matched ouvert.json.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ouvert.train.distributed as D
import ouvert.train.lora as lora
from ouvert.checkpoint import manifest
from ouvert.checkpoint.base import CheckpointError, write_atomically
from ouvert.checkpoint.hf import read_state_dict
from ouvert.checkpoint.io import save_model
from ouvert.data import read_manifest
from ouvert.train.config import TrainConfig


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The last step-* directory of a run whose train_state/ was written in full, if any."""
    done = sorted(p for p in out_dir.glob("step-*") if (p / "train_state" / "state.json").is_file())
    return done[-1] if done else None


# ---- what a checkpoint records ------------------------------------------------------------------


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


# ---- saving -------------------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, model, optimizer, task, c: TrainConfig, d: D.Dist, tokenizer,
                    history: list[dict], provenance: dict[str, Any]) -> Path:
    """step-NNNNNN/: HF layout (or, with LoRA, the adapter in PEFT's layout) + train_state/
    (optimizer, data position, RNG) + ouvert.json (provenance) + metrics.jsonl (the history so far,
    for the model card's loss curve). Atomic; keeps the last few."""
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


# ---- resuming -----------------------------------------------------------------------------------


def set_rng_state(rng: dict[str, Any]) -> None:
    """Inverse of rng_state: every generator where it was when the checkpoint was written."""
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def load_plain(path: Path) -> Any:
    """torch.load that only rebuilds tensors and plain containers: a file holding anything else
    (a pickled object whose loading would run code) is refused, naming the file."""
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


def restore(ckpt: Path, model, optimizer, task, lora_only: bool = False) -> dict:
    """Load weights, optimizer, data position and RNG from `ckpt` into a run built to match it;
    returns train_state/state.json (step, counters). With LoRA the adapters were loaded with the
    model, and the frozen base is as the model already holds it."""
    state = json.loads((ckpt / "train_state" / "state.json").read_text())
    osd = load_plain(ckpt / "train_state" / "optimizer.pt")
    raw = D.unwrap(model)
    msd = raw.state_dict() if lora_only else read_state_dict(ckpt, raw.config)
    D.load_full_state(model, optimizer, msd, osd)
    task.load_state_dict(state["task"])
    set_rng_state(load_plain(ckpt / "train_state" / "rng.pt"))
    return state


def read_history(path: Path, step: int) -> list[dict]:
    """Earlier metrics of a resumed run, up to its checkpoint (lines past it are dropped)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows
