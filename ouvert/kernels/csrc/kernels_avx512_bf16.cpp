// AVX-512 with VNNI and BF16: kernels_avx512.cpp again, its integer dots on vpdpbusd and its bfloat16
// products on vdpbf16ps (ops.cpp picks it when the CPU reports avx512_bf16).
#define OUVERT_VNNI
#define OUVERT_BF16
#include "kernels_avx512.cpp"
