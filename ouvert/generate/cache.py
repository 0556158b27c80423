"""Pre-allocated attention caches, passed into the model (never stored on it).

Each attention layer says what it keeps per token (`new_cache`): GQA keeps K and V
(B, n_kv_heads, max_len, head_dim); MLA keeps one latent buffer (B, max_len, kv_lora_rank +
qk_rope_head_dim). All rows of a batch write at the same slot index `start`; rows that are
shorter are left-padded, and `valid` marks which slots hold real tokens so attention skips the
padding. Nothing is allocated per decode step.

The model talks to a cache through the calls of model.KVCache, so another cache (the server's,
with a slot per request) can stand in: `attention_mask(T, pad_mask, window)` once per forward,
`update(layer, tensors, seq_dim)` in each attention layer, `advance(T)` at the end, and
`positions(T)` when the caller gives none. Speculative decoding also uses `rollback(n)` to forget
rejected tokens, and a second cache over the first MTP module's block (`mtp=True`), which runs one
step behind the trunk (generate/speculative.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ouvert.model import attention_mask


class Cache:
    """A model.KVCache whose rows all write at one slot index, `start`."""

    def __init__(
        self, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None, mtp: bool = False
    ):
        """A cache for the trunk's layers, or with mtp=True for the first MTP module's block alone
        (layer index num_hidden_layers), which has its own attention and so its own history."""
        dtype, device = dtype or model.dtype, device or model.embed_tokens.weight.device
        self.batch_size, self.max_len = batch_size, max_len
        blocks = [model.mtp[0].block] if mtp else model.layers
        self.first_layer = model.config.num_hidden_layers if mtp else 0  # layer index of self.layers[0]
        self.layers: list[tuple[Tensor, ...]] = [
            block.self_attn.new_cache(batch_size, max_len, dtype, device) for block in blocks
        ]
        self.start = 0  # slots [0, start) are written
        self.valid: Tensor | None = None  # (B, max_len) bool, allocated at the first padding seen
        self.device = device

    def update(self, layer: int, new: tuple[Tensor, ...], seq_dim: int) -> tuple[Tensor, ...]:
        """Write this step's entries (T along seq_dim) at slots [start, start+T); return views of
        slots [0, start+T) to attend over. Called by each attention layer."""
        T = new[0].shape[seq_dim]
        out = []
        for buf, x in zip(self.layers[layer - self.first_layer], new):
            buf.narrow(seq_dim, self.start, T).copy_(x)
            out.append(buf.narrow(seq_dim, 0, self.start + T))
        return tuple(out)

    def attention_mask(self, T: int, pad_mask: Tensor | None, window: int | None) -> tuple[Tensor | None, bool]:
        """The mask for T new tokens, and whether plain causal attention over them alone is exact
        (the first chunk, no padding). Records which new slots hold real tokens."""
        if self.start + T > self.max_len:
            raise ValueError(f"cache is full: {self.start} + {T} tokens > max_len {self.max_len}")
        if pad_mask is not None and self.valid is None and not bool(pad_mask.all()):
            self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=self.device)
        if self.valid is not None:
            self.valid[:, self.start : self.start + T] = True if pad_mask is None else pad_mask
        S = self.start + T
        if self.valid is None and (window is None or S <= window):
            if self.start == 0:
                return None, True
            if T == 1:
                return None, False  # one query sees every slot so far
        q_slot = torch.arange(self.start, S, device=self.device)
        return attention_mask(q_slot, S, self.valid, window), False

    def positions(self, T: int) -> Tensor:
        """The next T slots' positions (T,): start, start + 1, ... (left padding shifts a row's own
        positions; prefill passes those)."""
        return torch.arange(self.start, self.start + T, device=self.device)

    def advance(self, T: int) -> None:
        """Called by the model once every layer has written its T new entries."""
        self.start += T

    def rollback(self, n: int) -> None:
        """Forget the last n tokens (draft tokens the target rejected): the next write overwrites
        their slots. Nothing needs clearing, as no mask lets a query see a slot at or past start."""
        if not 0 <= n <= self.start:
            raise ValueError(f"cannot roll back {n} tokens from a cache holding {self.start}")
        self.start -= n

    def nbytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers (per batch row)."""
        return sum(t[0].numel() * t.element_size() // self.max_len for layer in self.layers for t in layer)

    def reset(self) -> None:
        self.start = 0
        self.valid = None
