"""The server's attention cache: one slot (a batch row) per request, each at its own length.

It stands in for generate.cache.Cache through the calls the model makes (model.KVCache:
`attention_mask`, `update`, `advance`, `positions`), but where that cache writes every row at one
shared index, here the engine plans each forward first (`plan`): which rows take part, where each new
token is written, and the mask. Buffers come from each layer's `self_attn.new_cache`, so GQA
(K and V) and MLA (one latent) models use it alike.

Layout per layer and buffer: (n_slots, ..., length + 1, ...) along the layer's sequence axis.
Slot s holds its request's tokens at indices 0, 1, 2, ... (index = position, no padding). The
last index is a scratch column: rows that take no part in a decode step write there and attend
to index 0, so an idle row never disturbs what a slot keeps for the prefix cache.

Rows of a forward are always a contiguous range (all slots for a decode step, one slot for a
prefill chunk), so the views handed back to attention are views, never copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Plan:
    """What the next forward does: rows [lo, hi) write token t of row b at slot index pos[b, t];
    attention covers slot indices [0, S) under mask (B, 1, T, S); then row b grows by n_new[b]."""

    lo: int
    hi: int
    pos: Tensor  # (B, T) long
    mask: Tensor  # (B, 1, T, S) bool
    n_new: list[int]


class SlotCache:
    """A model.KVCache with a slot per request, each at its own length; forwards are planned first."""

    def __init__(self, model, n_slots: int, length: int, dtype: torch.dtype | None = None, device=None):
        dtype, device = dtype or model.dtype, device or model.embed_tokens.weight.device
        self.n_slots, self.length, self.device = n_slots, length, device
        self.scratch = length  # index of the scratch column
        self.layers: list[tuple[Tensor, ...]] = [
            layer.self_attn.new_cache(n_slots, length + 1, dtype, device) for layer in model.layers
        ]
        self.seq_dims: list[int | None] = [None] * len(self.layers)  # learnt from the first update
        self.lens = [0] * n_slots  # entries written per slot
        self._plan: Plan | None = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    @staticmethod
    def bytes_per_token(model, dtype: torch.dtype | None = None) -> int:
        """Cache bytes one token takes over all layers, from a one-slot, one-token allocation."""
        dtype = dtype or model.dtype
        return sum(
            t.numel() * t.element_size()
            for layer in model.layers
            for t in layer.self_attn.new_cache(1, 1, dtype, "meta")
        )

    def plan(self, lo: int, hi: int, pos: Tensor, mask: Tensor, n_new: list[int]) -> None:
        if self._plan is not None:
            raise RuntimeError("SlotCache.plan: the previous forward did not finish")
        self._plan = Plan(lo, hi, pos, mask, n_new)

    # ---- the calls the model makes (model.KVCache) -----------------------------------------

    def _planned(self, T: int) -> Plan:
        p = self._plan
        if p is None or p.pos.shape[1] != T:
            raise RuntimeError("SlotCache: forward without a matching plan")
        return p

    def attention_mask(self, T: int, pad_mask: Tensor | None, window: int | None) -> tuple[Tensor, bool]:
        """The planned mask (window and padding are already in it: the engine builds it)."""
        return self._planned(T).mask, False

    def positions(self, T: int) -> Tensor:
        """The planned slot indices (B, T), which are the positions (a slot holds no padding)."""
        return self._planned(T).pos

    def update(self, layer: int, new: tuple[Tensor, ...], seq_dim: int) -> tuple[Tensor, ...]:
        p = self._plan
        self.seq_dims[layer] = seq_dim
        B = p.hi - p.lo
        rows = torch.arange(B, device=p.pos.device).unsqueeze(1)  # (B, 1)
        S = p.mask.shape[-1]
        out = []
        for buf, x in zip(self.layers[layer], new):
            view = buf[p.lo : p.hi]
            view.movedim(seq_dim, 1)[rows, p.pos] = x.movedim(seq_dim, 1)  # (B, T, ...) scattered
            out.append(view.narrow(seq_dim, 0, S))
        return tuple(out)

    def advance(self, T: int) -> None:
        p = self._plan
        for i, n in enumerate(p.n_new):
            self.lens[p.lo + i] += n
        self._plan = None

    # ---- slot management ------------------------------------------------------------------

    def abort(self) -> None:
        """Forget a plan whose forward raised."""
        self._plan = None

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copy the first n entries of slot src into slot dst (prefix caching)."""
        for layer, d in zip(self.layers, self.seq_dims):
            for buf in layer:
                buf[dst].narrow(d - 1, 0, n).copy_(buf[src].narrow(d - 1, 0, n))
        self.lens[dst] = n
