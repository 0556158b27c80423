"""What the evaluations ask of a model: log-likelihoods of continuations, rolling log-likelihoods of
long texts, and greedy generation. Shared by `ouvert eval` and the lm-eval adapter, so the two agree.

Tokenisation follows lm-eval's causal models (lm_eval.api.model.TemplateLM._encode_pair): trailing
spaces of the context move to the continuation, the context + continuation is encoded whole and
split at the length of the context's own encoding. We depart from lm-eval's HF default in one
place: every sequence starts with the prefix token (BOS, or EOS when the tokenizer has no BOS), as
with lm-eval's `add_bos_token=True`. Llama checkpoints were trained with BOS in front, and models
trained here see EOS before each document, so either is the natural start of a text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ouvert.generate.decode import generate
from ouvert.generate.sampling import SamplingParams
from ouvert.tokenizer import stop_ids


def prefix_id(tok) -> int:
    """The token every scored sequence starts with: BOS, else EOS (what ends a document in our shards)."""
    t = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if t is None:
        raise ValueError(f"{tok.source or 'tokenizer'}: has neither a BOS nor an EOS token to start a sequence with")
    return t


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-eval splits them; the context starts with the prefix."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False) if context else []
    return [prefix_id(tok), *ctx], whole[len(ctx):]


def max_length(model, limit: int | None = None) -> int:
    """Tokens per forward pass: the model's context, capped (a 128k context does not fit a batch)."""
    ctx = model.config.max_position_embeddings
    return min(ctx, limit) if limit else min(ctx, 2048)


@torch.inference_mode()
def score(model, requests: Sequence[tuple[Sequence[int], int]], batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each (ids, n): the sum of log p(ids[t] | ids[:t]) over the last n tokens, and whether each of
    them was the argmax. Sequences are right-padded: with causal attention, padding after a token
    cannot change its logits, so no mask is needed. Longest first, so a batch holds similar lengths."""
    device = model.embed_tokens.weight.device
    out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        lens = [len(requests[i][0]) - 1 for i in rows]  # the input is ids[:-1]
        tokens = torch.zeros(len(rows), max(lens), dtype=torch.long)
        for r, i in enumerate(rows):
            tokens[r, : lens[r]] = torch.as_tensor(np.asarray(requests[i][0][:-1], dtype=np.int64))
        logits = model(tokens.to(device))  # (B, T, V)
        sums, greedy = [], []
        for r, i in enumerate(rows):
            ids, n = requests[i]
            L = lens[r]
            lp = F.log_softmax(logits[r, L - n : L].float(), dim=-1)  # (n, V): predicts ids[-n:]
            target = torch.as_tensor(np.asarray(ids[len(ids) - n :], dtype=np.int64), device=lp.device)
            sums.append(lp.gather(1, target[:, None]).sum())
            greedy.append((lp.argmax(-1) == target).all())
        # one device-to-host copy per batch, not two per row
        for i, s, g in zip(rows, torch.stack(sums).tolist(), torch.stack(greedy).tolist()):
            out[i] = (s, bool(g))
    return out


def loglikelihoods(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                   max_len: int | None = None) -> list[tuple[float, bool]]:
    """log p(continuation | context) and is-greedy for (context, continuation) strings. A context too long
    for the window loses its left end (as lm-eval does); the continuation must fit."""
    L = max_length(model, max_len)
    reqs = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tok, context, continuation)
        if len(cont) > L:
            raise ValueError(f"a continuation of {len(cont)} tokens does not fit the {L}-token window")
        reqs.append(((ctx + cont)[-(L + 1):], len(cont)))
    return score(model, reqs, batch_size)


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Strided windows over a sequence s of n + 1 tokens (a prefix, then the n tokens to score).

    Returns (start, end, new): feed s[start:end] (at most max_len tokens) and score the last `new`
    of its predictions, targets s[end - new + 1 : end + 1]. Every target is scored exactly once, with at
    least max_len - stride tokens of context after the first window; stride == max_len gives
    lm-eval's disjoint rolling windows (utils.get_rolling_token_windows with context_len 1)."""
    if not 0 < stride <= max_len:
        raise ValueError(f"stride must be in [1, {max_len}], got {stride}")
    out, prev, end = [], 0, min(max_len, n)
    while n:
        out.append((max(0, end - max_len), end, end - prev))
        if end == n:
            break
        prev, end = end, min(end + stride, n)
    return out


def rolling_loglikelihood(model, token_lists: Sequence[Sequence[int] | np.ndarray], prefix: int, batch_size: int = 8,
                          max_len: int | None = None, stride: int | None = None) -> list[float]:
    """Total log-likelihood of each token list, every token predicted once (the first from `prefix`),
    with windows of the model's context (see `windows`); all windows of all lists are batched together."""
    L = max_length(model, max_len)
    reqs, owner = [], []
    for k, ids in enumerate(token_lists):
        s = np.concatenate([[prefix], np.asarray(ids, dtype=np.int64)])  # windows are views of it, not copies
        for start, end, new in windows(len(ids), L, stride or L):
            reqs.append((s[start : end + 1], new))
            owner.append(k)
    totals = [0.0] * len(token_lists)
    for k, (lp, _) in zip(owner, score(model, reqs, batch_size)):
        totals[k] += lp
    return totals


def greedy_generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 64, stop: Sequence[str] = (),
                    batch_size: int = 8, temperature: float = 0.0, seed: int | None = None) -> list[str]:
    """Continue each prompt (greedy unless temperature > 0) until a stop token, a stop string or
    max_new_tokens; returns the new text, cut before the first stop string. Prompts are batched by
    length and left-truncated so that prompt + max_new_tokens fits the context."""
    room = model.config.max_position_embeddings - max_new_tokens
    if room < 2:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context")
    ids = [[prefix_id(tok), *tok.encode(p, add_special_tokens=False)][-room:] for p in prompts]
    stops = stop_ids(tok, model.config)
    params = SamplingParams(temperature=temperature, seed=seed, stop_token_ids=stops, stop=tuple(stop))
    out = [""] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        new = generate(model, [ids[i] for i in rows], max_new_tokens, params, tokenizer=tok)
        for i, n in zip(rows, new):
            # Decode prompt + reply and take the difference: decoding the reply alone can drop a leading
            # space (SentencePiece) or split a character that straddles the boundary.
            head = tok.decode(ids[i], skip_special_tokens=True)
            text = tok.decode(ids[i] + [t for t in n if t not in stops], skip_special_tokens=True)[len(head):]
            out[i] = cut_at_stop(text, stop)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = min((j for s in stop if s and (j := text.find(s)) >= 0), default=len(text))
    return text[:cut]
