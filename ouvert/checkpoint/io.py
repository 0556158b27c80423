"""The front door of checkpoint/: load or save a model, or its tokenizer, without knowing the format.

A path ending in .gguf is a llama.cpp / Ollama file (checkpoint/gguf/), a directory with
params.json and consolidated.*.pth is Meta's layout (meta.py), any other directory is Hugging
Face's (hf.py). ouvert saves in Hugging Face's layout and exports to GGUF; `export_hf` and
`export_gguf` convert any checkpoint this door reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ouvert.assets import check_asset
from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.gguf import gguf_tokenizer, load_gguf, write_gguf
from ouvert.checkpoint.hf import load_hf, save_model
from ouvert.checkpoint.meta import is_meta_dir, load_meta
from ouvert.model import Transformer
from ouvert.tokenizer import Tokenizer, read_tokenizer

__all__ = ["export_gguf", "export_hf", "load", "load_model", "load_tokenizer", "save_model"]

log = logging.getLogger(__name__)


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """A model from a Hugging Face directory (config.json + safetensors, sharded or not, FP8 or
    ouvert's quantized layouts included), Meta's params.json + consolidated.*.pth, or a GGUF file.
    Tensors keep their stored dtype unless `dtype` asks for another."""
    path = Path(path)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype=dtype, device=device)
    if is_meta_dir(path):
        return load_meta(path, dtype=dtype, device=device)
    return load_hf(path, dtype=dtype, device=device)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer from a directory with tokenizer.json, or the one a GGUF file carries."""
    path = Path(path)
    if path.suffix == ".gguf":
        if not path.is_file():
            check_asset(path)  # a file `make assets` fetches says how to fetch it
            raise CheckpointError(f"{path}: no such file")
        return gguf_tokenizer(path)
    return read_tokenizer(path)


def load(
    model: str | Path, tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Transformer, Tokenizer]:
    """(model, tokenizer) for the commands that run a model: the tokenizer from `tokenizer`, else
    the model's own directory or GGUF file."""
    m = load_model(model, dtype=dtype, device=device)
    tok_dir = Path(tokenizer or model)
    if tok_dir.suffix != ".gguf" and not (tok_dir / "tokenizer.json").is_file():
        raise ValueError(f"{tok_dir}: no tokenizer.json; pass --tokenizer DIR")
    return m, load_tokenizer(tok_dir)


def export_hf(model_dir: str | Path, out: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """`ouvert export hf`: any checkpoint load_model reads (Meta's layout, a GGUF file, a HF directory)
    written as a HF directory, with the tokenizer from `tokenizer_dir`, else the GGUF file's own, else
    the model directory's tokenizer.json (Meta's tokenizer.model is not converted)."""
    src = Path(model_dir)
    model = load_model(src, dtype=torch.float32 if src.suffix == ".gguf" else None)  # floats to write
    if tokenizer_dir is None and src.suffix == ".gguf":  # a GGUF file carries its tokenizer
        tok = gguf_tokenizer(src)
    else:
        tok_dir = Path(tokenizer_dir) if tokenizer_dir else src
        tok = read_tokenizer(tok_dir) if (tok_dir / "tokenizer.json").is_file() else None
        if tokenizer_dir and tok is None:
            raise CheckpointError(f"{tok_dir / 'tokenizer.json'}: missing")
    if tok is None and (src / "tokenizer.model").is_file():
        log.warning("%s: tokenizer.model is not converted; pass --tokenizer DIR with a tokenizer.json", src)
    if tok is not None:
        cfg = model.config
        cfg.bos_token_id = cfg.bos_token_id if cfg.bos_token_id is not None else tok.bos_token_id
        cfg.eos_token_id = cfg.eos_token_id if cfg.eos_token_id is not None else tok.eos_token_id
    return save_model(model, out, tokenizer=tok)


def export_gguf(
    model_dir: str | Path, out: str | Path, type: str | None = None, tokenizer_dir: str | Path | None = None
) -> Path:
    """`ouvert export gguf`: a checkpoint (any that load_model reads) and its tokenizer as one GGUF file."""
    # A checkpoint in blocks (`ouvert quantize --scheme q4_k_m`, or a GGUF file) is copied block for
    # block when no type is asked for; asked for one, it is dequantized and written in that type.
    model = load_model(model_dir, dtype=torch.float32 if type is not None else None)
    if type is None:
        type = "f16"  # a float model's default; a model in blocks keeps them (its other tensors in f16)
    src = Path(model_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else src
    if not (tok_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tok_dir}: no tokenizer.json (a GGUF file carries its tokenizer); pass --tokenizer DIR")
    return write_gguf(model, read_tokenizer(tok_dir), out, type, name=src.name)
