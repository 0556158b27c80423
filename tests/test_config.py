"""ModelConfig from both spellings of config.json, and back."""

from __future__ import annotations

import json

import pytest

from ouvert import CheckpointError, ConfigError, ModelConfig, preset
from ouvert.checkpoint.hf import read_config

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
    # 16 experts: V3's default n_group 8 needs at least two per group (groups rank by their best two)
    v3 = ModelConfig.from_hf({**base, "model_type": "deepseek_v3", "kv_lora_rank": 512, "n_routed_experts": 16})
    assert v3.scoring_func == "sigmoid" and v3.topk_method == "noaux_tc"
    v2 = ModelConfig.from_hf({**base, "model_type": "deepseek_v2", "kv_lora_rank": 512, "n_routed_experts": 8})
    assert v2.scoring_func == "softmax"


TINY = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 160,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
TINY_MOE = {**TINY, "model_type": "deepseek_v3", "kv_lora_rank": 16, "qk_rope_head_dim": 8, "n_routed_experts": 8,
            "n_group": 2, "topk_group": 1}


@pytest.mark.parametrize(
    "config,message",
    [
        ({**TINY, "hidden_size": "576"}, """key 'hidden_size' must be an integer, not "576\""""),
        ({**TINY, "hidden_size": True}, "key 'hidden_size' must be an integer, not true"),
        ({**TINY, "hidden_size": None}, "key 'hidden_size' must be an integer, not null"),
        ({**TINY, "intermediate_size": 1.5}, "key 'intermediate_size' must be an integer, not 1.5"),
        ([TINY], "expected a JSON object of config keys, not a list"),
        ({**TINY, "num_key_value_heads": 0}, "key 'num_key_value_heads' must be a positive integer, not 0"),
        ({**TINY, "num_hidden_layers": -1}, "key 'num_hidden_layers' must be an integer >= 0, not -1"),
        ({**TINY, "vocab_size": 0}, "key 'vocab_size' must be a positive integer, not 0"),
        ({**TINY, "tie_word_embeddings": "no"}, """key 'tie_word_embeddings' must be true or false, not "no\""""),
        ({**TINY, "max_position_embeddings": 1e30}, "key 'max_position_embeddings' must be an integer, not 1e+30"),
        ({**TINY, "max_position_embeddings": 2**40},
         "key 'max_position_embeddings' must be between 1 and 16777216 (2**24), not 1099511627776"),
        ({**TINY, "rope_theta": "abc"}, """key 'rope_theta' must be a finite number, not "abc\""""),
        ({**TINY, "rope_theta": 0}, "key 'rope_theta' must be a number above 1, not 0"),
        ({**TINY, "rms_norm_eps": float("nan")}, "key 'rms_norm_eps' must be a finite number, not NaN"),
        ({**TINY, "eos_token_id": [2, "3"]},
         """key 'eos_token_id' must be an integer, a list of integers or null, not [2, "3"]"""),
        ({**TINY, "head_dim": 15}, "key 'head_dim' must be even (rotary embeddings pair its channels), not 15"),
        ({**TINY, "rope_scaling": {"rope_type": "linear", "factor": "2"}},
         """key 'rope_scaling.factor' must be a number, not "2\""""),
        ({**TINY, "rope_scaling": {"rope_type": "linear", "factor": -2.0}},
         "key 'rope_scaling.factor' must be a positive number, not -2.0"),
        ({**TINY_MOE, "num_experts_per_tok": 9},
         "key 'num_experts_per_tok' must be between 1 and n_routed_experts (8), not 9"),
        ({**TINY_MOE, "scoring_func": "relu"}, """key 'scoring_func' must be one of softmax, sigmoid, not "relu\""""),
        ({**TINY_MOE, "n_group": 3}, "n_routed_experts (8) must be a multiple of n_group (3)"),
    ],
)
def test_bad_config_json_is_one_line_naming_file_key_and_value(tmp_path, config, message):
    """Each bad value is caught once, in ModelConfig, and the error names config.json, the key and
    the value as the file spells it; read_config (load_model, ouvert info) passes it on unchanged."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"
    with pytest.raises(ConfigError, match="^x/config.json: "):
        ModelConfig.from_hf(config, source="x/config.json")


def test_bad_preset_toml_names_the_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[model]\nvocab_size = 300\nhidden_size = "64"\nnum_hidden_layers = 2\nnum_attention_heads = 4\n')
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(path)
    assert str(e.value) == f"""{path}: key 'hidden_size' must be an integer, not "64\""""


def test_float_fields_take_json_integers_as_floats():
    cfg = ModelConfig.from_hf({**TINY, "rope_theta": 10000, "rms_norm_eps": 0})
    assert type(cfg.rope_theta) is float and type(cfg.rms_norm_eps) is float
    with pytest.raises(ConfigError, match="key 'rms_norm_eps' must be a finite number, not false"):
        ModelConfig.from_hf({**TINY, "rms_norm_eps": False})


def test_replace_derives_head_dim_again():
    """A preset changed in width or head count gets the head_dim of its new shape (train's [model]
    overrides); dataclasses.replace kept the preset's 64 / 4 = 16 beside hidden_size 256."""
    cfg = preset("tiny-llama").replace(hidden_size=256, num_attention_heads=8, num_key_value_heads=4)
    assert cfg.head_dim == 32
    assert preset("tiny-llama").replace(hidden_size=256, head_dim=16).head_dim == 16  # unless set
    assert preset("llama-3.2-1b").replace(hidden_size=1024).head_dim == 64  # the preset's own head_dim stays
