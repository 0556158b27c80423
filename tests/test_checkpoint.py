"""Checkpoint directories: both ways with transformers, sharding, atomic saves, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import ouvert
from ouvert import CheckpointError
from ouvert.checkpoint import hf as hfmod
from ouvert.checkpoint.base import hf_names, our_name


def _logits(model, n=50, seed=0):
    x = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = model(x)
    return x, out


def test_save_then_transformers_loads(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    out = ouvert.save_model(model, tmp_path / "ours")
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    x, ref = _logits(model)
    with torch.no_grad():
        assert (theirs(x).logits - ref).abs().max() < 1e-5
    assert not list(tmp_path.glob(".ours.*")), "no temporary directory left behind"


def test_transformers_shards_then_we_load(smollm2_ckpt, tmp_path):
    d, hf = smollm2_ckpt
    hf.save_pretrained(tmp_path, max_shard_size="20MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = ouvert.load_model(tmp_path)
    x, out = _logits(model)
    with torch.no_grad():
        assert (hf(x).logits - out).abs().max() < 1e-4


def test_we_shard_and_both_load(tiny_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    d, hf = tiny_ckpt
    model = ouvert.load_model(d)
    out = ouvert.save_model(model, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    x, ref = _logits(model)
    with torch.no_grad():
        assert (ouvert.load_model(out)(x) - ref).abs().max() == 0
        assert (AutoModelForCausalLM.from_pretrained(out)(x).logits - ref).abs().max() < 1e-5


def test_stored_dtype_kept_unless_asked(tiny_ckpt, tmp_path):
    d, _ = tiny_ckpt
    bf = ouvert.load_model(d, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    ouvert.save_model(bf, tmp_path / "bf16")
    again = ouvert.load_model(tmp_path / "bf16")
    assert again.lm_head.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_failed_save_leaves_previous_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    """A disk that fills up mid-save: the old checkpoint stays whole, no temp dir is left."""
    d, _ = tiny_ckpt
    model = ouvert.load_model(d)
    target = ouvert.save_model(model, tmp_path / "ckpt", max_shard_bytes=40_000)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    calls = {"n": 0}
    real = hfmod.save_file

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(hfmod, "save_file", flaky)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        ouvert.save_model(model, target, max_shard_bytes=40_000)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


# ---- errors: one clear message naming the file and the key ----------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_error_no_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        ouvert.load_model(tmp_path / "nope")


def test_error_no_config(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt[0], tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        ouvert.load_model(d)


def test_error_unknown_model_type(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt[0], tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'gpt_neox' \(key 'model_type'\)"):
        ouvert.load_model(d)


def test_error_wrong_shape(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt[0], tmp_path / "c")
    w = load_file(d / "model.safetensors")
    w["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight 'model\.layers\.1\.mlp\.up_proj\.weight' "
                                              r"has shape \(100, 64\), expected \(160, 64\)"):
        ouvert.load_model(d)


def test_error_missing_weight(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt[0], tmp_path / "c")
    w = load_file(d / "model.safetensors")
    del w["model.layers.0.self_attn.k_proj.weight"]
    save_file(w, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing weight 'model\.layers\.0\.self_attn\.k_proj\.weight'"):
        ouvert.load_model(d)


def test_error_truncated_file(tiny_ckpt, tmp_path):
    d = _copy(tiny_ckpt[0], tmp_path / "c")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*truncated"):
        ouvert.load_model(d)


def test_error_missing_shard(tiny_ckpt, tmp_path):
    out = ouvert.save_model(ouvert.load_model(tiny_ckpt[0]), tmp_path / "s", max_shard_bytes=40_000)
    (out / "model-00002-of-{:05d}.safetensors".format(len(list(out.glob("model-*"))))).unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: missing"):
        ouvert.load_model(out)


def test_name_table_round_trip():
    """Every parameter maps to HF names and back (Llama and a DeepSeek-V3 with experts and MTP)."""
    from ouvert import ModelConfig, Transformer

    llama = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4)
    ds = ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=8,
                     qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                     num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1,
                     topk_method="noaux_tc", scoring_func="sigmoid", num_nextn_predict_layers=1)
    for cfg in (llama, ds):
        with torch.device("meta"):
            m = Transformer(cfg)
        for name in m.state_dict():
            keys = hf_names(name, cfg)
            for e, k in enumerate(keys):
                assert our_name(k, cfg) == (name, e if len(keys) > 1 else None), k
    assert hf_names("mtp.0.block.mlp.experts.up_proj", ds)[3] == "model.layers.2.mlp.experts.3.up_proj.weight"
    assert hf_names("mtp.0.norm.weight", ds) == ["model.layers.2.shared_head.norm.weight"]


def test_deepseek_built_here_runs_in_transformers(tmp_path):
    """A V3 config made by ouvert (hidden / heads != qk_rope_head_dim) saves a config.json that
    transformers runs: it reads head_dim as the rotary width."""
    from transformers import AutoModelForCausalLM

    from ouvert import ModelConfig, Transformer

    cfg = ModelConfig(model_type="deepseek_v3", vocab_size=64, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
                      qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                      topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, max_position_embeddings=64)
    model = Transformer(cfg)
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    ouvert.save_model(model, tmp_path / "v3")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "v3").eval()
    x = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        assert (theirs(x).logits - model(x)).abs().max() < 1e-4
