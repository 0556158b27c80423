"""The serving engine: continuous batching over one model, with a cache slot per request.

A background thread runs steps. Each step
  1. drops cancelled requests and admits waiting ones into free slots, reusing the longest
     cached prompt prefix any slot holds (copied from a busy slot, or in place from a free one);
  2. prefills a chunk or two of the admitted prompts, oldest first (so a long prompt never
     stalls running streams for more than `prefill_chunks` chunks at a time);
  3. decodes one token for every request past its prompt, in one forward over all slots.
A request joins the running batch at the next step and leaves it when it finishes.

Batch invariance: a request's tokens with a given seed do not depend on what else runs. On CPU a
torch matmul's rounding depends on its shape (a 1-row and an 8-row matmul round a row differently),
so every forward has a shape that does not depend on the other requests: a decode step runs all
`max_batch` slots (idle rows are padding that writes to a scratch column), a prefill chunk
is always `chunk` tokens of one slot (padded at the end), chunks start at multiples of `chunk`,
and a prefix is reused only in whole chunks, so a reused prefix holds exactly the numbers the
request would have computed itself. The attention length of a decode step is rounded up to a
multiple of `chunk` over the longest running request; scaled_dot_product_attention gives each
row the same result whatever the extra masked length (tests/test_serve_engine.py checks both).
Mixture-of-experts layers group the batch's tokens by expert, so how many rows an expert's matmul
has depends on the other requests: where torch multiplies, the engine sets each Experts' `row_tile`,
and experts then run in matmuls of exactly ROW_TILE rows. Each request samples with its own
torch.Generator.

A model whose every matmul runs on ouvert's kernels needs no padding: the kernels sum each row in
a fixed order whatever the other rows (ouvert/kernels), so a decode step runs only slots
[0, highest busy slot], and new requests take the lowest free slot. One stream then costs one row,
not `max_batch`. GGUF blocks run there as they are (a .gguf file, `ouvert quantize --scheme ...`);
a dense float model is served through a view of itself whose linear layers are the kernels over
their own float rows (quantize.float_rows_view: no weight is copied; sums in the kernels' order,
so logits differ from generate()'s by float rounding). That covers DeepSeek's parts too: MLA's
absorbed heads, the routers, and the routed experts, which then need no tiles. int8 / int4 models
and the PyTorch twin keep the padding.

This is no second generate: it calls the model's forward with its own cache (serve/cache.py),
samples with generate.sampling, decodes text with the tokenizer's StreamDecoder.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ouvert import kernels
from ouvert.generate.sampling import Penalties, SamplingParams, StopStrings, sample
from ouvert.model import Experts, MLAttention, Router, attention_mask
from ouvert.quantize import (
    BLOCK_KERNEL_MAX_ROWS,
    BlockExperts,
    BlockLinear,
    BlockMLAttention,
    BlockRouter,
    float_rows_view,
)
from ouvert.serve.cache import SlotCache
from ouvert.tokenizer import stop_ids

if TYPE_CHECKING:  # a type only: the engine runs the grammars it is handed without loading llguidance
    from ouvert.serve.grammar import Grammar


ROW_TILE = 8  # rows per expert matmul: in a decode step most experts get fewer tokens than this


class QueueFull(Exception):
    """The waiting queue is at max_queue."""


class InvalidRequest(ValueError):
    """A request the engine can never serve. `param` names the Request field at fault ("n" when more
    requests come at once than the queue holds), for a caller that answers in its own fields' names."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextTooLong(InvalidRequest):
    """The prompt, or the prompt and max_tokens, do not fit in a slot's context_length. param is
    "prompt" when the prompt alone fills it, else "max_tokens"; `explain` words it with the caller's
    names for those two fields."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int):
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        super().__init__(self.explain(), "prompt" if prompt_tokens >= context_length else "max_tokens")

    def explain(self, prompt: str = "prompt", max_tokens: str = "max_tokens") -> str:
        ctx, n = self.context_length, self.prompt_tokens
        if n >= ctx:
            return f"This model's maximum context length is {ctx} tokens; the {prompt} take {n} tokens."
        return (f"This model's maximum context length is {ctx} tokens; you asked for {n + self.max_tokens} "
                f"({n} in the {prompt}, {self.max_tokens} in the completion). Lower {max_tokens} or shorten "
                f"the {prompt}.")


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


@dataclass
class Request:
    """One completion to generate. params: how to sample and when to stop, by default OpenAI's
    (temperature 1; stop token ids None are the engine's). logprobs None is off, k >= 0 gives the
    chosen token's log-probability and the k most likely."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    grammar: Grammar | None = None
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]


@dataclass
class Output:
    """What a request produced since its last Output. Text is final: stop strings are cut off and
    text that may begin one is held back until it cannot."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class Handle:
    """The caller's side of a request: `cancel()` frees its slot at the next step."""

    _ids = itertools.count()

    def __init__(self, on_output: Callable[[Output], None]):
        self.id = next(self._ids)
        self.on_output = on_output
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def _on_cpu(model) -> bool:
    return model.embed_tokens.weight.device.type == "cpu"


def rows_are_invariant(model, max_batch: int) -> bool:
    """Whether a decode step of up to max_batch rows gives each row the same numbers whatever the
    other rows: every product runs on ouvert's kernels, which take up to BLOCK_KERNEL_MAX_ROWS rows
    (linear layers and the head as BlockLinear; routed experts, routers and MLA's absorbed decode as
    their block subclasses, which float_rows_view puts in)."""
    on_kernels = (BlockLinear, BlockExperts, BlockRouter, BlockMLAttention)
    kinds = (Experts, Router, MLAttention)
    products = [m for m in model.modules() if isinstance(m, kinds) or hasattr(m, "in_features")]
    return (max_batch <= BLOCK_KERNEL_MAX_ROWS and bool(kernels.available()) and bool(products)
            and all(isinstance(m, on_kernels) for m in products))


class Metrics:
    """Counters the server exports in Prometheus text (api.py renders them)."""

    TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

    def __init__(self):
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.generation_tokens = 0
        self.prefix_cache_hits = self.prefix_cache_tokens = 0
        self.rejected = 0
        self.ttft_counts = [0] * (len(self.TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.decode_steps = self.decode_rows = 0
        self.decode_batch_rows = 0  # rows computed, padding included
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_sum += seconds
        i = next((i for i, b in enumerate(self.TTFT_BUCKETS) if seconds <= b), len(self.TTFT_BUCKETS))
        self.ttft_counts[i] += 1

    def tokens(self, n: int) -> None:
        self.generation_tokens += n
        now = time.monotonic()
        self._recent.append((now, n))
        while self._recent and self._recent[0][0] < now - 10:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last 10 seconds."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - 10]
        if not recent:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1.0)


class _Seq:
    """A request in flight."""

    def __init__(self, req: Request, handle: Handle, engine: Engine):
        self.req, self.handle = req, handle
        self.tokens = list(req.prompt)  # prompt, then generated tokens
        self.n_prompt = len(req.prompt)
        self.slot: int | None = None
        self.pos = 0  # cache entries written (positions 0..pos-1)
        self.cached = 0  # prompt tokens taken from the prefix cache
        self.generated = 0
        self.next_token: int | None = None  # sampled, not yet in the cache
        self.params = params = req.params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        self.generator = torch.Generator(device=engine.device).manual_seed(seed)
        self.stop_ids = params.stop_set(engine.stop_token_ids)
        self.penalties = None
        if params.penalised:
            prompt = torch.tensor([req.prompt], device=engine.device)
            self.penalties = Penalties(params, prompt, None, engine.vocab_size)
        self.bias = None
        if req.logit_bias:
            self.bias = torch.zeros(engine.vocab_size, device=engine.device)
            for t, b in req.logit_bias.items():
                self.bias[t] = b
        self.constraint = req.grammar.new() if req.grammar is not None else None
        self.decoder = engine.tokenizer.stream(skip_special_tokens=True)
        self.stops = StopStrings(list(params.stop))  # holds decoded text not sent yet (it may begin a stop string)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None

    @property
    def decoding(self) -> bool:
        return self.next_token is not None


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class Engine:
    """Continuous batching over `max_batch` cache slots of `context_length` tokens each.

    max_len:       tokens per slot (prompt + completion); default the model's context length.
    cache_memory:  bytes the slot pool may take; the slot length shrinks to fit (a pool sized by
                   memory). Default: no limit beyond max_len.
    chunk:         prefill chunk, also the granularity of prefix reuse and of attention lengths.
    prefill_chunks: chunks prefilled per step, before its decode: more gives new requests their
                   first token sooner, fewer keeps the running streams' pace steadier.
    max_queue:     requests that may wait for a slot; one more raises QueueFull (HTTP 429).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_len: int | None = None,
        chunk: int = 64,
        prefill_chunks: int = 2,
        max_queue: int = 64,
        cache_memory: int | None = None,
        stop_token_ids: list[int] | None = None,
    ):
        self.tokenizer = tokenizer
        # a float dense model is served through ouvert's kernels over its own float rows (no copy), so
        # that decode steps need no padding (module docstring)
        view = float_rows_view(model) if max_batch <= BLOCK_KERNEL_MAX_ROWS and kernels.available() else None
        self.model = model = (view if view is not None and _on_cpu(model) else model).eval()
        for m in model.modules():
            if isinstance(m, Experts):
                m.row_tile = ROW_TILE  # batch invariance for MoE where torch multiplies (module docstring)
        cfg = model.config
        self.device = model.embed_tokens.weight.device
        self.vocab_size = cfg.vocab_size
        self.max_batch, self.chunk, self.max_queue = max_batch, chunk, max_queue
        self.live_rows_only = rows_are_invariant(model, max_batch)  # no padding of decode steps (docstring)
        self.prefill_chunks = prefill_chunks
        length = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        per_token = SlotCache.bytes_per_token(model)
        if cache_memory is not None:
            length = min(length, cache_memory // (per_token * max_batch))
        if length < chunk:
            raise ValueError(
                f"a cache pool of {max_batch} slots leaves {length} tokens per slot (fewer than one chunk of "
                f"{chunk}); lower max_batch or raise the cache memory"
            )
        self.context_length = length
        self.cache = SlotCache(model, max_batch, _round_up(length, chunk))
        self.stop_token_ids = stop_ids(tokenizer, model.config) if stop_token_ids is None else stop_token_ids
        self.window = cfg.sliding_window
        self.pad_id = tokenizer.pad_token_id or 0

        self.slots: list[_Seq | None] = [None] * max_batch
        self.slot_tokens: list[list[int]] = [[] for _ in range(max_batch)]  # prefix-reusable tokens per slot
        self.slot_used = [0.0] * max_batch
        self.prefilling: deque[_Seq] = deque()
        self.waiting: deque[_Seq] = deque()
        self.metrics = Metrics()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- the caller's side -------------------------------------------------------------------

    def submit(self, req: Request, on_output: Callable[[Output], None]) -> Handle:
        """Queue a request; on_output is called from the engine thread with each Output."""
        return self.submit_many([req], [on_output])[0]

    def submit_many(self, reqs: list[Request], on_outputs: list[Callable[[Output], None]]) -> list[Handle]:
        """Queue requests all at once or none: QueueFull when the queue has no room for all of them now,
        InvalidRequest when it never could (more of them than max_queue) or a request is invalid."""
        if len(reqs) > self.max_queue:
            raise InvalidRequest(f"This request asks for {len(reqs)} completions; this server queues at most "
                                 f"{self.max_queue}.", "n")
        for req in reqs:
            self._check(req)
        handles = [Handle(f) for f in on_outputs]
        seqs = [_Seq(r, h, self) for r, h in zip(reqs, handles)]
        with self._cond:
            if len(self.waiting) + len(seqs) > self.max_queue:
                self.metrics.rejected += 1
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            self.waiting.extend(seqs)
            self._cond.notify()
        return handles

    def _check(self, req: Request) -> None:
        """Raise InvalidRequest, naming the field, if the engine can never serve req: the one place a
        request's fields are checked against the model and the cache (the API relies on it)."""
        if not req.prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if len(req.prompt) + req.max_tokens > self.context_length:
            raise ContextTooLong(len(req.prompt), req.max_tokens, self.context_length)
        if req.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", "max_tokens")
        if max(req.prompt) >= self.vocab_size or min(req.prompt) < 0:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size}) (the model's vocabulary)",
                                 "prompt")
        if req.logit_bias and any(not 0 <= t < self.vocab_size for t in req.logit_bias):
            raise InvalidRequest(f"logit_bias: token ids must be in [0, {self.vocab_size})", "logit_bias")
        if req.params.seed is not None and not 0 <= req.params.seed <= SEED_MAX:
            raise InvalidRequest(f"seed must be in [0, {SEED_MAX}], got {req.params.seed}", "seed")

    def start(self) -> None:
        """Step the engine on a thread of its own until stop()."""
        self._stop = False
        self._thread = threading.Thread(target=self.run, name="ouvert-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Make run() return after its step in progress (and join the engine's thread, if start() made one).
        Safe to call from a signal handler."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def run(self) -> None:
        """Step whenever there is work, on the calling thread, until stop(). `ouvert serve` runs it on
        the main thread (the one whose OpenMP workers torch's ops already use; see serve/cli.py)."""
        self._stop = False
        while True:
            with self._cond:
                while not self._stop and not self.waiting and not self.running and not self.slots_cancelled():
                    self._cond.wait(timeout=0.5)  # a timeout, so that signals reach a main-thread loop
                if self._stop:
                    return
            try:
                self.step()
            except Exception:
                traceback.print_exc(file=sys.stderr)
                self.cache.abort()
                for seq in [s for s in self.slots if s is not None]:
                    self._finish(seq, "error")

    def slots_cancelled(self) -> bool:
        return any(s is not None and s.handle.cancelled for s in self.slots)

    # ---- one step -----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, prefill up to prefill_chunks chunks, decode one token for every running request.
        Returns whether there was anything to do."""
        self._reap()
        self._admit()
        worked = False
        for _ in range(self.prefill_chunks):
            if not self.prefilling:
                break
            self._prefill_chunk(self.prefilling[0])
            worked = True
        if any(s is not None and s.decoding for s in self.slots):
            self._decode()
            worked = True
        return worked

    def _reap(self) -> None:
        with self._cond:
            for seq in [s for s in self.waiting if s.handle.cancelled]:
                self.waiting.remove(seq)
                self._count("cancelled")
        for seq in self.slots:
            if seq is not None and seq.handle.cancelled:
                self._finish(seq, "cancelled")

    def _admit(self) -> None:
        while None in self.slots:
            with self._cond:
                if not self.waiting:
                    return
                seq = self.waiting.popleft()
            self._place(seq)
            self.prefilling.append(seq)
            self.metrics.prompt_tokens += seq.n_prompt

    def _place(self, seq: _Seq) -> None:
        """Give seq a free slot, with the longest whole-chunk prompt prefix any slot already holds."""
        prompt, c = seq.tokens[: seq.n_prompt], self.chunk
        best, src = 0, None
        for s, held in enumerate(self.slot_tokens):
            m = 0
            for a, b in zip(held, prompt):
                if a != b:
                    break
                m += 1
            reuse = min(m, len(prompt) - 1) // c * c  # keep at least one token to compute
            if reuse > best or (reuse == best and reuse and self.slots[s] is None):
                best, src = reuse, s
        free = [s for s in range(self.max_batch) if self.slots[s] is None]
        if best and self.slots[src] is None:
            slot = src  # a free slot holds the prefix: continue there
        else:
            # the lowest free slot keeps live-rows-only decode steps short; else keep cached prefixes longest
            slot = min(free) if self.live_rows_only else min(
                free, key=lambda s: (len(self.slot_tokens[s]) > 0, self.slot_used[s]))
            if best:
                self.cache.copy_prefix(src, slot, best)
        self.cache.lens[slot] = best
        self.slot_tokens[slot] = prompt[:best]
        self.slots[slot] = seq
        seq.slot, seq.pos, seq.cached = slot, best, best
        if best:
            self.metrics.prefix_cache_hits += 1
            self.metrics.prefix_cache_tokens += best

    def _prefill_chunk(self, seq: _Seq) -> None:
        c, P = self.chunk, seq.pos
        real = seq.tokens[P : min(P + c, seq.n_prompt)]
        n = len(real)
        tokens = torch.full((1, c), self.pad_id, dtype=torch.long, device=self.device)
        tokens[0, :n] = torch.tensor(real, device=self.device)
        pos = torch.arange(P, P + c, device=self.device).unsqueeze(0)  # (1, c)
        self.cache.plan(seq.slot, seq.slot + 1, pos, attention_mask(pos, P + c, None, self.window), [n])
        logits = self.model(tokens, pos, self.cache, logits_at=torch.tensor([n - 1]))  # (1, 1, V): the last real token
        seq.pos += n
        self.slot_tokens[seq.slot] = seq.tokens[: seq.pos]
        if seq.pos == seq.n_prompt:
            self.prefilling.popleft()
            self._next_or_fail(seq, logits[0, 0])

    def _decode(self) -> None:
        rows = [(b, s) for b, s in enumerate(self.slots) if s is not None and s.decoding]
        invariant = self.live_rows_only and kernels.isa() != "twin"  # the twin is torch's matmul
        B = rows[-1][0] + 1 if invariant else self.max_batch
        tokens = torch.full((B, 1), self.pad_id, dtype=torch.long)
        write = torch.full((B, 1), self.cache.scratch, dtype=torch.long)
        for b, s in rows:
            tokens[b, 0], write[b, 0] = s.next_token, s.pos
        S = min(_round_up(max(s.pos for _, s in rows) + 1, self.chunk), self.cache.length)
        active = torch.zeros(B, dtype=torch.bool)
        active[[b for b, _ in rows]] = True
        positions = torch.where(active.unsqueeze(1), write, 0)
        mask = attention_mask(positions.to(self.device), S, None, self.window)  # (B, 1, 1, S)
        mask[~active.to(self.device), 0, 0] = torch.arange(S, device=self.device) == 0  # idle rows see index 0
        self.cache.plan(0, B, write.to(self.device), mask, active.long().tolist())
        logits = self.model(tokens.to(self.device), positions.to(self.device), self.cache)[:, 0]
        self.metrics.decode_steps += 1
        self.metrics.decode_rows += len(rows)
        self.metrics.decode_batch_rows += B
        for b, s in rows:
            s.pos += 1
            self._next_or_fail(s, logits[b])

    # ---- sampling and output -------------------------------------------------------------------

    def _next_or_fail(self, seq: _Seq, logits: Tensor) -> None:
        """_next, where a failure ends this request alone (with finish_reason "error"), not the batch."""
        try:
            self._next(seq, logits)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if self.slots[seq.slot] is seq:
                self._finish(seq, "error", flush=False)

    def _next(self, seq: _Seq, logits: Tensor) -> None:
        """Choose seq's next token from its logits (V,), and send what it adds."""
        req = seq.req
        x = logits.float()
        lp = torch.log_softmax(x, dim=-1) if req.logprobs is not None else None
        if seq.bias is not None:
            x = x + seq.bias
        if seq.penalties is not None:
            x = seq.penalties.apply(x.unsqueeze(0))[0]
        if req.ignore_eos and seq.constraint is None:  # a grammar decides itself when the end may come
            x[list(seq.stop_ids)] = float("-inf")
        token = None
        if seq.constraint is not None:
            token = seq.constraint.choose(req.max_tokens - seq.generated)  # set when the budget says close now
            if token is None:
                x = x.masked_fill(~seq.constraint.allowed(), float("-inf"))
        if token is None:
            token = int(sample(x.unsqueeze(0), seq.params, [seq.generator])[0])
        seq.generated += 1
        self.metrics.tokens(1)
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
            self.metrics.observe_ttft(seq.t_first - seq.t_submit)

        if token in seq.stop_ids and not req.ignore_eos:
            self._finish(seq, "stop")
            return
        entry = None
        if lp is not None:
            top = []
            if req.logprobs:
                v, i = lp.topk(req.logprobs)
                top = [(t, self.tokenizer.decode([t]), float(p)) for t, p in zip(i.tolist(), v.tolist())]
            entry = TokenLogprob(token, self.tokenizer.decode([token]), float(lp[token]), top)
        seq.tokens.append(token)
        seq.next_token = token
        if seq.penalties is not None:
            seq.penalties.observe(torch.tensor([token], device=self.device))
        if seq.constraint is not None:
            seq.constraint.accept(token)
        text, stopped = self._text(seq, seq.decoder.push(token))
        out = Output(text, [token], [entry] if entry else None)
        if stopped:
            self._finish(seq, "stop", out, flush=False)
        elif seq.constraint is not None and seq.constraint.finished:
            self._finish(seq, "stop", out)
        elif seq.generated >= req.max_tokens or seq.pos >= self.context_length:
            self._finish(seq, "length", out)
        else:
            seq.handle.on_output(out)

    def _text(self, seq: _Seq, new: str, final: bool = False) -> tuple[str, bool]:
        """Add new text; return the part safe to send and whether a stop string was found."""
        return seq.stops.push(new, final)

    def _finish(self, seq: _Seq, reason: str, out: Output | None = None, flush: bool = True) -> None:
        """Send the last Output (with the text still held, unless a stop string ended it) and free the slot."""
        out = out or Output()
        if flush and reason in ("stop", "length"):
            out.text += self._text(seq, seq.decoder.flush(), final=True)[0]
        out.finish_reason = reason
        out.prompt_tokens, out.completion_tokens, out.cached_tokens = seq.n_prompt, seq.generated, seq.cached
        if seq.slot is not None:
            self.slots[seq.slot] = None
            self.slot_used[seq.slot] = time.monotonic()
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._count(reason)
        seq.handle.on_output(out)

    def _count(self, reason: str) -> None:
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1


def default_cache_memory() -> int:
    """A quarter of the machine's memory, for the slot pool when the caller gives no figure."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size // 4
    except (ValueError, OSError):
        return 4 << 30


