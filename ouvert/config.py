"""Model configuration: one dataclass for the Llama and DeepSeek families.

`ModelConfig.from_hf` reads a Hugging Face `config.json` dict (both the hub spelling, with
top-level `rope_theta` and `rope_scaling`, and the transformers 5 spelling, `rope_parameters`);
`to_hf` writes one back that transformers, vLLM and llama.cpp's converter read.

A Llama-family model is a DeepSeek model with two parts swapped: grouped-query attention
instead of multi-head latent attention (`kv_lora_rank is None`), and a dense SwiGLU MLP in
every layer instead of mixture-of-experts (`n_routed_experts is None`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that ouvert cannot run, with the file and key at fault in the message."""


# model_type -> family defaults that differ from the dataclass defaults.
_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"rope_theta": 1e6, "attention_bias": False},
    "qwen2": {"attention_bias": True, "o_proj_bias": False, "rope_theta": 1e6},
    "qwen3": {"qk_norm": True, "rope_theta": 1e6},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "rope_interleave": True},
    # V3's config.json has no scoring_func/topk_method: sigmoid + noaux_tc is the only V3 router. The
    # routing keys that would otherwise change the result silently default as DeepseekV3Config's do.
    "deepseek_v3": {
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "rope_interleave": True,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4,
    },
}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_DERIVED = ("num_key_value_heads", "head_dim", "o_proj_bias")  # None in the config: computed from other fields
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
# The server and generate() size caches and rotary tables from max_position_embeddings: a context
# beyond 16M tokens is a typo (or 1e30), not a model ouvert can run.
MAX_CONTEXT = 2**24


@dataclass
class ModelConfig:
    """Architecture of a decoder-only transformer. Field names follow the HF configs and the papers."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # SwiGLU hidden width of the dense MLP
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # GQA groups; None means as many as query heads
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2) and, unless o_proj_bias says otherwise, on o_proj
    o_proj_bias: bool | None = None  # None: as attention_bias (Llama, Qwen3); Qwen2 has none there
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head of q and k before rotary (Qwen3)
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` keys only

    # Rotary position embedding. rope_scaling holds the scaling rule in normalised form:
    # {"rope_type": "linear" | "llama3" | "yarn", "factor": ..., ...}; None means plain RoPE.
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = False  # DeepSeek: rotary pairs are adjacent (x0,x1) not halves (x0,x_{d/2})

    # Multi-head latent attention (DeepSeek-V2 §2.1). kv_lora_rank None means GQA instead.
    q_lora_rank: int | None = None  # None: q = q_proj(x) directly (V2-Lite)
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    # DeepSeekMoE (DeepSeek-V2 §2.2, V3 §2.1.2). n_routed_experts None means dense MLP everywhere.
    n_routed_experts: int | None = None
    num_experts_per_tok: int = 8
    n_shared_experts: int = 0
    moe_intermediate_size: int = 1407
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "greedy"  # greedy | group_limited_greedy (V2) | noaux_tc (V3)
    scoring_func: str = "softmax"  # softmax (V2) | sigmoid (V3)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0  # the first k layers keep a dense MLP
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 0  # multi-token prediction modules (V3 §2.2)

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in

    # Keys of the source config.json that ouvert does not use, kept so to_hf() loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        # Fields left to be derived from others, so that replace() derives them again.
        self._derived = frozenset(k for k in _DERIVED if getattr(self, k) is None)
        self.validate()

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with changes, deriving again what was derived (head_dim from a new hidden_size or
        head count) unless the changes set it. dataclasses.replace would keep the old values."""
        again = {k: None for k in self._derived if k not in changes}
        return dataclasses.replace(self, **again, **changes)

    def validate(self) -> None:
        """Check every field's type (as annotated) and range, and fill the defaults that depend on
        other fields. Raises ConfigError naming the key and its value; from_hf / from_file prefix
        the file's name."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _is(value, _HINTS[f.name]):
                raise ConfigError(f"key {f.name!r} must be {_describe(_HINTS[f.name])}, not {_show(value)}")
        if self.model_type not in _FAMILIES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; ouvert runs {', '.join(sorted(_FAMILIES))}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads"):
            _at_least(key, getattr(self, key), 1)
        _at_least("num_hidden_layers", self.num_hidden_layers, 0)  # 0: embedding, norm and head (a bigram model)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _at_least("num_key_value_heads", self.num_key_value_heads, 1)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            if self.head_dim < 1:
                raise ConfigError(f"hidden_size ({self.hidden_size}) is smaller than num_attention_heads "
                                  f"({self.num_attention_heads}): no width is left per head")
        _at_least("head_dim", self.head_dim, 1)
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 1 <= self.max_position_embeddings <= MAX_CONTEXT:
            raise ConfigError(f"key 'max_position_embeddings' must be between 1 and {MAX_CONTEXT} (2**24), "
                              f"not {_show(self.max_position_embeddings)}")
        if self.rms_norm_eps < 0:
            raise ConfigError(f"key 'rms_norm_eps' must be a number >= 0, not {_show(self.rms_norm_eps)}")
        if self.rope_theta <= 1:  # the rotary frequencies are powers of 1 / rope_theta
            raise ConfigError(f"key 'rope_theta' must be a number above 1, not {_show(self.rope_theta)}")
        if self.sliding_window is not None:
            _at_least("sliding_window", self.sliding_window, 1)
        self._validate_rope_scaling()
        if self.rope_dim % 2:  # rotary embeddings turn the channels in pairs
            key = "qk_rope_head_dim" if self.is_mla else "head_dim"
            raise ConfigError(f"key {key!r} must be even (rotary embeddings pair its channels), not {self.rope_dim}")
        if self.is_mla:
            for key in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
                _at_least(key, getattr(self, key), 1)
            _at_least("qk_nope_head_dim", self.qk_nope_head_dim, 0)
            if self.q_lora_rank is not None:
                _at_least("q_lora_rank", self.q_lora_rank, 1)
        if self.n_routed_experts is not None:
            self._validate_moe()
        _at_least("num_nextn_predict_layers", self.num_nextn_predict_layers, 0)
        for f in dataclasses.fields(self):  # float fields take JSON integers (rope_theta: 10000)
            if _HINTS[f.name] is float and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))

    def _validate_rope_scaling(self) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        kind = rs.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling: unsupported rope_type {kind!r}; ouvert knows {', '.join(ROPE_TYPES)}")
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                    "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            value = rs.get(key)
            if value is not None and not _is(value, float):
                raise ConfigError(f"key 'rope_scaling.{key}' must be a number, not {_show(value)}")
        for key in ("factor", "original_max_position_embeddings"):
            if rs.get(key) is not None and rs[key] <= 0:
                raise ConfigError(f"key 'rope_scaling.{key}' must be a positive number, not {_show(rs[key])}")
        if kind in ("linear", "llama3") and rs.get("factor") is None:
            raise ConfigError(f"rope_scaling of type {kind!r} needs key 'factor'")
        if kind == "yarn" and rs.get("factor") is None and rs.get("original_max_position_embeddings") is None:
            raise ConfigError("rope_scaling of type 'yarn' needs key 'factor' or 'original_max_position_embeddings'")
        if kind == "llama3":
            lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
            if not 0 < lo < hi:  # the smooth ramp between them divides by hi - lo
                raise ConfigError(f"rope_scaling: low_freq_factor ({lo}) must be positive and below "
                                  f"high_freq_factor ({hi})")

    def _validate_moe(self) -> None:
        E = self.n_routed_experts
        _at_least("n_routed_experts", E, 1)
        for key, low in (("moe_intermediate_size", 1), ("n_shared_experts", 0), ("first_k_dense_replace", 0),
                         ("moe_layer_freq", 1), ("n_group", 1), ("topk_group", 1)):
            _at_least(key, getattr(self, key), low)
        if not 1 <= self.num_experts_per_tok <= E:
            raise ConfigError(f"key 'num_experts_per_tok' must be between 1 and n_routed_experts ({E}), "
                              f"not {_show(self.num_experts_per_tok)}")
        if self.topk_method not in TOPK_METHODS:
            raise ConfigError(
                f"key 'topk_method' must be one of {', '.join(TOPK_METHODS)}, not {_show(self.topk_method)}"
            )
        if self.scoring_func not in SCORING_FUNCS:
            raise ConfigError(
                f"key 'scoring_func' must be one of {', '.join(SCORING_FUNCS)}, not {_show(self.scoring_func)}"
            )
        if not self.routed_scaling_factor > 0:
            raise ConfigError(f"key 'routed_scaling_factor' must be a positive number, "
                              f"not {_show(self.routed_scaling_factor)}")
        if self.topk_method != "greedy" and self.n_group > 1:  # the router views the experts as groups
            if E % self.n_group:
                raise ConfigError(f"n_routed_experts ({E}) must be a multiple of n_group ({self.n_group})")
            if self.topk_group > self.n_group:
                raise ConfigError(f"topk_group ({self.topk_group}) must not exceed n_group ({self.n_group})")
            per_group = E // self.n_group
            if self.topk_method == "noaux_tc" and per_group < 2:  # groups rank by their two best scores
                raise ConfigError(f"noaux_tc routing needs at least 2 experts per group, not {per_group} "
                                  f"(n_routed_experts {E}, n_group {self.n_group})")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ConfigError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) is more than the {self.topk_group} "
                    f"group(s) of {per_group} experts that topk_group keeps"
                )

    # ---- derived values -------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def qk_head_dim(self) -> int:
        """Width of one attention head's query and key."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """How many channels of each head rotate: all of them for GQA, the decoupled part for MLA."""
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @property
    def stop_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else list(e) if isinstance(e, list) else [e]

    # ---- Hugging Face config.json -----------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a Hugging Face config dict. `source` names the file in error messages."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object of config keys, not {_json_type(hf)}")
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type is None:
            raise ConfigError(f"{source}: key 'model_type' is missing")
        if model_type not in _FAMILIES:
            raise ConfigError(
                f"{source}: unknown model_type {model_type!r} (key 'model_type'); "
                f"ouvert runs {', '.join(sorted(_FAMILIES))}"
            )
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ConfigError(f"{source}: key {key!r} is missing")
            if hf[key] is None:  # null elsewhere means "the default"; these have none worth guessing
                raise ConfigError(f"{source}: key {key!r} must be an integer, not null")
        kw: dict[str, Any] = dict(_FAMILIES[model_type])
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"}
        for key in names & hf.keys():
            value = hf.pop(key)
            if value is not None:  # an explicit null means "the default" (head_dim, q_lora_rank)
                kw[key] = value
        if "dtype" in hf:  # transformers 5 says dtype where 4 said torch_dtype
            kw["torch_dtype"] = hf.pop("dtype")
        if model_type == "qwen2" and not hf.get("use_sliding_window", False):
            kw["sliding_window"] = None

        # Rotary: hub spelling (rope_theta + rope_scaling with "type" or "rope_type") or the
        # transformers 5 spelling (rope_parameters, holding rope_theta as well).
        params = hf.pop("rope_parameters", None) or {}
        scaling = hf.pop("rope_scaling", None) or {}
        theta = hf.pop("rope_theta", None)
        rope = {**params, **scaling}
        theta = rope.pop("rope_theta", theta)
        if theta is not None:
            kw["rope_theta"] = theta
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        if rope_type != "default":
            if rope_type not in ROPE_TYPES:
                raise ConfigError(
                    f"{source}: unsupported rope type {rope_type!r} (key 'rope_scaling'); "
                    f"ouvert knows {', '.join(ROPE_TYPES)}"
                )
            kw["rope_scaling"] = {"rope_type": rope_type, **rope}
        kw["extra"] = hf
        try:
            return cls(**kw)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict in the hub spelling, which transformers 4 and 5, vLLM and llama.cpp read."""
        out: dict[str, Any] = dict(self.extra)
        skip = {"extra", "rope_scaling", "torch_dtype", "qk_norm", "rope_interleave", "o_proj_bias"}
        if not self.is_mla:
            skip |= {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}
        if self.n_routed_experts is None:
            skip |= {
                "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "moe_intermediate_size",
                "n_group", "topk_group", "topk_method", "scoring_func", "norm_topk_prob",
                "routed_scaling_factor", "first_k_dense_replace", "moe_layer_freq",
            }
        if not self.model_type.startswith("deepseek"):
            skip |= {"num_nextn_predict_layers"}
        else:
            out["rope_interleave"] = self.rope_interleave
        if self.model_type not in ("mistral", "qwen2"):
            skip |= {"sliding_window"}
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = getattr(self, f.name)
        if self.is_mla:  # transformers reads head_dim as the rotary width of an MLA model
            out["head_dim"] = self.qk_rope_head_dim
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.torch_dtype:
            out["torch_dtype"] = self.torch_dtype
        out["architectures"] = [_ARCHITECTURES[self.model_type]]
        return out

    # ---- files ----------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read a config.json, or a preset TOML (a [model] table of ModelConfig fields)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file")
        if path.suffix == ".toml":
            with open(path, "rb") as f:
                data = tomllib.load(f)
            data = data.get("model", data)
            unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(f"{path}: unknown model key(s) {sorted(unknown)}")
            try:
                return cls(**data)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(data, source=str(path))


_HINTS = typing.get_type_hints(ModelConfig)  # field name -> its annotation, resolved


def _is(value: Any, hint: Any) -> bool:
    """Whether value fits the annotation: an int is not a bool or a float; a float field takes an
    int as JSON writes 10000.0, but not NaN or infinity; a bool is only true or false."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_is(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is(v, typing.get_args(hint)[0]) for v in value)
    if typing.get_origin(hint) is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """An annotation in words, for error messages: `int | None` -> 'an integer or null'."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        words = [_describe(h) for h in typing.get_args(hint)]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if typing.get_origin(hint) is list:
        return "a list of " + _describe(typing.get_args(hint)[0]).split(" ", 1)[1] + "s"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
             type(None): "null", dict: "an object"}
    return names.get(typing.get_origin(hint) or hint, str(hint))


def _show(value: Any) -> str:
    """A value as config.json spells it ("576", true, 1e+30), cut short if long."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _json_type(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"key {key!r} must be {what}, not {_show(value)}")


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}

PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def preset(name: str) -> ModelConfig:
    """A named preset from ouvert/presets/NAME.toml (demo, tiny-llama, smollm2-135m, llama-3.2-1b, ...)."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(names)}")
    return ModelConfig.from_file(path)
