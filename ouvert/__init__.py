"""ouvert: an open LLM stack for the Llama and DeepSeek families, in plain PyTorch."""

from ouvert.checkpoint.hf import CheckpointError, load_model, save_model
from ouvert.config import ConfigError, ModelConfig, preset
from ouvert.generate.decode import generate
from ouvert.model import Transformer
from ouvert.tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "Tokenizer", "Transformer",
    "generate", "load_model", "load_tokenizer", "preset", "save_model",
]
