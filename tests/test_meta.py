"""Meta's original Llama layout (params.json + consolidated.NN.pth), read by load_model and turned into
a HF directory by `ouvert export hf`.

The Meta checkpoints are made here from random transformers models by this file's own converter
(HF -> Meta: the names, the rotary permutation of q and k undone, model-parallel shards split as
Meta's ColumnParallel / RowParallel layers split them), so ouvert's reader is checked against an
independent writer and, through it, against transformers' logits (float32, 1e-5).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import make_hf_model

import ouvert
from ouvert import CheckpointError
from ouvert.cli import main as cli_main

LLAMA31 = dict(  # Llama 3.1's rope scaling, GQA
    vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, initializer_range=0.2,
)
LLAMA2 = dict(  # Llama 2: no GQA, rope theta 10000, no scaling
    vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
    rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2,
)
# Meta's layers: ColumnParallel split the output rows, RowParallel the input columns.
SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}


def _halves_to_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo convert_llama_weights_to_hf.py's permute(w) = w.view(n, d/2, 2, in).transpose(1, 2)."""
    d1, d2 = w.shape
    return w.view(n_heads, 2, d1 // n_heads // 2, d2).transpose(1, 2).reshape(d1, d2)


def write_meta(hf, out, shards: int = 1, params_extra: dict | None = None, embed_dim: int = 0) -> None:
    """A transformers Llama as Meta's consolidated.NN.pth + params.json; embed_dim is the axis the
    embedding is split on (Llama 3's VocabParallelEmbedding: 0; Llama 2's ParallelEmbedding: 1)."""
    c = hf.config
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    meta = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not c.tie_word_embeddings:
        meta["output.weight"] = sd["lm_head.weight"]
    for i in range(c.num_hidden_layers):
        p, h, hkv = f"model.layers.{i}.", c.num_attention_heads, c.num_key_value_heads
        meta.update({
            f"layers.{i}.attention.wq.weight": _halves_to_pairs(sd[p + "self_attn.q_proj.weight"], h),
            f"layers.{i}.attention.wk.weight": _halves_to_pairs(sd[p + "self_attn.k_proj.weight"], hkv),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    out.mkdir(parents=True, exist_ok=True)
    for r in range(shards):
        part = {}
        for k, t in meta.items():
            kind = k.split(".")[-2]
            axis = embed_dim if kind == "tok_embeddings" else SPLIT.get(kind)
            part[k] = t if axis is None else t.chunk(shards, dim=axis)[r].clone()
        torch.save(part, out / f"consolidated.{r:02d}.pth")
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size, "multiple_of": 32,
              "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_parameters["rope_theta"]}
    (out / "params.json").write_text(json.dumps({**params, **(params_extra or {})}))


def _logits(model, hf, n=60):
    x = torch.randint(0, hf.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x), hf(x).logits


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    hf = make_hf_model("llama", seed=3, **copy.deepcopy(LLAMA31))
    d = tmp_path_factory.mktemp("meta31")
    write_meta(hf, d, params_extra={"use_scaled_rope": True, "rope_scaling_factor": 8})
    return d, hf


def test_single_file_matches_transformers(llama31):
    d, hf = llama31
    model = ouvert.load_model(d)
    cfg = model.config
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.num_key_value_heads) == (256, 192, 2)
    assert cfg.rope_scaling == LLAMA31["rope_scaling"] and cfg.max_position_embeddings == 131072
    ours, ref = _logits(model, hf)
    assert ref.std() > 1.0 and (ours - ref).abs().max() < 1e-5


@pytest.mark.parametrize("embed_dim", [0, 1], ids=["vocab-split", "width-split"])
def test_model_parallel_shards_put_back_together(tmp_path, embed_dim):
    """Llama 2 style: two ranks, vocab_size -1 in params.json, the precomputed rope.freqs table."""
    hf = make_hf_model("llama", seed=4, **LLAMA2)
    write_meta(hf, tmp_path, shards=2, params_extra={"vocab_size": -1}, embed_dim=embed_dim)
    first = torch.load(tmp_path / "consolidated.00.pth")
    first["rope.freqs"] = torch.zeros(8)
    torch.save(first, tmp_path / "consolidated.00.pth")
    assert first["layers.0.attention.wo.weight"].shape == (64, 32)  # really split
    model = ouvert.load_model(tmp_path)
    assert model.config.max_position_embeddings == 4096 and model.config.rope_scaling is None
    ours, ref = _logits(model, hf)
    assert (ours - ref).abs().max() < 1e-5


def test_tied_embeddings_and_stored_dtype(tmp_path):
    hf = make_hf_model("llama", seed=5, **{**copy.deepcopy(LLAMA31), "tie_word_embeddings": True}).to(torch.bfloat16)
    write_meta(hf, tmp_path, params_extra={"use_scaled_rope": True, "rope_scaling_factor": 8})
    model = ouvert.load_model(tmp_path)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
    assert model.embed_tokens.weight.dtype == torch.bfloat16  # Meta ships bf16: kept unless asked
    assert ouvert.load_model(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def test_export_hf_then_transformers_loads(llama31, tmp_path, llama3_tokenizer_dir):
    from transformers import AutoModelForCausalLM

    d, hf = llama31
    out = tmp_path / "hf"
    args = ["export", "hf", "--model", str(d), "--out", str(out), "--tokenizer", str(llama3_tokenizer_dir)]
    assert cli_main(args) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["rope_scaling"]["rope_type"] == "llama3"
    assert (out / "tokenizer.json").is_file() and cfg["bos_token_id"] == 128000
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, ref = _logits(theirs, hf)
    assert (ours.logits - ref).abs().max() < 1e-5


def test_missing_factor_warns(tmp_path):
    hf = make_hf_model("llama", seed=3, **copy.deepcopy(LLAMA31))
    write_meta(hf, tmp_path, params_extra={"use_scaled_rope": True})
    with pytest.warns(UserWarning, match=r"params\.json: use_scaled_rope without rope_scaling_factor"):
        model = ouvert.load_model(tmp_path)
    assert model.config.rope_scaling["factor"] == 8.0


def test_errors_name_file_and_key(llama31, tmp_path):
    d, hf = llama31
    sd = torch.load(d / "consolidated.00.pth")
    params = (d / "params.json").read_text()

    del sd["layers.1.feed_forward.w3.weight"]
    (tmp_path / "a").mkdir()
    torch.save(sd, tmp_path / "a" / "consolidated.00.pth")
    (tmp_path / "a" / "params.json").write_text(params)
    with pytest.raises(CheckpointError, match=r"a/consolidated\.00\.pth: missing weight "
                                              r"'layers\.1\.feed_forward\.w3\.weight'"):
        ouvert.load_model(tmp_path / "a")

    sd = torch.load(d / "consolidated.00.pth")
    sd["layers.0.attention.wv.weight"] = torch.zeros(20, 64)
    (tmp_path / "b").mkdir()
    torch.save(sd, tmp_path / "b" / "consolidated.00.pth")
    (tmp_path / "b" / "params.json").write_text(params)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: weight 'layers\.0\.attention\.wv\.weight' "
                                              r"has shape \(20, 64\), expected \(32, 64\)"):
        ouvert.load_model(tmp_path / "b")

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "consolidated.00.pth").write_bytes((d / "consolidated.00.pth").read_bytes()[:5000])
    (tmp_path / "c" / "params.json").write_text(params)
    with pytest.raises(CheckpointError, match=r"c/consolidated\.00\.pth: cannot read"):
        ouvert.load_model(tmp_path / "c")

    (tmp_path / "c" / "consolidated.00.pth").write_bytes((d / "consolidated.00.pth").read_bytes())
    (tmp_path / "c" / "params.json").write_text(json.dumps({"dim": 64}))
    with pytest.raises(CheckpointError, match=r"params\.json: key 'n_layers' is missing"):
        ouvert.load_model(tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a HF directory beside params.json stays a HF directory
        (tmp_path / "c" / "config.json").write_text("{}")
        with pytest.raises(CheckpointError, match=r"config\.json: key 'model_type' is missing"):
            ouvert.load_model(tmp_path / "c")
