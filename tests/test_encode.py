"""The block-format encoder (ouvert/kernels/encode.py) against the decoder it must feed
(formats.dequantize), the gguf package's quantizers (byte for byte where it has one), llama.cpp's
own k-quant quantizer (through cyllama), and the C++ kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_kernels import ISAS, _bound

from ouvert import kernels
from ouvert.kernels import encode
from ouvert.kernels.formats import TYPES, dequantize, row_bytes

ALL = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
K_QUANTS = ["Q4_K", "Q5_K", "Q6_K"]
GGUF_QUANTIZES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]  # the types gguf.quants can encode

# RMS error over RMS of w on Gaussian weights (measured: F16 0.021%, BF16 0.16%, Q8_0 0.53%, Q4_0 8.6%,
# Q4_1 7.9%, Q4_K 7.2%, Q5_K 3.6%, Q6_K 1.78%), with a little room
ERROR_BOUND = {"F32": 0.0, "F16": 2.5e-4, "BF16": 2e-3, "Q8_0": 6e-3, "Q4_0": 0.09, "Q4_1": 0.082,
               "Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.0185}


def gaussian(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def heavy_tailed(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Student-t-like weights: a Gaussian over the square root of a uniform, so some values are 20x the rest."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) / torch.rand(n, k, generator=g).clamp(min=0.0025).sqrt() * 0.02


def awkward(k: int = 256) -> torch.Tensor:
    """Rows that break careless encoders: zeros (row 0), constants (1-3), ties of +a and -a (4, 16),
    one outlier (5), huge and tiny magnitudes, a subnormal row whose float32 scale has an infinite
    inverse (10), and halves for Q8_0 to round away from zero (17: its scale is 1)."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(k, generator=g)
    rows = [torch.zeros(k), torch.full((k,), 0.37), torch.full((k,), -1.5), torch.full((k,), 3.0),
            torch.tensor([1.0, -1.0]).repeat(k // 2), torch.where(torch.arange(k) == 77, 1e3, 1e-3 * r),
            torch.where(torch.arange(k) % 32 == 5, -4.0, 1e-2 * r), r * 1e4, r * 1e-6, r * 1e-30, r * 1e-40,
            r.clamp(min=0), -r.abs(), r.round(), torch.full((k,), 1e-3), r, torch.tensor([-2.0, 2.0]).repeat(k // 2),
            torch.where(torch.arange(k) % 32 == 0, 127.0, torch.arange(k) % 32 - 16.5)]
    return torch.stack(rows)


def rel_error(w: torch.Tensor, qtype: str) -> float:
    y = dequantize(encode.quantize(w, qtype), qtype)
    return ((y - w).square().mean().sqrt() / w.square().mean().sqrt()).item()


@pytest.mark.parametrize("qtype", ALL)
def test_round_trip_error(qtype):
    w = gaussian(16, 1024)
    b = encode.quantize(w, qtype)
    assert b.dtype == torch.uint8 and b.shape == (16, row_bytes(qtype, 1024))
    assert rel_error(w, qtype) <= ERROR_BOUND[qtype]
    if qtype == "F32":
        assert torch.equal(dequantize(b, qtype), w)


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_k_quant_search_beats_plain_rounding(qtype):
    """The scale search against the same layout with the plain choice (scale = range / nmax, offset
    = min; Q6_K: scale = max / -32). Measured RMS error ratios, Gaussian: Q4_K 0.911, Q5_K 0.947,
    Q6_K 0.948; heavy-tailed: 0.929, 0.944, 0.989 (Q6_K's search weighs errors by x^2, and by
    that measure it gains 19% there)."""
    encoder = getattr(encode, "_" + qtype.lower())
    for w, most in ((gaussian(16, 1024), 0.96), (heavy_tailed(16, 1024), 0.995)):
        blocks = w.reshape(-1, 256)
        searched = dequantize(encoder(blocks), qtype)
        plain = dequantize(encoder(blocks, search=False), qtype)
        ratio = ((searched - blocks).square().sum() / (plain - blocks).square().sum()).sqrt().item()
        assert ratio < most, (qtype, ratio)


@pytest.mark.parametrize("qtype", GGUF_QUANTIZES)
def test_bytes_are_the_gguf_packages(qtype):
    """Byte for byte the gguf package's numpy quantizer (ggml's reference schemes), on random and
    awkward rows; the subnormal row is left out, where the reference divides by a zero f16 scale."""
    gguf = pytest.importorskip("gguf")
    w = torch.cat([gaussian(16, 512).reshape(-1, 256), heavy_tailed(4, 256), awkward()[:10], awkward()[11:]])
    ours = encode.quantize(w, qtype)
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert np.array_equal(ours.numpy(), ref.view(np.uint8).reshape(ours.shape))


@pytest.mark.parametrize("qtype", K_QUANTS)
def test_gguf_package_decodes_our_k_quants(qtype):
    gguf = pytest.importorskip("gguf")
    b = encode.quantize(torch.cat([heavy_tailed(8, 512).reshape(-1, 256), awkward()]), qtype)
    ref = gguf.quants.dequantize(b.numpy(), gguf.GGMLQuantizationType[qtype])
    torch.testing.assert_close(dequantize(b, qtype), torch.from_numpy(ref).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", ALL[3:])
def test_awkward_rows_decode_finite_and_close(qtype):
    w = awkward()
    y = dequantize(encode.quantize(w, qtype), qtype)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], torch.zeros(256))
    for i in (1, 2, 3):  # a constant row comes back as itself, to f16 precision
        torch.testing.assert_close(y[i], w[i], rtol=2e-3, atol=0)
    assert abs(y[5, 77].item() - 1e3) < 0.05 * 1e3  # the outlier keeps its value
    assert y[10].abs().max() <= 1e-30  # a subnormal row decodes to (about) zero, not NaN


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(3, 100\) as Q4_K.*multiple of Q4_K's 256"):
        encode.quantize(torch.randn(3, 100), "Q4_K")
    with pytest.raises(ValueError, match=r"shape \(4, 48\) as Q8_0"):
        encode.quantize(torch.randn(4, 48), TYPES["Q8_0"].id)
    with pytest.raises(ValueError, match="torch.int64 tensor"):
        encode.quantize(torch.ones(2, 32, dtype=torch.long), "Q8_0")
    with pytest.raises(ValueError, match=r"shape \(\) as F32"):
        encode.quantize(torch.tensor(1.0), "F32")
    with pytest.raises(ValueError, match="GGML type 'Q5_0' has no kernel"):
        encode.quantize(torch.randn(2, 32), "Q5_0")
    with pytest.raises(ValueError, match="inf or NaN"):
        encode.quantize(torch.tensor([[float("nan")] * 32]), "Q4_0")
    with pytest.raises(ValueError, match="overflows F16"):
        encode.quantize(torch.full((1, 8), 1e5), "F16")
    with pytest.raises(ValueError, match="overflows Q8_0"):
        encode.quantize(torch.full((1, 32), 1e7), "Q8_0")


def test_dtypes_leading_dims_and_chunks(monkeypatch):
    """bfloat16 input encodes as its float32 values; (..., K) keeps its leading dims; the chunked
    loop writes the same bytes as one chunk."""
    w = heavy_tailed(6, 512).bfloat16()
    for qtype in ("Q4_K", "Q4_1", "BF16"):
        b = encode.quantize(w, qtype)
        assert torch.equal(b, encode.quantize(w.float(), qtype))
        assert torch.equal(encode.quantize(w.reshape(2, 3, 512), qtype), b.reshape(2, 3, -1))
        monkeypatch.setattr(encode, "_CHUNK", 700)  # not a multiple of any block
        assert torch.equal(encode.quantize(w, qtype), b)
        monkeypatch.undo()
    x = torch.randn(4, 32)
    b = encode.quantize(x, "F32")
    b.zero_()  # the bytes are a copy, not a view of the weight
    assert x.abs().sum() > 0


@pytest.mark.skipif(not ISAS, reason="ouvert's C++ kernels are not built")
@pytest.mark.parametrize("qtype", ALL)
def test_kernels_multiply_the_encoded_weights(qtype):
    """ouvert's C++ kernel on encoded weights gives x @ dequantize(quantize(w)).T as its twin computes
    it, within test_kernels' bound (float activations: integer dots off; x rounded to bfloat16 where
    bfloat16 weights take AVX-512 BF16's pairs)."""
    was = kernels.integer_dots()
    kernels.use_integer_dots(False)
    try:
        w = heavy_tailed(24, 512, seed=2)
        b = encode.quantize(w, qtype)
        wf = dequantize(b, qtype)
        x = torch.randn(5, 512, generator=torch.Generator().manual_seed(3))
        y = kernels.block_matmul(x, b, TYPES[qtype].id)
        assert ((y - kernels.twin_matmul(x, b, TYPES[qtype].id)).abs() <= _bound(x, wf)).all()
    finally:
        kernels.use_integer_dots(was)


# ---- llama.cpp's own k-quant quantizer ---------------------------------------------------------------
def _narrow_llama_gguf(path, g: np.random.Generator, layers: int = 4) -> dict[str, np.ndarray]:
    """A float32 llama of width 256 whose other dims are 64 (one head of 64, a feed-forward of 64, a
    vocabulary of 64): the matrices with rows of 256 values are 64 k-quant blocks each, small enough
    that torch runs each op on one thread (fast on a busy machine); rows of 64 fall back to other types."""
    import gguf

    hidden, small = 256, 64
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(small)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_key_length(small)
    w.add_value_length(small)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(small)

    def mat(n, k):
        return (g.standard_normal((n, k)) * 0.02).astype(np.float32)

    t = {"token_embd.weight": mat(small, hidden), "output_norm.weight": np.ones(hidden, np.float32),
         "output.weight": mat(small, hidden)}
    for i in range(layers):
        t |= {f"blk.{i}.attn_norm.weight": np.ones(hidden, np.float32),
              f"blk.{i}.ffn_norm.weight": np.ones(hidden, np.float32),
              **{f"blk.{i}.{n}.weight": mat(small, hidden)
                 for n in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")},
              f"blk.{i}.attn_output.weight": mat(hidden, small), f"blk.{i}.ffn_down.weight": mat(hidden, small)}
    for name, v in t.items():
        w.add_tensor(name, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return t


def test_llama_cpp_writes_the_same_k_quants(tmp_path):
    """llama.cpp (cyllama's build) quantizes a float32 GGUF as Q4_K_M and Q5_K_M (Q4_K / Q5_K with
    some tensors in Q6_K); our encoder on the same floats writes the same bytes for most blocks (the
    rest are near ties its left-to-right float32 sums break otherwise: measured 96% of Q4_K blocks,
    85% of Q5_K, 97% of Q6_K) with the same squared error to within 0.1%."""
    cp = pytest.importorskip("cyllama.llama.llama_cpp")
    gguf = pytest.importorskip("gguf")
    cp.disable_logging()
    src = tmp_path / "f32.gguf"
    floats = _narrow_llama_gguf(src, np.random.default_rng(0))
    stats = {t: [0, 0, 0.0, 0.0] for t in K_QUANTS}  # same blocks, blocks, our squared error, theirs
    for ftype in (15, 17):  # LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M
        params = cp.LlamaModelQuantizeParams()
        params.ftype, params.nthread = ftype, 1
        out = tmp_path / f"{ftype}.gguf"
        cp.model_quantize(str(src), str(out), params)
        for t in gguf.GGUFReader(out).tensors:
            qtype = t.tensor_type.name
            if qtype not in K_QUANTS:
                continue
            x = torch.from_numpy(floats[t.name])
            theirs = torch.from_numpy(np.array(t.data).reshape(x.shape[0], -1).copy())
            ours = encode.quantize(x, qtype)
            nb = TYPES[qtype].bytes
            s = stats[qtype]
            s[0] += (ours.reshape(-1, nb) == theirs.reshape(-1, nb)).all(1).sum().item()
            s[1] += ours.numel() // nb
            s[2] += (dequantize(ours, qtype) - x).square().sum().item()
            s[3] += (dequantize(theirs, qtype) - x).square().sum().item()
    for qtype, (same, blocks, ours, theirs) in stats.items():
        assert blocks >= 256, (qtype, blocks)
        assert same / blocks >= (0.75 if qtype == "Q5_K" else 0.9), (qtype, same / blocks)
        assert abs(ours / theirs - 1) < 1e-3, (qtype, ours / theirs)
