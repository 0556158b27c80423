// GGUF's block formats, drawn byte by byte, each with the plain loop that decodes it: the
// specification that every SIMD path and the PyTorch twin (ouvert/kernels/formats.py) are held to.
//
// Included once per instruction set, inside that set's namespace (kernels_*.cpp), so that the
// compiler vectorizes these loops for it; `half_to_float` comes from the including file.
// A weight row of K values is K / block_elems blocks laid end to end.

// The decoders below are written over three steps each instruction set provides (kernels_*.cpp):
//   nibbles16(qs, lo, hi, bias)  lo[i] = (qs[i] & 15) - bias, hi[i] = (qs[i] >> 4) - bias, 16 bytes
//   affine16(q, d, m, y)         y[i] = d * q[i] + m over 16 unsigned bytes (a multiply, then an add)
//   scale16(q, d, y)             y[i] = d * q[i] over 16 signed bytes

// ---- Q8_0: 32 values, 34 bytes -----------------------------------------------------------------
//   [ d: f16 ][ q0 q1 ... q31: int8 ]          value i = d * q_i
static inline void decode_q8_0(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b));
  const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
  scale16(q, d, y);
  scale16(q + 16, d, y + 16);
}

// ---- Q4_0: 32 values, 18 bytes -----------------------------------------------------------------
//   [ d: f16 ][ 16 bytes: low nibble = value i, high nibble = value i + 16 ]
//   value = d * (nibble - 8)
static inline void decode_q4_0(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b));
  alignas(16) uint8_t lo[16], hi[16];
  nibbles16(b + 2, lo, hi, 8);
  scale16(reinterpret_cast<const int8_t*>(lo), d, y);
  scale16(reinterpret_cast<const int8_t*>(hi), d, y + 16);
}

// ---- Q4_1: 32 values, 20 bytes -----------------------------------------------------------------
//   [ d: f16 ][ m: f16 ][ 16 bytes of nibbles, laid out as Q4_0 ]      value = d * nibble + m
static inline void decode_q4_1(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b)), m = half_to_float(load_u16(b + 2));
  alignas(16) uint8_t lo[16], hi[16];
  nibbles16(b + 4, lo, hi, 0);
  affine16(lo, d, m, y);
  affine16(hi, d, m, y + 16);
}

// ---- k-quants: super-blocks of 256 values in 8 sub-blocks of 32 -----------------------------------
// Q4_K and Q5_K give each sub-block a 6-bit scale and a 6-bit min, packed into 12 bytes:
//   bytes 0-3: scales 0-3 (low 6 bits), their top 2 bits hold bits 4-5 of scales 4-7
//   bytes 4-7: mins 0-3 (low 6 bits),   their top 2 bits hold bits 4-5 of mins 4-7
//   bytes 8-11: low nibble = bits 0-3 of scales 4-7, high nibble = bits 0-3 of mins 4-7
static inline void k_scale_min(const uint8_t* s, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = s[j] & 63;
    *min = s[j + 4] & 63;
  } else {
    *scale = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    *min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Sub-blocks 2g and 2g + 1 of a Q4_K / Q5_K super-block from their 32 + 32 unsigned values:
// value = d * scale_j * q - dmin * min_j (the products first, as the twin does).
static inline void k_pair(const uint8_t* s, int g, float d, float dmin, const uint8_t* q0, const uint8_t* q1,
                          float* y) {
  int sc0, m0, sc1, m1;
  k_scale_min(s, 2 * g, &sc0, &m0);
  k_scale_min(s, 2 * g + 1, &sc1, &m1);
  const float d0 = d * float(sc0), o0 = dmin * float(m0), d1 = d * float(sc1), o1 = dmin * float(m1);
  affine16(q0, d0, -o0, y);
  affine16(q0 + 16, d0, -o0, y + 16);
  affine16(q1, d1, -o1, y + 32);
  affine16(q1 + 16, d1, -o1, y + 48);
}

// ---- Q4_K: 256 values, 144 bytes ---------------------------------------------------------------
//   [ d: f16 ][ dmin: f16 ][ scales: 12 bytes, above ][ qs: 128 bytes ]
//   qs in 4 groups of 32 bytes: group g's low nibbles are sub-block 2g, its high nibbles 2g + 1.
static inline void decode_q4_k(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const uint8_t* qs = b + 16;
  alignas(16) uint8_t lo[32], hi[32];
  for (int g = 0; g < 4; g++) {
    nibbles16(qs + 32 * g, lo, hi, 0);
    nibbles16(qs + 32 * g + 16, lo + 16, hi + 16, 0);
    k_pair(b + 4, g, d, dmin, lo, hi, y + 64 * g);
  }
}

// ---- Q5_K: 256 values, 176 bytes ---------------------------------------------------------------
//   [ d: f16 ][ dmin: f16 ][ scales: 12 bytes ][ qh: 32 bytes ][ qs: 128 bytes ]
//   As Q4_K, with a fifth bit: bit j of qh[i] is the high bit of value i of sub-block j.
static inline void decode_q5_k(const uint8_t* b, float* y) {
  const float d = half_to_float(load_u16(b)), dmin = half_to_float(load_u16(b + 2));
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
  alignas(16) uint8_t lo[32], hi[32];
  for (int g = 0; g < 4; g++) {
    for (int i = 0; i < 32; i++) {
      lo[i] = (qs[32 * g + i] & 0x0F) | (((qh[i] >> (2 * g)) & 1) << 4);
      hi[i] = (qs[32 * g + i] >> 4) | (((qh[i] >> (2 * g + 1)) & 1) << 4);
    }
    k_pair(b + 4, g, d, dmin, lo, hi, y + 64 * g);
  }
}

// ---- Q6_K: 256 values, 210 bytes ---------------------------------------------------------------
//   [ ql: 128 bytes, low 4 bits ][ qh: 64 bytes, high 2 bits ][ scales: 16 x int8 ][ d: f16 ]
//   Two halves of 128 values; in each, with ql (64 bytes) and qh (32 bytes) of that half, i < 32:
//     value i      = low nibble  of ql[i]      | bits 0-1 of qh[i] << 4
//     value i + 32 = low nibble  of ql[i + 32] | bits 2-3 of qh[i] << 4
//     value i + 64 = high nibble of ql[i]      | bits 4-5 of qh[i] << 4
//     value i + 96 = high nibble of ql[i + 32] | bits 6-7 of qh[i] << 4
//   each minus 32, times d * scale of its 16 values (scale k of a half covers values 16k..16k+15).
static inline void decode_q6_k(const uint8_t* b, float* y) {
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = half_to_float(load_u16(b + 208));
  alignas(16) int8_t q[128];
  for (int h = 0; h < 2; h++) {
    const uint8_t* ql = b + 64 * h;
    const uint8_t* qh = b + 128 + 32 * h;
    for (int i = 0; i < 32; i++) {
      q[i] = int8_t(((ql[i] & 0x0F) | (((qh[i] >> 0) & 3) << 4)) - 32);
      q[i + 32] = int8_t(((ql[i + 32] & 0x0F) | (((qh[i] >> 2) & 3) << 4)) - 32);
      q[i + 64] = int8_t(((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32);
      q[i + 96] = int8_t(((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32);
    }
    for (int k = 0; k < 8; k++) scale16(q + 16 * k, d * float(sc[8 * h + k]), y + 128 * h + 16 * k);
  }
}

// ---- plain floats, one value a "block" ------------------------------------------------------------
static inline void decode_f16(const uint8_t* b, float* y) { *y = half_to_float(load_u16(b)); }
static inline void decode_bf16(const uint8_t* b, float* y) {
  const uint32_t bits = uint32_t(load_u16(b)) << 16;
  std::memcpy(y, &bits, 4);
}
