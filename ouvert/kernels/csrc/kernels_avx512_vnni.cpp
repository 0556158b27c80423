// AVX-512 with VNNI: kernels_avx512.cpp again, its integer dots on vpdpbusd (ops.cpp picks it when
// the CPU reports avx512_vnni).
#define OUVERT_VNNI
#include "kernels_avx512.cpp"
