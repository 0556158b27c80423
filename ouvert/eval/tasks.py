"""Evaluation tasks: what to read, what kind it is, how to build its prompts.

A task is named on the command line as one of:
  a JSONL file        one object per line; the kind follows from the fields of the first line:
                      {"context", "choices", "label"} is multiple choice (HellaSwag's and ARC's layout),
                      {"prompt", "answer"} is generative.
  a task spec         a small .yaml / .yml / .json file: {"path": "data.jsonl", "kind": ..., "name": ...,
                      "num_fewshot": ..., "stop": [...], ...} (the fields of `Task`; paths are relative
                      to the spec).
  perplexity:PATH     perplexity on text files (a file, a glob, a directory) or on a token-shard
                      directory written by `ouvert data prepare` (it has a manifest.json).
  a text file, glob or shard directory: perplexity, as above.
  a shipped task's name, from ouvert/eval/data (its .json spec, else its .jsonl):
                      general_mc   52 easy general-knowledge questions, 4 choices each, zero-shot
                      general_qa   50 short questions (capitals, sums, opposites...) answered in a word
                                   or a number, 3-shot, greedy to the end of the line, exact match

Few-shot prompts follow lm-eval: each example is `context + target_delimiter + answer`, the examples
and then the scored context are joined with `fewshot_delimiter`. The K examples are drawn from the
same file without the document being scored, with a generator seeded by (seed, document index), so
a document's prompt does not depend on --limit or on the order of evaluation.
"""

from __future__ import annotations

import glob
import json
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

KINDS = ("multiple_choice", "generate", "perplexity")
# The fields a JSONL line of each kind must have, with their types.
FIELDS = {
    "multiple_choice": {"context": str, "choices": list, "label": int},
    "generate": {"prompt": str, "answer": (str, int, float)},
}
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
SHIPPED = Path(__file__).parent / "data"  # tasks that come with ouvert, named by their file's stem


class TaskError(ValueError):
    """A task file that cannot be used; names the file, and the line and field at fault."""


@dataclass
class Task:
    """One evaluation task. The fields are also the keys a task spec file may set."""

    name: str
    kind: str  # one of KINDS
    path: str  # JSONL file; for perplexity: text file, glob, directory or shard directory
    num_fewshot: int = 0
    fewshot_seed: int = 1234  # lm-eval's default seed
    target_delimiter: str = " "  # between a context and its answer (lm-eval's default)
    fewshot_delimiter: str = "\n\n"  # between few-shot examples (lm-eval's default)
    # generative tasks
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    max_new_tokens: int = 64
    verifier: str | None = None  # "exact" or "numeric"; default: numeric when every answer is a number
    # perplexity on shards
    split: str | None = None  # "val" or "train"; default: val when the shards have one
    docs: list[dict] = field(default_factory=list, repr=False)  # the JSONL's records, read by load_task

    def fewshot_prefix(self, index: int, k: int | None = None) -> str:
        """The K solved examples put before document `index` (empty for zero-shot)."""
        k = self.num_fewshot if k is None else k
        if k <= 0:
            return ""
        others = [i for i in range(len(self.docs)) if i != index]
        if k > len(others):
            raise TaskError(f"{self.path}: {k}-shot needs {k + 1} documents, the file has {len(self.docs)}")
        rng = random.Random(self.fewshot_seed * 1_000_003 + index)
        shots = [self.docs[i] for i in rng.sample(others, k)]
        return "".join(self.context(d) + self.target_delimiter + self.answer(d) + self.fewshot_delimiter
                       for d in shots)

    def context(self, doc: dict) -> str:
        return doc["context"] if self.kind == "multiple_choice" else doc["prompt"]

    def answer(self, doc: dict) -> str:
        return doc["choices"][doc["label"]] if self.kind == "multiple_choice" else str(doc["answer"])


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL file; a line that is not a JSON object is an error naming the line."""
    docs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            rec["_line"] = lineno
            docs.append(rec)
    if not docs:
        raise TaskError(f"{path}: no records")
    return docs


def infer_kind(path: Path, doc: dict) -> str:
    for kind, want in FIELDS.items():
        if set(want) <= doc.keys():
            return kind
    keys = ", ".join(k for k in doc if k != "_line")
    raise TaskError(f"{path}:{doc['_line']}: cannot tell the task kind from the fields ({keys}); multiple choice "
                    "needs context, choices, label; generative needs prompt, answer")


def check_docs(path: Path, kind: str, docs: list[dict]) -> None:
    """Every record has its kind's fields with the right types; the error names file, line and field."""
    for doc in docs:
        where = f"{path}:{doc['_line']}"
        for name, typ in FIELDS[kind].items():
            if name not in doc:
                raise TaskError(f"{where}: missing field {name!r} (a {kind} task needs {', '.join(FIELDS[kind])})")
            if not isinstance(doc[name], typ) or isinstance(doc[name], bool):
                raise TaskError(f"{where}: field {name!r} has the wrong type ({type(doc[name]).__name__})")
        if kind == "multiple_choice":
            choices = doc["choices"]
            if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
                raise TaskError(f"{where}: field 'choices' must be a list of at least 2 non-empty strings")
            if not 0 <= doc["label"] < len(choices):
                raise TaskError(f"{where}: field 'label' is {doc['label']}, outside the {len(choices)} choices")


def _read_spec(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            spec = json.loads(text)
        else:
            import yaml  # PyYAML comes with transformers; JSON specs need nothing

            spec = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different error types; both are "cannot parse"
        raise TaskError(f"{path}: cannot parse the task spec ({e})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a task spec is a mapping of fields ({', '.join(f.name for f in fields(Task))})")
    known = {f.name for f in fields(Task)} - {"docs"}
    for key in spec:
        if key not in known:
            raise TaskError(f"{path}: unknown field {key!r}; a task spec has {', '.join(sorted(known))}")
    if "path" not in spec:
        raise TaskError(f"{path}: missing field 'path' (the data file, relative to the spec)")
    return spec


def _is_shard_dir(p: Path) -> bool:
    return p.is_dir() and (p / "manifest.json").is_file()


def load_task(spec: str, num_fewshot: int | None = None) -> Task:
    """A Task from a command-line name (see the module docstring); JSONL records are read and checked.
    num_fewshot, when given, overrides the spec's."""
    if spec.startswith("perplexity:"):
        target = spec.removeprefix("perplexity:")
        return Task(name=f"perplexity/{Path(target.rstrip('/')).stem or 'text'}", kind="perplexity", path=target)
    p = Path(spec)
    if not p.exists() and (shipped := shipped_task(spec)):
        p = shipped
    if p.is_file() and p.suffix in SPEC_SUFFIXES:
        s = _read_spec(p)
        data = Path(s["path"]) if Path(s["path"]).is_absolute() else p.parent / s["path"]
        kind = s.get("kind")
        if kind is not None and kind not in KINDS:
            raise TaskError(f"{p}: field 'kind' is {kind!r}; kinds are {', '.join(KINDS)}")
        task = Task(**{**s, "name": s.get("name", p.stem), "kind": kind or "", "path": str(data)})
        if task.kind == "perplexity" or (not task.kind and (data.suffix != ".jsonl")):
            task.kind = "perplexity"
        elif not data.is_file():
            raise TaskError(f"{p}: field 'path' names {data}, which does not exist")
        else:
            _read_docs(task)
    elif p.is_file() and p.suffix == ".jsonl":
        task = Task(name=p.stem, kind="", path=str(p))
        _read_docs(task)
    elif p.is_file() or _is_shard_dir(p) or p.is_dir() or glob.glob(spec):
        task = Task(name=f"perplexity/{p.stem or 'text'}", kind="perplexity", path=spec)
    else:
        raise TaskError(f"{spec}: no such task file (give a .jsonl, a .yaml/.json task spec, text files, a shard "
                        f"directory, perplexity:PATH, or a shipped task: {', '.join(shipped_names())})")
    if num_fewshot is not None:
        task.num_fewshot = num_fewshot
    if task.num_fewshot < 0:
        raise TaskError(f"{spec}: num_fewshot must be >= 0, got {task.num_fewshot}")
    if task.verifier not in (None, "exact", "numeric"):
        raise TaskError(f"{spec}: verifier is {task.verifier!r}; verifiers are 'exact' and 'numeric'")
    return task


def shipped_names() -> list[str]:
    return sorted({f.stem for f in SHIPPED.glob("*.json*")})


def shipped_task(name: str) -> Path | None:
    """The file of the shipped task called `name` (its spec before its data), or None."""
    if name not in shipped_names():
        return None
    spec = SHIPPED / f"{name}.json"
    return spec if spec.is_file() else SHIPPED / f"{name}.jsonl"


def _read_docs(task: Task) -> None:
    path = Path(task.path)
    if not path.is_file():
        raise TaskError(f"{path}: no such file")
    task.docs = read_jsonl(path)
    task.kind = task.kind or infer_kind(path, task.docs[0])
    if task.kind == "perplexity":
        raise TaskError(f"{path}: a perplexity task reads text files or shards, not JSONL records")
    check_docs(path, task.kind, task.docs)
