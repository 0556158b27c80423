"""ouvert.json on every checkpoint, `ouvert verify`, `ouvert card`, and `ouvert reproduce`: a tiny
pretraining run and a fine-tune of it, then tampering with weights and data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import ouvert
from ouvert.card import write_card
from ouvert.checkpoint import manifest
from ouvert.cli import main
from ouvert.train import TrainConfig, train
from ouvert.train.reproduce import reproduce

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), preset="tiny-llama", model=dict(TINY), seq_len=32, batch_size=4,
                max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=3, eval_steps=2, save_every=0,
                log_every=1, progress=False, sample_tokens=0, seed=3)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run(corpus_data, tmp_path_factory):
    """(data dir copy, final checkpoint) of a 6-step pretraining run."""
    root = tmp_path_factory.mktemp("prov")
    data = root / "data"
    shutil.copytree(corpus_data, data)
    return data, train(_cfg(data, root / "run"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_records_its_provenance(run):
    data, ckpt = run
    rec = json.loads((ckpt / "ouvert.json").read_text())
    assert rec["ouvert"]["version"] == ouvert.__version__
    assert len(rec["ouvert"]["git_commit"]) == 40  # the tests run from a git checkout
    assert rec["weights"] == {"model.safetensors": _sha(ckpt / "model.safetensors")}
    assert rec["model_config"]["hidden_size"] == 64
    assert rec["tokenizer_sha256"] == _sha(ckpt / "tokenizer.json")
    assert rec["train_config"]["seed"] == 3 and rec["seed"] == 3 and rec["world_size"] == 1
    assert rec["step"] == 6 and rec["tokens_seen"] == 6 * 4 * 32
    assert rec["wall_clock_s"] > 0 and rec["hardware"]["torch_threads"] >= 1
    m = json.loads((data / "manifest.json").read_text())
    assert rec["data"]["manifest_sha256"] == _sha(data / "manifest.json")
    assert {s["file"]: s["sha256"] for s in rec["data"]["shards"]} == {
        s["file"]: _sha(data / s["file"]) for split in ("train", "val") for s in m[split]}
    assert "val_loss" in rec["metrics"] and "loss" in rec["metrics"]
    assert "parent" not in rec
    assert manifest.verify(ckpt) == []


def test_finetune_names_its_parent(run, tmp_path):
    data, parent = run
    child = train(_cfg(data, tmp_path / "ft", init_from=str(parent), max_steps=2, eval_every=0))
    rec = manifest.read(child)
    assert rec["parent"]["path"] == str(parent.resolve())
    assert rec["parent"]["checkpoint_sha256"] == manifest.combined_hash(
        {"model.safetensors": _sha(parent / "model.safetensors")})
    assert rec["checkpoint_sha256"] != rec["parent"]["checkpoint_sha256"]
    card = write_card(child).read_text()
    assert "## Lineage" in card and str(parent.resolve()) in card


def test_verify_names_a_tampered_file(run, tmp_path, capsys):
    _, ckpt = run
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    assert main(["verify", "--model", str(copy)]) == 0
    w = copy / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x01  # one bit of one weight
    w.write_bytes(bytes(raw))
    with pytest.raises(SystemExit) as e:
        main(["verify", "--model", str(copy)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"{w}: sha256" in out and "does not match" in out

    (copy / "ouvert.json").unlink()
    assert main(["verify", "--model", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "ouvert.json: missing" in err and "Traceback" not in err


def test_verify_names_a_changed_train_state_file(run, tmp_path, capsys):
    """train_state/ (what --resume loads) is hashed in ouvert.json like the weights."""
    _, ckpt = run
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    record = json.loads((copy / "ouvert.json").read_text())
    assert record["train_state"]["train_state/optimizer.pt"] == _sha(copy / "train_state" / "optimizer.pt")
    assert set(record["train_state"]) == {"train_state/optimizer.pt", "train_state/rng.pt",
                                          "train_state/state.json"}
    state = copy / "train_state" / "state.json"
    state.write_text(state.read_text().replace('"step": 6', '"step": 5'))
    (copy / "train_state" / "extra.pt").write_bytes(b"x")
    with pytest.raises(SystemExit) as e:
        main(["verify", "--model", str(copy)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert f"{state}: sha256" in out and "does not match" in out
    assert f"{copy / 'train_state' / 'extra.pt'}: not recorded" in out


def test_card_renders_with_its_image(run, tmp_path):
    _, ckpt = run
    copy = tmp_path / "card"
    shutil.copytree(ckpt, copy)
    manifest.record_eval(copy, "tiny_mc", {"acc": 0.5, "n": 6})
    assert manifest.verify(copy) == []  # eval results do not change the weights' identity
    text = write_card(copy, license="apache-2.0").read_text()
    assert text.startswith("---\nlicense: apache-2.0\n")
    assert "| layers | 2 |" in text and "| hidden size | 64 |" in text
    assert "| tiny_mc: acc | 0.5 |" in text
    assert "![training and validation loss](loss.png)" in text
    assert (copy / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (copy / "loss.png").stat().st_size > 1000
    assert "Trained from scratch" in text and "tokens seen | 768" in text


def test_reproduce_is_bitwise_and_names_a_changed_shard(run, tmp_path):
    data, ckpt = run
    r = reproduce(ckpt, tmp_path / "again")
    assert r["problems"] == [] and r["identical"], r

    shard = data / json.loads((data / "manifest.json").read_text())["train"][1]["file"]
    backup = shard.read_bytes()
    try:
        tokens = np.fromfile(shard, dtype=np.uint16)
        tokens[::-1].tofile(shard)  # same tokens and length, different text
        r = reproduce(ckpt, tmp_path / "changed")
        assert not r["identical"] and "reproduction" not in r
        assert r["problems"] == [f"{shard}: train shard differs from the one trained on (sha256 mismatch)"]
        r = reproduce(ckpt, tmp_path / "forced", force=True)
        assert not r["identical"] and r["differences"]
    finally:
        shard.write_bytes(backup)


def test_time_budget_fixes_the_step_count_and_reproduce_replays_it(corpus_data, tmp_path):
    """max_time turns into a step count after the first steps (inside warmup); the count is recorded
    as max_steps, the schedule runs to it, and reproduce replays exactly that many steps."""
    c = _cfg(corpus_data, tmp_path / "run", max_steps=100_000, max_time=3.0, warmup_steps=8, eval_every=0)
    final = train(c)
    record = manifest.read(final)
    steps = record["train_config"]["max_steps"]
    assert 8 <= steps < 100_000 and record["step"] == steps and record["max_steps_from_time"]
    assert json.loads((final / "train_config.json").read_text())["max_steps"] == steps
    assert (tmp_path / "run" / "final").resolve() == final.resolve()
    r = reproduce(final, tmp_path / "again")
    assert r["identical"], r

    capped = train(_cfg(corpus_data, tmp_path / "capped", max_steps=5, max_time=1e6, warmup_steps=8))
    assert manifest.read(capped)["step"] == 5  # max_steps stays the upper bound


def test_reproduce_without_a_record_is_a_clear_error(tmp_path, tiny_ckpt):
    path, _ = tiny_ckpt  # written by transformers: no ouvert.json
    assert main(["reproduce", "--model", str(path), "--out", str(tmp_path / "x")]) == 2


def test_eval_windows_default_to_the_pretrained_length(run):
    """Positions past the training seq_len were never trained: eval's default window is that length."""
    from ouvert.eval import EvalConfig
    from ouvert.eval.run import run as run_eval

    data, ckpt = run
    out = run_eval(EvalConfig(model=str(ckpt), tasks=[str(data)], record=False))
    assert out["config"]["max_length"] == 32
    longer = run_eval(EvalConfig(model=str(ckpt), tasks=[str(data)], record=False, max_length=128))
    assert longer["config"]["max_length"] == 128
