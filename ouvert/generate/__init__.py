"""Generation: caches, sampling, prefill and decode steps."""

from ouvert.generate.cache import Cache
from ouvert.generate.decode import decode_step, generate, prefill, stream
from ouvert.generate.sampling import SamplingParams

__all__ = ["Cache", "SamplingParams", "decode_step", "generate", "prefill", "stream"]
