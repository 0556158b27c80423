"""The low room of checkpoint/: what every format shares, importing nothing above the model.

- CheckpointError, and the dtypes a command line may ask for by name;
- the name table between our parameter names and Hugging Face's, the names every format starts from;
- building the model on the meta device and putting loaded tensors in place (assign, no copy);
- the two rotary layouts of q and k rows (halves: HF and ours; adjacent pairs: Meta and GGUF);
- writing a directory atomically (a temp dir renamed over the target).

Our parameter names are HF's without the `model.` prefix, with two exceptions that compute wants:
routed experts are stacked into one tensor per projection, and DeepSeek-V3's multi-token
prediction module, which HF checkpoints keep as layer `num_hidden_layers`, is `mtp.{k}`. The one
table `NAMES` below maps both directions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from ouvert.config import ModelConfig
from ouvert.model import Transformer

# The dtypes a command line may ask load_model for, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and the key."""


# ---- the name table ---------------------------------------------------------------------------
# (ours, HF). Placeholders: {i} a trunk layer, {m} an MTP depth (HF layer num_hidden_layers + m),
# {e} an expert (stacked on dim 0 on our side), {w} an expert projection, {q} empty or, in an int8 /
# int4 checkpoint (ouvert/quantize/), the suffix of a quantized tensor (`gate_proj_scale` is
# `gate_proj.weight_scale`), {own} a part only the MTP module has, {rest} any remaining dotted
# path. First match wins, in both directions.
NAMES: list[tuple[str, str]] = [
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight{q}", "lm_head.weight{q}"),
    ("layers.{i}.mlp.experts.{w}{q}", "model.layers.{i}.mlp.experts.{e}.{w}.weight{q}"),
    ("layers.{i}.{rest}", "model.layers.{i}.{rest}"),
    ("mtp.{m}.norm.weight", "model.layers.{m}.shared_head.norm.weight"),
    ("mtp.{m}.{own}", "model.layers.{m}.{own}"),
    ("mtp.{m}.block.mlp.experts.{w}{q}", "model.layers.{m}.mlp.experts.{e}.{w}.weight{q}"),
    ("mtp.{m}.block.{rest}", "model.layers.{m}.{rest}"),
]
# HF keys we read past on purpose: the MTP layer's copies of the shared embedding and head (an int8
# head's scale too).
SHARED_COPIES = re.compile(r"model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight(_scale)?)$")


_PATTERNS = {
    "i": r"(?P<i>\d+)", "m": r"(?P<m>\d+)", "e": r"(?P<e>\d+)", "w": r"(?P<w>gate_proj|up_proj|down_proj)",
    "q": r"(?P<q>|_scale|_packed|_zero)",
    "own": r"(?P<own>enorm\.weight|hnorm\.weight|eh_proj\.weight)", "rest": r"(?P<rest>.+)",
}


def _regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for k, v in _PATTERNS.items():
        out = out.replace(re.escape("{" + k + "}"), v)
    return re.compile(out + "$")


_RULES = [(ours, hf, _regex(ours), _regex(hf)) for ours, hf in NAMES]


def hf_names(name: str, cfg: ModelConfig) -> list[str]:
    """Our parameter name -> its HF key(s); a stacked expert tensor gives one key per expert."""
    n = cfg.num_hidden_layers
    for _, hf, ours_re, _ in _RULES:
        m = ours_re.match(name)
        if m:
            g = m.groupdict()
            if "m" in g:
                g["m"] = str(n + int(g["m"]))
            if "{e}" in hf:
                return [hf.format(**g, e=e) for e in range(cfg.n_routed_experts)]
            return [hf.format(**g)]
    raise CheckpointError(f"no HF name for parameter {name!r}")


def our_name(key: str, cfg: ModelConfig) -> tuple[str, int | None] | None:
    """HF key -> (our name, expert index or None); None for keys we skip on purpose."""
    n = cfg.num_hidden_layers
    if SHARED_COPIES.match(key):
        return None
    for ours, _, _, hf_re in _RULES:
        m = hf_re.match(key)
        if not m:
            continue
        g = m.groupdict()
        if "i" in g and int(g["i"]) >= n:
            continue  # a layer past the trunk is an MTP module
        if "m" in g:
            if int(g["m"]) < n:
                continue
            g["m"] = str(int(g["m"]) - n)
        e = g.pop("e", None)
        return ours.format(**g), None if e is None else int(e)
    return None


# ---- building and loading -----------------------------------------------------------------------


def build_on_meta(
    cfg: ModelConfig, swap: Callable[[Transformer], None] | None = None
) -> tuple[Transformer, dict[str, Tensor]]:
    """The model on the meta device (no memory, no random init), and the tensors a checkpoint
    must supply: parameters and persistent buffers, the tied head excepted. `swap` replaces
    modules first (a quantized checkpoint's Linears: ouvert/quantize/'s prepare_for_load)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if swap is not None:
        swap(model)
    expected = dict(model.named_parameters())
    expected.update((k, v) for k, v in model.named_buffers() if k in model.state_dict())
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    return model, expected


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of the model a config describes, from the shapes (nothing allocated)."""
    return sum(p.numel() for p in build_on_meta(cfg)[0].parameters())


def assign_weights(model: Transformer, state: dict[str, torch.Tensor], device) -> Transformer:
    """Put loaded tensors in place of the meta ones (assign=True: no copy), re-tie the head,
    and compute the rotary tables on the device."""
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.reset_buffers()
    model.inv_freq = model.inv_freq.to(device)
    return model.eval()


# ---- writing ------------------------------------------------------------------------------------


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary directory beside `path` with write(tmp), then rename it over `path`.
    If anything fails (a full disk), what was at `path` is untouched and the temp dir removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_json(path: Path, obj) -> None:
    """JSON as Hugging Face writes it: indented, UTF-8 as is, a final newline."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# ---- the two rotary layouts --------------------------------------------------------------------


def rope_pairs_to_halves(w: Tensor, n_head: int) -> Tensor:
    """Rows of q or k (n_head * d, ...) from the adjacent-pairs layout (Meta, GGUF) to halves (HF, ours)."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_halves_to_pairs(w: Tensor, n_head: int) -> Tensor:
    """The inverse of rope_pairs_to_halves: halves (HF, ours) to adjacent pairs (Meta, GGUF); it is
    llama.cpp's LlamaModel.permute."""
    return w.reshape(n_head, 2, -1, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
