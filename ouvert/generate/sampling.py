"""Turning logits into the next token: penalties, temperature, top-k, top-p, min-p; and when to stop.

The order is transformers' (penalty, temperature, top-k, top-p, min-p). Each batch row may have
its own torch.Generator, so a request's samples depend on its seed alone. `SamplingParams` is the
one description of a request's sampling that generate, speculative decoding and the server share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Temperatures below this are greedy: dividing logits by a tinier one overflows float32 to inf, and
# softmax of inf - inf is NaN; and so low a temperature samples the argmax but for near-ties anyway.
MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How each next token is chosen, and which tokens or strings end the output."""

    temperature: float = 0.0  # 0 (below MIN_TEMPERATURE) means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output (CTRL paper)
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token generated so far
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    seed: int | None = None  # None: generate draws from torch's global generator, the server picks one at random
    stop_token_ids: Sequence[int] | None = None  # None: the caller's default (see stop_set)
    stop: Sequence[str] = ()  # stop strings; generate needs a tokenizer to find them

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

    @property
    def penalised(self) -> bool:
        """Whether any penalty is on."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)

    def stop_set(self, default: Sequence[int]) -> set[int]:
        """The token ids that end the output: stop_token_ids, or the caller's default when None."""
        return set(default if self.stop_token_ids is None else self.stop_token_ids)


# ---- penalties ----------------------------------------------------------------------------------


def apply_penalties(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
                    counts: Tensor | None = None) -> Tensor:
    """logits (..., V) with the penalties of params: CTRL's repetition penalty divides the positive
    logits (multiplies the negative ones) of the tokens in `seen` (..., V) bool, prompt and output
    as transformers does; then OpenAI's presence and frequency penalties over the `counts` (..., V)
    of tokens generated so far: logit - frequency * count - presence * (count > 0)."""
    p = params.repetition_penalty
    if seen is not None and p != 1.0:
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if counts is not None:
        logits = logits - counts * params.frequency_penalty - (counts > 0).to(logits.dtype) * params.presence_penalty
    return logits


class Penalties:
    """What the penalties of params remember of B rows: the tokens each has seen (prompt and output,
    for the repetition penalty) and how often it generated each (presence and frequency). Holds
    nothing, and changes nothing, for penalties that are off."""

    def __init__(self, params: SamplingParams, prompts: Tensor, mask: Tensor | None, vocab_size: int):
        """prompts (B, T) token ids; mask (B, T), False where a prompt is padding (None: no padding)."""
        B, device = prompts.shape[0], prompts.device
        self.params = params
        self.seen: Tensor | None = None
        self.counts: Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, prompts, True if mask is None else mask)
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(B, vocab_size, device=device)

    def apply(self, logits: Tensor) -> Tensor:
        """logits (B, V) -> penalised logits (B, V)."""
        return apply_penalties(logits, self.params, self.seen, self.counts)

    def observe(self, tokens: Tensor) -> None:
        """Record each row's new token, tokens (B,)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens.view(-1, 1), True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens.view(-1, 1), torch.ones_like(self.counts[:, :1]))


# ---- sampling -----------------------------------------------------------------------------------


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


# ---- stop strings -------------------------------------------------------------------------------


class StopStrings:
    """Finds stop strings in text that arrives in pieces, in time linear in the text.

    Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest
    suffix of the text so far that is a prefix of that string. A piece of text moves each state one
    character at a time (amortized O(1) per character), so a token costs O(len(its text)) whatever
    the stop strings' length. The text that may begin a stop string (the longest such suffix, at most
    the longest stop string less one character) is held back until it cannot.
    Empty stop strings are ignored: they would end every request before its first token.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.fail = [_failure(s) for s in self.stops]
        self.state = [0] * len(self.stops)
        self.held = ""

    def push(self, new: str, final: bool = False) -> tuple[str, bool]:
        """Add new text; return the part safe to send, and whether a stop string ended the text
        (the text is then cut where the earliest stop string begins). final sends what is held."""
        text = self.held + new
        cut = None
        for k, (s, fail) in enumerate(zip(self.stops, self.fail)):
            q = self.state[k]
            for j, ch in enumerate(new):
                while q and s[q] != ch:
                    q = fail[q - 1]
                if s[q] == ch:
                    q += 1
                if q == len(s):  # s ends at new[j]
                    start = len(self.held) + j + 1 - len(s)
                    cut = start if cut is None else min(cut, start)
                    break
            self.state[k] = q
        if cut is not None:
            self.held = ""
            return text[:cut], True
        keep = 0 if final else max(self.state, default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False


def _failure(s: str) -> list[int]:
    """KMP's failure function: f[i] = length of the longest proper prefix of s[: i + 1] that is also its suffix."""
    f, q = [0] * len(s), 0
    for i in range(1, len(s)):
        while q and s[i] != s[q]:
            q = f[q - 1]
        if s[i] == s[q]:
            q += 1
        f[i] = q
    return f
