// What the AVX2 and AVX-512 paths share, included inside each one's namespace (kernels_avx2.cpp,
// kernels_avx512.cpp), both compiled with AVX2: unpacking nibbles on 128-bit lanes, and the
// integer block dots on 256-bit lanes, and hsum8, the fixed sum of 8 floats both vsum()s end with.

static inline void nibbles16(const uint8_t* qs, uint8_t* lo, uint8_t* hi, int bias) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i mask = _mm_set1_epi8(0x0F), off = _mm_set1_epi8(char(bias));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(lo), _mm_sub_epi8(_mm_and_si128(b, mask), off));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(hi), _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), off));
}

// Integer block dots (impl.h's qdot) on 256-bit integer lanes: maddubs multiplies unsigned by
// signed bytes into pairs of 16-bit sums (no overflow: at most 2 * 128 * 127), madd adds the pairs
// into 8 lanes of int32; each block's 8 partial sums become floats and join a float accumulator
// through d_w * d_x.
static inline __m256i dot_u8_i8(__m256i u, __m256i s) {
#ifdef OUVERT_VNNI
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);  // the same sums, in one instruction
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}
static inline __m256i nibbles32(const uint8_t* qs) {  // low nibbles in bytes 0-15, high in 16-31
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// A block's 32 weights as signed bytes (Q8_0 as stored, Q4_0's nibbles minus 8).
static inline __m256i signed_block(const uint8_t* w, bool nibbles) {
  return nibbles ? _mm256_sub_epi8(nibbles32(w + 2), _mm256_set1_epi8(8))
                 : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 2));
}
// 8 float16 scales at a stride (the d, or m, of 8 consecutive blocks), as floats.
static inline __m256 halves8(const uint8_t* p, int64_t stride) {
  return _mm256_cvtph_ps(_mm_setr_epi16(load_u16(p), load_u16(p + stride), load_u16(p + 2 * stride),
                                        load_u16(p + 3 * stride), load_u16(p + 4 * stride), load_u16(p + 5 * stride),
                                        load_u16(p + 6 * stride), load_u16(p + 7 * stride)));
}
#include "kquant_dots.h"

// A group of 8 Q4_1 blocks from block b: each row's d_w * d_x (dwx), and its offset terms
// m_w * d_x * s_x added into offv, lane i for block b + i (the AVX2 and AVX-512 dots share it).
template <int R>
static inline void q4_1_group(const uint8_t* w, const float* dx, const int32_t* sx, int64_t nb, int64_t b, __m256* dwx,
                              __m256* offv) {
  const __m256 dw = halves8(w, 20), mw = halves8(w + 2, 20);
  for (int r = 0; r < R; r++) {
    const __m256 d = _mm256_loadu_ps(dx + r * nb + b);
    dwx[r] = _mm256_mul_ps(dw, d);
    const __m256 s = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sx + r * nb + b)));
    offv[r] = _mm256_fmadd_ps(_mm256_mul_ps(mw, d), s, offv[r]);
  }
}

#ifndef OUVERT_WIDE_QDOTS  // kernels_avx512.cpp has its own, two blocks per 512-bit instruction
// R activation rows against one weight row, each weight block unpacked once for the R rows. Two
// accumulators per row, even and odd blocks, so that consecutive blocks' multiply-adds do not wait for
// each other; the order is fixed, so a row's result depends on nothing but that row (R = 1 is the
// one-row dot). qx, dx, sx: row r at qx + r * K, dx + r * nb, sx + r * nb; row r's result at out[r * ldo].
// Whole groups of 8 blocks take their 8 scales (and Q4_1's offsets) in vectors, one lane each; the
// blocks after the last group one by one.
template <int R>
static inline void qdot_rows_signed(const uint8_t* w, int stride, bool nibbles, const int8_t* qx, int64_t K,
                                    const float* dx, int64_t nb, float* out, int64_t ldo) {
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const __m256 dw = halves8(w, stride);
    __m256 dwx[R];
    for (int r = 0; r < R; r++) dwx[r] = _mm256_mul_ps(dw, _mm256_loadu_ps(dx + r * nb + b));
    for (int i = 0; i < 8; i++, w += stride) {
      const __m256i q = signed_block(w, nibbles);
      const __m256i aq = _mm256_sign_epi8(q, q);
      for (int r = 0; r < R; r++) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * (b + i)));
        const __m256i p = dot_u8_i8(aq, _mm256_sign_epi8(x, q));  // |q| * (x signed as q)
        const __m256 scale = _mm256_permutevar8x32_ps(dwx[r], _mm256_set1_epi32(i));
        acc[r][i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][i & 1]);
      }
    }
  }
  for (; b < nb; b++, w += stride) {
    const __m256i q = signed_block(w, nibbles);
    const __m256i aq = _mm256_sign_epi8(q, q);
    const float dw = half_to_float(load_u16(w));
    for (int r = 0; r < R; r++) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * b));
      const __m256i p = dot_u8_i8(aq, _mm256_sign_epi8(x, q));
      acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dw * dx[r * nb + b]), acc[r][b & 1]);
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}
template <int R>
static inline void qdot_rows_q4_1(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, const int32_t* sx,
                                  int64_t nb, float* out, int64_t ldo) {
  __m256 acc[R][2], offv[R];  // offv lane i: the offset terms of block i of every group
  float offsets[R][2];  // those of the blocks after the last group, even and odd
  for (int r = 0; r < R; r++) {
    acc[r][0] = acc[r][1] = offv[r] = _mm256_setzero_ps();
    offsets[r][0] = offsets[r][1] = 0.0f;
  }
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    __m256 dwx[R];
    q4_1_group<R>(w, dx, sx, nb, b, dwx, offv);
    for (int i = 0; i < 8; i++, w += 20) {
      const __m256i q = nibbles32(w + 4);
      for (int r = 0; r < R; r++) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * (b + i)));
        const __m256 scale = _mm256_permutevar8x32_ps(dwx[r], _mm256_set1_epi32(i));
        acc[r][i & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_i8(q, x)), scale, acc[r][i & 1]);
      }
    }
  }
  for (; b < nb; b++, w += 20) {
    const __m256i q = nibbles32(w + 4);
    const float dw = half_to_float(load_u16(w)), mw = half_to_float(load_u16(w + 2));
    for (int r = 0; r < R; r++) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * b));
      const float d = dx[r * nb + b];
      acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_i8(q, x)), _mm256_set1_ps(dw * d), acc[r][b & 1]);
      offsets[r][b & 1] += mw * d * float(sx[r * nb + b]);
    }
  }
  for (int r = 0; r < R; r++)
    out[r * ldo] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1])) + (hsum8(offv[r]) + (offsets[r][0] + offsets[r][1]));
}
#endif  // OUVERT_WIDE_QDOTS
