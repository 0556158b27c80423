"""Weight-only int8 / int4: the kernels against dequantize-then-matmul, the integer math, the
checkpoint round trip (library and CLI), top-1 agreement with the float model on a model trained
here, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import ouvert
from ouvert import quantize
from ouvert.cli import main
from ouvert.data import TokenLoader
from ouvert.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizeError,
    linear_names,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_state_dict,
    swap_linears,
    unpack_int4,
)
from ouvert.train import TrainConfig, train

# A tiny Llama: in_features 64 and 128, so int4's default group size is 32 (128 does not divide 64).
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": False}


def _quantized_linear(lin: nn.Linear, scheme: str, group_size: int | None) -> nn.Module:
    holder = nn.Sequential(lin)
    state = {"0.weight": lin.weight.detach(), "0.bias": lin.bias.detach()}
    q = quantize_state_dict(state, ["0"], scheme, group_size)
    swap_linears(holder, ["0"], scheme, group_size)
    holder.load_state_dict(q, assign=True)
    if scheme == "int4":
        holder[0].pack()
    return holder[0]


def _ops(fn) -> set[str]:
    """The aten ops that fn() runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# Relative output error against the float layer (nn.Linear's uniform init, 256 inputs), as measured
# in float32 and bfloat16 alike: int8 0.4-0.6%, int4 groups of 32: 6.0%, of 128: 6.6%. Bounds: about twice.
FLOAT_BOUND = {("int8", None): 0.012, ("int4", 32): 0.12, ("int4", 128): 0.13}


@pytest.mark.parametrize("scheme,group_size", list(FLOAT_BOUND))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantized_matmul(scheme, group_size, dtype, monkeypatch):
    monkeypatch.setitem(quantize.KERNEL_MAX_ROWS, dtype, 10)  # the kernels on all 10 rows, whatever pays best
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    q = _quantized_linear(lin, scheme, group_size).to(dtype)
    x = torch.randn(2, 5, 256).to(dtype)
    kernel = "aten::_weight_int8pack_mm" if scheme == "int8" else "aten::_weight_int4pack_mm_for_cpu"
    with torch.no_grad():
        assert kernel in _ops(lambda: q(x))  # the fast path is the one taken
        fast = q(x)
        q.use_kernel = False
        assert kernel not in _ops(lambda: q(x))
        slow = q(x)
        ref = lin.to(dtype)(x)
    assert fast.dtype == dtype and fast.shape == (2, 5, 96)
    # float32: the same sums in another order; bfloat16: the kernels round the products differently
    assert _rel(fast, slow) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert _rel(fast, ref) < FLOAT_BOUND[scheme, group_size]


@pytest.mark.parametrize("scheme,group_size", [("int8", None), ("int4", 32)])
def test_kernel_dispatch(scheme, group_size):
    """The kernels run where they pay (decode: a few rows, bfloat16; one row in float32), else
    dequantize-then-matmul, which must also give the same answer."""
    q = _quantized_linear(nn.Linear(256, 96), scheme, group_size)
    kernel = "aten::_weight_int8pack_mm" if scheme == "int8" else "aten::_weight_int4pack_mm_for_cpu"
    for dtype, rows, used in [(torch.float32, 1, True), (torch.float32, 2, False), (torch.bfloat16, 32, True),
                              (torch.bfloat16, 33, False)]:
        q = q.to(dtype)
        x = torch.randn(1, rows, 256).to(dtype)
        with torch.no_grad():
            assert (kernel in _ops(lambda q=q, x=x: q(x))) == used, (dtype, rows)
            y = q(x)
        assert _rel(y, F.linear(x, q.dequantize(dtype), q.bias.to(dtype))) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_integer_math():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,) and q.abs().max() == 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()  # round to nearest

    ints = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    assert pack_int4(ints).shape == (4, 32) and torch.equal(unpack_int4(pack_int4(ints)), ints)
    assert pack_int4(torch.tensor([[1, 2]])).item() == 0x21  # column 2j in the low nibble

    packed, scale, zero = quantize_int4(w, 32)
    assert packed.shape == (32, 64) and scale.shape == zero.shape == (32, 4)
    dq = ((unpack_int4(packed).float() - 8) * scale.repeat_interleave(32, 1) + zero.repeat_interleave(32, 1))
    assert ((dq - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-5).all()
    g = w.view(32, 4, 32)  # each group's min and max are representable
    assert torch.allclose(dq.view(32, 4, 32).amin(-1), g.amin(-1), atol=1e-5)
    assert torch.allclose(dq.view(32, 4, 32).amax(-1), g.amax(-1), atol=1e-5)


# ---- on a trained model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(corpus_data, tmp_path_factory) -> Path:
    """A tiny Llama trained for 200 steps on four plays: top-1 agreement means something only for a
    model whose logits are not flat, as a random one's are."""
    out = tmp_path_factory.mktemp("quant-train") / "run"
    c = TrainConfig(data=str(corpus_data), out_dir=str(out), preset="tiny-llama", model=dict(TINY), seq_len=64,
                    batch_size=8, max_steps=200, lr=3e-3, min_lr=3e-4, warmup_steps=20, eval_every=0,
                    save_every=0, log_every=50, progress=False, sample_tokens=4, seed=0)
    return train(c)


@pytest.fixture(scope="module")
def val_tokens(corpus_data) -> torch.Tensor:
    x, _ = TokenLoader(corpus_data, "val", seq_len=64, batch_size=8, shuffle=False).next()
    return x  # (8, 64): 512 positions


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_save_load_round_trip(trained, val_tokens, tmp_path, scheme):
    model = quantize_model(ouvert.load_model(trained), scheme)
    expect = _logits(model, val_tokens)
    ouvert.save_model(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    group_size = 32 if scheme == "int4" else None
    assert cfg["quantization_config"] == {"quant_method": "ouvert", "scheme": scheme, "group_size": group_size}
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        prefix = "model.layers.1.mlp.down_proj."
        dtypes = {k.removeprefix(prefix): f.get_slice(k).get_dtype() for k in f.keys() if k.startswith(prefix)}
        assert f.get_slice("lm_head.weight").get_dtype() == "F32"  # kept in float
    want = {"weight": "I8", "weight_scale": "F32"} if scheme == "int8" else {
        "weight_packed": "U8", "weight_scale": "F32", "weight_zero": "F32"}
    assert dtypes == want

    loaded = ouvert.load_model(tmp_path / "q")
    kind = Int8Linear if scheme == "int8" else Int4Linear
    assert sorted(n for n, m in loaded.named_modules() if isinstance(m, kind)) == sorted(linear_names(
        ouvert.load_model(trained)))
    assert torch.equal(_logits(loaded, val_tokens), expect)
    # and in bfloat16: scales cast, the kernels run in bfloat16
    bf16 = ouvert.load_model(tmp_path / "q", dtype=torch.bfloat16)
    assert bf16.layers[0].mlp.up_proj.weight_scale.dtype == torch.bfloat16
    assert (_logits(bf16, val_tokens).argmax(-1) == expect.argmax(-1)).float().mean() > 0.9


def test_cli_quantize(trained, val_tokens, tmp_path, capsys):
    assert main(["quantize", "--model", str(trained), "--scheme", "int4", "--group-size", "64",
                 "--out", str(tmp_path / "q4")]) == 0
    assert "int4, group size 64" in capsys.readouterr().out
    assert (tmp_path / "q4" / "tokenizer.json").is_file()
    expect = _logits(quantize_model(ouvert.load_model(trained), "int4", 64), val_tokens)
    assert torch.equal(_logits(ouvert.load_model(tmp_path / "q4"), val_tokens), expect)
    from ouvert.checkpoint import manifest  # lineage: the quantized checkpoint names its float parent

    rec = manifest.read(tmp_path / "q4")
    assert rec["parent"]["checkpoint_sha256"] == manifest.checkpoint_hash(trained)
    assert rec["derived_by"] == "ouvert quantize --scheme int4" and manifest.verify(tmp_path / "q4") == []


# Measured on this model and these 512 positions: int8 agrees with float on 99.8% of the top-1
# tokens, int4 (groups of 32) on 97.5%. int8's bound is the goal; int4's leaves 4.5 points of margin.
TOP1_BOUND = {"int8": 0.98, "int4": 0.93}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_top1_agrees_with_float(trained, val_tokens, scheme):
    model = ouvert.load_model(trained)
    ref = _logits(model, val_tokens)
    q = _logits(quantize_model(model, scheme), val_tokens)
    agree = (q.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{scheme}: top-1 agreement {agree:.4f}")
    assert agree >= TOP1_BOUND[scheme]
    assert not torch.equal(q, ref)  # it did quantize


def test_deepseek_round_trip(tmp_path):
    """MLA, MoE and MTP: projections and shared experts quantized; routed experts, routers and
    kv_b_proj (read directly by absorbed decoding) stay float; kv_a_proj_with_mqa (40 outputs, not a
    multiple of 16) takes the dequantize path."""
    model = ouvert.Transformer(ouvert.preset("tiny-deepseek"))
    model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(model.eval(), tokens)
    quantize_model(model, "int4")
    attn, moe = model.layers[1].self_attn, model.layers[1].mlp
    assert isinstance(attn.q_b_proj, Int4Linear) and isinstance(moe.shared_experts.down_proj, Int4Linear)
    assert isinstance(model.mtp[0].block.self_attn.o_proj, Int4Linear)
    assert type(attn.kv_b_proj) is nn.Linear and moe.experts.gate_proj.dtype == torch.float32
    assert attn.kv_a_proj_with_mqa.kernel_weight is None and attn.o_proj.kernel_weight is not None
    expect = _logits(model, tokens)
    assert 0 < _rel(expect, ref) < 0.4  # random weights: int4 error only, no meaning in top-1
    loaded = ouvert.load_model(ouvert.save_model(model, tmp_path / "q"))
    assert torch.equal(_logits(loaded, tokens), expect)
    assert len(ouvert.generate(loaded, [1, 2, 3], 4, stop_token_ids=[])[0]) == 4  # absorbed MLA decode runs


# ---- errors -------------------------------------------------------------------------------------


def test_bad_scheme_and_group_size(trained, tmp_path, capsys):
    model = ouvert.load_model(trained)
    with pytest.raises(QuantizeError, match="unknown quantization scheme 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(QuantizeError, match=r"group size 128 does not divide in_features 64 of layer "
                                            r"'layers.0.self_attn.q_proj'"):
        quantize_model(model, "int4", 128)
    with pytest.raises(QuantizeError, match="group size 48 is not one of 32, 64, 128, 256"):
        quantize_model(model, "int4", 48)
    with pytest.raises(QuantizeError, match="int8 is per output channel"):
        quantize_model(model, "int8", 32)
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear  # a refused request changes nothing
    with pytest.raises(QuantizeError, match="quantized already"):
        quantize_model(quantize_model(model, "int8"), "int4")

    assert main(["quantize", "--model", str(trained), "--scheme", "int3", "--out", str(tmp_path / "x")]) == 2
    assert "ouvert quantize: error: unknown quantization scheme 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("qc,message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not one ouvert reads"),
    ({"quant_method": "ouvert", "scheme": "int3"}, "unknown quantization scheme 'int3'"),
    ({"quant_method": "ouvert", "scheme": "int4"}, "int4 needs a group_size"),
])
def test_load_refuses_unknown_quantization(trained, tmp_path, qc, message):
    d = ouvert.save_model(quantize_model(ouvert.load_model(trained), "int8"), tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ouvert.CheckpointError, match=message) as e:
        ouvert.load_model(d)
    assert str(d / "config.json") in str(e.value)
