"""Fine-tuning: the SFT mask, LoRA (with PEFT as the reference), DPO and GRPO."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ouvert
from ouvert.chat import ChatError, render_with_mask
from ouvert.train import TrainConfig, train
from ouvert.train.grpo import group_advantages, grpo_token_loss

THREE_TURNS = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "William Shakespeare."},
    {"role": "user", "content": "Et en français ?"},
    {"role": "assistant", "content": "  William Shakespeare, évidemment. 🎭 "},
    {"role": "user", "content": "And Faust?"},
    {"role": "assistant", "content": "Goethe."},
]


def test_sft_mask_is_exactly_the_assistant_tokens(llama3_tokenizer_dir):
    tok = ouvert.load_tokenizer(llama3_tokenizer_dir)
    ids, mask = render_with_mask(tok, THREE_TURNS)
    assert ids == tok.apply_chat_template(THREE_TURNS, tokenize=True)
    eot = tok.token_to_id("<|eot_id|>")
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"].strip() for m in THREE_TURNS if m["role"] == "assistant"]
    assert len(runs) == 3
    for run, text in zip(runs, answers):
        assert run[-1] == eot
        assert run[:-1] == tok.encode(text, add_special_tokens=False)
    assert sum(mask) == sum(len(tok.encode(a, add_special_tokens=False)) + 1 for a in answers)


@pytest.mark.parametrize(
    "messages,match",
    [
        (THREE_TURNS[:2], "last turn is 'user'"),
        ([{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role 'wizard'"),
        ([], "non-empty list"),
    ],
)
def test_bad_conversations(llama3_tokenizer_dir, messages, match):
    tok = ouvert.load_tokenizer(llama3_tokenizer_dir)
    with pytest.raises(ChatError, match=match):
        render_with_mask(tok, messages)


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, corpus_tokenizer):
    """A random Llama written by transformers, with the 512-token corpus tokenizer beside it."""
    from conftest import make_hf_model

    d = tmp_path_factory.mktemp("base")
    hf = make_hf_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       initializer_range=0.1, tie_word_embeddings=False)
    hf.save_pretrained(d)
    for f in corpus_tokenizer.iterdir():
        shutil.copy(f, d / f.name)
    return d, hf


def _chat_jsonl(path, n=64, extra_bad=False):
    lines = []
    for i in range(n):
        q = f"Say the number {i % 8}."
        lines.append(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": f"{i % 8} {i % 8} {i % 8}"}]}))
    if extra_bad:
        lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}))
        lines.insert(5, json.dumps({"messages": [{"role": "robot", "content": "x"},
                                                 {"role": "assistant", "content": "y"}]}))
        lines.insert(7, "{broken json")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_lora_sft_peft_and_merge(base_ckpt, tmp_path):
    from peft import PeftModel

    from ouvert.train.lora import load_adapter, merge

    d, hf = base_ckpt
    data = _chat_jsonl(tmp_path / "chat.jsonl", extra_bad=True)
    c = TrainConfig(objective="sft", data=str(data), init_from=str(d), out_dir=str(tmp_path / "run"), seq_len=64,
                    batch_size=8, max_steps=12, lr=1e-2, warmup_steps=1, lora_rank=4, lora_alpha=8,
                    lora_targets="all-linear", eval_every=0, save_every=0, progress=False, sample_tokens=0)
    final = train(c)
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    # the base checkpoint is untouched and the adapter moved
    base = load_file(d / "model.safetensors")
    model = load_adapter(ouvert.load_model(d), final)
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            key = "model." + name if name != "lm_head.weight" else name
            assert torch.equal(p.detach(), base[key]), name
    assert any(m.lora_B.weight.abs().max() > 0 for n, m in model.named_modules() if hasattr(m, "lora_B"))
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        adapted = model(x)
        peft_model = PeftModel.from_pretrained(hf, str(final)).eval()
        assert (peft_model(x).logits - adapted).abs().max() < 1e-4
        merged = merge(model)(x)
        assert (merged - adapted).abs().max() < 1e-5


def test_sft_reports_bad_lines_and_uses_the_rest(base_ckpt, tmp_path, capsys):
    from ouvert.train.distributed import Dist
    from ouvert.train.objectives import SFTTask

    d, _ = base_ckpt
    data = _chat_jsonl(tmp_path / "chat.jsonl", n=16, extra_bad=True)
    c = TrainConfig(objective="sft", data=str(data), init_from=str(d), seq_len=64, batch_size=4)
    task = SFTTask(c, Dist(), ouvert.load_tokenizer(d))
    assert len(task.train) == 16
    text = "\n".join(task.problems)
    assert f"{data}:4: the last turn is 'user'" in text
    assert f"{data}:6: message 0 has unknown role 'robot'" in text
    assert f"{data}:8: not JSON" in text


def test_dpo_margin_rises(base_ckpt, tmp_path):
    d, _ = base_ckpt
    rows = [{"prompt": f"Question {i}: shall we?", "chosen": "Yes, gladly.", "rejected": "No."} for i in range(32)]
    rows.insert(2, {"prompt": "Empty?", "chosen": "fine", "rejected": "  "})
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = TrainConfig(objective="dpo", data=str(data), init_from=str(d), out_dir=str(tmp_path / "dpo"), seq_len=64,
                    batch_size=8, max_steps=15, lr=3e-3, warmup_steps=1, beta=0.1, eval_every=5, eval_steps=4,
                    save_every=0, progress=False, sample_tokens=0)
    train(c)
    m = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_reward_margin"] for r in m if "val_reward_margin" in r]
    assert m[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert evals[-1] > evals[0] + 0.5 and evals[-1] > 0
    assert m[-1]["pref_accuracy"] > 0.9


def test_grpo_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    a = group_advantages(r, eps=0.0 + 1e-4)
    # group 1: mean 0.5, population std 0.5 -> +-1 (up to eps); group 2: all equal -> 0
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) * 0.5 / (0.5 + 1e-4))
    assert torch.equal(a[1], torch.zeros(4))


def test_grpo_loss_clipping_and_kl_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    logp = torch.log(torch.tensor([[0.8, 0.5], [0.2, 0.5]]))  # ratios 1.6, 1.0 / 0.4, 1.0
    ref = torch.log(torch.tensor([[0.4, 0.5], [0.4, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = grpo_token_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.5)
    # seq 0 (A=+1): min(1.6, 1.2) = 1.2 and min(1.0, 1.0) = 1.0
    # seq 1 (A=-1): min(-0.4, -0.8) = -0.8; its second token is masked out
    def kl(p: float, q: float) -> float:  # k3 with the ratio ref / pi
        return q / p - math.log(q / p) - 1

    k00, k01, k10 = kl(0.8, 0.4), kl(0.5, 0.5), kl(0.2, 0.4)
    seq0 = ((1.2 - 0.5 * k00) + (1.0 - 0.5 * k01)) / 2
    seq1 = -0.8 - 0.5 * k10
    assert loss.item() == pytest.approx(-(seq0 + seq1) / 2, abs=1e-6)
    assert m["kl"].item() == pytest.approx((k00 + k01 + k10) / 3, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(2 / 3)


def test_rewards_by_hand():
    from ouvert.train.grpo import REWARDS

    ex = {"prompt": "23+48", "answer": "17"}  # reversed digits: 71 written least significant first
    assert REWARDS["exact_answer"]("17", ex) == 1.0 and REWARDS["exact_answer"]("71", ex) == 0.0
    assert REWARDS["digit_match"]("17", ex) == 0.5
    assert REWARDS["digit_match"]("19", ex) == 0.25  # one of two positions right
    assert REWARDS["digit_match"]("170", ex) == 0.5 * 2 / 3  # an extra digit costs
    assert REWARDS["digit_match"]("no number", ex) == 0.0
    assert REWARDS["format"](" 17 ", ex) == 0.1 and REWARDS["format"]("17 apples", ex) == 0.0
