"""Constrained decoding: JSON schemas and tool calls compiled to token masks by llguidance.

llguidance (github.com/guidance-ai/llguidance) turns a JSON schema or a Lark grammar into a
matcher that, given the tokens so far, says which next tokens keep the output inside the
grammar. The engine applies that mask to a request's logits before sampling, so the output is
valid by construction: `{"type": "json_object"}` is the schema `{"type": "object"}`, and a forced
tool call is a schema for `{"name": ..., "parameters": ...}`.

One thing a mask alone does not give is an end: a random or weak model can stay inside a string
forever, and `max_tokens` would cut the JSON short. So each request counts how many tokens
closing its output would take from where it is (its open strings, arrays and objects, and the
required keys still missing), by running the closing moves on a copy of its matcher; when the
remaining budget comes down to that count, the engine stops sampling and plays those moves
(`"`, `}`, `]`, `0`, `[]`, the keys the grammar forces, ...). A constrained answer therefore ends
valid whenever max_tokens is at least the grammar's shortest completion from the start.

JSON is generated compactly with Python's separators (`", "` and `": "`), no free whitespace, so
the grammar ends with the closing brace and the request stops there.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import llguidance
import numpy as np
import torch
from torch import Tensor

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile; the message says why."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def lark_grammar(lark: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(lark)


def lark_json(schema: dict[str, Any]) -> str:
    """A Lark rule body that embeds a JSON schema (with our separators)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


class JsonState:
    """How much of a JSON text is still open: nesting depth and whether we are inside a string."""

    __slots__ = ("depth", "in_string", "escape", "in_number")

    def __init__(self, depth: int = 0, in_string: bool = False, escape: bool = False, in_number: bool = False):
        self.depth, self.in_string, self.escape, self.in_number = depth, in_string, escape, in_number

    def copy(self) -> JsonState:
        return JsonState(self.depth, self.in_string, self.escape, self.in_number)

    def feed(self, text: str) -> JsonState:
        for c in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif c == "\\":
                    self.escape = True
                elif c == '"':
                    self.in_string = False
                continue
            self.in_number = c in "0123456789-+.eE" and (self.in_number or c in "-0123456789")
            if c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth = max(self.depth - 1, 0)
        return self

    @property
    def openness(self) -> int:
        return self.depth + self.in_string


# Closing moves, most closing first: the closer takes the first valid one that leaves the least open.
CLOSERS = ['"}', '"]', '"}}', '"]}', '}}', ']}', '}]', '}', ']', '"', '""', '[]', '{}', '0', 'null', 'true',
           '", ', '": ', ', ', ': ', ',', ':', *"123456789"]


class Vocabulary:
    """What the grammar side needs to know about a tokenizer, built once per engine (~seconds)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.vocab_size = vocab_size
        self.ll = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=list(stop_token_ids))
        n = min(tokenizer.vocab_size, vocab_size)
        self.texts = tokenizer.tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        self.closers: list[int] = []  # CLOSERS that are one token in this vocabulary, in that order
        for c in CLOSERS:
            ids = tokenizer.encode(c, add_special_tokens=False)
            if len(ids) == 1 and ids[0] < n and self.texts[ids[0]] == c:
                self.closers.append(ids[0])


class Grammar:
    """A compiled grammar (llguidance's serialised form); `new()` starts a fresh matcher for one request."""

    def __init__(self, vocab: Vocabulary, grammar: str):
        self.vocab, self.grammar = vocab, grammar
        err, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, vocab.ll)
        if err:
            raise GrammarError(msgs[0] if msgs else "invalid grammar")

    def new(self) -> Constraint:
        return Constraint(self.vocab, llguidance.LLMatcher(self.vocab.ll, self.grammar, log_level=0))


class Constraint:
    """One request's matcher: masks logits, takes the chosen token, and closes the JSON in time.

    Closing is deterministic (no logits): the first move of CLOSERS that the grammar accepts and
    that leaves the least open (without lengthening a number), else the token the grammar forces,
    else the lowest token id it allows. So the number of tokens closing takes from any point can
    be counted in advance, by running the same moves on a copy of the matcher (`closing_cost`),
    and closing starts exactly when the remaining budget comes down to that count.
    """

    MAX_CLOSING = 512  # a grammar that needs more than this to end counts as never ending

    def __init__(self, vocab: Vocabulary, matcher):
        self.vocab, self.matcher = vocab, matcher
        self.state = JsonState()
        self.closing = False
        self._cost: int | None = None
        self._since = 0  # tokens since the cost was last counted
        self._bits = np.zeros((vocab.vocab_size + 31) // 32, dtype=np.int32)

    def allowed(self, matcher=None) -> Tensor:
        """(V,) bool: the tokens the grammar accepts next."""
        (matcher or self.matcher).unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")  # bit i of word w: token 32 * w + i
        return torch.from_numpy(bits[: self.vocab.vocab_size].view(np.bool_))

    def _closing_move(self, matcher, state: JsonState) -> int:
        best, best_key = None, None
        for t in self.vocab.closers:
            if matcher.validate_tokens([t]) != 1:
                continue
            text = self.vocab.texts[t]
            key = (state.copy().feed(text).openness, state.in_number and text[0].isdigit())
            if best_key is None or key < best_key:
                best, best_key = t, key
        if best is not None:
            return best
        forced = matcher.compute_ff_tokens()
        if forced:
            return forced[0]
        return int(self.allowed(matcher).numpy().argmax())  # the first allowed token

    def _done(self, matcher, state: JsonState) -> bool:
        return matcher.is_stopped() or (matcher.is_accepting() and state.openness == 0)

    def closing_cost(self) -> int:
        """Tokens the closing moves take from here to a complete output."""
        m, state = self.matcher.deep_copy(), self.state.copy()
        for n in range(self.MAX_CLOSING):
            if self._done(m, state):
                return n
            t = self._closing_move(m, state)
            if not m.consume_token(t):
                break
            state.feed(self.vocab.texts[t] if t < len(self.vocab.texts) else "")
        return self.MAX_CLOSING

    def choose(self, remaining: int) -> int | None:
        """The token to emit when the budget (tokens left, this one included) demands closing,
        else None (sample as usual). The cost is recounted every 8 tokens, and at every token
        once the budget is within 32 of it."""
        if not self.closing:
            if self._cost is None or self._since >= 8 or remaining <= self._cost + 32:
                self._cost, self._since = self.closing_cost(), 0
            self.closing = remaining <= self._cost + 1
        return self._closing_move(self.matcher, self.state) if self.closing else None

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")
        self._since += 1
        if token < len(self.vocab.texts):
            self.state.feed(self.vocab.texts[token])

    @property
    def finished(self) -> bool:
        """Nothing but end-of-sequence can follow, or closing has closed everything."""
        return self.matcher.is_stopped() or (self.closing and self._done(self.matcher, self.state))


class GrammarCompiler:
    """Builds the Vocabulary lazily (the first constrained request pays for it) and compiles grammars."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._args = (tokenizer, vocab_size, stop_token_ids)
        self._vocab: Vocabulary | None = None
        self._lock = threading.Lock()

    @property
    def vocab(self) -> Vocabulary:
        with self._lock:
            if self._vocab is None:
                self._vocab = Vocabulary(*self._args)
            return self._vocab

    def json_schema(self, schema: dict[str, Any]) -> Grammar:
        try:
            return Grammar(self.vocab, json_schema_grammar(schema))
        except ValueError as e:
            raise GrammarError(str(e)) from None

    def lark(self, lark: str) -> Grammar:
        return Grammar(self.vocab, lark_grammar(lark))
