"""ouvert: an open LLM stack for the Llama and DeepSeek families, in plain PyTorch.

The names below are the ones a user starts from; docs/architecture.md draws the rooms behind them.
"""

from ouvert.checkpoint.base import CheckpointError
from ouvert.checkpoint.io import load_model, load_tokenizer, save_model
from ouvert.config import ConfigError, ModelConfig, preset
from ouvert.generate.decode import generate
from ouvert.generate.sampling import SamplingParams
from ouvert.model import Transformer
from ouvert.tokenizer import Tokenizer
from ouvert.version import __version__

__all__ = [
    "CheckpointError", "ConfigError", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer", "__version__",
    "generate", "load_model", "load_tokenizer", "preset", "save_model",
]
