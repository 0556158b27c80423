"""Corpus -> token shards, and a loader that serves training windows from them.

`prepare` streams plain text, JSONL (a text field) and parquet files through a tokenizer, one
source file per worker process, and writes each file's tokens as flat uint16 / uint32 arrays
(`.bin`) plus a `manifest.json` with the sources' sha256, token counts and the tokenizer's hash.
A file is finished when its record `.done/NAME.json` exists; an interrupted run resumes by
skipping finished files and redoing the others, so no shard is written twice. Documents end with
EOS, so the model learns where one text stops. Bad input (a line that is not UTF-8, a JSONL line
without the field, an empty file) is reported with the file and line, and the rest goes on.

`TokenLoader` cuts the shards into windows of seq_len + 1 tokens, shuffles them per epoch with a
seeded permutation, and hands each rank its rows of the global batch: the global order does not
depend on the world size, so 1 process and 2 processes see the same batches. Its position is a
small dict (state_dict / load_state_dict) for exact resume.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ouvert.checkpoint.io import load_tokenizer
from ouvert.checkpoint.manifest import sha256_file
from ouvert.tokenizer import tokenizer_hash


class DataError(ValueError):
    """Input the data pipeline cannot use; names the file (and line)."""


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files and globs -> a sorted list of files (globs sorted, the order of arguments kept)."""
    out: list[Path] = []
    for spec in inputs:
        matches = sorted(glob.glob(spec, recursive=True)) if any(c in spec for c in "*?[") else [spec]
        if not matches:
            raise DataError(f"{spec}: matches no file")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
            elif not p.is_file():
                raise DataError(f"{p}: no such file")
            else:
                out.append(p)
    return out


def _documents(
    path: Path, text_field: str, problems: list[str], chunk_chars: int = 1 << 20
) -> Iterator[tuple[str, bool]]:
    """Yield (text, ends_document) pieces of a file, streaming. Plain text is one document per file,
    cut into pieces at blank lines; each JSONL line or parquet row is a document."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            problems.append(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
            return
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for i, t in enumerate(batch.column(0).to_pylist()):
                if isinstance(t, str) and t:
                    yield t, True
                elif t is not None:
                    problems.append(f"{path}: row with a non-text {text_field!r} skipped (batch row {i})")
        return
    with open(path, "rb") as f:
        buf: list[str] = []
        size = 0
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start}); line skipped")
                continue
            if suffix in (".jsonl", ".json", ".ndjson"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    problems.append(f"{path}:{lineno}: not JSON ({e.msg}); line skipped")
                    continue
                text = rec.get(text_field) if isinstance(rec, dict) else None
                if not isinstance(text, str):
                    problems.append(f"{path}:{lineno}: no text field {text_field!r}; line skipped")
                    continue
                yield text, True
                continue
            buf.append(line)
            size += len(line)
            if size >= chunk_chars and not line.strip():  # cut at a blank line: no token spans it
                yield "".join(buf), False
                buf, size = [], 0
        if suffix not in (".jsonl", ".json", ".ndjson") and buf:
            yield "".join(buf), True
        elif suffix not in (".jsonl", ".json", ".ndjson"):
            yield "", True


def _prepare_file(job: dict) -> dict:
    """Worker: tokenize one source file into NAME.train.bin / NAME.val.bin; return its record."""
    src, out, name = Path(job["src"]), Path(job["out"]), job["name"]
    tok = load_tokenizer(job["tokenizer"])
    dtype = np.dtype(job["dtype"])
    problems: list[str] = []
    eos = tok.eos_token_id
    tmp = out / f"{name}.all.tmp"
    n = 0
    with open(tmp, "wb") as f:
        for text, end in _documents(src, job["text_field"], problems):
            ids = tok.encode(text, add_special_tokens=False) if text else []
            if end and eos is not None:
                ids.append(eos)
            np.asarray(ids, dtype=dtype).tofile(f)
            n += len(ids)
    if n <= (1 if eos is not None else 0):
        tmp.unlink()
        problems.append(f"{src}: empty, skipped")
        return {"source": str(src), "sha256": sha256_file(src), "tokens": 0, "shards": {}, "problems": problems}
    # The last val_fraction of each file's tokens is its validation part.
    all_ids = np.memmap(tmp, dtype=dtype, mode="r")
    n_val = int(round(n * job["val_fraction"]))
    shards = {}
    for split, part in (("train", all_ids[: n - n_val]), ("val", all_ids[n - n_val :])):
        if len(part):
            fname = f"{name}.{split}.bin"
            np.asarray(part).tofile(out / fname)
            shards[split] = {"file": fname, "tokens": int(len(part)), "sha256": sha256_file(out / fname)}
    del all_ids
    tmp.unlink()
    rec = {"source": str(src), "sha256": sha256_file(src), "tokens": n, "shards": shards, "problems": problems}
    done = out / ".done" / f"{name}.json"
    done.write_text(json.dumps(rec))  # written last: its presence means the file is finished
    return rec


def prepare(
    tokenizer: str | Path,
    inputs: list[str],
    out: str | Path,
    val_fraction: float = 0.0,
    text_field: str = "text",
    workers: int | None = None,
) -> dict:
    """Tokenize a corpus into shards and a manifest; resumable. Returns the manifest."""
    out = Path(out)
    files = expand_inputs(inputs)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = load_tokenizer(tokenizer)
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    (out / ".done").mkdir(parents=True, exist_ok=True)
    jobs, records = [], {}
    for i, src in enumerate(files):
        name = f"{i:05d}-{src.stem}"
        done = out / ".done" / f"{name}.json"
        if done.is_file():
            records[i] = json.loads(done.read_text())
            continue
        for stale in out.glob(f"{name}.*"):  # left by an interrupted run: redo this file
            stale.unlink()
        jobs.append({"src": str(src), "out": str(out), "name": name, "tokenizer": str(tokenizer), "dtype": dtype,
                     "val_fraction": val_fraction, "text_field": text_field, "index": i})
    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    if jobs:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for job, rec in zip(jobs, pool.map(_prepare_file, jobs)):
                    records[job["index"]] = rec
        else:
            for job in jobs:
                records[job["index"]] = _prepare_file(job)
    ordered = [records[i] for i in sorted(records)]
    manifest = {
        "tokenizer": str(Path(tokenizer).resolve()),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "val_fraction": val_fraction,
        "sources": [{k: r[k] for k in ("source", "sha256", "tokens")} for r in ordered],
        "train": [r["shards"]["train"] for r in ordered if "train" in r["shards"]],
        "val": [r["shards"]["val"] for r in ordered if "val" in r["shards"]],
        "problems": [p for r in ordered for p in r["problems"]],
    }
    manifest["train_tokens"] = sum(s["tokens"] for s in manifest["train"])
    manifest["val_tokens"] = sum(s["tokens"] for s in manifest["val"])
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(out / "manifest.json")
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; run `ouvert data prepare` first")
    return json.loads(path.read_text())


@dataclass
class TokenLoader:
    """(input, target) windows of seq_len tokens from a split's shards, for one rank.

    Window w of shard s is tokens [w*seq_len, w*seq_len + seq_len + 1). Each epoch visits every
    window once in an order drawn from `seed + epoch`. A step takes `batch_size * world_size`
    windows; rank r gets rows [r*batch_size, (r+1)*batch_size).
    """

    data_dir: str | Path
    split: str
    seq_len: int
    batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        m = read_manifest(self.data_dir)
        dtype = np.dtype(m["dtype"])
        self.shards = [np.memmap(Path(self.data_dir) / s["file"], dtype=dtype, mode="r") for s in m[self.split]]
        counts = [max(0, (len(s) - 1) // self.seq_len) for s in self.shards]
        self.index = [(i, w) for i, c in enumerate(counts) for w in range(c)]
        if len(self.index) < self.batch_size * self.world_size:
            raise DataError(
                f"{self.data_dir}: the {self.split} split has {len(self.index)} windows of {self.seq_len + 1} tokens, "
                f"fewer than one global batch ({self.batch_size} x {self.world_size} ranks)"
            )
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.index))
        return np.random.default_rng(self.seed + self.epoch).permutation(len(self.index))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (batch_size, seq_len) int64."""
        g = self.batch_size * self.world_size
        if self.pos + g > len(self._order):  # drop the ragged end of an epoch
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation()
        rows = self._order[self.pos + self.rank * self.batch_size : self.pos + (self.rank + 1) * self.batch_size]
        self.pos += g
        L = self.seq_len
        windows = [self.index[r] for r in rows]
        batch = np.stack([self.shards[s][w * L : w * L + L + 1].astype(np.int64) for s, w in windows])
        t = torch.from_numpy(batch)
        return t[:, :-1], t[:, 1:]

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state["seq_len"] != self.seq_len or state["global_batch"] != self.batch_size * self.world_size:
            raise DataError(
                f"cannot resume the data position: saved with seq_len {state['seq_len']} and global batch "
                f"{state['global_batch']}, now {self.seq_len} and {self.batch_size * self.world_size}"
            )
        self.epoch, self.pos, self.seed = state["epoch"], state["pos"], state["seed"]
        self._order = self._permutation()
