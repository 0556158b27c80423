"""GGUF's block formats in plain PyTorch: the twin of every C++ kernel (csrc/blocks.h draws the
bytes). `dequantize(blocks, qtype)` turns rows of blocks, (N, bytes per row) uint8, into (N, K)
float32 with the same arithmetic, in the same order, as the kernels' decoding, so a kernel and its
twin differ only in how the dot products are summed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockType:
    name: str
    id: int  # GGML's type number, as GGUF files store it
    values: int  # values per block
    bytes: int  # bytes per block


TYPES = {t.name: t for t in [
    BlockType("F32", 0, 1, 4), BlockType("F16", 1, 1, 2), BlockType("BF16", 30, 1, 2),
    BlockType("Q8_0", 8, 32, 34), BlockType("Q4_0", 2, 32, 18), BlockType("Q4_1", 3, 32, 20),
    BlockType("Q4_K", 12, 256, 144), BlockType("Q5_K", 13, 256, 176), BlockType("Q6_K", 14, 256, 210),
]}
BY_ID = {t.id: t for t in TYPES.values()}


def block_type(qtype: int | str) -> BlockType:
    t = TYPES.get(qtype) if isinstance(qtype, str) else BY_ID.get(qtype)
    if t is None:
        raise ValueError(f"GGML type {qtype!r} has no kernel; ouvert's kernels cover {', '.join(TYPES)}")
    return t


def row_values(blocks: Tensor, qtype: int | str) -> int:
    """K, the values in one row of `blocks`."""
    t = block_type(qtype)
    if blocks.shape[-1] % t.bytes:
        raise ValueError(f"rows of {blocks.shape[-1]} bytes do not hold whole {t.name} blocks of {t.bytes} bytes")
    return blocks.shape[-1] // t.bytes * t.values


def row_bytes(qtype: int | str, k: int) -> int:
    """Bytes of one row of k values (k a multiple of the block's values): row_values' inverse."""
    t = block_type(qtype)
    return k // t.values * t.bytes


def _f16(b: Tensor) -> Tensor:
    """Little-endian half floats in the last dim's byte pairs, as float32."""
    return b.contiguous().view(torch.float16).float()


def dequantize(blocks: Tensor, qtype: int | str) -> Tensor:
    """(..., bytes per row) uint8 -> (..., K) float32."""
    t = block_type(qtype)
    lead, K = blocks.shape[:-1], row_values(blocks, qtype)
    if t.name == "F32":
        return blocks.contiguous().view(torch.float32).reshape(*lead, K)
    if t.name in ("F16", "BF16"):
        return blocks.contiguous().view(torch.float16 if t.name == "F16" else torch.bfloat16).float().reshape(*lead, K)
    b = blocks.reshape(-1, t.bytes)  # one block a row
    y = _DECODE[t.name](b)
    return y.reshape(*lead, K)


def _nibbles(qs: Tensor) -> tuple[Tensor, Tensor]:
    return (qs & 0x0F).float(), (qs >> 4).float()


def _q8_0(b: Tensor) -> Tensor:
    d = _f16(b[:, 0:2])  # (B, 1)
    return d * b[:, 2:].view(torch.int8).float()


def _q4_0(b: Tensor) -> Tensor:
    d = _f16(b[:, 0:2])
    lo, hi = _nibbles(b[:, 2:18])
    return torch.cat([d * (lo - 8), d * (hi - 8)], dim=1)


def _q4_1(b: Tensor) -> Tensor:
    d, m = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    lo, hi = _nibbles(b[:, 4:20])
    return torch.cat([d * lo + m, d * hi + m], dim=1)


def _k_scales_mins(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 8 six-bit scales and mins of a Q4_K / Q5_K super-block, from its 12 scale bytes."""
    s = s.long()
    lo_sc, lo_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    hi_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    hi_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat([lo_sc, hi_sc], 1).float(), torch.cat([lo_m, hi_m], 1).float()  # (B, 8) each


def _k_quant(b: Tensor, q: Tensor) -> Tensor:
    """value = d * scale_j * q - dmin * min_j over sub-blocks j of 32, q: (B, 8, 32)."""
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scales_mins(b[:, 4:16])
    return ((d * sc).unsqueeze(-1) * q - (dmin * mn).unsqueeze(-1)).reshape(b.shape[0], 256)


def _q4_k_ints(b: Tensor) -> Tensor:
    qs = b[:, 16:144].reshape(-1, 4, 32)  # group g: low nibbles are sub-block 2g, high ones 2g + 1
    return torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).long()  # (B, 8, 32)


def _q4_k(b: Tensor) -> Tensor:
    return _k_quant(b, _q4_k_ints(b).float())


def _q5_k_ints(b: Tensor) -> Tensor:
    qh = b[:, 16:48].long()  # bit j of qh[i]: the fifth bit of value i of sub-block j
    qs = b[:, 48:176].reshape(-1, 4, 32).long()
    nib = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    bit = (qh.unsqueeze(1) >> torch.arange(8).view(1, 8, 1)) & 1
    return nib | (bit << 4)  # (B, 8, 32), 0..31


def _q5_k(b: Tensor) -> Tensor:
    return _k_quant(b, _q5_k_ints(b).float())


def _q6_k_ints(b: Tensor) -> tuple[Tensor, Tensor]:
    """A Q6_K super-block's 256 integers, -32..31, as (B, 16, 16), and its 16 scales d * scale_k (B, 16),
    scale k for values 16k .. 16k + 15."""
    ql, qh = b[:, 0:128].long().reshape(-1, 2, 64), b[:, 128:192].long().reshape(-1, 2, 32)
    sc = b[:, 192:208].view(torch.int8).float()
    d = _f16(b[:, 208:210])  # (B, 1)
    q = torch.stack([  # (B, half, 4 quarters of 32 values)
        (ql[..., :32] & 0x0F) | ((qh >> 0) & 3) << 4,
        (ql[..., 32:] & 0x0F) | ((qh >> 2) & 3) << 4,
        (ql[..., :32] >> 4) | ((qh >> 4) & 3) << 4,
        (ql[..., 32:] >> 4) | ((qh >> 6) & 3) << 4,
    ], dim=2) - 32  # (B, 2, 4, 32)
    return q.reshape(-1, 16, 16), d * sc


def _q6_k(b: Tensor) -> Tensor:
    q, scale = _q6_k_ints(b)
    return (scale.unsqueeze(-1) * q.float()).reshape(b.shape[0], 256)


# ---- integer dot products on quantized activations (csrc/impl.h) ------------------------------------
INTEGER_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")  # the weight formats the kernels multiply in integers


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (..., K) float32 in blocks of 32 as Q8_0: d = max|x| / 127 and q = x * (1 / d) rounded half
    away from zero, in the kernels' float operations: (q int8 (..., K), d float32 (..., K / 32))."""
    xb = x.float().reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    t = xb * inv.unsqueeze(-1)
    q = torch.trunc(t + torch.copysign(torch.full_like(t, 0.5), t))
    return q.to(torch.int8).reshape(x.shape), d


def integer_parts(blocks: Tensor, qtype: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """A weight (N, bytes) as integers (N, G, g) in G groups of g values sharing a scale, the scales
    (N, G) and, for Q4_1, Q4_K and Q5_K, offsets (N, G): value = scale * integer (+ offset). g is 32,
    but 16 for Q6_K (a scale per 16 values)."""
    t = TYPES[qtype]
    b = blocks.reshape(-1, t.bytes)
    n = blocks.shape[0]
    if qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scales_mins(b[:, 4:16])
        q = _q4_k_ints(b) if qtype == "Q4_K" else _q5_k_ints(b)
        return q.reshape(n, -1, 32), (d * sc).reshape(n, -1), (-(dmin * mn)).reshape(n, -1)
    if qtype == "Q6_K":
        q, scale = _q6_k_ints(b)
        return q.reshape(n, -1, 16), scale.reshape(n, -1), None
    d = _f16(b[:, 0:2])[:, 0]
    if qtype == "Q8_0":
        q, m = b[:, 2:].view(torch.int8).long(), None
    else:
        qs = b[:, 2:18] if qtype == "Q4_0" else b[:, 4:20]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).long() - (8 if qtype == "Q4_0" else 0)
        m = _f16(b[:, 2:4])[:, 0] if qtype == "Q4_1" else None
    return q.reshape(n, -1, 32), d.reshape(n, -1), None if m is None else m.reshape(n, -1)


def integer_matmul(x: Tensor, blocks: Tensor, qtype: str) -> Tensor:
    """The kernels' integer path, plainly: activations quantized per block, exact integer sums per
    group, then sum over groups of (d_w * d_x) * sum (+ (m_w * d_x) * sum of q_x), in float64."""
    lead, K = x.shape[:-1], x.shape[-1]
    q, d = quantize_activations(x.reshape(-1, K))
    qw, dw, mw = integer_parts(blocks, qtype)
    g = qw.shape[-1]  # values per weight scale: 32, or 16 (an activation block's scale then serves two)
    qx = q.reshape(q.shape[0], -1, g).double()  # (M, G, g)
    d = d.repeat_interleave(32 // g, dim=-1)  # (M, G)
    isum = torch.einsum("mbi,nbi->mnb", qx, qw.double())  # exact: |sum| < 2^20
    y = ((dw.unsqueeze(0) * d.unsqueeze(1)).double() * isum).sum(-1)
    if mw is not None:
        y += ((mw.unsqueeze(0) * d.unsqueeze(1)).double() * qx.sum(-1).unsqueeze(1)).sum(-1)
    return y.float().reshape(*lead, blocks.shape[0])


_DECODE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
