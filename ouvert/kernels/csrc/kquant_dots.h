// Integer dots for Q4_K, Q5_K and Q6_K weights on 256-bit lanes (AVX2 and AVX-512 paths), included by
// avx2_shared.h. The activations are quantized in blocks of 32 as for Q8_0 (impl.h's quantize_rows), and
// a k-quant super-block is 8 such blocks with scales of their own:
//   Q4_K  sub-block j: value = (d * scale_j) * q - dmin * min_j, q in 0..15: Q4_1's form, per sub-block
//   Q5_K  the same with q in 0..31: a fifth bit per value, bit j of qh[i] for value i of sub-block j
//   Q6_K  16 values per scale: value = (d * scale_k) * q, q in -32..31; a block of 32 spans two scales
// Each block's integer sums join a float accumulator through the block's scale times d_x, even and odd
// blocks apart, in a fixed order: a row's result depends on nothing but that row. R activation rows
// at a time share the unpacking of each weight block (row r at qx + r * K, dx + r * nb, sx + r * nb).

// The 8 six-bit scales and mins of a Q4_K super-block (blocks.h draws the 12 bytes), all at once, as
// floats: four bytes at a time, scale j < 4 the low 6 bits of byte j, scale j + 4 the low nibble of
// byte j + 8 with byte j's top 2 bits above it (mins likewise from bytes j + 4 and the high nibbles).
static inline void k_scales_mins8(const uint8_t* s, __m256* sc, __m256* mn) {
  uint32_t a, m, h;
  std::memcpy(&a, s, 4);
  std::memcpy(&m, s + 4, 4);
  std::memcpy(&h, s + 8, 4);
  const uint64_t scales = (a & 0x3F3F3F3Fu) | uint64_t((h & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u)) << 32;
  const uint64_t mins = (m & 0x3F3F3F3Fu) | uint64_t(((h >> 4) & 0x0F0F0F0Fu) | ((m >> 2) & 0x30303030u)) << 32;
  *sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(scales))));
  *mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(mins))));
}

// The fifth bits of sub-block j (Q5_K), as 16s added to its nibbles.
static inline __m256i fifth_bits(const uint8_t* qh, int j) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  return _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, j), _mm256_set1_epi8(1)), 4);
}

#ifndef OUVERT_WIDE_QDOTS  // kernels_avx512.cpp has its own, two blocks per 512-bit instruction
template <int R, bool Five>
static inline void qdot_rows_q4_k(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, const int32_t* sx,
                                  int64_t nb, float* out, int64_t ldo) {
  __m256 acc[R][2], offsets[R];  // offsets: lane j sums the min terms of sub-blocks j of every super-block
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = offsets[r] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; w += Five ? 176 : 144) {
    const float d = half_to_float(load_u16(w)), dmin = half_to_float(load_u16(w + 2));
    __m256 scv, mnv;
    k_scales_mins8(w + 4, &scv, &mnv);
    alignas(32) float sc[8];
    _mm256_store_ps(sc, scv);
    const __m256 dm = _mm256_mul_ps(_mm256_set1_ps(dmin), mnv);
    for (int r = 0; r < R; r++) {  // dmin * min_j * d_x * s_x for the 8 sub-blocks at once
      const __m256 xs = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sx + r * nb + b)));
      offsets[r] = _mm256_fmadd_ps(_mm256_mul_ps(dm, _mm256_loadu_ps(dx + r * nb + b)), xs, offsets[r]);
    }
    for (int j = 0; j < 8; j++, b++) {
      const float ds = d * sc[j];
      // 32 bytes per pair of sub-blocks: low nibbles are sub-block 2g, high nibbles 2g + 1
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (Five ? 48 : 16) + 32 * (j / 2)));
      __m256i q = _mm256_and_si256(j & 1 ? _mm256_srli_epi16(raw, 4) : raw, low);
      if (Five) q = _mm256_or_si256(q, fifth_bits(w + 16, j));
      for (int r = 0; r < R; r++) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * b));
        acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8_i8(q, x)), _mm256_set1_ps(ds * dx[r * nb + b]),
                                        acc[r][b & 1]);
      }
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1])) - hsum8(offsets[r]);
}

template <int R>
static inline void qdot_rows_q6_k(const uint8_t* w, const int8_t* qx, int64_t K, const float* dx, int64_t nb, float* out,
                                  int64_t ldo) {
  __m256 acc[R][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(3);
  for (int64_t b = 0; b < nb; w += 210) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const float d = half_to_float(load_u16(w + 208));
    for (int c = 0; c < 8; c++, b++) {  // block c of the super-block: half c / 4, quarter c % 4 of it
      const int h = c / 4, k = c % 4;
      const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * h + 32 * (k & 1)));
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 128 + 32 * h));
      const __m256i lo4 = _mm256_and_si256(k >= 2 ? _mm256_srli_epi16(ql, 4) : ql, low);
      const __m256i hi2 = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), two);
      const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo4, _mm256_slli_epi16(hi2, 4)), _mm256_set1_epi8(32));
      const __m256i aq = _mm256_sign_epi8(q, q);
      const float s0 = d * float(scales[2 * c]), s1 = d * float(scales[2 * c + 1]);
      for (int r = 0; r < R; r++) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + 32 * b));
        const __m256i p = dot_u8_i8(aq, _mm256_sign_epi8(x, q));  // lanes 0-3: values 0-15, 4-7: 16-31
        const float dxb = dx[r * nb + b];
        const __m256 s = _mm256_set_m128(_mm_set1_ps(s1 * dxb), _mm_set1_ps(s0 * dxb));
        acc[r][b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][b & 1]);
      }
    }
  }
  for (int r = 0; r < R; r++) out[r * ldo] = hsum8(_mm256_add_ps(acc[r][0], acc[r][1]));
}
#endif  // OUVERT_WIDE_QDOTS
