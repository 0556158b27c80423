"""Generation without a server: small functions over (model, tokens, positions, cache).

Rooms:
  cache.py        Cache: the KV (or MLA latent) cache of a batch, one shared write index (model.KVCache)
  sampling.py     SamplingParams; penalties, temperature, top-k, top-p, min-p, per-row generators
  decode.py       prefill, decode_step, compiled decode, stream and generate
  speculative.py  speculative decoding with DeepSeek's MTP head or a draft model (greedy = plain greedy)
"""

from ouvert.generate.cache import Cache
from ouvert.generate.decode import decode_step, generate, prefill, stream
from ouvert.generate.sampling import SamplingParams
from ouvert.generate.speculative import speculative_generate

__all__ = ["Cache", "SamplingParams", "decode_step", "generate", "prefill", "speculative_generate", "stream"]
