// The matrix product y = x W^T over one instruction set, included inside that set's namespace
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp), which first defines:
//   vec, W (lanes), vzero(), vload(p), vfma(a, b, acc), vadd(a, b), vsum(v), half_to_float(bits),
//   and the decoding steps nibbles16, affine16, scale16 (blocks.h says what each does).
//
// Each output row n: decode W's row n to float32 once (blocks.h), then one dot product per input
// row m. A dot product always runs the same way for the same K (four chains of W lanes, then the
// tail, then a fixed sum of the chains), so y[m, n] does not depend on how many rows x has, what
// they hold, or how the output rows are split among threads: row invariance by construction.

static inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

#include "blocks.h"

static float dot(const float* a, const float* b, int64_t K) {
  vec c0 = vzero(), c1 = vzero(), c2 = vzero(), c3 = vzero();
  int64_t i = 0;
  for (; i + 4 * W <= K; i += 4 * W) {
    c0 = vfma(vload(a + i), vload(b + i), c0);
    c1 = vfma(vload(a + i + W), vload(b + i + W), c1);
    c2 = vfma(vload(a + i + 2 * W), vload(b + i + 2 * W), c2);
    c3 = vfma(vload(a + i + 3 * W), vload(b + i + 3 * W), c3);
  }
  for (; i + W <= K; i += W) c0 = vfma(vload(a + i), vload(b + i), c0);
  float s = vsum(vadd(vadd(c0, c1), vadd(c2, c3)));
  for (; i < K; i++) s += a[i] * b[i];
  return s;
}

// W's row as float32: `out` filled, or (float32 weights) the row itself.
static const float* decode_row(int qtype, const uint8_t* row, int64_t K, float* out) {
  switch (qtype) {
    case F32: return reinterpret_cast<const float*>(row);
    case F16: for (int64_t i = 0; i < K; i++) decode_f16(row + 2 * i, out + i); break;
    case BF16: for (int64_t i = 0; i < K; i++) decode_bf16(row + 2 * i, out + i); break;
    case Q8_0: for (int64_t b = 0; b < K / 32; b++) decode_q8_0(row + 34 * b, out + 32 * b); break;
    case Q4_0: for (int64_t b = 0; b < K / 32; b++) decode_q4_0(row + 18 * b, out + 32 * b); break;
    case Q4_1: for (int64_t b = 0; b < K / 32; b++) decode_q4_1(row + 20 * b, out + 32 * b); break;
    case Q4_K: for (int64_t b = 0; b < K / 256; b++) decode_q4_k(row + 144 * b, out + 256 * b); break;
    case Q5_K: for (int64_t b = 0; b < K / 256; b++) decode_q5_k(row + 176 * b, out + 256 * b); break;
    case Q6_K: for (int64_t b = 0; b < K / 256; b++) decode_q6_k(row + 210 * b, out + 256 * b); break;
  }
  return out;
}

// y[m * ldy + n] for m < M, n0 <= n < n1. x: (M, K) float32 rows ldx apart; w: rows of row_bytes;
// scratch: K floats.
void matmul(int qtype, const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w, int64_t row_bytes,
            int64_t n0, int64_t n1, float* y, int64_t ldy, float* scratch) {
  for (int64_t n = n0; n < n1; n++) {
    const float* wr = decode_row(qtype, w + n * row_bytes, K, scratch);
    for (int64_t m = 0; m < M; m++) y[m * ldy + n] = dot(x + m * ldx, wr, K);
  }
}

// Rows `rows` of W as float32 into out (rows x K): embedding lookups and the dequantizing path.
void dequantize(int qtype, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* rows, int64_t n,
                float* out) {
  for (int64_t i = 0; i < n; i++) {
    float* o = out + i * K;
    const float* r = decode_row(qtype, w + rows[i] * row_bytes, K, o);
    if (r != o) std::memcpy(o, r, K * sizeof(float));
  }
}
