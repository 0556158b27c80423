"""Pre-allocated attention caches, passed into the model (never stored on it).

Each attention layer says what it keeps per token (`new_cache`): GQA keeps K and V
(B, n_kv_heads, max_len, head_dim); MLA keeps one latent buffer (B, max_len, kv_lora_rank +
qk_rope_head_dim). All rows of a batch write at the same slot index `start`; rows that are
shorter are left-padded, and `valid` marks which slots hold real tokens so attention skips the
padding. Nothing is allocated per decode step.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Cache:
    def __init__(self, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None):
        p = model.embed_tokens.weight
        dtype, device = dtype or p.dtype, device or p.device
        self.batch_size, self.max_len = batch_size, max_len
        self.layers: list[tuple[Tensor, ...]] = [
            layer.self_attn.new_cache(batch_size, max_len, dtype, device) for layer in model.layers
        ]
        self.start = 0  # slots [0, start) are written
        self.valid: Tensor | None = None  # (B, max_len) bool, allocated at the first padding seen
        self.device = device

    def mark_valid(self, pad_mask: Tensor | None, T: int) -> Tensor | None:
        """Record which of the next T slots hold real tokens; return the valid map, or None if
        every slot so far is real (then plain causal attention is exact)."""
        if self.start + T > self.max_len:
            raise ValueError(f"cache is full: {self.start} + {T} tokens > max_len {self.max_len}")
        if pad_mask is not None and self.valid is None and not bool(pad_mask.all()):
            self.valid = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=self.device)
        if self.valid is not None:
            self.valid[:, self.start : self.start + T] = True if pad_mask is None else pad_mask
        return self.valid

    def nbytes_per_token(self) -> int:
        """Cache bytes one token takes, over all layers (per batch row)."""
        return sum(t[0].numel() * t.element_size() // self.max_len for layer in self.layers for t in layer)

    def reset(self) -> None:
        self.start = 0
        self.valid = None
