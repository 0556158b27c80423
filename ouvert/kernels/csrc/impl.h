// The matrix product y = x W^T over one instruction set, included inside that set's namespace
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp), which first defines:
//   vec, W (lanes), vzero(), vload(p), vfma(a, b, acc), vadd(a, b), vsum(v), half_to_float(bits),
//   and the decoding steps nibbles16, affine16, scale16 (blocks.h says what each does).
//
// Output rows NROWS at a time: decode those rows of W to float32 once (blocks.h), then tiles of
// input rows against them (tile, below), each output summed by one fixed chain: row invariance by
// construction.

#include "blocks.h"

// How tile() reads input and weight rows, and adds their products into an accumulator. Float inputs:
// x in float32, W lanes a step, one fused multiply-add. The weights as float32 (as stored, or decoded
// into scratch), or bfloat16 / float16 as stored, widened in registers (exactly: the same floats as
// decoding first).
struct FloatInputs {
  using X = float;
  using V = vec;
  static constexpr int step = W;
  static vec xload(const float* p) { return vload(p); }
  static float xone(const float* p) { return *p; }
  static vec dot(vec acc, vec x, vec w) { return vfma(x, w, acc); }
};
struct AsF32 : FloatInputs {
  using T = float;
  static vec load(const float* p) { return vload(p); }
  static float one(const float* p) { return *p; }
};
struct AsBF16 : FloatInputs {
  using T = uint16_t;
  static vec load(const uint16_t* p) { return vload_bf16(p); }
  static float one(const uint16_t* p) {
    float f;
    decode_bf16(reinterpret_cast<const uint8_t*>(p), &f);
    return f;
  }
};
struct AsF16 : FloatInputs {
  using T = uint16_t;
  static vec load(const uint16_t* p) { return vload_f16(p); }
  static float one(const uint16_t* p) { return half_to_float(*p); }
};

// One output is one chain: acc = dot(acc, x[i : i + step], w[i : i + step]) over K, then vsum(acc), then
// the tail (K % step values) one by one. tile<RM, RN> computes RM input rows against RN weight rows
// with RM * RN such chains side by side (each weight vector loaded once for the RM rows, each input
// vector once for the RN weight rows), so an output's numbers are the same in any tile: y[m, n]
// does not depend on how many rows x has, what they hold, or how the work is split.
template <int RM, int RN, class F>
static void tile(const typename F::X* x, int64_t ldx, const typename F::T* const* w, int64_t K, float* y,
                 int64_t ldy) {
  vec c[RM][RN];
  for (int r = 0; r < RM; r++)
    for (int j = 0; j < RN; j++) c[r][j] = vzero();
  int64_t i = 0;
  for (; i + F::step <= K; i += F::step) {
    typename F::V wv[RN];
    for (int j = 0; j < RN; j++) wv[j] = F::load(w[j] + i);
    for (int r = 0; r < RM; r++) {
      const typename F::V xv = F::xload(x + r * ldx + i);
      for (int j = 0; j < RN; j++) c[r][j] = F::dot(c[r][j], xv, wv[j]);
    }
  }
  for (int r = 0; r < RM; r++)
    for (int j = 0; j < RN; j++) {
      float s = vsum(c[r][j]);
      for (int64_t t = i; t < K; t++) s = std::fma(F::xone(x + r * ldx + t), F::one(w[j] + t), s);
      y[r * ldy + j] = s;
    }
}

// Weight rows at a time (the scratch holds NROWS * K decoded floats), and input rows per tile: as
// many accumulators as the registers hold (16 of AVX-512's 32, 8 of AVX2's 16).
constexpr int NROWS = kScratchRows;
constexpr int MROWS = W == 16 ? 4 : 2;

// All M input rows against nr weight rows wr (nr == step, or fewer at the end of a range).
template <class F>
static void tiles(const typename F::X* x, int64_t M, int64_t ldx, int64_t K, const typename F::T* const* wr,
                  int64_t nr, int64_t step, float* y, int64_t ldy) {
  if (nr < step) {  // the range's last rows, one by one
    for (int64_t j = 0; j < nr; j++)
      for (int64_t m = 0; m < M; m++) tile<1, 1, F>(x + m * ldx, ldx, wr + j, K, y + m * ldy + j, ldy);
    return;
  }
  int64_t m = 0;
  for (; m + MROWS <= M; m += MROWS)
    for (int j = 0; j < step; j += 4) tile<MROWS, 4, F>(x + m * ldx, ldx, wr + j, K, y + m * ldy + j, ldy);
  for (; m < M; m++)
    for (int j = 0; j < step; j += 4) tile<1, 4, F>(x + m * ldx, ldx, wr + j, K, y + m * ldy + j, ldy);
}

// A few input rows take 4 weight rows at a time, whose floats stay in the L1 cache; more take NROWS.
static int64_t weight_step(int64_t M) { return M >= MROWS ? NROWS : 4; }

// y[m * ldy + n] for m < M, n0 <= n < n1, with W's rows read as stored through F (no decoding).
template <class F>
static void as_stored(const typename F::X* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w,
                      int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t step = weight_step(M);
  for (int64_t n = n0; n < n1; n += step) {
    const int64_t nr = std::min<int64_t>(step, n1 - n);
    const typename F::T* wr[NROWS];
    for (int64_t j = 0; j < nr; j++) wr[j] = reinterpret_cast<const typename F::T*>(w + (n + j) * row_bytes);
    tiles<F>(x, M, ldx, K, wr, nr, step, y + n, ldy);
  }
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

// ---- integer dot products on quantized activations (Q8_0, Q4_0, Q4_1 and the k-quants) ----------
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

#ifndef OUVERT_PLAIN_QDOT_ROWS
// R activation rows against one weight row (the SIMD paths' qdot_rows_* share each block's unpacking).
template <int R>
static inline void qdot_rows(int qtype, const uint8_t* w, const int8_t* qx, int64_t K, const float* dx,
                             const int32_t* sx, int64_t nb, float* out, int64_t ldo) {
  switch (qtype) {
    case Q8_0: return qdot_rows_signed<R>(w, 34, false, qx, K, dx, nb, out, ldo);
    case Q4_0: return qdot_rows_signed<R>(w, 18, true, qx, K, dx, nb, out, ldo);
    case Q4_K: return qdot_rows_q4_k<R, false>(w, qx, K, dx, sx, nb, out, ldo);
    case Q5_K: return qdot_rows_q4_k<R, true>(w, qx, K, dx, sx, nb, out, ldo);
    case Q6_K: return qdot_rows_q6_k<R>(w, qx, K, dx, nb, out, ldo);
    default: return qdot_rows_q4_1<R>(w, qx, K, dx, sx, nb, out, ldo);
  }
}
#endif

// One weight row (nb blocks) against one quantized activation row.
static float qdot(int qtype, const uint8_t* w, const int8_t* qx, const float* dx, const int32_t* sx, int64_t nb) {
#ifdef OUVERT_PLAIN_QDOT_ROWS
  switch (qtype) {
    case Q8_0: return qdot_q8_0(w, qx, dx, nb);
    case Q4_0: return qdot_q4_0(w, qx, dx, nb);
    case Q4_K: return qdot_q4_k<false>(w, qx, dx, sx, nb);
    case Q5_K: return qdot_q4_k<true>(w, qx, dx, sx, nb);
    case Q6_K: return qdot_q6_k(w, qx, dx, nb);
    default: return qdot_q4_1(w, qx, dx, sx, nb);
  }
#else  // the SIMD paths: their row templates at R = 1
  float y;
  qdot_rows<1>(qtype, w, qx, 0, dx, sx, nb, &y, 0);
  return y;
#endif
}

// y = x W^T through qdot: xq (M, K) int8, xd and xs (M, K / 32).
void matmul_q8(int qtype, const int8_t* xq, const float* xd, const int32_t* xs, int64_t M, int64_t K,
               const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t nb = K / 32;
  for (int64_t n = n0; n < n1; n++) {
    const uint8_t* wr = w + n * row_bytes;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) qdot_rows<4>(qtype, wr, xq + m * K, K, xd + m * nb, xs + m * nb, nb, y + m * ldy + n, ldy);
    for (; m < M; m++) y[m * ldy + n] = qdot(qtype, wr, xq + m * K, xd + m * nb, xs + m * nb, nb);
  }
}

// y[m * ldy + n] for m < M, n0 <= n < n1. x: (M, K) float32 rows ldx apart; w: rows of row_bytes;
// scratch: NROWS * K floats.
void matmul(int qtype, const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w, int64_t row_bytes,
            int64_t n0, int64_t n1, float* y, int64_t ldy, float* scratch) {
  switch (qtype) {
    case F32: return as_stored<AsF32>(x, M, ldx, K, w, row_bytes, n0, n1, y, ldy);
    case BF16: return as_stored<AsBF16>(x, M, ldx, K, w, row_bytes, n0, n1, y, ldy);
    case F16: return as_stored<AsF16>(x, M, ldx, K, w, row_bytes, n0, n1, y, ldy);
  }
  const int64_t step = weight_step(M);
  for (int64_t n = n0; n < n1; n += step) {  // block formats: decode the rows into scratch first
    const int64_t nr = std::min<int64_t>(step, n1 - n);
    const float* wr[NROWS];
    for (int64_t j = 0; j < nr; j++) wr[j] = decode_row(qtype, w + (n + j) * row_bytes, K, scratch + j * K);
    tiles<AsF32>(x, M, ldx, K, wr, nr, step, y + n, ldy);
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
