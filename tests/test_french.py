"""The worked fine-tuning of the real SmolLM2-135M-Instruct (ouvert/train/french.py) at a reduced
size: LoRA SFT's loss falls, the adapter gives PEFT's logits on transformers' model of the same file,
GRPO runs on the merged model with the language reward; and the language check itself, by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ouvert
from ouvert.train.french import chat_set, names_answer
from ouvert.train.grpo import REWARDS, looks_french

SMOLLM2 = Path(__file__).resolve().parent.parent / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("text,french", [
    ("La capitale de la France est Paris.", True),
    ("Je vais bien, merci !", True),
    ("Le contraire de chaud est froid.", True),
    ("Trois plus quatre font sept.", True),
    ("The capital of France is Paris.", False),
    ("Paris.", False),  # no function word either way: not French
    ("Three plus four is seven.", False),
    ("I'm fine, thank you! And you?", False),
    ("", False),
])
def test_language_check(text, french):
    assert looks_french(text) is french
    assert REWARDS["french"](text, {}) == float(french)


def test_chat_set_is_french_and_held_out_is_unseen():
    rows, held = chat_set()
    answers = [r["messages"][1]["content"] for r in rows]
    assert all(looks_french(a) for a in answers)
    questions = {r["messages"][0]["content"] for r in rows}
    assert not questions & {h["prompt"] for h in held}
    # the held-out capitals are countries the training set never names
    assert not any("France" in q or "Australia" in q for q in questions)
    assert names_answer("La capitale du Viêt Nam est Hanoi.", {"answer": ["Hanoï"]})


@pytest.mark.skipif(not SMOLLM2.is_file(), reason="run `make assets` (scripts/fetch_assets.sh)")
def test_reduced_run_peft_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ouvert.train.french import run
    from ouvert.train.lora import load_adapter

    r = run(tmp_path, SMOLLM2, sft_steps=4, grpo_steps=1, n_train=32, n_held=4, progress=False, export=False,
            lora_rank=4, sft_batch=4, grpo_batch=2, grpo_group=2, max_new_tokens=8)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    grpo = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(grpo) == 1 and 0.0 <= grpo[0]["reward_mean"] <= 1.0
    for stage in ("base", "after_sft", "after_grpo"):
        assert r[stage]["n"] == 4 and 0.0 <= r[stage]["french"] <= 1.0
    assert (Path(r["final"]) / "model.safetensors").is_file()

    # the SFT adapter, in PEFT's layout, on transformers' model read from the same GGUF
    adapted = load_adapter(ouvert.load_model(SMOLLM2, dtype=torch.float32), r["sft_adapter"]).eval()
    hf = AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(hf, r["sft_adapter"]).eval()
    x = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = adapted(x), peft(x).logits
        with peft.disable_adapter():
            base = peft(x).logits
    assert (ours - theirs).abs().max() <= 1e-4 * (theirs.max() - theirs.min())
    assert (ours - base).abs().max() > 1e-2 * (base.max() - base.min())  # the adapter moved: not a no-op
