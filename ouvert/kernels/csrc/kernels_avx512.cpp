// AVX-512 (F, BW, VL) + FMA + F16C: 16 float lanes. Only run when the CPU reports them (ops.cpp).
// Compiled three times: as the avx512 path; (kernels_avx512_vnni.cpp defines OUVERT_VNNI) as the
// avx512_vnni path, whose integer dots take VNNI's vpdpbusd (the same sums in one instruction); and
// (kernels_avx512_bf16.cpp adds OUVERT_BF16) as avx512_bf16, whose bfloat16 products take vdpbf16ps.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(OUVERT_BF16)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")
#define OUVERT_NS avx512_bf16
#elif defined(OUVERT_VNNI)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#define OUVERT_NS avx512_vnni
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#define OUVERT_NS avx512
#endif
#include <immintrin.h>

#include "kernels.h"

namespace ouvert_kernels::OUVERT_NS {

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#define OUVERT_WIDE_QDOTS
#include "avx2_shared.h"

using vec = __m512;
constexpr int W = 16;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline float vsum(vec v) {  // the halves, then AVX2's fixed tree (avx2_shared.h)
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

static inline vec vload_bf16(const uint16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
static inline vec vload_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
static inline void affine16(const uint8_t* q, float d, float m, float* y) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  _mm512_storeu_ps(y, _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(d), a), _mm512_set1_ps(m)));
}
static inline void scale16(const int8_t* q, float d, float* y) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))));
}


// ---- integer dots, two blocks per 512-bit instruction -------------------------------------------
// Lanes 0-7 carry the even blocks and lanes 8-15 the odd ones, so the accumulator's halves are
// AVX2's two accumulators (avx2_shared.h), lane for lane: the same numbers, at half the instructions.
static inline __m512i dot_u8_i8_512(__m512i u, __m512i s) {
#ifdef OUVERT_VNNI
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#else
  return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
#endif
}
static inline __m512i pair(__m256i even, __m256i odd) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(even), odd, 1);
}
static inline __m512 pair_ps(float even, float odd) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(even)),
                                             _mm256_castps_pd(_mm256_set1_ps(odd)), 1));
}
// |q| times x carrying q's sign (x negated where q < 0): maddubs takes its first operand unsigned.
static inline __m512i signed_dot(__m512i q, __m512i x) {
  const __m512i sx = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(q), _mm512_setzero_si512(), x);
  return dot_u8_i8_512(_mm512_abs_epi8(q), sx);
}
static inline __m512i load_x(const int8_t* qx, int64_t b, int64_t nb) {  // blocks b and b + 1 (zeros past nb)
  return b + 1 < nb ? _mm512_loadu_si512(qx + 32 * b)
                    : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + 32 * b)));
}
static inline float hsum_pair(__m512 acc) {
  return hsum8(_mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1))));
}

// Block pair g's two scales from 8 blocks' (v): lanes 0-7 float 2g of v, lanes 8-15 float 2g + 1.
static inline __m512 pair_scales(__m256 v, int g) {
  const __m512i index =
      _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(2 * g)), _mm256_set1_epi32(2 * g + 1), 1);
  return _mm512_permutexvar_ps(index, _mm512_castps256_ps512(v));
}

// Whole groups of 8 blocks take their 8 scales (and Q4_1's offsets) in vectors (halves8, in
// avx2_shared.h, as the AVX2 path does), the blocks after the last group one pair at a time.
template <int R>
static inline void qdot_rows_signed(const uint8_t* w, int stride, bool nibbles, const int8_t* qx, int64_t K,
                                    const float* dx, int64_t nb, float* out, int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8, w += 8 * stride) {
    const __m256 dw = halves8(w, stride);
    __m256 dwx[R];
    for (int r = 0; r < R; r++) dwx[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(dx + r * nb + b));
    for (int g = 0; g < 4; g++) {
      const uint8_t* wg = w + 2 * g * stride;
      const __m512i q = pair(signed_block(wg, nibbles), signed_block(wg + stride, nibbles));
      for (int r = 0; r < R; r++) {
        const __m512i p = signed_dot(q, _mm512_loadu_si512(qx + r * K + 32 * (b + 2 * g)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scales(dwx[r], g), acc[r]);
      }
    }
  }
  for (; b < nb; b += 2, w += 2 * stride) {
    const bool two = b + 1 < nb;
    const __m512i q = pair(signed_block(w, nibbles), two ? signed_block(w + stride, nibbles) : _mm256_setzero_si256());
    const float d0 = half_to_float(load_u16(w)), d1 = two ? half_to_float(load_u16(w + stride)) : 0.0f;
    for (int r = 0; r < R; r++) {
      const __m512i p = signed_dot(q, load_x(qx + r * K, b, nb));
      const float* d = dx + r * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_ps(d0 * d[0], two ? d1 * d[1] : 0.0f), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum_pair(acc[r]);
}
template <int R>
static inline void qdot_rows_q4_1(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, const int32_t* sx,
                                  int64_t nb, float* out, int64_t ldo) {
  __m512 acc[R];
  __m256 offv[R];  // lane i: the offset terms of block i of every group
  float offsets[R][2];  // those of the blocks after the last group, even and odd
  for (int r = 0; r < R; r++) {
    acc[r] = _mm512_setzero_ps();
    offv[r] = _mm256_setzero_ps();
    offsets[r][0] = offsets[r][1] = 0.0f;
  }
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8, w += 160) {
    __m256 dwx[R];
    q4_1_group<R>(w, dx, sx, nb, b, dwx, offv);
    for (int g = 0; g < 4; g++) {
      const __m512i q = pair(nibbles32(w + 40 * g + 4), nibbles32(w + 40 * g + 24));
      for (int r = 0; r < R; r++) {
        const __m512i p = dot_u8_i8_512(q, _mm512_loadu_si512(qx + r * K + 32 * (b + 2 * g)));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scales(dwx[r], g), acc[r]);
      }
    }
  }
  for (; b < nb; b += 2, w += 40) {
    const bool two = b + 1 < nb;
    const __m512i q = pair(nibbles32(w + 4), two ? nibbles32(w + 24) : _mm256_setzero_si256());
    const float d0 = half_to_float(load_u16(w)), m0 = half_to_float(load_u16(w + 2));
    const float d1 = two ? half_to_float(load_u16(w + 20)) : 0.0f, m1 = two ? half_to_float(load_u16(w + 22)) : 0.0f;
    for (int r = 0; r < R; r++) {
      const __m512i p = dot_u8_i8_512(q, load_x(qx + r * K, b, nb));
      const float* d = dx + r * nb + b;
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_ps(d0 * d[0], two ? d1 * d[1] : 0.0f), acc[r]);
      offsets[r][0] += m0 * d[0] * float(sx[r * nb + b]);
      if (two) offsets[r][1] += m1 * d[1] * float(sx[r * nb + b + 1]);
    }
  }
  for (int r = 0; r < R; r++)
    out[r * ldo] = hsum_pair(acc[r]) + (hsum8(offv[r]) + (offsets[r][0] + offsets[r][1]));
}

// Q4_K (and Q5_K, Five: with its fifth bits): sub-blocks 2g and 2g + 1 are the low and high nibbles of
// the same 32 bytes; the min terms as on AVX2 (kquant_dots.h).
template <int R, bool Five>
static inline void qdot_rows_q4_k(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, const int32_t* sx,
                                  int64_t nb, float* out, int64_t ldo) {
  __m512 acc[R];
  __m256 offsets[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps(), offsets[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; w += Five ? 176 : 144) {
    const float d = half_to_float(load_u16(w)), dmin = half_to_float(load_u16(w + 2));
    __m256 sc, mn;
    k_scales_mins8(w + 4, &sc, &mn);
    const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(dmin), mn);
    for (int r = 0; r < R; r++) {
      const __m256 xs = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sx + r * nb + b)));
      offsets[r] = _mm256_fmadd_ps(_mm256_mul_ps(dm, _mm256_loadu_ps(dx + r * nb + b)), xs, offsets[r]);
    }
    const __m256 ds = _mm256_mul_ps(_mm256_set1_ps(d), sc);  // d * scale_j
    __m256 dsx[R];  // d * scale_j * d_x of block b + j, for each row
    for (int r = 0; r < R; r++) dsx[r] = _mm256_mul_ps(ds, _mm256_loadu_ps(dx + r * nb + b));
    for (int g = 0; g < 4; g++, b += 2) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (Five ? 48 : 16) + 32 * g));
      __m256i even = _mm256_and_si256(raw, low), odd = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      if (Five) {
        even = _mm256_or_si256(even, fifth_bits(w + 16, 2 * g));
        odd = _mm256_or_si256(odd, fifth_bits(w + 16, 2 * g + 1));
      }
      const __m512i q = pair(even, odd);
      for (int r = 0; r < R; r++) {
        const __m512i p = dot_u8_i8_512(q, _mm512_loadu_si512(qx + r * K + 32 * b));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scales(dsx[r], g), acc[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum_pair(acc[r]) - hsum8(offsets[r]);
}

// Q6_K: blocks c and c + 1 (c even) read 64 contiguous bytes of low bits and the same 32 bytes of
// high bits, shifted by 2k and 2k + 2; four scales, one per 16 values.
template <int R>
static inline void qdot_rows_q6_k(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, int64_t nb, float* out,
                                  int64_t ldo) {
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3), bias = _mm512_set1_epi8(32);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t b = 0; b < nb; w += 210) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const __m128 d = _mm_set1_ps(half_to_float(load_u16(w + 208)));
    for (int c = 0; c < 8; c += 2, b += 2) {  // blocks c, c + 1: half c / 4, quarters k, k + 1 of it
      const int h = c / 4, k = c % 4;
      const __m512i ql = _mm512_loadu_si512(w + 64 * h);
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
      const __m512i lo4 = _mm512_and_si512(k >= 2 ? _mm512_srli_epi16(ql, 4) : ql, low);
      const __m512i hi2 = _mm512_and_si512(pair(_mm256_srli_epi16(qh, 2 * k), _mm256_srli_epi16(qh, 2 * k + 2)), three);
      const __m512i q = _mm512_sub_epi8(_mm512_or_si512(lo4, _mm512_slli_epi16(hi2, 4)), bias);
      // d * scale of each 16 values, as floats: lanes 0-3 block c's first 16, 4-7 its second, ...
      int32_t four;  // the 4 int8 scales of blocks c and c + 1
      std::memcpy(&four, scales + 2 * c, 4);
      const __m128 s = _mm_mul_ps(d, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(four))));
      for (int r = 0; r < R; r++) {
        const __m512i p = signed_dot(q, _mm512_loadu_si512(qx + r * K + 32 * b));
        const float* dxb = dx + r * nb + b;
        const __m128 sd = _mm_mul_ps(s, _mm_setr_ps(dxb[0], dxb[0], dxb[1], dxb[1]));
        const __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(sd));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[r]);
      }
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum_pair(acc[r]);
}

#include "impl.h"

#ifdef OUVERT_BF16
// x and W both bfloat16, 32 values a step: vdpbf16ps adds 16 pairs of products into the 16 lanes of
// an output's one chain (ops.cpp rounds x to bfloat16 once per product, as llama.cpp does for
// bfloat16 weights).
struct BF16Pairs {
  using T = uint16_t;
  using X = uint16_t;
  using V = __m512bh;
  static constexpr int step = 32;
  static V load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static V xload(const uint16_t* p) { return load(p); }
  static vec dot(vec acc, V x, V w) { return _mm512_dpbf16_ps(acc, x, w); }
  static float one(const uint16_t* p) { return AsBF16::one(p); }
  static float xone(const uint16_t* p) { return AsBF16::one(p); }
};

void matmul_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n0,
                 int64_t n1, float* y, int64_t ldy) {
  as_stored<BF16Pairs>(x, M, K, K, w, row_bytes, n0, n1, y, ldy);
}
#endif

}  // namespace ouvert_kernels::OUVERT_NS
