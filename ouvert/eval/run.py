"""`ouvert eval`: run tasks (see tasks.py) on a checkpoint; results as a table, as JSON, and into the
checkpoint's ouvert.json under "eval".

Metrics by kind:
  multiple_choice  acc       argmax of the summed log-likelihood of `target_delimiter + choice`
                   acc_norm  argmax of log-likelihood per character of the choice (lm-eval's acc_norm)
                   acc_bytes argmax of log-likelihood per UTF-8 byte of the choice (lm-eval's acc_bytes)
  generate         exact_match or numeric_match (verify.py), greedy outputs cut at the stop strings
  perplexity       perplexity = exp(NLL per token), bits_per_byte = NLL / (ln 2 * bytes), with tokens
                   and bytes counted as below.

Perplexity counts bytes honestly for each input:
  text files   the UTF-8 bytes of each file; each file is one document, tokenized whole after the prefix
               token (BOS, else EOS), every token predicted once.
  shards       the tokens as `ouvert data prepare` wrote them (documents end with EOS); bytes are the
               UTF-8 bytes of the decoded tokens, decoded one document at a time. The EOS tokens are
               predicted too and have no bytes, so bits per byte on shards is a little higher than on
               the same text given as files. The shards must come from the model's tokenizer (checked
               against the manifest's hash).
--limit takes the first N documents of a JSONL task, or the first N files / shards for perplexity.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ouvert.checkpoint import io, manifest
from ouvert.checkpoint.base import DTYPES
from ouvert.data import expand_inputs, read_manifest
from ouvert.eval import score
from ouvert.eval.tasks import Task, TaskError, load_task
from ouvert.eval.verify import VERIFIERS, is_number
from ouvert.tokenizer import tokenizer_hash


@dataclass
class EvalConfig:
    model: str
    tasks: list[str]
    num_fewshot: int | None = None  # None: each task's own (0 unless its spec says)
    batch_size: int = 8
    limit: int | None = None
    out: str | None = None  # results JSON
    tokenizer: str | None = None  # default: the model's directory
    dtype: str | None = None  # default: as stored
    device: str | None = None  # default: cuda when available
    max_length: int | None = None  # tokens per forward; default: the pretrained seq_len, else min(context, 2048)
    stride: int | None = None  # perplexity window stride; default max_length // 2
    record: bool = True  # write results into the checkpoint's ouvert.json
    log_samples: bool = False  # per-document outputs in the results JSON


def multiple_choice(model, tok, task: Task, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    docs = task.docs[: cfg.limit]
    pairs = []
    for i, d in enumerate(docs):
        context = task.fewshot_prefix(i) + d["context"]
        pairs += [(context, task.target_delimiter + c) for c in d["choices"]]
    lls = score.loglikelihoods(model, tok, pairs, cfg.batch_size, cfg.max_length)
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    samples, k = [], 0
    for d in docs:
        ll = [lp for lp, _ in lls[k : k + len(d["choices"])]]
        k += len(d["choices"])
        preds = {
            "acc": int(np.argmax(ll)),
            "acc_norm": int(np.argmax([x / len(c) for x, c in zip(ll, d["choices"])])),
            "acc_bytes": int(np.argmax([x / len(c.encode()) for x, c in zip(ll, d["choices"])])),
        }
        for m, p in preds.items():
            hits[m] += p == d["label"]
        samples.append({"line": d["_line"], "loglikelihoods": ll, "label": d["label"], "pred": preds["acc"]})
    metrics = {m: h / len(docs) for m, h in hits.items()}
    return {**metrics, "n": len(docs)}, samples


def generative(model, tok, task: Task, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    docs = task.docs[: cfg.limit]
    prompts = [task.fewshot_prefix(i) + d["prompt"] for i, d in enumerate(docs)]
    outputs = score.greedy_generate(model, tok, prompts, task.max_new_tokens, task.stop, cfg.batch_size)
    verifier = task.verifier or ("numeric" if all(is_number(d["answer"]) for d in task.docs) else "exact")
    ok = [VERIFIERS[verifier](o.strip(), d["answer"]) for o, d in zip(outputs, docs)]
    samples = [{"line": d["_line"], "output": o, "answer": d["answer"], "correct": c}
               for d, o, c in zip(docs, outputs, ok)]
    return {f"{verifier}_match": sum(ok) / len(docs), "n": len(docs)}, samples


def _text_documents(path: str, tok) -> list[tuple[str, list[int], int]]:
    """(file, token ids, UTF-8 bytes) per file; a file is one document."""
    docs = []
    for f in expand_inputs([path]):
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise TaskError(f"{f}: not UTF-8 (byte {e.start}: {e.reason})") from None
        docs.append((str(f), tok.encode(text, add_special_tokens=False), len(text.encode())))
    return docs


def _shard_documents(path: Path, tok, split: str | None) -> list[tuple[str, np.ndarray, int]]:
    """(shard file, token ids, bytes of the decoded text) per shard of the split."""
    m = read_manifest(path)
    split = split or ("val" if m.get("val") else "train")
    if split not in ("train", "val") or not m.get(split):
        raise TaskError(f"{path}/manifest.json: no {split!r} shards")
    if tok.source is not None and (tok.source / "tokenizer.json").is_file():
        if tokenizer_hash(tok.source) != m["tokenizer_sha256"]:
            raise TaskError(f"{path}/manifest.json: the shards were made with another tokenizer ({m['tokenizer']}) "
                            f"than the model's ({tok.source})")
    eos = tok.eos_token_id
    docs = []
    for s in m[split]:
        ids = np.fromfile(path / s["file"], dtype=np.dtype(m["dtype"])).astype(np.int64)
        # Decode document by document (cut after each EOS), so that no cut falls inside a character.
        cuts = (np.flatnonzero(ids == eos) + 1).tolist() if eos is not None else []
        parts = np.split(ids, cuts)
        n_bytes = sum(len(tok.decode(p.tolist(), skip_special_tokens=True).encode()) for p in parts if len(p))
        docs.append((str(path / s["file"]), ids, n_bytes))
    return docs


def perplexity(model, tok, task: Task, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    p = Path(task.path)
    if p.is_dir() and (p / "manifest.json").is_file():
        docs = _shard_documents(p, tok, task.split)
    else:
        docs = _text_documents(task.path, tok)
    docs = [d for d in docs if len(d[1])][: cfg.limit]
    if not docs:
        raise TaskError(f"{task.path}: no text to score")
    L = score.max_length(model, cfg.max_length)
    lls = score.rolling_loglikelihood(model, [ids for _, ids, _ in docs], score.prefix_id(tok), cfg.batch_size,
                                      L, cfg.stride or max(1, L // 2))
    nll = -sum(lls)
    tokens = sum(len(ids) for _, ids, _ in docs)
    n_bytes = sum(b for _, _, b in docs)
    metrics = {"perplexity": math.exp(nll / tokens), "bits_per_byte": nll / (math.log(2) * n_bytes),
               "nll_per_token": nll / tokens, "tokens": tokens, "bytes": n_bytes, "n": len(docs)}
    samples = [{"source": name, "tokens": len(ids), "bytes": b, "loglikelihood": lp}
               for (name, ids, b), lp in zip(docs, lls)]
    return metrics, samples


RUNNERS = {"multiple_choice": multiple_choice, "generate": generative, "perplexity": perplexity}


def load(cfg: EvalConfig):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = io.load(cfg.model, cfg.tokenizer, DTYPES[cfg.dtype] if cfg.dtype else None, device)
    return model.eval(), tok


def evaluate(model, tok, task: Task, cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """One task's metrics and per-document records."""
    return RUNNERS[task.kind](model, tok, task, cfg)


def trained_context(model_dir) -> int | None:
    """The sequence length a model ouvert pretrained from scratch was trained at, from its
    ouvert.json: positions past it were never trained, so longer windows measure extrapolation,
    not the model (None for hub checkpoints and fine-tunes, whose base saw longer contexts)."""
    try:
        c = manifest.read(model_dir).get("train_config") or {}
    except (ValueError, OSError):
        return None
    if c.get("objective") == "pretrain" and not c.get("init_from") and c.get("seq_len"):
        return int(c["seq_len"])
    return None


def run(cfg: EvalConfig, model=None, tok=None) -> dict:
    """Evaluate every task; returns {"model", "results": {task: metrics}, "config"}. Loads the model
    unless given one; records each task's metrics in the checkpoint's ouvert.json (cfg.record)."""
    for name in ("limit", "batch_size", "max_length", "stride"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    tasks = [load_task(t, cfg.num_fewshot) for t in cfg.tasks]  # all checked before the model loads
    if model is None:
        model, tok = load(cfg)
    if cfg.max_length is None and (L := trained_context(cfg.model)):
        print(f"windows of {L} tokens: the sequence length {cfg.model} was pretrained at (--max-length to change)",
              file=sys.stderr)
        cfg = replace(cfg, max_length=L)
    results, samples = {}, {}
    for task in tasks:
        t0 = time.perf_counter()
        metrics, recs = evaluate(model, tok, task, cfg)
        metrics = {"kind": task.kind, **metrics, "num_fewshot": task.num_fewshot,
                   "seconds": round(time.perf_counter() - t0, 3)}
        results[task.name] = metrics
        samples[task.name] = recs
        if cfg.record and Path(cfg.model).is_dir():
            manifest.record_eval(cfg.model, task.name, metrics)
    out = {"model": str(cfg.model), "results": results, "config": {k: v for k, v in asdict(cfg).items()
                                                                   if k not in ("model", "out")}}
    if cfg.log_samples:
        out["samples"] = samples
    return out


def table(results: dict) -> str:
    """A plain table: task, metric, value, n."""
    rows = [("task", "metric", "value", "n")]
    for name, m in results["results"].items():
        for k, v in m.items():
            if k in ("kind", "n", "num_fewshot", "seconds", "tokens", "bytes"):
                continue
            rows.append((name, k, f"{v:.4f}", str(m["n"])))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}" for r in rows)


def cmd_eval(args) -> None:
    """`ouvert eval`: the table, then the results as one line of JSON (also written to --out)."""
    cfg = EvalConfig(model=args.model, tasks=args.task, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                     limit=args.limit, out=args.out, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                     max_length=args.max_length, stride=args.stride, record=not args.no_record,
                     log_samples=args.log_samples)
    results = run(cfg)
    print(table(results))
    line = json.dumps(results)
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {cfg.out}", file=sys.stderr)
    print(line)
