// AVX-512 (F, BW, VL) + FMA + F16C: 16 float lanes. Only run when the CPU reports them (ops.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#include <immintrin.h>

#include "kernels.h"

namespace ouvert_kernels::avx512 {

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

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

#include "impl.h"

}  // namespace ouvert_kernels::avx512
