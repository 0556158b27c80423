"""ouvert.json: where a checkpoint came from.

Every checkpoint directory ouvert writes carries one. It records the code (ouvert's version, git
commit, whether the tree was dirty), the model config, the tokenizer's hash, the sha256 of each
weight file and, for trained checkpoints, the full training config, the data shards by hash, the
tokens seen, seed, world size, hardware, wall-clock time and final metrics, and the parent
checkpoint's hash for fine-tunes. Evaluations add their results under "eval".

A checkpoint's identity (`checkpoint_sha256`) is the hash of its weight files' hashes, so it does
not change when ouvert.json itself gains eval results or a model card is written beside it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from ouvert.tokenizer import tokenizer_hash  # the hash data manifests record, so the two compare
from ouvert.version import __version__

MANIFEST = "ouvert.json"
TRAIN_STATE = "train_state"
FORMAT = 1


class ManifestError(ValueError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def weight_files(path: str | Path) -> list[Path]:
    """The files that hold a checkpoint's tensors: model*.safetensors, or a LoRA adapter's."""
    path = Path(path)
    return sorted(path.glob("model*.safetensors")) + sorted(path.glob("adapter_model.safetensors"))


def weight_hashes(path: str | Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in weight_files(path)}


def train_state_hashes(path: str | Path) -> dict[str, str]:
    """sha256 of every file under train_state/ (optimizer, RNG, data position), by relative path:
    `--resume` loads these, so they are checked like the weights."""
    path = Path(path)
    ts = path / TRAIN_STATE
    files = sorted(f for f in ts.rglob("*") if f.is_file()) if ts.is_dir() else []
    return {f.relative_to(path).as_posix(): sha256_file(f) for f in files}


def combined_hash(hashes: dict[str, str]) -> str:
    lines = "".join(f"{name} {h}\n" for name, h in sorted(hashes.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


def checkpoint_hash(path: str | Path) -> str:
    """The identity of a checkpoint directory, from its weight files as they are on disk now."""
    hashes = weight_hashes(path)
    if not hashes:
        raise ManifestError(f"{path}: no weight files (model*.safetensors) to hash")
    return combined_hash(hashes)


def code_version() -> dict[str, Any]:
    """ouvert's version and, when it runs from a git checkout, the commit and whether the tree
    had uncommitted changes to tracked files."""
    out: dict[str, Any] = {"version": __version__, "git_commit": None, "git_dirty": None}
    root = Path(__file__).resolve().parents[2]  # the checkout holding ouvert/
    if not (root / ".git").exists():
        return out
    try:
        git = ["git", "-C", str(root)]
        out["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                           check=True).stdout.strip()
        status = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=True).stdout
        out["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


def hardware(device: torch.device | str = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
          "torch_threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
    return hw


def parent_record(path: str | Path) -> dict[str, Any]:
    """What a fine-tune names as its parent: the path, the weights' identity, and the parent's own
    parent hash if it has an ouvert.json (so a chain of fine-tunes can be walked)."""
    path = Path(path)
    if path.is_file():  # a single-file checkpoint (GGUF): its bytes are its identity
        return {"path": str(path.resolve()), "file_sha256": sha256_file(path)}
    rec: dict[str, Any] = {"path": str(path.resolve()), "checkpoint_sha256": checkpoint_hash(path)}
    try:
        m = read(path)
        rec["ouvert_commit"] = m.get("ouvert", {}).get("git_commit")
    except ManifestError:
        rec["ouvert_json"] = False  # a checkpoint from a hub, not written by ouvert
    return rec


def build(path: Path, model_config: dict, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of the checkpoint whose files are already written in `path`."""
    hashes = weight_hashes(path)
    record: dict[str, Any] = {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ouvert": code_version(),
        "model_config": model_config,
        "tokenizer_sha256": tokenizer_hash(path) if (path / "tokenizer.json").is_file() else None,
    }
    record.update(fields or {})
    record["weights"] = hashes
    record["checkpoint_sha256"] = combined_hash(hashes) if hashes else None
    if state := train_state_hashes(path):
        record["train_state"] = state
    return record


def write(path: str | Path, record: dict[str, Any]) -> None:
    """Write ouvert.json into `path` through a temporary file and a rename."""
    path = Path(path)
    tmp = path / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n")
    tmp.rename(path / MANIFEST)


def read(path: str | Path) -> dict[str, Any]:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise ManifestError(f"{f}: missing; this checkpoint has no provenance record "
                            "(not written by ouvert, or the file was removed)")
    try:
        record = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or "weights" not in record:
        raise ManifestError(f"{f}: no 'weights' entry; not an ouvert provenance record")
    return record


def record_eval(path: str | Path, task: str, metrics: dict[str, Any]) -> None:
    """Add (or replace) one task's results under "eval" in the checkpoint's ouvert.json. A
    checkpoint without one gets a minimal record, so eval results are never lost."""
    path = Path(path)
    try:
        record = read(path)
    except ManifestError:
        if (path / MANIFEST).is_file():
            raise
        config = path / "config.json"
        record = build(path, json.loads(config.read_text()) if config.is_file() else {})
    record.setdefault("eval", {})[task] = {
        **metrics, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    write(path, record)


def verify(path: str | Path) -> list[str]:
    """Problems found comparing the weight files and train_state/ on disk with ouvert.json; []
    when they match."""
    path = Path(path)
    record = read(path)
    recorded: dict[str, str] = record["weights"]
    problems = _compare(path, recorded, {f.name: f for f in weight_files(path)})
    if not recorded:
        problems.append(f"{path / MANIFEST}: records no weight files")
    state_on_disk = train_state_hashes(path)
    if "train_state" in record or state_on_disk:
        if "train_state" not in record:
            problems.append(f"{path / TRAIN_STATE}: not recorded in {MANIFEST} (written before ouvert "
                            "hashed training state), so it cannot be checked")
        else:
            problems += _compare(path, record["train_state"], {n: path / n for n in state_on_disk})
    return problems


def _compare(path: Path, recorded: dict[str, str], on_disk: dict[str, Path]) -> list[str]:
    problems = []
    for name, expected in sorted(recorded.items()):
        f = path / name
        if not f.is_file():
            problems.append(f"{f}: missing (recorded in {MANIFEST})")
        elif (actual := sha256_file(f)) != expected:
            problems.append(f"{f}: sha256 {actual[:16]}... does not match {MANIFEST} ({expected[:16]}...)")
    for name in sorted(set(on_disk) - set(recorded)):
        problems.append(f"{on_disk[name]}: not recorded in {MANIFEST}")
    return problems
