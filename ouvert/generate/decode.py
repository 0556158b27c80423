"""Generation as small functions over (model, tokens, positions, cache).

`prefill` runs the prompts (left-padded to one length) and fills the cache; `decode_step` runs
one new token per row. `stream` yields the tokens of each step as they come; `generate` collects
them. Stop tokens end a row (and are kept in its output, as transformers does); stop strings end
it once the decoded text contains them (found as the server finds them, sampling.StopStrings).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from ouvert import kernels
from ouvert.generate.cache import Cache
from ouvert.generate.sampling import Penalties, SamplingParams, StopStrings, sample
from ouvert.model import KVCache
from ouvert.quantize import BLOCK_KERNEL_MAX_ROWS, float_rows_view


def pad_left(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> tokens (B, T) left-padded, and the mask (B, T) of real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, T - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, T - len(p) :] = True
    return tokens, mask


@torch.inference_mode()
def prefill(model, tokens: Tensor, mask: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """Run the prompts; returns the last position's logits (B, V) and each row's next position (B,)."""
    positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
    pad = None if bool(mask.all()) else mask
    logits = model(tokens, positions, cache, pad, logits_at=torch.tensor([-1]))  # left-padded: all end at T - 1
    return logits[:, -1], mask.sum(dim=1)


@torch.inference_mode()
def decode_step(model, token: Tensor, position: Tensor, cache: KVCache) -> Tensor:
    """One token per row: token, position (B,) -> logits (B, V)."""
    return model(token.unsqueeze(1), position.unsqueeze(1), cache)[:, -1]


_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_model(model, batch: int):
    """The model decode steps of `batch` rows run: float_rows_view(model) on a CPU where ouvert's
    kernels are built (the same weights, its products on the kernels: on one row they read float32
    and bfloat16 weights about twice as fast as torch's matrix-vector product), else the model.
    Made once per model and its weights: a model whose tensors were replaced gets a new view."""
    if batch > BLOCK_KERNEL_MAX_ROWS or not kernels.available() or model.embed_tokens.weight.device.type != "cpu":
        return model
    params = [t.data for t in model.parameters()]
    if any(type(t) is not torch.Tensor for t in params):  # sharded (DTensor, FSDP): torch's products
        return model
    weights = tuple(t.data_ptr() for t in params)
    entry = _views.get(model)
    if entry is None or entry[0] != weights:
        entry = _views[model] = (weights, float_rows_view(model) or model)
    return entry[1]


_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_models_compiled = [0]  # in this process, ever: dynamo's cache outlives the WeakKeyDictionary's entries


def compiled_decode_step(model) -> Callable[[Tensor, Tensor, KVCache], Tensor]:
    """decode_step through torch.compile: the model's forward is compiled once per model (dynamic
    in batch size and cache length, so a longer context or a new prompt does not recompile), the
    first call paying for it. Prefill stays eager: it runs once per prompt, in large matmuls that
    compiling does not speed up. If compiling fails (no C++ compiler, an op inductor cannot
    lower), warn once and decode eagerly: the fall-back gives the same tokens, only slower."""
    entry = _compiled.get(model)
    if entry is None:
        # dynamo keeps recompile_limit (8) compiled versions of one function, Transformer.forward
        # here, and past it runs the function eagerly with only a logged warning. Models of another
        # shape or module types (int8, int4) are new versions, so a process that compiles several
        # (a benchmark, a server that loads more than one) would silently lose the fast path:
        # raise the limit with each model, two versions apiece.
        _models_compiled[0] += 1
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 8 + 2 * _models_compiled[0])
        entry = _compiled[model] = {"fn": torch.compile(model, dynamic=True), "ok": True}

    def step(token: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        if entry["ok"]:
            with torch.inference_mode():  # inputs always inference tensors: one set of guards, no recompile
                token, position = token.clone(), position.clone()
            try:
                return decode_step(entry["fn"], token, position, cache)
            except Exception as e:  # raised while compiling, before this step wrote to the cache
                warnings.warn(f"torch.compile of the decode step failed, decoding eagerly: {type(e).__name__}: {e}",
                              stacklevel=2)
                entry["ok"] = False
        return decode_step(model, token, position, cache)

    return step


def _as_batch(prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    if len(prompts) and isinstance(prompts[0], int):
        return [list(prompts)]
    return [list(p) for p in prompts]


def stream(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int = 64,
    params: SamplingParams | None = None,
    *,
    tokenizer=None,
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per step, one new token per prompt (None for rows that have already stopped).
    params: greedy by default; stop tokens default to the config's eos ids; stop strings need the
    tokenizer. A seed gives row i its own generator seeded seed + i. compile: decode through
    compiled_decode_step."""
    params = params or SamplingParams()
    batch = _as_batch(prompts)
    B = len(batch)
    cfg = model.config
    ctx = cfg.max_position_embeddings
    longest = max(len(p) for p in batch)
    if longest + max_new_tokens > ctx:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context length {ctx}"
        )
    stop = params.stop
    if stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    stops = params.stop_set(cfg.stop_token_ids)
    device = model.embed_tokens.weight.device
    generators = None
    if params.seed is not None and not params.greedy:
        generators = [torch.Generator(device=device).manual_seed(params.seed + i) for i in range(B)]

    tokens, mask = pad_left(batch)
    tokens, mask = tokens.to(device), mask.to(device)
    cache = Cache(model, B, longest + max_new_tokens)
    stepper = decode_model(model, B)
    decode = compiled_decode_step(stepper) if compile else functools.partial(decode_step, stepper)
    logits, position = prefill(model, tokens, mask, cache)
    penalties = Penalties(params, tokens, mask, logits.shape[-1])
    decoders = [tokenizer.stream() for _ in range(B)] if stop else None
    found = [StopStrings(list(stop)) for _ in range(B)] if stop else None  # the engine's matcher
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample(penalties.apply(logits), params, generators)
        ids = nxt.tolist()
        out: list[int | None] = []
        for i, t in enumerate(ids):
            if done[i]:
                out.append(None)
                continue
            out.append(t)
            if t in stops:
                done[i] = True
            elif decoders is not None:
                done[i] = found[i].push(decoders[i].push(t))[1]
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        penalties.observe(nxt)
        logits = decode(nxt, position, cache)
        position = position + 1


def generate(
    model,
    prompts: Sequence[int] | Sequence[Sequence[int]] | Tensor,
    max_new_tokens: int = 64,
    params: SamplingParams | None = None,
    *,
    tokenizer=None,
    on_token: Callable[[list[int | None]], None] | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Generate up to max_new_tokens for one prompt (a list of ids) or a batch of prompts of any
    lengths, sampled as params says (greedy by default; see stream). Returns the new ids, one list
    per prompt. `on_token` is called with each step's tokens, for streaming. compile: decode through
    torch.compile (compiled_decode_step), same tokens in float32."""
    outs: list[list[int]] = [[] for _ in _as_batch(prompts)]
    for step in stream(model, prompts, max_new_tokens, params, tokenizer=tokenizer, compile=compile):
        for o, t in zip(outs, step):
            if t is not None:
                o.append(t)
        if on_token is not None:
            on_token(step)
    return outs
