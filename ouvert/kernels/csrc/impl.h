// The matrix product y = x W^T over one instruction set, included inside that set's namespace
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp), which first defines:
//   vec, W (lanes), vzero(), vload(p), vfma(a, b, acc), vadd(a, b), vsum(v), half_to_float(bits),
//   and the decoding steps nibbles16, affine16, scale16 (blocks.h says what each does).
//
// Each output row n: decode W's row n to float32 once (blocks.h), then one dot product per input
// row m. A dot product always runs the same way for the same K (four chains of W lanes, then the
// tail, then a fixed sum of the chains), so y[m, n] does not depend on how many rows x has, what
// they hold, or how the output rows are split among threads: row invariance by construction.

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

// R input rows against one weight row, each summed exactly as dot() sums it (the same chains in
// the same order), with each weight vector loaded once for the R rows.
template <int R>
static void dot_rows(const float* a, int64_t lda, const float* b, int64_t K, float* out, int64_t ldo) {
  vec c[R][4];
  for (int r = 0; r < R; r++) c[r][0] = c[r][1] = c[r][2] = c[r][3] = vzero();
  int64_t i = 0;
  for (; i + 4 * W <= K; i += 4 * W) {
    for (int j = 0; j < 4; j++) {
      const vec bj = vload(b + i + j * W);
      for (int r = 0; r < R; r++) c[r][j] = vfma(vload(a + r * lda + i + j * W), bj, c[r][j]);
    }
  }
  for (; i + W <= K; i += W) {
    const vec bi = vload(b + i);
    for (int r = 0; r < R; r++) c[r][0] = vfma(vload(a + r * lda + i), bi, c[r][0]);
  }
  for (int r = 0; r < R; r++) {
    float s = vsum(vadd(vadd(c[r][0], c[r][1]), vadd(c[r][2], c[r][3])));
    for (int64_t t = i; t < K; t++) s += a[r * lda + t] * b[t];
    out[r * ldo] = s;
  }
}

// Rows at a time in dot_rows: as many accumulators as the registers hold (16 of AVX2's, 32 of AVX-512's).
constexpr int ROWS = W == 16 ? 4 : 2;

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

// ---- integer dot products on quantized activations (Q8_0, Q4_0, Q4_1 weights) -------------------
// Each row of x is quantized once per product, in blocks of 32 as Q8_0 stores weights:
//   d = max|x| / 127, q = x / d rounded half away from zero (written as x * (1 / d)), s = sum q.
// A weight block times an activation block is then d_w * d_x * (integer sum of q_w * q_x), plus, for
// Q4_1's offset, m_w * d_x * s_x: integers where llama.cpp has them, at a quarter of the float work.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s) {
  for (int64_t b = 0; b < M * (K / 32); b++) {
    const float* xb = x + 32 * b;
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) {
      const float t = xb[i] * id;
      const int v = int(std::trunc(t + std::copysign(0.5f, t)));
      q[32 * b + i] = int8_t(v);
      sum += v;
    }
    d[b] = db;
    s[b] = sum;
  }
}

// One weight row (nb blocks) against one quantized activation row.
static float qdot(int qtype, const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb) {
  switch (qtype) {
    case Q8_0: return qdot_q8_0(w, qx, dx, nb);
    case Q4_0: return qdot_q4_0(w, qx, dx, nb);
    default: return qdot_q4_1(w, qx, dx, sx, nb);
  }
}

// y = x W^T through qdot: xq (M, K) int8, xd and xs (M, K / 32).
void matmul_q8(int qtype, const int8_t* xq, const float* xd, const int32_t* xs, int64_t M, int64_t K,
               const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  for (int64_t n = n0; n < n1; n++)
    for (int64_t m = 0; m < M; m++)
      y[m * ldy + n] = qdot(qtype, w + n * row_bytes, xq + m * K, xd + m * nb, xs + m * nb, nb);
}

// y[m * ldy + n] for m < M, n0 <= n < n1. x: (M, K) float32 rows ldx apart; w: rows of row_bytes;
// scratch: K floats.
void matmul(int qtype, const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w, int64_t row_bytes,
            int64_t n0, int64_t n1, float* y, int64_t ldy, float* scratch) {
  for (int64_t n = n0; n < n1; n++) {
    const float* wr = decode_row(qtype, w + n * row_bytes, K, scratch);
    int64_t m = 0;
    for (; m + ROWS <= M; m += ROWS) dot_rows<ROWS>(x + m * ldx, ldx, wr, K, y + m * ldy + n, ldy);
    for (; m < M; m++) y[m * ldy + n] = dot(x + m * ldx, wr, K);
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
