// ouvert's CPU kernels: one implementation per instruction set, chosen at load (ops.cpp).
#pragma once
#include <cstdint>
#include <cstring>

namespace ouvert_kernels {

// Weight rows a matmul task decodes at a time: its scratch holds kScratchRows * K floats.
constexpr int kScratchRows = 8;

// GGML's type numbers, as GGUF files store them.
enum QType : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14, BF16 = 30 };

#define OUVERT_ISA_DECLS                                                                                     \
  void matmul(int qtype, const float* x, int64_t M, int64_t ldx, int64_t K, const uint8_t* w,              \
              int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy, float* scratch);           \
  void dequantize(int qtype, const uint8_t* w, int64_t row_bytes, int64_t K, const int64_t* rows,          \
                  int64_t n, float* out);                                                                   \
  void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* q, float* d, int32_t* s);                \
  void matmul_q8(int qtype, const int8_t* xq, const float* xd, const int32_t* xs, int64_t M, int64_t K,     \
                 const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* y, int64_t ldy);

static inline uint16_t load_u16(const uint8_t* p) {  // little-endian, as GGUF stores its halves
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

namespace scalar { OUVERT_ISA_DECLS }
namespace avx2 { OUVERT_ISA_DECLS }
namespace avx512 { OUVERT_ISA_DECLS }
namespace avx512_vnni { OUVERT_ISA_DECLS }
namespace avx512_bf16 {
OUVERT_ISA_DECLS
// y = x W^T for bfloat16 W with x rounded to bfloat16 (M, K): pairs of products on vdpbf16ps.
void matmul_bf16(const uint16_t* x, int64_t M, int64_t K, const uint8_t* w, int64_t row_bytes, int64_t n0,
                 int64_t n1, float* y, int64_t ldy);
}

}  // namespace ouvert_kernels
