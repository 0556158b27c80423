"""One decoder-only transformer for the Llama and DeepSeek families.

A Block is norm -> attention -> residual -> norm -> feed-forward -> residual. Attention is
grouped-query attention (Llama, GQA, arXiv:2305.13245) or multi-head latent attention (DeepSeek-V2
§2.1, arXiv:2405.04434); the feed-forward is a SwiGLU MLP (arXiv:2002.05202) or DeepSeekMoE
(arXiv:2401.06066), chosen per layer by the config. DeepSeek-V3's multi-token prediction modules
(arXiv:2412.19437 §2.2) sit beside the trunk and are run on request.

Module and parameter names follow the Hugging Face checkpoints (`q_proj`, `kv_a_proj_with_mqa`,
`e_score_correction_bias`), so loading is a plain copy except for the stacked experts
(see checkpoint/hf.py). Caches are passed in, never stored on the model: any object with the
calls of `KVCache` (generate/cache.py's Cache, serve/cache.py's SlotCache).
This file imports neither torch.distributed nor the tokenizer.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ouvert.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (arXiv:1910.07467), computed in float32 as the HF models do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype) * self.weight


# ---- rotary position embedding -------------------------------------------------------------


def rope_frequencies(cfg: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (rope_dim/2,) and the factor applied to cos/sin, per rope_type.

    linear: positions / factor (arXiv:2306.15595). llama3: low frequencies / factor, high ones
    kept, a smooth ramp between. yarn (arXiv:2309.00071): ramp between interpolation and
    extrapolation over a band of dimensions, and cos/sin scaled by an attention factor.
    """
    dim, base = cfg.rope_dim, cfg.rope_theta  # computed on the CPU, even inside a meta-device context
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
    old_len = rs.get("original_max_position_embeddings", cfg.max_position_embeddings)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, d) rotated by cos/sin (B, 1, T, d), halves layout (x_i pairs with x_{i+d/2})."""
    return x * cos + rotate_half(x) * sin


def deinterleave(x: Tensor) -> Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...): DeepSeek's adjacent rotary pairs become
    halves, so one apply_rope serves both. q and k get the same permutation, so q.k is unchanged."""
    *lead, d = x.shape
    return x.view(*lead, d // 2, 2).transpose(-1, -2).reshape(*lead, d)


# ---- attention ------------------------------------------------------------------------------


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """Scaled dot-product attention with GQA. q (B, H, T, d), k (B, Hkv, S, d), v (B, Hkv, S, dv)."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    if T == 1 and H != Hkv:
        # Decode: fold the query heads of a group into the time axis, so each K/V head is read
        # once (much faster on CPU than enable_gqa, which expands K and V).
        g = H // Hkv
        y = F.scaled_dot_product_attention(q.view(B, Hkv, g, d), k, v, attn_mask=mask, scale=scale)
        return y.view(B, H, 1, -1)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale, enable_gqa=H != Hkv
    )


def attention_mask(q_slot: Tensor, S: int, valid: Tensor | None = None, window: int | None = None) -> Tensor:
    """Boolean mask (B or 1, 1, T, S): the query in cache slot q_slot[t] sees key slot j when j <= q_slot[t],
    j is within the sliding window, and valid[b, j] (False for padding). q_slot: (T,) or (B, T)."""
    k = torch.arange(S, device=q_slot.device)
    q = q_slot.unsqueeze(-1)  # (..., T, 1)
    m = k <= q
    if window is not None:
        m = m & (k > q - window)
    m = m.view(-1, 1, q_slot.shape[-1], S)
    if valid is not None:
        m = m & valid[:, None, None, :S]
        # A padding query sees nothing, and softmax over nothing is NaN: let it see its own slot.
        m = m | (~m.any(dim=-1, keepdim=True) & (k == q).view(-1, 1, q_slot.shape[-1], S))
    return m


@runtime_checkable
class KVCache(Protocol):
    """What the model asks of an attention cache. A forward over T new tokens calls
    `attention_mask` once, `update` in each attention layer, then `advance` once every layer has
    written; `positions` when the caller gives no rotary positions. generate/cache.py's Cache
    writes all rows at one shared slot; serve/cache.py's SlotCache gives each row its own."""

    def positions(self, T: int) -> Tensor:
        """Rotary positions of the next T tokens: (T,) shared by all rows, or (B, T)."""
        ...

    def attention_mask(self, T: int, pad_mask: Tensor | None, window: int | None) -> tuple[Tensor | None, bool]:
        """(mask, causal) for T new tokens, pad_mask (B, T) False at padding: a boolean mask
        (B or 1, 1, T, S) over the S slots `update` will return; or None with causal True when plain
        causal attention over the new tokens alone is exact, None with causal False when every
        slot is visible to every new token."""
        ...

    def update(self, layer: int, new: tuple[Tensor, ...], seq_dim: int) -> tuple[Tensor, ...]:
        """Store layer's entries for the new tokens (T along seq_dim); return the S entries to attend over."""
        ...

    def advance(self, T: int) -> None:
        """The forward is done: every layer has written its T new entries."""
        ...


def next_positions(cache: KVCache | None, B: int, T: int, device: torch.device) -> Tensor:
    """(B, T) rotary positions of T new tokens when the caller gives none: the cache's next ones, else 0 .. T-1."""
    return (torch.arange(T, device=device) if cache is None else cache.positions(T)).expand(B, T)


class Attention(nn.Module):
    """Grouped-query attention; caches K and V per layer: 2 * n_kv_heads * head_dim numbers per token."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.n_head * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, self.n_kv_head * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, self.n_kv_head * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * hd, D, bias=cfg.o_proj_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's channels, before rotary
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.scale = hd**-0.5

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> tuple[Tensor, ...]:
        shape = (batch, self.n_kv_head, max_len, self.head_dim)
        return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, causal: bool, cache: KVCache | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rope(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, (k, v), seq_dim=2)  # (B, Hkv, S, hd)
        y = attend(q, k, v, mask, causal, self.scale)  # (B, H, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1).

    Keys and values are compressed into a latent c_kv (kv_lora_rank) plus one rotary key shared by
    all heads (qk_rope_head_dim); the cache holds just those two, kv_lora_rank + qk_rope_head_dim
    numbers per token per layer. Two equal ways to attend:
      naive:    expand c_kv through kv_b_proj into per-head keys and values, then attend.
      absorbed: fold kv_b_proj's key half into the query and its value half into the output, and
                attend over the latent directly (§2.1.2); the default for decoding.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_head, self.kv_lora_rank = H, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 whatever rms_norm_eps says, as HF
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=cfg.attention_bias)
        self.interleave = cfg.rope_interleave
        self.scale = qk**-0.5
        rs = cfg.rope_scaling or {}
        if rs.get("rope_type") == "yarn" and rs.get("mscale_all_dim"):
            # YaRN's attention temperature, applied to the softmax scale (DeepSeek-V2 config), with
            # the same factor as rope_frequencies (implied by the lengths when the config omits it).
            factor = rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"]
            self.scale *= yarn_mscale(factor, rs["mscale_all_dim"]) ** 2
        self.absorb = True  # use the absorbed path when decoding from a cache

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> tuple[Tensor, ...]:
        # One buffer per layer: [c_kv | k_rope] along the last axis.
        return (torch.zeros(batch, max_len, self.kv_lora_rank + self.rope, dtype=dtype, device=device),)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, causal: bool, cache: KVCache | None = None
    ) -> Tensor:
        B, T, _ = x.shape
        H = self.n_head
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r)
        if self.interleave:
            q_pe, k_pe = deinterleave(q_pe), deinterleave(k_pe)
        cos, sin = rope
        q_pe = apply_rope(q_pe, cos, sin)  # (B, H, T, rope)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)  # (B, T, rope), shared by all heads
        if cache is not None:
            (latent,) = cache.update(self.layer_idx, (torch.cat([c_kv, k_pe], dim=-1),), seq_dim=1)  # (B, S, r+rope)
            if self.absorb and not causal:  # there is history: attend over the latent as it is
                return self._absorbed(q_nope, q_pe, latent, mask)
            c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope], dim=-1)
        # naive: per-head keys and values from the latent
        S = c_kv.shape[1]
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, S, nope), (B, H, S, v)
        k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(B, H, S, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        y = attend(q, k, v, mask, causal, self.scale)  # (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def _absorbed(self, q_nope: Tensor, q_pe: Tensor, latent: Tensor, mask: Tensor | None) -> Tensor:
        """Attend over the cached latent [c_kv | k_rope] (B, S, r + rope) without expanding it."""
        B, H, T, _ = q_nope.shape
        r = self.kv_lora_rank
        q = torch.cat([self.absorb_query(q_nope), q_pe], dim=-1)  # (B, H, T, r + rope): q.k = q_nope.k_nope + q_pe.k_pe
        k = latent.unsqueeze(1)  # (B, 1, S, r + rope): one "head" shared by all queries
        v = latent[..., :r].unsqueeze(1)  # (B, 1, S, r)
        o = attend(q, k, v, mask, False, self.scale)  # (B, H, T, r)
        return self.o_proj(self.absorb_output(o).reshape(B, T, -1))

    def _kv_b_halves(self) -> tuple[Tensor, Tensor]:
        w = self.kv_b_proj.weight.view(self.n_head, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]  # (H, nope, r), (H, v, r)

    def absorb_query(self, q_nope: Tensor) -> Tensor:
        """q_nope (B, H, T, nope) through kv_b_proj's key half of each head: (B, H, T, r)."""
        return torch.einsum("bhtd,hdr->bhtr", q_nope, self._kv_b_halves()[0])

    def absorb_output(self, o: Tensor) -> Tensor:
        """Attention over the latent (B, H, T, r) through kv_b_proj's value half of each head: (B, T, H, v)."""
        return torch.einsum("bhtr,hvr->bthv", o, self._kv_b_halves()[1])


# ---- feed-forward ---------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """n_routed_experts SwiGLU MLPs stored stacked: one (E, out, in) tensor per projection."""

    def __init__(self, n: int, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.up_proj = nn.Parameter(torch.empty(n, hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(n, dim, hidden))
        self.n_experts = n
        # None: each expert runs its tokens as one matmul. An int t: in matmuls of exactly t rows
        # (the last padded). A CPU matmul rounds a row the same whatever the other rows hold, but
        # differently for another row count, so with tiles a token's output does not depend on
        # how many other tokens chose its experts: the serving engine's batch invariance.
        self.row_tile: int | None = None

    def weights(self, w: str, idx, dtype: torch.dtype | None = None) -> Tensor:
        """Projection w's (out, in) weights of expert idx, an int, or of experts idx, a tensor of
        indices (..., out, in). Quantized subclasses (ouvert/quantize/) dequantize them to dtype;
        float weights come as stored."""
        return getattr(self, w)[idx]

    def proj(self, w: str, e: int, x: Tensor) -> Tensor:
        """x (n, in) through projection w of expert e."""
        return x @ self.weights(w, e).T

    def expert(self, e: int, x: Tensor) -> Tensor:
        return self.proj("down_proj", e, F.silu(self.proj("gate_proj", e, x)) * self.proj("up_proj", e, x))

    def forward(self, x: Tensor, expert_idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D); expert_idx, weight (N, k). Returns sum_k weight * expert(x) (N, D) and the
        number of tokens each expert got (E,).

        Token-expert pairs are sorted by expert, so each expert runs its tokens as one matmul:
        a loop over experts, never over tokens."""
        N, k = expert_idx.shape
        if torch.compiler.is_compiling() and N * k <= self.n_experts:
            return self.gathered(x, expert_idx, weight)
        return sorted_dispatch(x, expert_idx, weight, self.n_experts, self.expert, self.row_tile)

    def gathered(self, x: Tensor, expert_idx: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        """forward for a few tokens under torch.compile (a decode step): every (token, expert)
        pair on its own, as products summed over the input dimension. Shapes do not depend on
        the routing, so the step stays one graph, and inductor fuses the indexing of the stacked
        weights into the reductions: each chosen expert is read once, never copied. (Eagerly this
        would materialise the products; forward keeps the sorted dispatch there.)"""
        xk = x[:, None, None, :]  # (N, 1, 1, D)
        h = (F.silu((xk * self.weights("gate_proj", expert_idx, x.dtype)).sum(-1))
             * (xk * self.weights("up_proj", expert_idx, x.dtype)).sum(-1))
        out = (h[:, :, None, :] * self.weights("down_proj", expert_idx, x.dtype)).sum(-1)  # (N, k, D)
        y = (out * weight.unsqueeze(-1).to(out.dtype)).sum(1)
        return y, expert_counts(expert_idx, self.n_experts)


def expert_counts(expert_idx: Tensor, n_experts: int) -> Tensor:
    """How many tokens each expert got (E,), in fixed shapes."""
    counts = torch.zeros(n_experts, dtype=torch.long, device=expert_idx.device)
    return counts.index_add_(0, expert_idx.flatten(), torch.ones_like(expert_idx.flatten()))


def sorted_dispatch(x: Tensor, expert_idx: Tensor, weight: Tensor, n_experts: int, expert,
                    row_tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Experts.forward's eager path, with `expert(e, x)` the SwiGLU of expert e: token-expert pairs
    sorted by expert, each expert's tokens as one matmul (or tiles of row_tile rows)."""
    k = expert_idx.shape[1]
    flat = expert_idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    token = order // k  # which token each sorted pair belongs to
    xs = x[token]  # (N*k, D)
    out = torch.empty_like(xs)
    start, t = 0, row_tile
    for e, n in enumerate(counts.tolist()):
        if n:
            xe = xs[start : start + n]
            if t:
                xe = F.pad(xe, (0, 0, 0, -n % t))
                out[start : start + n] = torch.cat([expert(e, xe[i : i + t]) for i in range(0, n, t)])[:n]
            else:
                out[start : start + n] = expert(e, xe)
            start += n
    # index_add_ sums a token's k outputs in the order of its own expert ids: batch-independent.
    out = out * weight.flatten()[order].unsqueeze(-1).to(out.dtype)
    y = torch.zeros_like(x).index_add_(0, token, out)
    return y, counts


def last_axis_sum(t: Tensor) -> Tensor:
    """Sum over the last axis, left to right: a row's sum does not depend on how many rows there are
    (torch's sum vectorizes a short axis differently by shape), which batch invariance needs."""
    return sum(t.unbind(-1))


class Router(nn.Module):
    """Chooses num_experts_per_tok experts for each token (DeepSeek-V2 §2.2, V3 §2.1.2).

    V2: softmax scores; `greedy` takes the top-k, `group_limited_greedy` first keeps the topk_group
    groups with the best single score. V3 (`noaux_tc`): sigmoid scores; e_score_correction_bias is
    added for the choice only (auxiliary-loss-free balancing, V3 §2.1.2) and groups rank by the sum
    of their two best biased scores. The gate weights are the unbiased scores of the chosen experts:
    V3 normalises them when norm_topk_prob, then multiplies by routed_scaling_factor; V2 does one
    or the other (normalise when norm_topk_prob, else scale), as DeepSeek's V2 code does.
    transformers' V2 ignores norm_topk_prob (always scales); every released V2 config has it false,
    where all three agree.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.topk_method, self.scoring_func = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = cfg.norm_topk_prob, cfg.routed_scaling_factor
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(E))

    def logits(self, x: Tensor) -> Tensor:
        """x (..., D) -> the experts' affinity logits (..., E), in float32."""
        return F.linear(x.float(), self.weight.float())

    def scores(self, logits: Tensor) -> Tensor:
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D) -> expert indices (N, k), gate weights (N, k) in float32."""
        scores = self.scores(self.logits(x))
        choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
        if self.topk_method in ("noaux_tc", "group_limited_greedy") and self.n_group > 1:
            N, E = choice.shape
            groups = choice.view(N, self.n_group, E // self.n_group)
            if self.topk_method == "noaux_tc":
                group_score = last_axis_sum(groups.topk(2, dim=-1).values)  # (N, n_group)
            else:
                group_score = groups.amax(dim=-1)
            keep = group_score.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            # V3 masks with -inf (biased scores may be negative); V2's scores are positive, 0 suffices.
            fill = float("-inf") if self.topk_method == "noaux_tc" else 0.0
            choice = choice.masked_fill(~group_mask.repeat_interleave(E // self.n_group, dim=1), fill)
        idx = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weight = scores.gather(1, idx)
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (last_axis_sum(weight).unsqueeze(-1) + 1e-20)
            if self.topk_method != "noaux_tc":
                return idx, weight  # DeepSeek-V2: normalised weights are not scaled again
        return idx, weight * self.routed_scaling_factor


class MoE(nn.Module):
    """DeepSeekMoE: shared experts every token passes through, plus routed fine-grained experts.

    It keeps no training state: the balancing statistics (tokens per expert, the sequence-wise
    balance loss) are read from outside, by train/balance.py's Balancer through forward hooks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        idx, weight = self.gate(x)
        y, _ = self.experts(x, idx, weight)  # the counts are for a Balancer's hook
        if hasattr(self, "shared_experts"):
            y = y + self.shared_experts(x)
        return y.view(shape)


# ---- blocks and the model ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg, layer_idx) if cfg.is_mla else Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, causal: bool, cache: KVCache | None = None
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, causal, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One multi-token prediction depth (DeepSeek-V3 §2.2): from the trunk's hidden state at i and
    the embedding of token i+1, predict token i+2. The embedding and output head are the trunk's.

    h' = Block(eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)])), logits = head(shared_head.norm(h')).
    Two readings of the released weights depart from the paper's equation (21), as vLLM and SGLang
    run them: the concatenation puts the embedding first (the paper writes h first), and h_i at the
    first depth is the trunk's output after its final norm, the vector its head reads (a later
    depth reads the previous depth's block output, before shared_head.norm).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)  # shared_head.norm in HF checkpoints


class Transformer(nn.Module):
    """The model: embed_tokens -> Blocks -> norm -> lm_head, plus optional MTP modules."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPModule(cfg, n + i) for i in range(cfg.num_nextn_predict_layers))
        self.reset_buffers()

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and caches: the final norm's. Norms stay float in every storage
        format, where the embedding may hold integer blocks (a GGUF model run as stored)."""
        return self.norm.weight.dtype

    def reset_buffers(self) -> None:
        """(Re)compute the non-persistent rotary tables, e.g. after building on the meta device."""
        device = self.embed_tokens.weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        inv_freq, self.rope_factor = rope_frequencies(self.config)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for training from scratch: normal(0, std) matrices, unit norms, zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, 0.0, std, generator=generator)
        for m in self.modules():
            if isinstance(m, Router) and hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (B, 1, T, rope_dim) for integer positions (B, T), computed in float32."""
        freqs = positions.unsqueeze(-1).float() * self.inv_freq  # (B, T, rope_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return (emb.cos() * self.rope_factor).to(dtype), (emb.sin() * self.rope_factor).to(dtype)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        cache: KVCache | None = None,
        pad_mask: Tensor | None = None,
        logits_at: Tensor | None = None,
        return_hidden: bool = False,
        next_tokens: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, list[Tensor]]:
        """tokens (B, T) -> logits (B, T, vocab) in the weights' dtype.

        positions: (B, T) rotary positions; default the cache's next ones (KVCache.positions), or arange(T).
        cache:     a KVCache the new tokens' keys and values are written to, and attention reads.
        pad_mask:  (B, T) bool, False where a token is padding (left-padded batches).
        logits_at: (K,) or (B, K) indices along T (negative from the end): logits at those positions
                   only, (B, K, vocab); the head runs on nothing else (a prefill wants one position).
        return_hidden: also return the final hidden states (B, T, D) before the norm (for MTP).
        next_tokens: (B, T) the tokens after `tokens` (training targets); when given, also return
                   the MTP modules' logits, [(B, T, vocab)] per depth (see mtp_logits).
        """
        B, T = tokens.shape
        if positions is None:
            positions = next_positions(cache, B, T, tokens.device)
        window = self.config.sliding_window
        if cache is not None:
            mask, causal = cache.attention_mask(T, pad_mask, window)
        elif pad_mask is None and (window is None or T <= window):
            mask, causal = None, True
        else:
            mask, causal = attention_mask(torch.arange(T, device=tokens.device), T, pad_mask, window), False
        x = self.embed_tokens(tokens)  # (B, T, D)
        rope = self.rope(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, causal, cache)
        if cache is not None:
            cache.advance(T)
        h = x
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device).unsqueeze(1), logits_at.to(x.device)]  # (B, K, D)
        logits = self.lm_head(self.norm(x))
        if next_tokens is not None:
            return logits, self.mtp_logits(h, next_tokens, positions)
        return (logits, h) if return_hidden else logits

    def mtp_logits(
        self, hidden: Tensor, next_tokens: Tensor, positions: Tensor | None = None, cache: KVCache | None = None
    ) -> list[Tensor]:
        """Logits of each MTP depth. hidden (B, T, D): the trunk's last hidden states (before its
        final norm) for positions i; next_tokens (B, T): tokens i+1. Depth k predicts token i+1+k.
        Each depth sees its own causal window over the same positions (no cache). The first
        depth reads norm(hidden), the trunk's final norm (see MTPModule).

        cache: a Cache(model, ..., mtp=True) to run the first depth alone incrementally, as
        speculative decoding does: slots [start, start+T) are written, positions default to the
        cache's next ones. (A later depth would need tokens not yet known.)"""
        B, T, _ = hidden.shape
        if positions is None:
            positions = next_positions(cache, B, T, hidden.device)
        mask, causal = (None, True) if cache is None else cache.attention_mask(T, None, self.config.sliding_window)
        rope = self.rope(positions, hidden.dtype)
        out, h = [], self.norm(hidden)
        for k, m in enumerate(self.mtp if cache is None else self.mtp[:1]):
            if k > 0:  # depth k uses the token k steps further; the last k positions have none
                next_tokens = torch.cat([next_tokens[:, 1:], next_tokens[:, -1:]], dim=1)
            e = m.enorm(self.embed_tokens(next_tokens))
            h = m.block(m.eh_proj(torch.cat([e, m.hnorm(h)], dim=-1)), rope, mask, causal, cache)
            out.append(self.lm_head(m.norm(h)))
        if cache is not None:
            cache.advance(T)
        return out
