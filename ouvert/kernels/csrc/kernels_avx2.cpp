// AVX2 + FMA + F16C: 8 float lanes. Only this file is compiled for these instructions; nothing
// here runs unless the CPU reports them (ops.cpp).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

#include "kernels.h"

namespace ouvert_kernels::avx2 {

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "avx2_shared.h"

using vec = __m256;
constexpr int W = 8;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline float vsum(vec v) { return hsum8(v); }  // a fixed tree (avx2_shared.h)

static inline vec vload_bf16(const uint16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
static inline vec vload_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline void affine16(const uint8_t* q, float d, float m, float* y) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256 vd = _mm256_set1_ps(d), vm = _mm256_set1_ps(m);
  const __m256 a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  _mm256_storeu_ps(y, _mm256_add_ps(_mm256_mul_ps(vd, a), vm));
  _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_mul_ps(vd, c), vm));
}
static inline void scale16(const int8_t* q, float d, float* y) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256 vd = _mm256_set1_ps(d);
  _mm256_storeu_ps(y, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))));
  _mm256_storeu_ps(y + 8, _mm256_mul_ps(vd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))));
}

#include "impl.h"

}  // namespace ouvert_kernels::avx2
