// The portable path: plain C++ for any CPU (the baseline x86-64 the compiler targets).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace ouvert_kernels::scalar {

using vec = float;
constexpr int W = 1;
static inline vec vzero() { return 0.0f; }
static inline vec vload(const float* p) { return *p; }
static inline vec vfma(vec a, vec b, vec c) { return a * b + c; }  // -ffp-contract=off: two roundings
static inline vec vadd(vec a, vec b) { return a + b; }
static inline float vsum(vec v) { return v; }

// IEEE half to float, exactly (normals, subnormals, infinities, NaN).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalize
    exp = 113;
    while (!(man & 0x400)) {
      man <<= 1;
      exp--;
    }
    bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

static inline vec vload_bf16(const uint16_t* p) {
  const uint32_t bits = uint32_t(*p) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
static inline vec vload_f16(const uint16_t* p) { return half_to_float(*p); }
static inline void nibbles16(const uint8_t* qs, uint8_t* lo, uint8_t* hi, int bias) {
  for (int i = 0; i < 16; i++) {
    lo[i] = uint8_t((qs[i] & 0x0F) - bias);
    hi[i] = uint8_t((qs[i] >> 4) - bias);
  }
}
static inline void affine16(const uint8_t* q, float d, float m, float* y) {
  for (int i = 0; i < 16; i++) y[i] = d * float(q[i]) + m;
}
static inline void scale16(const int8_t* q, float d, float* y) {
  for (int i = 0; i < 16; i++) y[i] = d * float(q[i]);
}

// Integer block dots (impl.h's qdot): the specification, in plain loops.
static inline float qdot_q8_0(const uint8_t* w, const int8_t* qx, const float* dx, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; b++, w += 34, qx += 32) {
    const int8_t* q = reinterpret_cast<const int8_t*>(w + 2);
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) sum += int32_t(q[i]) * qx[i];
    acc += half_to_float(load_u16(w)) * dx[b] * float(sum);
  }
  return acc;
}
static inline float qdot_q4_0(const uint8_t* w, const int8_t* qx, const float* dx, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; b++, w += 18, qx += 32) {
    int32_t sum = 0;
    for (int i = 0; i < 16; i++) sum += ((w[2 + i] & 0x0F) - 8) * qx[i] + ((w[2 + i] >> 4) - 8) * qx[i + 16];
    acc += half_to_float(load_u16(w)) * dx[b] * float(sum);
  }
  return acc;
}
static inline float qdot_q4_1(const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; b++, w += 20, qx += 32) {
    int32_t sum = 0;
    for (int i = 0; i < 16; i++) sum += (w[4 + i] & 0x0F) * qx[i] + (w[4 + i] >> 4) * qx[i + 16];
    acc += half_to_float(load_u16(w)) * dx[b] * float(sum) + half_to_float(load_u16(w + 2)) * dx[b] * float(sx[b]);
  }
  return acc;
}

static float qdot(int qtype, const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb);
template <bool Five>
static inline float qdot_q4_k(const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb);
static inline float qdot_q6_k(const uint8_t* w, const int8_t* qx, const float* dx, int64_t nb);
// R rows at a time (the AVX paths share the weight block's unpacking among them): here, one by one.
#define OUVERT_PLAIN_QDOT_ROWS
template <int R>
static inline void qdot_rows(int qtype, const uint8_t* w, const int8_t* qx, int64_t K, const float* dx,
                             const int32_t* sx, int64_t nb, float* out, int64_t ldo) {
  for (int r = 0; r < R; r++) out[r * ldo] = qdot(qtype, w, qx + r * K, dx + r * nb, sx + r * nb, nb);
}

#include "impl.h"

// The k-quants' integer dots (kquant_dots.h says how), in plain loops. Five: Q5_K, Q4_K with a fifth
// bit per value (bit j of qh[i] for value i of sub-block j).
template <bool Five>
static inline float qdot_q4_k(const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb) {
  float acc = 0.0f, offsets = 0.0f;
  for (int64_t b = 0; b < nb; w += Five ? 176 : 144) {
    const float d = half_to_float(load_u16(w)), dmin = half_to_float(load_u16(w + 2));
    const uint8_t* qh = w + 16;
    for (int j = 0; j < 8; j++, b++) {
      int sc, m;
      k_scale_min(w + 4, j, &sc, &m);
      const uint8_t* qs = w + (Five ? 48 : 16) + 32 * (j / 2);
      int32_t sum = 0;
      for (int i = 0; i < 32; i++) {
        const int q = ((j & 1 ? qs[i] >> 4 : qs[i]) & 0x0F) | (Five ? ((qh[i] >> j) & 1) << 4 : 0);
        sum += q * qx[32 * b + i];
      }
      acc += d * float(sc) * dx[b] * float(sum);
      offsets -= dmin * float(m) * dx[b] * float(sx[b]);
    }
  }
  return acc + offsets;
}
static inline float qdot_q6_k(const uint8_t* w, const int8_t* qx, const float* dx, int64_t nb) {
  float acc = 0.0f;
  for (int64_t b = 0; b < nb; w += 210) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const float d = half_to_float(load_u16(w + 208));
    for (int c = 0; c < 8; c++, b++) {
      const int h = c / 4, k = c % 4;
      const uint8_t* ql = w + 64 * h + 32 * (k & 1);
      const uint8_t* qh = w + 128 + 32 * h;
      int32_t sums[2] = {0, 0};
      for (int i = 0; i < 32; i++) {
        const int q = (((k >= 2 ? ql[i] >> 4 : ql[i]) & 0x0F) | (((qh[i] >> (2 * k)) & 3) << 4)) - 32;
        sums[i / 16] += q * qx[32 * b + i];
      }
      acc += d * float(scales[2 * c]) * dx[b] * float(sums[0]) + d * float(scales[2 * c + 1]) * dx[b] * float(sums[1]);
    }
  }
  return acc;
}

}  // namespace ouvert_kernels::scalar
