"""Generation: caches, sampling, prefill and decode steps."""

from ouvert.generate.cache import Cache
from ouvert.generate.decode import decode_step, generate, prefill, stream
from ouvert.generate.sampling import SamplingParams
from ouvert.generate.speculative import speculative_generate

__all__ = ["Cache", "SamplingParams", "decode_step", "generate", "prefill", "speculative_generate", "stream"]
