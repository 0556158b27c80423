"""Meta's original Llama format: `params.json` + `consolidated.NN.pth` (one file per model-parallel rank).

Names map through the one table `NAMES` below (ours, Meta's, transform), like checkpoint/hf.py's.
Meta's q and k rows keep each rotary pair adjacent, (x0, x1), (x2, x3), ..., because Meta's code
rotates them as complex numbers; HF's and ours split the pairs into halves, (x0, x_{d/2}), ...
The `rope` transform converts between the two, per head, in both directions (base.py; the permutation
HF's convert_llama_weights_to_hf.py applies, and the one llama.cpp's GGUF layout shares, see checkpoint/base.py).

Model-parallel shards are put back together by shape: a tensor that is whole in every file is
replicated; otherwise it is concatenated along the one axis where the shards add up to the size
the config asks for (rows for wq/wk/wv/w1/w3/output, columns for wo/w2, either for the embedding).

params.json has no context length, token ids or tokenizer. What ouvert assumes instead, each a
documented rule rather than a guess from a size: vocab_size and intermediate_size come from the
weights' shapes (Llama 2 writes vocab_size -1), max_position_embeddings from `max_seq_len` if
present, else 131072 for `use_scaled_rope` (Llama 3.1+), 8192 for rope_theta 500000 (Llama 3),
4096 otherwise (Llama 2); llama3 rope scaling uses `rope_scaling_factor` if present, else Meta's
default factor 8 (Llama 3.1), with a warning (Llama 3.2 1B/3B use 32).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from ouvert.checkpoint.base import (
    CheckpointError,
    assign_weights,
    build_on_meta,
    rope_halves_to_pairs,
    rope_pairs_to_halves,
)
from ouvert.config import ConfigError, ModelConfig
from ouvert.model import Transformer

# (ours, Meta's, transform). {i} is a layer. Transforms: "rope_q" / "rope_k" permute the rows of each
# query / key head (n_head / n_kv_head of them) between the two rotary layouts.
NAMES: list[tuple[str, str, str | None]] = [
    ("embed_tokens.weight", "tok_embeddings.weight", None),
    ("norm.weight", "norm.weight", None),
    ("lm_head.weight", "output.weight", None),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.attention_norm.weight", None),
    ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.attention.wq.weight", "rope_q"),
    ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.attention.wk.weight", "rope_k"),
    ("layers.{i}.self_attn.v_proj.weight", "layers.{i}.attention.wv.weight", None),
    ("layers.{i}.self_attn.o_proj.weight", "layers.{i}.attention.wo.weight", None),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.ffn_norm.weight", None),
    ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.feed_forward.w1.weight", None),
    ("layers.{i}.mlp.down_proj.weight", "layers.{i}.feed_forward.w2.weight", None),
    ("layers.{i}.mlp.up_proj.weight", "layers.{i}.feed_forward.w3.weight", None),
]
_IGNORED = re.compile(r"(rope\.freqs|.*\.inner_attention\.rope\.freqs)$")  # Llama 2's precomputed table


def _heads(transform: str, cfg: ModelConfig) -> int:
    return cfg.num_attention_heads if transform == "rope_q" else cfg.num_key_value_heads


def to_ours(t: Tensor, transform: str | None, cfg: ModelConfig) -> Tensor:
    return t if transform is None else rope_pairs_to_halves(t, _heads(transform, cfg))


def to_meta(t: Tensor, transform: str | None, cfg: ModelConfig) -> Tensor:
    return t if transform is None else rope_halves_to_pairs(t, _heads(transform, cfg))


def meta_name(name: str) -> tuple[str, str | None]:
    """Our parameter name -> (Meta's key, transform)."""
    for ours, theirs, transform in NAMES:
        m = re.fullmatch(re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)"), name)
        if m:
            return theirs.format(**m.groupdict()), transform
    raise ConfigError(f"no Meta name for parameter {name!r}")


# ---- reading ------------------------------------------------------------------------------------


def is_meta_dir(path: Path) -> bool:
    """A directory in Meta's layout (and not also a HF one, which wins when both are there)."""
    return (
        path.is_dir() and (path / "params.json").is_file() and not (path / "config.json").is_file()
        and any(path.glob("consolidated.*.pth"))
    )


def _error(msg: str) -> Exception:
    return CheckpointError(msg)


def _open_shards(path: Path) -> list[tuple[Path, dict[str, Tensor]]]:
    files = sorted(path.glob("consolidated.*.pth"))
    shards = []
    for f in files:
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # torch raises several types for a truncated or foreign file
            raise _error(f"{f}: cannot read ({type(e).__name__}: {e}); the file may be truncated") from None
        if not isinstance(sd, dict):
            raise _error(f"{f}: expected a state dict, found {type(sd).__name__}")
        shards.append((f, sd))
    return shards


def read_meta_config(path: Path, shards: list[tuple[Path, dict[str, Tensor]]]) -> ModelConfig:
    """ModelConfig from params.json, with the sizes params.json leaves out read from the weights."""
    pfile = path / "params.json"
    try:
        p = json.loads(pfile.read_text())
    except json.JSONDecodeError as e:
        raise _error(f"{pfile}: not valid JSON ({e})") from None
    for key in ("dim", "n_layers", "n_heads"):
        if key not in p:
            raise _error(f"{pfile}: key {key!r} is missing")
    first_file, first = shards[0]
    for key in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight"):
        if key not in first:
            raise _error(f"{first_file}: missing weight {key!r}")
    n = len(shards)
    dim = p["dim"]
    emb = first["tok_embeddings.weight"].shape
    vocab = emb[0] * (n if emb[1] == dim else 1)  # split over the vocabulary (Llama 3) or the width (Llama 2)
    ffn = first["layers.0.feed_forward.w1.weight"].shape[0] * n
    if p.get("vocab_size", -1) > 0 and p["vocab_size"] != vocab:
        raise _error(f"{pfile}: vocab_size {p['vocab_size']} but tok_embeddings.weight has {vocab} rows")
    theta = float(p.get("rope_theta", 10000.0))
    scaling = None
    if p.get("use_scaled_rope"):
        factor = p.get("rope_scaling_factor", p.get("rope_scale_factor"))
        if factor is None:
            warnings.warn(
                f"{pfile}: use_scaled_rope without rope_scaling_factor; using Meta's default factor 8 "
                "(Llama 3.1). Llama 3.2 1B/3B were trained with 32: add \"rope_scaling_factor\": 32 to params.json",
                stacklevel=3,
            )
            factor = 8.0
        scaling = {
            "rope_type": "llama3", "factor": float(factor), "low_freq_factor": 1.0,
            "high_freq_factor": float(p.get("rope_high_freq_factor", 4.0)),
            "original_max_position_embeddings": 8192,
        }
    if "max_seq_len" in p:
        ctx = int(p["max_seq_len"])
    else:
        ctx = 131072 if p.get("use_scaled_rope") else 8192 if theta >= 500000 else 4096
    try:
        return ModelConfig(
            model_type="llama", vocab_size=vocab, hidden_size=dim, intermediate_size=ffn,
            num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
            num_key_value_heads=p.get("n_kv_heads") or p["n_heads"], head_dim=p.get("head_dim"),
            rms_norm_eps=float(p.get("norm_eps", 1e-5)), max_position_embeddings=ctx, rope_theta=theta,
            rope_scaling=scaling, tie_word_embeddings="output.weight" not in first,
        )
    except (ConfigError, TypeError) as e:
        raise _error(f"{pfile}: {e}") from None


def _assemble(key: str, parts: list[tuple[Path, Tensor]], want: torch.Size) -> Tensor:
    """One tensor from its model-parallel pieces: replicated, or concatenated along one axis."""
    f0, t0 = parts[0]
    if len(parts) == 1 or all(t.shape == want for _, t in parts):
        if t0.shape != want:
            raise _error(f"{f0}: weight {key!r} has shape {tuple(t0.shape)}, expected {tuple(want)} from params.json")
        return t0
    n = len(parts)
    for axis in range(len(want)):
        shape = list(want)
        shape[axis] //= n
        if want[axis] % n == 0 and all(list(t.shape) == shape for _, t in parts):
            return torch.cat([t for _, t in parts], dim=axis)
    shapes = ", ".join(f"{f.name} {tuple(t.shape)}" for f, t in parts)
    raise _error(f"{f0.parent}: weight {key!r}: shards ({shapes}) do not make up the expected {tuple(want)}")


def load_meta(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Load a Meta-format Llama directory (params.json + consolidated.*.pth) as a Transformer."""
    path = Path(path)
    shards = _open_shards(path)
    cfg = read_meta_config(path, shards)
    model, expected = build_on_meta(cfg)
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, meta in expected.items():
        key, transform = meta_name(name)
        parts = [(f, sd[key]) for f, sd in shards if key in sd]
        if len(parts) < len(shards):
            missing = next(f for f, sd in shards if key not in sd)
            raise _error(f"{missing}: missing weight {key!r} needed by llama with {cfg.num_hidden_layers} layers")
        t = to_ours(_assemble(key, parts, meta.shape), transform, cfg)
        used.add(key)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        state[name] = t.to(device)
    unused = sorted({k for _, sd in shards for k in sd} - used)
    unused = [k for k in unused if not _IGNORED.match(k)]
    if unused:
        warnings.warn(f"{path}: {len(unused)} weight(s) not used by llama: {', '.join(unused[:5])}", stacklevel=2)
    model = assign_weights(model, state, device)
    cfg.torch_dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    return model


