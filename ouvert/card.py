"""`ouvert card` writes MODEL_CARD.md from a checkpoint's config and ouvert.json; `ouvert verify`
checks its weight files against the hashes recorded there.

The card follows the Hugging Face model-card layout (YAML front matter, then sections): the
architecture, how and on what it was trained, its lineage, the loss curve (plotted from the
metrics.jsonl the trainer leaves in each checkpoint), the evaluation table, license, intended use
and limits. Everything in it is read from files; nothing is typed in by hand but the license.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ouvert.checkpoint import manifest
from ouvert.checkpoint.hf import read_config
from ouvert.model import Transformer
from ouvert.quantize import describe_quantization, quantized_numel
from ouvert.train.loop import plot_losses

CARD = "MODEL_CARD.md"


def _table(rows: list[tuple[str, str]], head: tuple[str, str]) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def architecture_rows(cfg) -> list[tuple[str, str]]:
    """`ouvert info`'s rows, from a model built on the meta device (no weights read)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    rows = [r for r in describe(model) if r[0] not in ("dtype", "mtp")]
    if cfg.torch_dtype:
        rows.insert(2, ("dtype", cfg.torch_dtype))
    return rows


def lineage(record: dict[str, Any]) -> list[str]:
    """This checkpoint's ancestors, nearest first, as far as their ouvert.json files reach."""
    out, seen = [], set()
    parent = record.get("parent")
    while parent and parent["checkpoint_sha256"] not in seen:
        seen.add(parent["checkpoint_sha256"])
        out.append(f"`{parent['path']}` (weights sha256 `{parent['checkpoint_sha256'][:16]}`)")
        try:
            parent = manifest.read(parent["path"]).get("parent")
        except (manifest.ManifestError, OSError):
            break
    return out


def _training_section(record: dict[str, Any]) -> list[str]:
    c = record["train_config"]
    hw = record.get("hardware", {})
    rows = [
        ("objective", c["objective"]),
        ("steps", f"{record['step']:,} of {c['max_steps']:,}"),
        ("tokens seen", f"{record.get('tokens_seen', 0):,}"),
        ("batch", f"{c['batch_size']} x {c['grad_accum']} accumulation x {record.get('world_size', 1)} process(es), "
                  f"sequence length {c['seq_len']}"),
        ("optimizer", f"AdamW, lr {c['lr']:g} -> {c['min_lr']:g} ({c['schedule']}, {c['warmup_steps']} warmup), "
                      f"weight decay {c['weight_decay']:g}"),
        ("precision", c["dtype"]),
        ("seed", str(record.get("seed", c["seed"]))),
        ("hardware", f"{hw.get('cpu', '?')} ({hw.get('device', '?')}, {hw.get('torch_threads', '?')} threads), "
                     f"torch {hw.get('torch', '?')}"),
        ("wall-clock time", f"{record.get('wall_clock_s', 0) / 60:.1f} min"),
    ]
    if c.get("lora_rank"):
        rows.append(("LoRA", f"rank {c['lora_rank']}, alpha {c['lora_alpha']:g}, on {c['lora_targets']}"))
    out = ["## Training", "", _table(rows, ("property", "value")), ""]
    data = record.get("data", {})
    out += ["### Data", ""]
    if "shards" in data:
        out.append(f"Token shards made by `ouvert data prepare` (manifest sha256 `{data['manifest_sha256'][:16]}`, "
                   f"tokenizer sha256 `{data['tokenizer_sha256'][:16]}`): {data['train_tokens']:,} training and "
                   f"{data['val_tokens']:,} validation tokens from {len(data['sources'])} source file(s):")
        out.append("")
        out.append(_table([(Path(s["source"]).name, f"{s['tokens']:,} tokens, sha256 `{s['sha256'][:16]}`")
                           for s in data["sources"]], ("source", "")))
    for f in data.get("files", []):
        out.append(f"- {f['role']}: `{f['path']}` (sha256 `{f['sha256'][:16]}`)")
    return out + [""]


def render(path: str | Path, license: str | None = None) -> str:
    """The card's Markdown; also (re)draws loss.png beside it when the checkpoint has metrics."""

    path = Path(path)
    cfg = read_config(path)
    try:
        record = manifest.read(path)
    except manifest.ManifestError as e:
        print(f"warning: {e}", file=sys.stderr)
        record = {}
    arch = cfg.model_type
    name = path.resolve().name
    if name.startswith("step-"):  # a training checkpoint: name it by its run
        name = f"{path.resolve().parent.name}, {name}"
    license = license or record.get("license") or "other"
    parents = lineage(record)
    front = ["---", f"license: {license}", "library_name: ouvert", f"tags: [ouvert, {arch}, text-generation]"]
    if record.get("parent"):
        front.append(f"base_model: {record['parent']['path']}")
    out = front + ["---", "", f"# {name}", ""]
    trained = "train_config" in record
    what = (f"A {arch} model trained with ouvert ({record['train_config']['objective']})" if trained
            else f"A {arch} checkpoint")
    out += [what + ". Every figure below is read from its `config.json` and `ouvert.json`.", ""]
    out += ["## Architecture", "", _table(architecture_rows(cfg), ("property", "value")), ""]
    if trained:
        out += _training_section(record)
    out += ["## Lineage", ""]
    out += [f"{i + 1}. {p}" for i, p in enumerate(parents)] or ["Trained from scratch (no parent checkpoint)."
                                                                  if trained else "Not recorded."]
    out.append("")
    metrics_file = path / "metrics.jsonl"
    if metrics_file.is_file():
        history = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        if history:
            plot_losses(history, path / "loss.png")
            out += ["## Loss curve", "", "![training and validation loss](loss.png)", ""]
    if record.get("metrics"):
        keep = {k: v for k, v in record["metrics"].items() if k.startswith(("loss", "val_", "reward"))}
        if keep:
            out += ["## Final training metrics", "", _table([(k, _fmt(v)) for k, v in sorted(keep.items())],
                                                             ("metric", "value")), ""]
    out += ["## Evaluation", ""]
    evals = record.get("eval", {})
    if evals:
        bookkeeping = {"n", "num_fewshot", "seconds", "tokens", "bytes"}
        rows = [(f"{task}: {k}", _fmt(v)) for task, m in sorted(evals.items()) for k, v in m.items()
                if k not in bookkeeping and isinstance(v, (int, float)) and not isinstance(v, bool)]
        out += [_table(rows, ("task: metric", "value")), ""]
        for task, m in sorted(evals.items()):
            shots = f", {m['num_fewshot']}-shot" if m.get("num_fewshot") else ""
            size = f"{m['n']} document(s)" + (f", {m['tokens']:,} tokens" if "tokens" in m else "")
            out.append(f"- {task}: {size}{shots}, {m.get('date', '')}")
        out.append("")
    else:
        out += [f"No evaluation recorded yet: run `ouvert eval --model {path} --task ...`.", ""]
    code = record.get("ouvert", {})
    out += ["## Provenance and reproduction", ""]
    if record:
        dirty = " (with uncommitted changes)" if code.get("git_dirty") else ""
        out += [f"Written by ouvert {code.get('version')} at commit `{code.get('git_commit')}`{dirty}. "
                f"Weights sha256 `{record.get('checkpoint_sha256')}`.", "",
                f"- `ouvert verify --model {path}` checks every weight file against `ouvert.json`."]
        if trained:
            out.append(f"- `ouvert reproduce --model {path} --out DIR` re-runs the recorded training and reports "
                       "whether the weights come out bitwise identical.")
    else:
        out.append("No `ouvert.json`: the provenance of this checkpoint is unknown.")
    out += ["", "## License", "", f"`{license}`" + ("" if license != "other" else
                                                    ": not stated; pass `ouvert card --license ID`."), ""]
    out += ["## Intended use and limits", "",
            "A research artifact: for studying, evaluating and fine-tuning language models. It has not been "
            "aligned or safety-tested; it can produce text that is wrong, offensive or that repeats its training "
            "data. It knows only what its training data above contains, in the languages it contains, and within "
            f"a context of {cfg.max_position_embeddings} tokens"
            + (f" (trained on sequences of {record['train_config']['seq_len']})" if trained else "") + ". "
            "Do not use it for decisions about people.", ""]
    return "\n".join(out)


def write_card(path: str | Path, license: str | None = None) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'}: missing; not a checkpoint directory")
    text = render(path, license)
    tmp = path / f".{CARD}.tmp"
    tmp.write_text(text)
    tmp.rename(path / CARD)
    return path / CARD


def add_card_parsers(sub) -> None:
    p = sub.add_parser("card", help="write MODEL_CARD.md (architecture, data, lineage, loss curve, evals)")
    p.add_argument("--model", required=True)
    p.add_argument("--license", help="SPDX id or HF license name (default: as recorded, else 'other')")
    p.set_defaults(func=cmd_card)
    p = sub.add_parser("verify", help="check the weight files against the hashes in ouvert.json")
    p.add_argument("--model", required=True)
    p.set_defaults(func=cmd_verify)


def cmd_card(args) -> None:
    print(f"wrote {write_card(args.model, args.license)}")


def cmd_verify(args) -> None:
    problems = manifest.verify(args.model)
    if problems:
        for p in problems:
            print(p)
        print(f"FAILED: {len(problems)} problem(s) in {args.model}")
        raise SystemExit(1)
    n = len(manifest.read(args.model)["weights"])
    print(f"ok: {n} weight file(s) in {args.model} match ouvert.json")


def describe(model) -> list[tuple[str, str]]:
    """Rows of `ouvert info` (and of the card's architecture table)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters()) + quantized_numel(model)  # int8 / int4: buffers
    rows = [
        ("architecture", c.model_type),
        ("parameters", f"{params:,} ({params / 1e6:.1f}M)"),
        ("dtype", str(model.dtype).removeprefix("torch.")),  # activations (and float weights)
        ("context length", f"{c.max_position_embeddings:,}"),
        ("layers", str(c.num_hidden_layers)),
        ("hidden size", str(c.hidden_size)),
        ("vocabulary", f"{c.vocab_size:,}"),
    ]
    if c.is_mla:
        q = "direct" if c.q_lora_rank is None else f"q_lora_rank {c.q_lora_rank}"
        rows.append(("attention", f"MLA, {c.num_attention_heads} heads, kv_lora_rank {c.kv_lora_rank}, {q}"))
    else:
        rows.append(("attention", f"GQA, {c.num_attention_heads} heads, {c.num_key_value_heads} KV heads, "
                                  f"head_dim {c.head_dim}"))
    if c.n_routed_experts:
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        rows.append(("experts", f"{n_moe} MoE layers: {c.n_routed_experts} routed ({c.num_experts_per_tok} active), "
                                f"{c.n_shared_experts} shared, {c.scoring_func} gating"))
    if c.rope_scaling:
        rows.append(("rope", f"theta {c.rope_theta:g}, {c.rope_scaling['rope_type']} scaling"))
    else:
        rows.append(("rope", f"theta {c.rope_theta:g}"))
    if c.num_nextn_predict_layers:
        rows.append(("mtp", f"{len(model.mtp)} module(s) loaded"))
    rows.append(("tied embeddings", str(c.tie_word_embeddings).lower()))
    quantized = describe_quantization(model)
    if quantized:
        rows.append(("quantization", quantized))
    return rows
