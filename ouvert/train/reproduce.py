"""`ouvert reproduce`: re-run the training recorded in a checkpoint's ouvert.json and check that
the weights come out bitwise identical.

The record holds the whole TrainConfig, the seed, the thread count and the data shards by hash,
and the loop is deterministic (resume is exact, so a run that was stopped and resumed is
reproduced by one straight run to the same step). Before training, the shards on disk (and a
fine-tune's parent weights) are hashed and compared with the record: a changed shard is named
and, unless forced, nothing is trained. On one CPU process in float32 the result must be
identical; across machines or thread counts, floating-point sums may round differently.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from ouvert.checkpoint import manifest
from ouvert.train.config import TrainConfig
from ouvert.train.loop import train


def check_inputs(record: dict[str, Any], data_dir: Path | None) -> list[str]:
    """Differences between the data (and parent) on disk now and what the record says was used."""
    problems = []
    data = record.get("data", {})
    if "shards" in data:
        root = data_dir or Path(data["dir"])
        for s in data["shards"]:
            f = root / s["file"]
            if not f.is_file():
                problems.append(f"{f}: {s['split']} shard missing")
            elif manifest.sha256_file(f) != s["sha256"]:
                problems.append(f"{f}: {s['split']} shard differs from the one trained on (sha256 mismatch)")
    for entry in data.get("files", []):
        f = Path(entry["path"])
        if not f.is_file():
            problems.append(f"{f}: {entry['role']} data file missing")
        elif manifest.sha256_file(f) != entry["sha256"]:
            problems.append(f"{f}: {entry['role']} data file differs from the one trained on (sha256 mismatch)")
    parent = record.get("parent")
    if parent:
        p = Path(parent["path"])
        if not p.is_dir():
            problems.append(f"{p}: parent checkpoint missing")
        elif manifest.checkpoint_hash(p) != parent["checkpoint_sha256"]:
            problems.append(f"{p}: parent checkpoint's weights differ from the recorded ones")
    return problems


def compare_weights(a: Path, b: Path) -> list[str]:
    """Tensors that differ between two checkpoints of the same layout ([] when bitwise equal)."""
    from safetensors import safe_open

    if manifest.weight_hashes(a) == manifest.weight_hashes(b):
        return []
    diffs = []
    for fa in manifest.weight_files(a):
        fb = b / fa.name
        if not fb.is_file():
            diffs.append(f"{fa.name}: missing in {b}")
            continue
        with safe_open(fa, "pt") as x, safe_open(fb, "pt") as y:
            for key in x.keys():
                ta, tb = x.get_tensor(key), y.get_tensor(key)
                if ta.shape != tb.shape or not ta.equal(tb):
                    err = (ta.double() - tb.double()).abs().max().item() if ta.shape == tb.shape else float("nan")
                    diffs.append(f"{key}: max abs difference {err:.3g}")
    return diffs or ["weight files differ in bytes but not in tensors (metadata)"]


def reproduce(model_dir: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
              force: bool = False) -> dict[str, Any]:
    """Re-run the recorded training into out_dir; returns a report (identical: bool, problems,
    differences)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    record = manifest.read(model_dir)
    where = model_dir / manifest.MANIFEST
    if "train_config" not in record:
        raise manifest.ManifestError(f"{where}: no training record (this checkpoint was not trained by ouvert)")
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"--out {out_dir} would overwrite the checkpoint being reproduced")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(record["train_config"]) - known
    if unknown:
        raise manifest.ManifestError(f"{where}: train_config has keys this ouvert does not know: {sorted(unknown)}")
    recorded_world = record.get("world_size", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != recorded_world:
        raise ValueError(f"{where}: trained on {recorded_world} process(es); run reproduce under torchrun "
                         f"with --nproc-per-node {recorded_world} (now {world})")

    data_dir = Path(data_dir) if data_dir else None
    report: dict[str, Any] = {"checkpoint": str(model_dir), "step": record["step"], "identical": False,
                              "problems": check_inputs(record, data_dir), "differences": []}
    code = manifest.code_version()
    if code["git_commit"] != record["ouvert"].get("git_commit") or code["git_dirty"] or record["ouvert"].get(
            "git_dirty"):
        report["code_note"] = (f"recorded with ouvert {record['ouvert']}, running {code}: the code may differ")
    if report["problems"] and not force:
        return report

    c = TrainConfig(**record["train_config"])
    c.out_dir = str(out_dir)
    c.stop_at = record["step"]
    c.max_time = 0.0  # a time-budgeted run recorded the step count its budget came to: replay that many
    c.threads = record.get("hardware", {}).get("torch_threads", c.threads)  # sums split across threads round alike
    data = record.get("data", {})
    if "shards" in data:
        c.data = str(data_dir or data["dir"])
    else:
        roles = {e["role"]: e["path"] for e in data.get("files", [])}
        c.data, c.val_data = roles.get("train", c.data), roles.get("val", c.val_data)
    if record.get("parent"):
        c.init_from = record["parent"]["path"]
    new = train(c)
    report["reproduction"] = str(new)
    report["differences"] = compare_weights(model_dir, new)
    report["identical"] = not report["differences"]
    return report


def add_reproduce_parser(sub) -> None:
    p = sub.add_parser("reproduce", help="re-run a checkpoint's recorded training; check the weights are identical")
    p.add_argument("--model", required=True, help="checkpoint directory with ouvert.json")
    p.add_argument("--out", required=True, help="run directory for the reproduction")
    p.add_argument("--data", help="token-shard directory, if it moved since training (checked by hash)")
    p.add_argument("--force", action="store_true", help="train even if the data differs from the record")
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args) -> None:
    r = reproduce(args.model, args.out, args.data, args.force)
    for p in r["problems"]:
        print(f"input differs: {p}")
    if r.get("code_note"):
        print(f"note: {r['code_note']}")
    if "reproduction" not in r:
        print(f"not reproduced: the inputs differ from {args.model}/ouvert.json (use --force to train anyway)")
        raise SystemExit(1)
    if r["identical"]:
        print(f"bitwise identical: {r['reproduction']} equals {args.model} (step {r['step']})")
        return
    print(f"NOT identical: {r['reproduction']} differs from {args.model} (step {r['step']}):")
    for d in r["differences"][:20]:
        print(f"  {d}")
    raise SystemExit(1)
