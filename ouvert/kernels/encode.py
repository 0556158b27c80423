"""Float weights -> GGUF's block formats: the encoder to formats.py's decoder (csrc/blocks.h draws
the bytes). `quantize(w, qtype)` turns (..., K) floats into (..., bytes per row) uint8, rows of
blocks exactly as GGUF stores them, so that `formats.dequantize(quantize(w, t), t)` is w rounded.

Q8_0, Q4_0 and Q4_1 are ggml's reference round-to-nearest schemes, in the same float32 operations,
so their bytes are those of ggml's quantize_row_*_ref (and of the gguf package's numpy version).

Q4_K, Q5_K and Q6_K follow llama.cpp's k-quants design (its quantize_row_q*_K_ref, the path it takes
without an importance matrix), written here over all blocks at once:
  - Q4_K / Q5_K: each sub-block of 32 gets a scale s and an offset m (value ~ s * q - m, q in
    0..nmax) from a search (_fit_scale_min): candidate grids of a little under to a little over nmax
    steps across the sub-block's range label the values by rounding; s and m are fitted to each
    labelling by weighted least squares (weights |x| + the sub-block's RMS, so large values count
    more) and the fit with the least weighted squared error is kept, its offset becoming the origin
    of the grids tried after it. The 8 scales and 8 offsets then become 6-bit multiples of the
    super-block's f16 d and dmin, and the values are labelled again against the scales as stored.
  - Q6_K: each sub-block of 16 gets one signed scale, from candidates around max / -32 (the value of
    largest magnitude lands on -32, the level that has no positive twin), each refitted by least
    squares with weights x^2; the 16 scales become int8 multiples of the super-block's f16 d.
Where this departs from llama.cpp: its sums run left to right in float32, ours in torch's order, so
a near tie between two candidates can fall the other way. On Gaussian weights llama.cpp's own
quantizer writes the same bytes for about 96% of Q4_K blocks, 85% of Q5_K and 97% of Q6_K, with
the same squared error to within 0.1% (tests/test_encode.py checks it). Weights whose f16 scales
would overflow are refused rather than stored as inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ouvert.kernels.formats import block_type

_CHUNK = 1 << 20  # values encoded at a time: the k-quant search holds a few tensors of this size


def quantize(w: Tensor, qtype: str | int) -> Tensor:
    """w (..., K) float of any dtype, computed in float32 -> (..., bytes per row) uint8 in `qtype`
    (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K); K a multiple of the type's block."""
    t = block_type(qtype)
    if w.dim() == 0 or w.shape[-1] % t.values or not w.is_floating_point():
        raise ValueError(f"cannot store a {w.dtype} tensor of shape {tuple(w.shape)} as {t.name}: its rows "
                         f"must be floats whose length is a multiple of {t.name}'s {t.values} values a block")
    x = w.detach().float().contiguous()
    if not torch.isfinite(x).all():
        raise ValueError(f"cannot store a tensor of shape {tuple(w.shape)} as {t.name}: it has inf or NaN values")
    lead, K = x.shape[:-1], x.shape[-1]
    if t.name == "F32":  # a copy: x may be w itself
        return x.clone().view(torch.uint8).reshape(*lead, K * 4)
    if t.name in ("F16", "BF16"):
        return _halves(x, torch.float16 if t.name == "F16" else torch.bfloat16, t.name).reshape(*lead, K * 2)
    xb = x.reshape(-1, t.values)  # one block a row
    out = torch.empty(xb.shape[0], t.bytes, dtype=torch.uint8, device=x.device)
    step = max(1, _CHUNK // t.values)
    for i in range(0, xb.shape[0], step):  # chunks of many blocks, to bound the search's memory
        out[i : i + step] = _ENCODE[t.name](xb[i : i + step])
    return out.reshape(*lead, K // t.values * t.bytes)


def _halves(v: Tensor, dtype: torch.dtype, what: str) -> Tensor:
    """float32 (..., n) -> (..., 2n) bytes of `dtype` (round to nearest even), refusing overflow."""
    h = v.to(dtype)
    if not torch.isfinite(h).all():
        raise ValueError(f"a value or scale of {v.abs().max().item():.4g} overflows {what}'s {dtype} fields")
    return h.view(torch.uint8)


def _f16(v: Tensor, what: str) -> tuple[Tensor, Tensor]:
    """(B,) float32 -> (B, 2) f16 bytes, and the f16 values back as float32 (what the decoder reads)."""
    h = _halves(v.unsqueeze(1), torch.float16, what)
    return h, h.view(torch.float16).float()[:, 0]


_MAGIC = 12582912.0  # 1.5 * 2^23: a float32 this large has no fraction bits


def _rne(v: Tensor) -> Tensor:
    """Round half to even, as llama.cpp's nearest_int does: adding 1.5 * 2^23 rounds the sum to an
    integer, subtracting it back is exact. Right for |v| < 2^22 (callers clamp first). Two adds,
    where torch.round / floor / trunc go multithreaded from a few thousand values, which costs
    milliseconds a call when the cores are busy."""
    return (v + _MAGIC) - _MAGIC


def _floor(v: Tensor) -> Tensor:
    r = _rne(v)
    return r - (r > v).float()


def _roundf(v: Tensor) -> Tensor:
    """C's roundf, halves away from zero, exactly: floor(a) + floor(2 * frac(a)) with the sign of v
    (the frac and the doubling are exact in float32; trunc(v + 0.5) is not, just below one half)."""
    a = v.abs()
    f = _floor(a)
    return torch.sign(v) * (f + (2 * (a - f) >= 1).float())


def _nibbles(q: Tensor) -> Tensor:
    """(B, 2, n) values 0..15 -> (B, n) bytes: the first half in the low nibbles, the second high."""
    return (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8)


def _safe(q: Tensor, lo: int, hi: int) -> Tensor:
    """Labels as integers in lo..hi. A block whose float32 scale is subnormal has an inverse of inf
    (ggml's code does the same and its cast is then undefined); its f16 scale is 0, so any label
    decodes the same, and NaN / inf labels become lo."""
    return torch.nan_to_num(q, nan=lo, posinf=lo, neginf=lo).clamp(lo, hi).long()


# ---- Q8_0 / Q4_0 / Q4_1: ggml's reference schemes ------------------------------------------------------
def _q8_0(x: Tensor) -> Tensor:
    """[ d: f16 ][ 32 int8 ]: d = max|x| / 127, q = roundf(x / d)."""
    d = x.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = _safe(_roundf(x * inv), -127, 127)
    return torch.cat([_f16(d[:, 0], "Q8_0")[0], q.to(torch.int8).view(torch.uint8)], 1)


def _q4_0(x: Tensor) -> Tensor:
    """[ d: f16 ][ 16 bytes of nibbles ]: d = (the value of largest magnitude) / -8, so that value
    is level 0 (-8) and the other end is 15 (+7) at most; q = trunc(x / d + 8.5)."""
    big = x.gather(1, x.abs().argmax(1, keepdim=True))  # the first of equal magnitudes, as ggml takes
    d = big / -8
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = _safe(_floor((x * inv + 8.5).clamp(0, 16)), 0, 15)  # floor is trunc here: the sum is >= 0
    return torch.cat([_f16(d[:, 0], "Q4_0")[0], _nibbles(q.reshape(-1, 2, 16))], 1)


def _q4_1(x: Tensor) -> Tensor:
    """[ d: f16 ][ m: f16 ][ 16 bytes of nibbles ]: m = min, d = (max - min) / 15, q = trunc((x - m) / d + 0.5)."""
    mn, mx = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    d = (mx - mn) / 15
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = _safe(_floor(((x - mn) * inv + 0.5).clamp(0, 16)), 0, 15)
    return torch.cat([_f16(d[:, 0], "Q4_1")[0], _f16(mn[:, 0], "Q4_1")[0], _nibbles(q.reshape(-1, 2, 16))], 1)


# ---- k-quants ------------------------------------------------------------------------------------------
def _fit_scale_min(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                   search: bool = True) -> tuple[Tensor, Tensor]:
    """Sub-blocks x (..., n) with weights w -> scale s >= 0 and offset m >= 0 (...) such that
    x ~ s * q - m, q in 0..nmax, by a search over nstep + 1 candidate grids: grid i puts
    nmax + rmin + rdelta * i steps between the origin and the sub-block's max, labels the values by
    rounding, and fits s and m to those labels by weighted least squares; a fit with a smaller
    weighted squared error sum w (s q - m - x)^2 is kept and its -m becomes the origin of the next
    grids (so the search also iterates on the offset, as llama.cpp's does). The first origin is the
    sub-block's min, or 0 when every value is positive (m is stored unsigned). Without `search`,
    the plain choice s = (max - min) / nmax, m = -min."""
    hi = x.amax(-1, keepdim=True)
    lo = x.amin(-1, keepdim=True).clamp(max=0)  # (..., 1): the grid's origin, -m
    flat = hi - lo <= 1e-30  # one value (or one that rounds so): s = 0 and the offset holds it
    rng = torch.where(flat, torch.ones_like(lo), hi - lo)
    scale = 1 / (nmax / rng)  # (..., 1)
    if search:
        sw, sx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
        q = _rne((x - lo).mul_(nmax / rng).clamp_(0, nmax))
        best = (w * (scale * q + lo - x).square_()).sum(-1, keepdim=True)
        for i in range(nstep + 1):
            q = _rne((x - lo).mul_((nmax + rmin + rdelta * i) / rng).clamp_(0, nmax))
            wq = w * q
            sl, sl2, sxl = wq.sum(-1, keepdim=True), (wq * q).sum(-1, keepdim=True), (wq * x).sum(-1, keepdim=True)
            det = sw * sl2 - sl * sl
            s = (sw * sxl - sx * sl) / det  # the weighted least-squares line through (q, x)
            o = (sl2 * sx - sl * sxl) / det
            pos = o > 0  # an offset above zero cannot be stored: fit the scale alone
            s, o = torch.where(pos, sxl / sl2, s), torch.where(pos, torch.zeros_like(o), o)
            err = (w * (s * q + o - x).square_()).sum(-1, keepdim=True)
            better = (det > 0) & (err < best)  # NaN from a zero determinant is never better
            best = torch.where(better, err, best)
            scale, lo = torch.where(better, s, scale), torch.where(better, o, lo)
            rng = torch.where(better, hi - o, rng)
    scale = torch.where(flat, torch.zeros_like(scale), scale).clamp(min=0)
    return scale[..., 0], (-lo[..., 0]).clamp(min=0)


def _six_bits(v: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """(B, 8) non-negative -> f16 bytes of the super-block factor v.max / 63, its float32 value, and
    the 8 six-bit multipliers round(63 v / v.max) (B, 8)."""
    top = v.amax(1)
    inv = torch.where(top > 0, 63 / top, torch.zeros_like(top))
    levels = _rne((v * inv.unsqueeze(1)).clamp(0, 63)).long()
    h, f = _f16(top / 63, what)
    return h, f, levels


def _pack_scales_mins(sc: Tensor, mn: Tensor) -> Tensor:
    """8 six-bit scales and mins (B, 8) -> the 12 bytes csrc/blocks.h draws for Q4_K / Q5_K."""
    return torch.cat([
        sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
    ], 1).to(torch.uint8)


def _k_levels(x: Tensor, nmax: int, rmin: float, nstep: int, what: str, search: bool) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K's common part: x (B, 256) -> the 16 header bytes (d, dmin, 12 scale bytes) and the
    labels q (B, 8, 32) in 0..nmax against the scales as stored."""
    xs = x.reshape(-1, 8, 32)
    w = xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()
    scale, offset = _fit_scale_min(xs, w, nmax, rmin, 0.1, nstep, search)  # (B, 8) each
    dh, d, ls = _six_bits(scale, what)
    mh, dmin, lm = _six_bits(offset, what)
    step = (d.unsqueeze(1) * ls).unsqueeze(-1)  # (B, 8, 1): the sub-blocks' scales as decoded
    off = (dmin.unsqueeze(1) * lm).unsqueeze(-1)
    q = _rne(((xs + off) / torch.where(step != 0, step, torch.ones_like(step))).clamp(0, nmax)).long()
    q = torch.where(step != 0, q, torch.zeros_like(q))  # a zero scale: every label decodes to -off
    return torch.cat([dh, mh, _pack_scales_mins(ls, lm)], 1), q


def _q4_k(x: Tensor, search: bool = True) -> Tensor:
    """[ d ][ dmin ][ 12 scale bytes ][ 128 bytes: group g's low nibbles sub-block 2g, high 2g + 1 ]."""
    head, q = _k_levels(x, 15, -1.0, 20, "Q4_K", search)
    return torch.cat([head, _nibbles(q.reshape(-1, 4, 2, 32).transpose(1, 2)).reshape(-1, 128)], 1)


def _q5_k(x: Tensor, search: bool = True) -> Tensor:
    """[ d ][ dmin ][ 12 scale bytes ][ qh: 32 bytes, bit j of byte i = bit 4 of value i of sub-block j ]
    [ qs: 128 bytes of low nibbles, laid out as Q4_K's ]."""
    head, q = _k_levels(x, 31, -0.5, 15, "Q5_K", search)
    qh = ((q >> 4) << torch.arange(8, device=q.device).view(1, 8, 1)).sum(1)  # (B, 32): the bits are disjoint
    qs = _nibbles((q & 0x0F).reshape(-1, 4, 2, 32).transpose(1, 2)).reshape(-1, 128)
    return torch.cat([head, qh.to(torch.uint8), qs], 1)


def _fit_signed_scale(x: Tensor, nmax: int, search: bool = True) -> Tensor:
    """Sub-blocks x (..., n) -> a signed scale s (...) with x ~ s q, q in -nmax..nmax-1: candidates
    -(nmax + 0.1 i) / big (i = -9..9, big the value of largest magnitude, so it lands on -nmax), each
    refitted by least squares with weights x^2, the best kept. Without `search`, s = big / -nmax."""
    big = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (..., 1)
    zero = big.abs() < 1e-15
    big = torch.where(zero, torch.ones_like(big), big)
    scale = (big / -nmax)[..., 0]
    if search:
        w = x.square()
        best = torch.full_like(scale, -1.0)
        for i in [0, *range(-9, 0), *range(1, 10)]:  # 0 first: a later candidate must do strictly better
            q = _rne((x * (-(nmax + 0.1 * i) / big)).clamp_(-nmax, nmax - 1))
            wq = w * q
            slx, sl2 = (wq * x).sum(-1), (wq * q).sum(-1)
            gain = slx * slx / sl2  # the weighted squared error is sum w x^2 - slx^2 / sl2
            better = (sl2 > 0) & (gain > best)
            best, scale = torch.where(better, gain, best), torch.where(better, slx / sl2, scale)
    return torch.where(zero[..., 0], torch.zeros_like(scale), scale)


def _q6_k(x: Tensor, search: bool = True) -> Tensor:
    """[ ql: 128 bytes ][ qh: 64 bytes ][ 16 int8 scales ][ d: f16 ], q = label + 32 in 0..63; in each
    half of 128 values, value 32k + i (quarter k) keeps its low nibble in ql[32 (k % 2) + i] (low
    nibble for k < 2, high for k >= 2) and its top 2 bits in qh[i] at bit 2k."""
    xs = x.reshape(-1, 16, 16)
    scale = _fit_signed_scale(xs, 32, search)  # (B, 16)
    top = scale.gather(1, scale.abs().argmax(1, keepdim=True))[:, 0]  # the signed scale of largest magnitude
    zero = top.abs() < 1e-15
    inv = torch.where(zero, torch.zeros_like(top), -128 / torch.where(zero, torch.ones_like(top), top))
    dh, d = _f16(torch.where(zero, torch.zeros_like(top), 1 / inv), "Q6_K")
    sc = _rne((scale * inv.unsqueeze(1)).clamp(-128, 127))  # (B, 16), the largest at -128
    step = (d.unsqueeze(1) * sc).unsqueeze(-1)  # (B, 16, 1)
    q = _rne((xs / torch.where(step != 0, step, torch.ones_like(step))).clamp(-32, 31)).long() + 32
    q = torch.where(step != 0, q, torch.full_like(q, 32))
    lo, hi = (q & 0x0F).reshape(-1, 2, 4, 32), (q >> 4).reshape(-1, 2, 4, 32)  # (B, half, quarter, 32)
    ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)  # (B, 2, 64)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)  # (B, 2, 32)
    n = x.shape[0]
    return torch.cat([ql.reshape(n, 128).to(torch.uint8), qh.reshape(n, 64).to(torch.uint8),
                      sc.to(torch.int8).view(torch.uint8), dh], 1)


_ENCODE = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
