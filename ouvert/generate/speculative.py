"""Speculative decoding: a cheap drafter proposes tokens, the target checks them all in one forward.

Two drafters:
  MTPDraft:   DeepSeek-V3's own multi-token prediction module (V3 §2.2, §5.4.3) drafts the token
              after next from the trunk's last hidden state and the next token's embedding. One
              draft per step; the trunk's next forward runs [next, draft] as two tokens.
  DraftModel: a smaller model with the same vocabulary proposes k tokens, one at a time, with its
              own cache (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023, arXiv:2302.01318).

The target runs [last token, d_1 .. d_k] in one forward, which gives its distribution at each
draft and one past the last. Greedy: keep the longest prefix of drafts equal to the target's
argmax, then the target's own token where they first differ (or after the last draft), so the
output is plain greedy decoding's, token for token. Sampling: `accept_drafts`, the standard rule,
whose tokens are distributed as the target's own (tempered and filtered) distribution. The
target's cache is rolled back over the rejected drafts; so is the draft model's.

Where this departs from the papers' setting: batch size 1 only (rows of a batch would accept
different numbers of tokens, while a Cache writes all rows at one slot); no penalties and
no stop strings (stop tokens are honoured); the MTP drafter uses the first depth only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ouvert.generate.cache import Cache
from ouvert.generate.decode import decode_step
from ouvert.generate.sampling import SamplingParams, probabilities


@dataclass
class SpeculativeOutput:
    """The new tokens and how well the drafter did."""

    tokens: list[int] = field(default_factory=list)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # of those, accepted by the target
    target_forwards: int = 0  # the prefill included, so plain decoding makes one token per forward

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(self.target_forwards, 1)


# ---- the acceptance rules --------------------------------------------------------------------------


def accept_greedy(logits: Tensor, drafts: Tensor) -> tuple[int, int]:
    """logits (k+1, V): the target's at each draft and one past the last; drafts (k,).
    Returns how many drafts agree with the target's argmax (a prefix), and the target's token after them."""
    best = logits.argmax(dim=-1)  # (k+1,)
    n = int((best[:-1] == drafts).long().cumprod(dim=0).sum())
    return n, int(best[n])


def accept_drafts(
    p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """The rejection rule of speculative sampling, for B independent runs at once.

    p (B, k+1, V): the target's probabilities at each draft and one past the last; q (B, k, V):
    the drafter's, from which drafts (B, k) were sampled. Draft i is accepted with probability
    min(1, p_i(x) / q_i(x)); at the first rejection the token is drawn from norm(max(0, p_i - q_i)),
    and when all k are accepted a bonus token is drawn from p_k. Each emitted token is then
    distributed as p. Returns the number accepted (B,) and the token after them (B,).
    """
    B, k = drafts.shape
    px = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    qx = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, k)
    u = torch.rand(B, k, generator=generator, device=p.device)
    ok = u * qx < px  # u < p/q, without dividing by q
    n = ok.long().cumprod(dim=-1).sum(dim=-1)  # (B,) length of the accepted prefix
    # At n == k there is no draft to reject: a zero q there makes the residual p_k itself.
    q = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # (B, k+1, V)
    at = n.view(B, 1, 1).expand(B, 1, p.shape[-1])
    pn, qn = p.gather(1, at).squeeze(1), q.gather(1, at).squeeze(1)  # (B, V)
    residual = (pn - qn).clamp(min=0)
    # p == q leaves no residual mass, but then nothing is rejected; keep multinomial's input valid.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pn)
    return n, torch.multinomial(residual, 1, generator=generator).squeeze(-1)


def _pick(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[int, Tensor | None]:
    """logits (V,) -> a token, and the distribution it was drawn from (None when greedy)."""
    if params.greedy:
        return int(logits.argmax()), None
    q = probabilities(logits, params)
    return int(torch.multinomial(q, 1, generator=generator)), q


# ---- drafters: propose(seq) -> drafts and their distributions; observe() what the target decided --


class MTPDraft:
    """Drafts one token with the target's first MTP module.

    The module has its own attention, so it keeps its own cache (Cache(mtp=True)), one step behind
    the trunk's: its slot i is made from the trunk's hidden state at i and token i+1, so it is
    written once token i+1 is decided and never rolled back.
    """

    def __init__(self, target, max_len: int):
        if len(target.mtp) == 0:
            raise ValueError("the model has no MTP module (num_nextn_predict_layers is 0, or the weights hold none)")
        self.model = target
        self.cache = Cache(target, 1, max_len, mtp=True)
        self.logits: Tensor | None = None  # the MTP head's logits for the token after the last decided one

    def observe(self, hidden: Tensor, next_tokens: list[int]) -> None:
        """hidden (1, T, D): the trunk's at the positions whose next tokens are now decided."""
        nxt = torch.tensor([next_tokens], device=hidden.device)
        self.logits = self.model.mtp_logits(hidden, nxt, cache=self.cache)[0][0, -1]

    def propose(self, seq: list[int], params: SamplingParams, generator) -> tuple[list[int], Tensor | None]:
        tok, q = _pick(self.logits, params, generator)
        return [tok], None if q is None else q.unsqueeze(0)


class DraftModel:
    """Drafts k tokens with a smaller model of the same vocabulary, autoregressively, with its own cache."""

    def __init__(self, draft, target, k: int, max_len: int):
        if draft.config.vocab_size != target.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                f"({target.config.vocab_size}); they must share a tokenizer"
            )
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.model, self.k = draft, k
        self.cache = Cache(draft, 1, max_len)
        self.cached: list[int] = []  # the tokens whose entries the cache holds

    def observe(self, hidden: Tensor, next_tokens: list[int]) -> None:
        pass  # the draft model needs nothing of the target's

    def propose(self, seq: list[int], params: SamplingParams, generator) -> tuple[list[int], Tensor | None]:
        # Keep the cache's longest prefix that agrees with seq (rejected drafts go), feed the rest:
        # one token, or two when all drafts were accepted (the last draft was never fed).
        n = _common_prefix(self.cached, seq[:-1])
        self.cache.rollback(len(self.cached) - n)
        self.cached = seq[:]
        device = self.model.embed_tokens.weight.device
        new = torch.tensor([seq[n:]], device=device)
        logits = self.model(new, None, self.cache, logits_at=torch.tensor([-1]))[0, -1]
        drafts, qs = [], []
        for i in range(self.k):
            tok, q = _pick(logits, params, generator)
            drafts.append(tok)
            qs.append(q)
            if i < self.k - 1:
                pos = torch.tensor([len(self.cached)], device=device)
                logits = decode_step(self.model, torch.tensor([tok], device=device), pos, self.cache)[0]
                self.cached.append(tok)
        return drafts, None if params.greedy else torch.stack(qs)


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# ---- the loop ----------------------------------------------------------------------------------------


@torch.inference_mode()
def speculative_generate(
    model,
    prompt: Sequence[int],
    max_new_tokens: int = 64,
    draft="mtp",
    params: SamplingParams | None = None,
    *,
    k: int = 4,
    on_token: Callable[[list[int]], None] | None = None,
) -> SpeculativeOutput:
    """Generate up to max_new_tokens for one prompt (a list of ids), drafting with the model's own
    MTP module (draft="mtp") or with a draft model (a Transformer of the same vocabulary) that
    proposes k tokens per step. params: greedy by default, which gives `generate`'s tokens; stop
    tokens default to the config's; no penalties or stop strings (module docstring). `on_token` is
    called with each step's new tokens, for streaming."""
    params = params or SamplingParams()
    if params.penalised or params.stop:
        raise ValueError("speculative decoding takes no penalties and no stop strings")
    prompt = prompt.tolist() if isinstance(prompt, Tensor) else list(prompt)
    if not prompt or not all(isinstance(t, int) for t in prompt):
        raise ValueError("speculative decoding takes one prompt, a non-empty list of token ids (batch size 1)")
    ctx = model.config.max_position_embeddings
    if len(prompt) + max_new_tokens > ctx:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length {ctx}"
        )
    stops = params.stop_set(model.config.stop_token_ids)
    device = model.embed_tokens.weight.device
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    # The target writes up to k drafts past the last kept token before rolling back.
    max_len = len(prompt) + max_new_tokens + k + 1
    if isinstance(draft, str):
        if draft != "mtp":
            raise ValueError(f"draft must be 'mtp' or a draft model, got {draft!r}")
        drafter = MTPDraft(model, max_len)
    else:
        drafter = DraftModel(draft, model, k, max_len)

    cache = Cache(model, 1, max_len)
    logits, hidden = model(torch.tensor([prompt], device=device), None, cache, logits_at=torch.tensor([-1]),
                           return_hidden=True)
    first, _ = _pick(logits[0, -1], params, generator)
    out = SpeculativeOutput(target_forwards=1)
    seq, new = prompt + [first], [first]
    drafter.observe(hidden, seq[1:])
    if on_token is not None:
        on_token([first])
    while len(new) < max_new_tokens and first not in stops:  # later stops end it below
        drafts, q = drafter.propose(seq, params, generator)
        x = torch.tensor([seq[-1:] + drafts], device=device)
        logits, hidden = model(x, None, cache, return_hidden=True)  # (1, k+1, V): at the last token and each draft
        if params.greedy:
            n, nxt = accept_greedy(logits[0], x[0, 1:])
        else:
            n_, nxt_ = accept_drafts(probabilities(logits, params), q.unsqueeze(0), x[:, 1:], generator)
            n, nxt = int(n_), int(nxt_)
        cache.rollback(len(drafts) - n)
        decided = drafts[:n] + [nxt]
        drafter.observe(hidden[:, : n + 1], decided)
        out.target_forwards += 1
        out.drafted += len(drafts)
        out.accepted += n
        seq += decided
        step = decided[: max_new_tokens - len(new)]
        stop_at = next((i for i, t in enumerate(step) if t in stops), None)
        if stop_at is not None:
            step = step[: stop_at + 1]  # the stop token is kept, as `generate` does
        new += step
        if on_token is not None:
            on_token(step)
        if stop_at is not None:
            break
    out.tokens = new
    return out
