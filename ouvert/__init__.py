"""ouvert: an open LLM stack for the Llama and DeepSeek families, in plain PyTorch.

The names below are the ones a user starts from. The rooms behind them, lowest first: config.py and
kernels/; model.py; tokenizer.py and chat.py; checkpoint/ (with quantize/ and assets.py); data.py;
generate/; serve/, train/, eval/; card.py and cli.py. docs/architecture.md draws them.
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
