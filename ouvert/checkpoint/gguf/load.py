"""Import: `load_gguf` builds a Transformer from a GGUF file (architectures llama and deepseek2).
The model comes back in the file's type (general.file_type: f32, f16 or bf16), float32 for a
quantized file, unless `dtype` says otherwise; tensors in GGML block formats ouvert's kernels run
stay in their blocks. Anything else is an error naming the architecture, or the tensor and its type.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ouvert.assets import check_asset
from ouvert.checkpoint.base import CheckpointError, assign_weights, build_on_meta
from ouvert.checkpoint.gguf.codec import GGUFTensor, decode_tensor, gguf_lib
from ouvert.checkpoint.gguf.config import gguf_config, llama3_scaling
from ouvert.checkpoint.gguf.names import ARCHITECTURES, from_gguf, gguf_names, to_gguf
from ouvert.checkpoint.gguf.read import GGUFFile
from ouvert.config import ModelConfig
from ouvert.kernels import BY_ID, row_bytes
from ouvert.model import Experts, Transformer
from ouvert.quantize import KEEP_FLOAT, block_config, swap_for_blocks


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """Read a GGUF file (llama or deepseek2 architecture) as a Transformer; see the module docstring.

    Without a dtype, the file runs as stored: linear layers and the embedding whose tensors are in a
    block format ouvert's kernels cover (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) keep their blocks,
    memory-mapped, in BlockLinear / BlockEmbedding (ouvert/quantize/blocks.py), and everything else is
    float. An explicit dtype dequantizes every tensor to it: the reference path."""
    g = gguf_lib()
    path = Path(path)
    check_asset(path)  # a file `make assets` fetches: missing or corrupted says how to fetch it again
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    f = GGUFFile(path)
    cfg = gguf_config(f)
    arch = ARCHITECTURES[cfg.model_type]
    tensors = f.tensors
    if "rope_freqs.weight" in tensors:
        cfg.rope_scaling = llama3_scaling(decode_tensor(tensors["rope_freqs.weight"], path), cfg, path)
    as_stored = dtype is None and torch.device(device).type == "cpu"
    if dtype is None:
        ft = f.fields.get("general.file_type")
        if ft is None:  # no file type: go by the embedding's
            emb = g.GGMLQuantizationType(tensors["token_embd.weight"].qtype).name
            ft = {"F16": 1, "BF16": 32, "F32": 0}.get(emb)
        dtype = {0: torch.float32, 1: torch.float16, 32: torch.bfloat16}.get(ft, torch.float32)
    cfg.torch_dtype = str(dtype).removeprefix("torch.")

    model, expected = build_on_meta(cfg)
    used = {"rope_freqs.weight"}
    state: dict[str, Tensor] = {}
    blocks: dict[str, int] = {}  # module -> GGML type, for the weights that run as stored
    dequantized: list[str] = []  # block tensors the kernels do not cover, turned into floats
    for name, meta in expected.items():
        names, transform = gguf_names(name, arch)
        for n in names:
            if n not in tensors:
                raise CheckpointError(
                    f"{path}: missing tensor {n!r} needed by {arch} with {cfg.num_hidden_layers} layers")
        with torch.device("meta"):
            want = [tuple(x.shape) for x in to_gguf(torch.empty(meta.shape), transform, cfg)]
        if as_stored and _runs_as_stored(model, name, tensors[names[0]], transform, cfg):
            state[name] = _blocks(tensors[names[0]], want[0], path)
            state[name] = from_gguf((state[name],), transform, cfg)  # q / k row orders permute whole rows
            blocks[name.removesuffix(".weight")] = tensors[names[0]].qtype  # a stack of experts: its own name
            used.add(names[0])
            continue
        parts = []
        for n, shape in zip(names, want):
            t = decode_tensor(tensors[n], path)
            if tuple(t.shape) != shape:
                raise CheckpointError(
                    f"{path}: tensor {n!r} has shape {tuple(t.shape)}, expected {shape} from the metadata")
            if as_stored and tensors[n].qtype not in (0, 1, 30):
                dequantized.append(f"{n} ({g.GGMLQuantizationType(tensors[n].qtype).name})")
            parts.append(t)
            used.add(n)
        t = from_gguf(tuple(parts), transform, cfg)
        keep = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))  # routing stays float32
        state[name] = t.to(device=device, dtype=torch.float32 if keep else dtype)
    unused = [n for n in tensors if n not in used]
    if unused:
        warnings.warn(f"{path}: {len(unused)} tensor(s) not used by {arch}: {', '.join(unused[:5])}", stacklevel=2)
    if dequantized:
        warnings.warn(f"{path}: {len(dequantized)} tensor(s) dequantized to {cfg.torch_dtype}, in a format or place "
                      f"ouvert's kernels do not cover: {', '.join(dequantized[:4])}", stacklevel=2)
    if blocks:
        if cfg.tie_word_embeddings and "embed_tokens" in blocks:
            blocks["lm_head"] = blocks["embed_tokens"]  # the head reads the embedding's blocks
        swap_for_blocks(model, blocks, dtype)
        cfg.extra["quantization_config"] = block_config(model, blocks)
    return assign_weights(model, state, device)


def _runs_as_stored(model: Transformer, name: str, t: GGUFTensor, transform: str | None, cfg: ModelConfig) -> bool:
    """Whether our parameter `name` keeps the GGUF tensor's blocks: a linear layer's or the embedding's
    weight, or a stack of routed experts, in a block format the kernels cover, whose transform (if
    any) only reorders rows."""
    if t.qtype not in BY_ID or t.qtype in (0, 1, 30):
        return False
    if isinstance(model.get_submodule(name.rpartition(".")[0]), Experts):
        return transform is None
    if not name.endswith(".weight"):
        return False
    module = model.get_submodule(name.removesuffix(".weight"))
    if type(module) not in (nn.Linear, nn.Embedding) or name.split(".")[-2] in KEEP_FLOAT:
        return False
    mla_rows = transform in ("rope_mla_q", "rope_mla_kv") and cfg.rope_interleave  # the identity then
    return transform in (None, "rope_q", "rope_k") or mla_rows


def _blocks(t: GGUFTensor, shape: tuple[int, ...], path: Path) -> Tensor:
    """A GGUF tensor's blocks as a (rows, bytes per row) uint8 tensor over the file's memory map."""
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"{path}: tensor {t.name!r} has shape {t.shape}, expected {tuple(shape)} "
                              "from the metadata")
    with warnings.catch_warnings():  # read-only memory: the blocks are never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(t.data).view(*shape[:-1], row_bytes(t.qtype, shape[-1]))
