"""Hugging Face checkpoint directories: config.json + safetensors (one file or shards).

Names map through checkpoint/base.py's table. Weights are memory-mapped (safetensors), converted
only if asked for another dtype, and DeepSeek's FP8 blocks are dequantized tensor by tensor. An
ouvert int8 / int4 or GGUF-block checkpoint (ouvert/quantize/) gets its quantized modules.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ouvert.checkpoint import manifest
from ouvert.checkpoint.base import (
    SHARED_COPIES,
    CheckpointError,
    assign_weights,
    build_on_meta,
    hf_names,
    our_name,
    write_atomically,
    write_json,
)
from ouvert.config import ConfigError, ModelConfig
from ouvert.model import Transformer
from ouvert.quantize import pack_for_kernels, prepare_for_load, read_quantization_config

# ---- reading ------------------------------------------------------------------------------------


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with config.json)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: missing; {path} is not a Hugging Face checkpoint directory")
    try:
        return ModelConfig.from_file(cfg_file)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


class WeightFiles:
    """The safetensors files of a checkpoint directory, opened memory-mapped, keyed by tensor name."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            others = sorted(p.name for p in path.glob("*.safetensors"))
            if len(others) == 1:
                files = others
            else:
                bins = [p.name for p in path.glob("*.bin")]
                hint = f" (found {', '.join(bins)}: convert .bin checkpoints to safetensors)" if bins else ""
                raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
        self.handles = {}
        self.where: dict[str, str] = {}
        for fname in files:
            fpath = path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: missing (listed in {index.name})")
            try:
                h = safe_open(str(fpath), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{fpath}: cannot read safetensors ({e}); the file may be truncated") from None
            self.handles[fname] = h
            for k in h.keys():
                self.where[k] = fname
        self.path = path

    def get(self, key: str) -> torch.Tensor:
        fname = self.where[key]
        try:
            return self.handles[fname].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{self.path / fname}: cannot read tensor {key!r} ({e})") from None


def dequantize_fp8(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """DeepSeek-V3's FP8 weights: w (out, in) float8_e4m3fn, scale_inv (ceil(out/b0), ceil(in/b1)).
    The real weight is w[i, j] * scale_inv[i // b0, j // b1], computed in float32 (as DeepSeek's
    weight_dequant kernel does) and then cast to dtype; the last row and column blocks may be partial.
    Works one row of blocks at a time, so the float32 copy never exceeds b0 rows."""
    b0, b1 = block
    out_dim, in_dim = w.shape
    s = scale_inv.float().repeat_interleave(b1, dim=1)[:, :in_dim]  # (ceil(out/b0), in)
    y = torch.empty(out_dim, in_dim, dtype=dtype, device=w.device)
    for i, r0 in enumerate(range(0, out_dim, b0)):
        y[r0 : r0 + b0] = (w[r0 : r0 + b0].float() * s[i]).to(dtype)
    return y


def _mtp_depths_present(cfg: ModelConfig, files: WeightFiles) -> int:
    """How many of the config's MTP layers (HF layers num_hidden_layers + k) have any weight in the
    files, counting from the first; a layer that is there but incomplete fails later, by name."""
    prefixes = {k.split(".", 3)[2] for k in files.where if k.startswith("model.layers.")}
    k = 0
    while k < cfg.num_nextn_predict_layers and str(cfg.num_hidden_layers + k) in prefixes:
        k += 1
    return k


def _dequantize(
    key: str, t: torch.Tensor, files: WeightFiles, block: tuple[int, int] | None, dtype: torch.dtype, path: Path
) -> torch.Tensor:
    """An FP8 weight of the checkpoint, dequantized with its `{key}_scale_inv` blocks."""
    where = path / files.where[key]
    if block is None:
        raise CheckpointError(
            f"{where}: weight {key!r} is {t.dtype} but config.json has no quantization_config "
            "with quant_method 'fp8'"
        )
    if t.dtype != torch.float8_e4m3fn or t.dim() != 2:
        raise CheckpointError(f"{where}: weight {key!r}: ouvert dequantizes 2-D float8_e4m3fn, not {t.dtype}")
    sk = key + "_scale_inv"
    if sk not in files.where:
        raise CheckpointError(f"{where}: FP8 weight {key!r} has no {sk!r}")
    s = files.get(sk)
    want = tuple(-(-n // b) for n, b in zip(t.shape, block))
    if tuple(s.shape) != want:
        raise CheckpointError(
            f"{path / files.where[sk]}: {sk!r} has shape {tuple(s.shape)}, expected {want} for a "
            f"{tuple(t.shape)} weight in {block[0]}x{block[1]} blocks"
        )
    return dequantize_fp8(t, s, block, dtype or torch.bfloat16)


def _check_mtp_copies(cfg: ModelConfig, files: WeightFiles, path: Path) -> None:
    """DeepSeek-V3 stores copies of the embedding and output head in each MTP layer; ouvert shares
    the trunk's (V3 §2.2). Say so if a copy differs, rather than drop it silently."""
    trunk = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
    if cfg.tie_word_embeddings:
        trunk["shared_head.head.weight"] = "model.embed_tokens.weight"
    for m in range(cfg.num_nextn_predict_layers):
        for own, theirs in trunk.items():
            key = f"model.layers.{cfg.num_hidden_layers + m}.{own}"
            if key in files.where and theirs in files.where:
                a, b = files.get(key), files.get(theirs)
                if a.dtype == b.dtype and not torch.equal(a, b):
                    warnings.warn(
                        f"{path / files.where[key]}: MTP weight {key!r} differs from {theirs!r}; ouvert's "
                        f"MTP module uses the trunk's {theirs!r}, as DeepSeek-V3 shares them",
                        stacklevel=3,
                    )


def load_hf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not).

    Tensors stay memory-mapped and in their stored dtype unless `dtype` asks for another; FP8
    checkpoints are dequantized (to bfloat16 unless told otherwise), one tensor at a time.
    """
    path = Path(path)
    cfg = read_config(path)
    files = WeightFiles(path)
    qc = cfg.extra.get("quantization_config") or {}
    fp8 = qc.get("quant_method") == "fp8"
    if fp8:
        block = tuple(qc.get("weight_block_size") or (128, 128))
        if len(block) != 2 or qc.get("fmt", "e4m3") != "e4m3":
            raise CheckpointError(
                f"{path / 'config.json'}: quantization_config: ouvert reads DeepSeek's FP8 format, "
                f"fmt 'e4m3' with 2-D weight_block_size; got fmt {qc.get('fmt')!r}, "
                f"weight_block_size {qc.get('weight_block_size')!r}"
            )
        dtype = dtype or torch.bfloat16
    elif qc and qc.get("quant_method") != "gguf":  # ouvert's int8 / int4: unknown methods and schemes fail here
        read_quantization_config(qc, path / "config.json")

    # DeepSeek-V3 configs say num_nextn_predict_layers=1 whether or not the file holds the MTP
    # layer (transformers writes it for every V3 and drops the weights). A checkpoint without MTP
    # weights is complete for inference: load the trunk alone, and make the config say so.
    present = _mtp_depths_present(cfg, files)
    if present < cfg.num_nextn_predict_layers:
        logging.getLogger(__name__).debug(
            "%s: config.json has num_nextn_predict_layers=%d but the weights hold %d MTP layer(s); "
            "loading without the rest", path, cfg.num_nextn_predict_layers, present,
        )
        cfg.num_nextn_predict_layers = present
    _check_mtp_copies(cfg, files, path)

    swap = None if fp8 or not qc else (lambda m: prepare_for_load(m, qc, "config.json"))
    model, expected = build_on_meta(cfg, swap)

    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for name, meta in expected.items():
        keys = hf_names(name, cfg)
        missing = [k for k in keys if k not in files.where]
        if missing:
            raise CheckpointError(
                f"{path}: missing weight {missing[0]!r}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + f" needed by {cfg.model_type} with {cfg.num_hidden_layers} layers"
            )
        parts = []
        for k in keys:
            t = files.get(k)
            used.add(k)
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                t = _dequantize(k, t, files, block if fp8 else None, dtype, path)
                used.add(k + "_scale_inv")
            expect = meta.shape[1:] if len(keys) > 1 else meta.shape
            if t.shape != expect:
                raise CheckpointError(
                    f"{path / files.where[k]}: weight {k!r} has shape {tuple(t.shape)}, "
                    f"expected {tuple(expect)} from config.json"
                )
            parts.append(t)
        t = torch.stack(parts) if len(keys) > 1 else parts[0]
        # The router stays in its stored precision (float32 in HF checkpoints): routing is a discrete choice.
        keep = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        if dtype is not None and t.is_floating_point() and not keep:
            t = t.to(dtype)
        state[name] = t.to(device)

    unused = [k for k in files.where if k not in used and not SHARED_COPIES.match(k)]
    unused = [k for k in unused if not k.endswith("rotary_emb.inv_freq") and not k.endswith("_scale_inv")]
    if cfg.tie_word_embeddings:
        unused = [k for k in unused if k != "lm_head.weight"]
    if unused:
        names = ", ".join(unused[:5])
        warnings.warn(f"{path}: {len(unused)} weight(s) not used by {cfg.model_type}: {names}", stacklevel=2)

    model = assign_weights(model, state, device)
    if fp8:
        cfg.extra.pop("quantization_config", None)  # what we hold now is dequantized
    elif qc:
        pack_for_kernels(model)  # int4: the CPU kernel's own layout, made from the portable one
    return model


# ---- writing ------------------------------------------------------------------------------------


def hf_state_dict(model: Transformer, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Our state dict (the model's, or `state` in our names) under HF names: experts unstacked,
    tied head left out (HF layout)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    state = model.state_dict() if state is None else state
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        keys = hf_names(name, cfg)
        if len(keys) > 1:
            for e, k in enumerate(keys):
                out[k] = t[e]
        else:
            out[keys[0]] = t
    for m in range(cfg.num_nextn_predict_layers):  # DeepSeek's MTP layer carries its own copies
        layer = cfg.num_hidden_layers + m
        out[f"model.layers.{layer}.embed_tokens.weight"] = out["model.embed_tokens.weight"]
        head = out.get("lm_head.weight", out["model.embed_tokens.weight"])
        out[f"model.layers.{layer}.shared_head.head.weight"] = head
        if "lm_head.weight_scale" in out:  # an int8 head (ouvert/quantize/integer.py)
            out[f"model.layers.{layer}.shared_head.head.weight_scale"] = out["lm_head.weight_scale"]
    return out


def hf_state_dict_to_ours(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of hf_state_dict: HF names -> ours, experts stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for k, t in hf.items():
        named = our_name(k, cfg)
        if named is None:
            continue
        name, e = named
        if e is None:
            out[name] = t
        else:
            experts.setdefault(name, {})[e] = t
    for name, parts in experts.items():
        out[name] = torch.stack([parts[e] for e in range(len(parts))])
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def read_state_dict(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A checkpoint directory's weights (sharded or not) under our names, as stored: what a
    trainer resuming a run loads into the model it has already built."""
    files = WeightFiles(Path(path))
    return hf_state_dict_to_ours({k: files.get(k) for k in files.where}, cfg)


def save_model(
    model: Transformer,
    path: str | Path,
    tokenizer=None,
    max_shard_bytes: int = 5 * 2**30,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra: Callable[[Path], None] | None = None,
    provenance: dict | None = None,
) -> Path:
    """Write a HF checkpoint directory: config.json, generation_config.json, safetensors
    (sharded above max_shard_bytes, with model.safetensors.index.json), the tokenizer's files,
    and ouvert.json (checkpoint/manifest.py) with the weight hashes and `provenance`'s fields.

    Written into a temporary directory beside `path`, then renamed over it: a failure (a full
    disk) leaves whatever was at `path` untouched. `state_dict` (our names) replaces the model's
    own, e.g. full tensors gathered from FSDP shards; `extra(tmp_dir)` writes more files (a
    training state) into the directory before the rename.
    """
    def write(tmp: Path) -> None:
        _write(model, tmp, tokenizer, max_shard_bytes, state_dict)
        if extra is not None:
            extra(tmp)
        manifest.write(tmp, manifest.build(tmp, json.loads((tmp / "config.json").read_text()), provenance))

    return write_atomically(path, write)


def _write(model: Transformer, out: Path, tokenizer, max_shard_bytes: int, state_dict) -> None:
    cfg = model.config
    tensors = hf_state_dict(model, state_dict)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for fname, shard in zip(names, shards):
        # safetensors refuses tensors that share storage (expert slices, tied copies): clone those.
        seen: set[int] = set()
        clean = {}
        for k, t in shard.items():
            ptr = t.untyped_storage().data_ptr()
            shared = ptr in seen or t.numel() != t.untyped_storage().nbytes() // t.element_size()
            clean[k] = t.detach().clone().contiguous() if shared else t.detach().contiguous()
            seen.add(ptr)
        save_file(clean, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(out / "model.safetensors.index.json", index)
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(model.dtype).removeprefix("torch.")  # the embedding may hold blocks (uint8)
    write_json(out / "config.json", hf)
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id)) if v is not None}
    if tokenizer is not None:
        tokenizer.save(out)
        gen.update(tokenizer.generation_config)
    if gen:
        write_json(out / "generation_config.json", gen)


