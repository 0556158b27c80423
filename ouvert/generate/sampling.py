"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p.

The order is transformers' (penalty, temperature, top-k, top-p, min-p). Each batch row may have
its own torch.Generator, so a request's samples depend on its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Temperatures below this are greedy: dividing logits by a tinier one overflows float32 to inf, and
# softmax of inf - inf is NaN; and so low a temperature samples the argmax but for near-ties anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 (below MIN_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL paper)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """Divide positive logits (multiply negative ones) of tokens in `seen` (B, V) bool by penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> Tensor:
    """Set to -inf every logit outside the top-k, the top-p nucleus, or below min_p * max prob."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - top_p  # the low tail whose mass is at most 1 - top_p
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits (..., V) -> the distribution `sample` draws from (temperature, top-k/p, min-p), float32."""
    return filter_logits(logits.float() / params.temperature, params.top_k, params.top_p, params.min_p).softmax(-1)


def sample(logits: Tensor, params: SamplingParams, generators: list[torch.Generator] | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i : i + 1], 1, generator=g) for i, g in enumerate(generators)]).view(-1)
