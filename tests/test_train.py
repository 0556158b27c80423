"""The training loop: it learns, it resumes bitwise, it runs the same under torchrun (DDP and
FSDP2), DeepSeek's balancing and MTP loss work, and a failed checkpoint write loses nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ouvert
from ouvert.train import TrainConfig, train

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256}


def _cfg(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), preset="tiny-llama", model=dict(TINY), seq_len=32, batch_size=4,
                max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=0, save_every=0, log_every=1,
                progress=False, sample_tokens=4, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_validation_loss(corpus_data, tmp_path):
    """A real learning test: 300 steps on four plays cut the validation loss by more than 1.5 nats
    (from about ln(512) = 6.2 at random init)."""
    c = _cfg(corpus_data, tmp_path / "run", max_steps=300, warmup_steps=20, eval_every=150, eval_steps=8,
             batch_size=8, seq_len=64, save_every=0)
    final = train(c)
    m = _metrics(tmp_path / "run")
    evals = [r["val_loss"] for r in m if "val_loss" in r]
    first = m[0]["loss"]
    assert first > 5.5
    assert evals[-1] < first - 1.5, (first, evals)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (final / "train_state" / "state.json").is_file()
    model = ouvert.load_model(final)  # a normal HF checkpoint directory
    assert model.config.vocab_size == 512


def test_exact_resume_is_bitwise(corpus_data, tmp_path):
    straight = train(_cfg(corpus_data, tmp_path / "a", max_steps=6))
    train(_cfg(corpus_data, tmp_path / "b", max_steps=6, stop_at=3))
    resumed = train(_cfg(corpus_data, tmp_path / "b", max_steps=6), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [r["loss"] for r in _metrics(tmp_path / "a")]
    lb = [r["loss"] for r in _metrics(tmp_path / "b")]
    assert la == lb


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ouvert.train", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _cli_args(c: TrainConfig) -> list[str]:
    args = []
    for k in ("data", "out_dir", "preset", "seq_len", "batch_size", "max_steps", "lr", "min_lr", "warmup_steps",
              "eval_every", "save_every", "log_every", "progress", "sample_tokens", "seed", "distributed",
              "threads"):
        args += [f"--{k}", str(getattr(c, k))]
    for k, v in c.model.items():
        args += [f"--model.{k}", json.dumps(v)]
    return args


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_torchrun_matches_one_process(corpus_data, tmp_path, strategy):
    """2 processes x batch 2 reproduce 1 process x batch 4, step by step (1e-5), and the 2-process
    checkpoint loads in one process with the same logits as the 1-process one (1e-5)."""
    one = train(_cfg(corpus_data, tmp_path / "one", max_steps=5, threads=1))
    two_cfg = _cfg(corpus_data, tmp_path / "two", max_steps=5, batch_size=2, distributed=strategy, threads=1)
    _torchrun(_cli_args(two_cfg), tmp_path)
    l1 = [r["loss"] for r in _metrics(tmp_path / "one")]
    l2 = [r["loss"] for r in _metrics(tmp_path / "two")]
    assert len(l1) == len(l2) == 5
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    state = json.loads((tmp_path / "two" / "step-000005" / "train_state" / "state.json").read_text())
    assert state["world_size"] == 2
    m1, m2 = ouvert.load_model(one), ouvert.load_model(tmp_path / "two" / "step-000005")
    x = torch.randint(0, 512, (1, 24))
    with torch.no_grad():
        assert (m1(x) - m2(x)).abs().max() < 1e-5


def test_fsdp_checkpoint_resumes_in_one_process_and_back(corpus_data, tmp_path):
    """Saved by 2 FSDP ranks at step 3, resumed by 1 process to step 5, then by 2 ranks to step 7:
    the same losses as one process all the way (1e-5)."""
    ref = train(_cfg(corpus_data, tmp_path / "ref", max_steps=7, threads=1))
    assert ref.name == "step-000007"
    run = tmp_path / "mixed"
    _torchrun(_cli_args(_cfg(corpus_data, run, max_steps=7, batch_size=2, distributed="fsdp", threads=1))
              + ["--stop_at", "3"], tmp_path)
    train(_cfg(corpus_data, run, max_steps=7, stop_at=5, threads=1), resume=True)
    _torchrun(_cli_args(_cfg(corpus_data, run, max_steps=7, batch_size=2, distributed="fsdp", threads=1))
              + ["--resume"], tmp_path)
    lr = [r["loss"] for r in _metrics(tmp_path / "ref")]
    lm = [r["loss"] for r in _metrics(run)]
    assert len(lm) == 7
    assert max(abs(a - b) for a, b in zip(lr, lm)) < 1e-5, (lr, lm)


DEEPSEEK = {"hidden_size": 64, "num_hidden_layers": 3, "max_position_embeddings": 256}


def test_router_bias_balances_a_skewed_router(corpus_data, tmp_path):
    from ouvert.model import MoE

    c = _cfg(corpus_data, tmp_path / "ds", preset="tiny-deepseek", model=dict(DEEPSEEK), max_steps=80, batch_size=16,
             router_bias_rate=0.005, lr=1e-3, save_every=0)
    from ouvert.train import loop

    real_build = loop.build_model

    def skewed(*a, **k):
        model = real_build(*a, **k)
        for m in model.modules():
            if isinstance(m, MoE):
                with torch.no_grad():
                    m.gate.e_score_correction_bias[:2] = 0.2  # experts 0 and 1 win nearly every token
        return model

    loop.build_model = skewed
    try:
        final = train(c)
    finally:
        loop.build_model = real_build
    ratios = [r["expert_load_max_over_mean"] for r in _metrics(tmp_path / "ds")]
    assert ratios[0] > 3.0, ratios[:3]
    assert sum(ratios[-5:]) / 5 < ratios[0] / 2, ratios
    bias = load_file(final / "model.safetensors")["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias[:2].mean() < 0.15 and bias[2:].mean() > 0  # the favoured experts were pushed down, others up


def test_mtp_loss_trains_the_mtp_module(corpus_data, tmp_path):
    c = _cfg(corpus_data, tmp_path / "mtp", preset="tiny-deepseek", model=dict(DEEPSEEK), max_steps=30,
             mtp_weight=0.3, seq_balance_alpha=1e-3, lr=3e-3, save_every=0)
    final = train(c)
    m = _metrics(tmp_path / "mtp")
    assert m[-1]["mtp_loss"] < m[0]["mtp_loss"] - 0.5
    assert all("balance_loss" in r for r in m)
    # the MTP module's weights moved from their init: they received gradients
    from ouvert.train.loop import build_model

    init = build_model(c, 512, None, [0])
    trained = ouvert.load_model(final)
    assert not torch.equal(init.mtp[0].eh_proj.weight, trained.mtp[0].eh_proj.weight)
    attn0, attn1 = init.mtp[0].block.self_attn, trained.mtp[0].block.self_attn
    assert not torch.equal(attn0.kv_b_proj.weight, attn1.kv_b_proj.weight)


class _RunsCode:
    """Unpickling this runs a shell command: what a crafted optimizer.pt would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_crafted_optimizer_state(corpus_data, tmp_path):
    """A train_state file that would run code on loading is refused without running it, even when
    ouvert.json was rewritten to match it; a changed file is refused by its hash first."""
    from ouvert.checkpoint import manifest
    from ouvert.checkpoint.base import CheckpointError

    out = tmp_path / "run"
    train(_cfg(corpus_data, out, max_steps=4, save_every=2, stop_at=2))
    ckpt = out / "step-000002"
    marker = tmp_path / "pwned"
    opt = ckpt / "train_state" / "optimizer.pt"
    torch.save({"state": _RunsCode(marker)}, opt)
    with pytest.raises(CheckpointError, match=f"{opt}: sha256 .* does not match"):
        train(_cfg(corpus_data, out, max_steps=4, save_every=2), resume=True)
    assert not marker.exists()

    record = json.loads((ckpt / "ouvert.json").read_text())  # the attacker fixes the hash too
    record["train_state"]["train_state/optimizer.pt"] = manifest.sha256_file(opt)
    (ckpt / "ouvert.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"{opt}: not plain tensor data, refused"):
        train(_cfg(corpus_data, out, max_steps=4, save_every=2), resume=True)
    assert not marker.exists()


def test_failed_checkpoint_write_keeps_the_previous_one(corpus_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(_cfg(corpus_data, out, max_steps=4, save_every=2, stop_at=2))
    before = {p.name: p.read_bytes() for p in (out / "step-000002").rglob("*") if p.is_file()}

    from ouvert.train import loop

    real = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise OSError(28, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(loop.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        train(_cfg(corpus_data, out, max_steps=4, save_every=2), resume=True)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step", ".step"))) == ["step-000002"]
    assert {p.name: p.read_bytes() for p in (out / "step-000002").rglob("*") if p.is_file()} == before


def test_model_overrides_derive_the_head_width_again(tmp_path):
    """[model] overrides of the width or head count give head_dim = hidden_size / heads, not the
    preset's head_dim (the demo once trained with attention half as wide as its hidden size)."""
    from ouvert.train.loop import build_model

    c = _cfg(tmp_path, tmp_path / "run", model={"hidden_size": 256, "num_attention_heads": 8,
                                                "num_key_value_heads": 4, "num_hidden_layers": 1})
    m = build_model(c, 512, None, [0])
    assert m.config.head_dim == 32
    assert m.layers[0].self_attn.q_proj.weight.shape == (256, 256)
