"""ModelConfig from both spellings of config.json, and back."""

from __future__ import annotations

import pytest

from ouvert import ConfigError, ModelConfig, preset

HUB_LLAMA32 = {  # as published on the hub for Llama-3.2-1B
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    "eos_token_id": 128001, "hidden_act": "silu",
}
TRANSFORMERS5_LLAMA32 = {  # as transformers 5 writes it
    **{k: v for k, v in HUB_LLAMA32.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
    "dtype": "bfloat16",
    "rope_parameters": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
}
HUB_DEEPSEEK_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}


def test_both_spellings_agree():
    a, b = ModelConfig.from_hf(HUB_LLAMA32), ModelConfig.from_hf(TRANSFORMERS5_LLAMA32)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling == b.rope_scaling and a.rope_scaling["rope_type"] == "llama3"
    assert (a.num_key_value_heads, a.head_dim, a.tie_word_embeddings) == (8, 64, True)
    assert a.torch_dtype == b.torch_dtype == "bfloat16"
    assert a.rope_scaling == preset("llama-3.2-1b").rope_scaling


def test_legacy_type_key():
    cfg = ModelConfig.from_hf({**HUB_LLAMA32, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ds = ModelConfig.from_hf({**HUB_LLAMA32, "rope_scaling": HUB_DEEPSEEK_YARN})
    assert ds.rope_scaling["rope_type"] == "yarn" and "type" not in ds.rope_scaling


def test_round_trip_keeps_unknown_keys():
    cfg = ModelConfig.from_hf({**HUB_LLAMA32, "some_future_key": 7})
    hf = cfg.to_hf()
    assert hf["some_future_key"] == 7 and hf["rope_theta"] == 500000.0
    assert ModelConfig.from_hf(hf) == cfg


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"model_type": "gpt2"}, "unknown model_type 'gpt2'"),
        ({"model_type": None}, "'model_type' is missing"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "unsupported rope type 'longrope'"),
        ({"rope_scaling": {"rope_type": "linear"}}, "needs key 'factor'"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
    ],
)
def test_config_errors(patch, match):
    hf = {**HUB_LLAMA32, **patch}
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(hf, source="x/config.json")


def test_family_defaults():
    base = {k: HUB_LLAMA32[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")}
    q2 = ModelConfig.from_hf({**base, "model_type": "qwen2"})
    assert q2.attention_bias and not q2.o_proj_bias
    assert ModelConfig.from_hf({**base, "model_type": "qwen3"}).qk_norm
    v3 = ModelConfig.from_hf({**base, "model_type": "deepseek_v3", "kv_lora_rank": 512, "n_routed_experts": 8})
    assert v3.scoring_func == "sigmoid" and v3.topk_method == "noaux_tc"
    v2 = ModelConfig.from_hf({**base, "model_type": "deepseek_v2", "kv_lora_rank": 512, "n_routed_experts": 8})
    assert v2.scoring_func == "softmax"
