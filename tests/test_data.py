"""Tokenizer training, data shards and the loader, on the embedded Shakespeare corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest

import ouvert
from ouvert.data import TokenLoader, prepare


def test_trained_tokenizer_loads_in_both(corpus_tokenizer):
    from transformers import AutoTokenizer

    ours = ouvert.load_tokenizer(corpus_tokenizer)
    theirs = AutoTokenizer.from_pretrained(corpus_tokenizer)
    assert ours.vocab_size == 512
    for text in ["To be, or not to be: that is the question.", "  O Romeo, Romeo!\n\twherefore art thou 42?",
                 "Ça, c'est très bien 🦙"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ids[0] == ours.bos_token_id
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True) == text
    conv = [{"role": "user", "content": "Who is Juliet?"}, {"role": "assistant", "content": "A Capulet."}]
    for gen in (False, True):
        assert ours.apply_chat_template(conv, add_generation_prompt=gen) == theirs.apply_chat_template(
            conv, add_generation_prompt=gen, tokenize=False)
    assert ours.token_to_id("<|eot_id|>") in ours.stop_token_ids


def test_manifest_and_shards(corpus_data, corpus_files):
    m = json.loads((corpus_data / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and len(m["sources"]) == len(corpus_files)
    assert m["train_tokens"] > 100_000 and 0 < m["val_tokens"] < m["train_tokens"] / 10
    for s in m["train"] + m["val"]:
        arr = np.fromfile(corpus_data / s["file"], dtype=np.uint16)
        assert len(arr) == s["tokens"]
    assert all(len(src["sha256"]) == 64 for src in m["sources"])


def test_prepare_resumes_without_duplicates(corpus_tokenizer, corpus_files, tmp_path):
    out = tmp_path / "d"
    full = prepare(corpus_tokenizer, [str(f) for f in corpus_files[:3]], out, val_fraction=0.1, workers=1)
    # simulate an interruption: the second file's record is gone and a partial shard is left over
    done = sorted((out / ".done").iterdir())
    done[1].unlink()
    (out / f"{done[1].stem}.all.tmp").write_bytes(b"\x00" * 10)
    again = prepare(corpus_tokenizer, [str(f) for f in corpus_files[:3]], out, val_fraction=0.1, workers=1)
    assert again["train"] == full["train"] and again["val"] == full["val"]
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in full["train"] + full["val"])
    assert not list(out.glob("*.tmp"))


def test_bad_inputs_are_reported_and_the_rest_processed(corpus_tokenizer, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Good text, once.\n" * 50)
    (src / "b.txt").write_bytes(b"fine line\n" + b"\xff\xfe broken bytes\n" + b"after it\n")
    (src / "c.txt").write_text("")
    (src / "d.jsonl").write_text('{"text": "one"}\n{"body": "no text field"}\nnot json\n{"text": "two"}\n')
    m = prepare(corpus_tokenizer, [str(src / "*")], tmp_path / "out", workers=1)
    problems = "\n".join(m["problems"])
    assert f"{src / 'b.txt'}:2: not UTF-8" in problems
    assert f"{src / 'c.txt'}: empty, skipped" in problems
    assert f"{src / 'd.jsonl'}:2: no text field 'text'" in problems
    assert f"{src / 'd.jsonl'}:3: not JSON" in problems
    tok = ouvert.load_tokenizer(corpus_tokenizer)
    texts = {}
    for s in m["train"]:
        ids = np.fromfile(tmp_path / "out" / s["file"], dtype=np.uint16).tolist()
        texts[s["file"]] = tok.decode(ids, skip_special_tokens=True)
    joined = " ".join(texts.values())
    assert "fine line" in joined and "after it" in joined and "broken" not in joined
    assert "one" in joined and "two" in joined and "Good text" in joined


def test_parquet_input(corpus_tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["First document.", "Second one."]}), tmp_path / "x.parquet")
    m = prepare(corpus_tokenizer, [str(tmp_path / "x.parquet")], tmp_path / "out", workers=1)
    tok = ouvert.load_tokenizer(corpus_tokenizer)
    ids = np.fromfile(tmp_path / "out" / m["train"][0]["file"], dtype=np.uint16).tolist()
    assert tok.decode(ids) == "First document.<|end_of_text|>Second one.<|end_of_text|>"


def test_loader_ranks_split_the_global_batch(corpus_data):
    one = TokenLoader(corpus_data, "train", 32, 4, rank=0, world_size=1, seed=3)
    r0 = TokenLoader(corpus_data, "train", 32, 2, rank=0, world_size=2, seed=3)
    r1 = TokenLoader(corpus_data, "train", 32, 2, rank=1, world_size=2, seed=3)
    for _ in range(3):
        x, y = one.next()
        x0, _ = r0.next()
        x1, _ = r1.next()
        assert (x[:2] == x0).all() and (x[2:] == x1).all()
        assert (x[:, 1:] == y[:, :-1]).all()
    state = one.state_dict()
    want = one.next()[0]
    fresh = TokenLoader(corpus_data, "train", 32, 4, seed=3)
    fresh.load_state_dict(state)
    assert (fresh.next()[0] == want).all()
