// ggml's block layouts (ggml-common.h), bit-exact, plus the small helpers every kernel and quantizer
// shares to read them. Kept header-only so scalar, AVX2 and AVX-512 files decode identically.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/base/half.h"

namespace qforge::kernels {

using ggml_half = uint16_t;

inline constexpr int kQK8_0 = 32;
inline constexpr int kQK4_0 = 32;
inline constexpr int kQK_K = 256;
inline constexpr int kKScaleSize = 12;

// 32 weights, w = d * qs[j].
struct block_q8_0 {
  ggml_half d;
  int8_t qs[kQK8_0];
};
// 32 weights: element j in the low nibble of qs[j], element j+16 in the high nibble; w = d * (q - 8).
struct block_q4_0 {
  ggml_half d;
  uint8_t qs[kQK4_0 / 2];
};
// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min packed in scales[12];
// w = d * sc * q - dmin * m.
struct block_q4_K {
  ggml_half d;
  ggml_half dmin;
  uint8_t scales[kKScaleSize];
  uint8_t qs[kQK_K / 2];
};


// The other ggml layouts qforge reads (docs/encodings.md has each one's formula). Every struct is the bytes of
// one block in order, little-endian, 2-byte aligned at most, so a row of blocks is an array of them.

// 32 weights: element j in the low nibble of qs[j], j+16 in the high nibble; w = d * q + m.
struct block_q4_1 {
  ggml_half d;
  ggml_half m;
  uint8_t qs[16];
};
// 32 weights of 5 bits: the low nibbles as Q4_0, bit 4 of element j is bit j of qh (u32 LE); w = d * (q - 16).
struct block_q5_0 {
  ggml_half d;
  uint8_t qh[4];
  uint8_t qs[16];
};
// As Q5_0 with a min: w = d * q + m.
struct block_q5_1 {
  ggml_half d;
  ggml_half m;
  uint8_t qh[4];
  uint8_t qs[16];
};
// 256 weights in 16 sub-blocks of 16: scales[k] = 4-bit scale (low) | 4-bit min (high) of sub-block k;
// 2-bit q, four per byte; w = d * sc * q - dmin * m.
struct block_q2_K {
  uint8_t scales[16];
  uint8_t qs[64];
  ggml_half d;
  ggml_half dmin;
};
// 256 weights in 16 sub-blocks of 16: 2 low bits in qs, the third in hmask (set: +0, clear: -4), 6-bit scales
// (biased by 32) packed in 12 bytes; w = d * (sc - 32) * q.
struct block_q3_K {
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12];
  ggml_half d;
};
// Q4_K with a fifth bit per weight in qh: w = d * sc * q - dmin * m, q in 0..31.
struct block_q5_K {
  ggml_half d;
  ggml_half dmin;
  uint8_t scales[kKScaleSize];
  uint8_t qh[32];
  uint8_t qs[128];
};
// 256 weights in 16 sub-blocks of 16: low 4 bits in ql, high 2 in qh, int8 scales; w = d * sc * (q - 32).
struct block_q6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  ggml_half d;
};
// 32 weights: 4-bit indices into kIq4nlValues, laid out as Q4_0; w = d * value.
struct block_iq4_nl {
  ggml_half d;
  uint8_t qs[16];
};
// 256 weights in 8 sub-blocks of 32 with 6-bit scales (low 4 bits in scales_l, high 2 in scales_h, biased by 32),
// each sub-block as IQ4_NL; w = d * (ls - 32) * value.
struct block_iq4_xs {
  ggml_half d;
  uint16_t scales_h;
  uint8_t scales_l[4];
  uint8_t qs[128];
};
// 256 ternary weights: 240 as five base-3 digits per byte of qs (fixed point: trit n of byte b is
// ((b * 3^n mod 256) * 3) >> 8), 16 as four digits per byte of qh; w = d * (t - 1).
struct block_tq1_0 {
  uint8_t qs[48];
  uint8_t qh[4];
  ggml_half d;
};
// 256 ternary weights of 2 bits each; w = d * (q - 1).
struct block_tq2_0 {
  uint8_t qs[64];
  ggml_half d;
};
// 256 weights in 8 groups of 32; per group two u32: four 8-bit grid indices (kIq2xxsGrid), then four 7-bit sign
// fields and a 4-bit scale in the top bits; w = d * (0.5 + s) / 4 * grid * sign.
struct block_iq2_xxs {
  ggml_half d;
  uint16_t qs[32];
};
// 256 weights: per 8 weights a u16 of a 9-bit grid index (kIq2xsGrid) and 7 sign bits; a 4-bit scale per 16.
struct block_iq2_xs {
  ggml_half d;
  uint16_t qs[32];
  uint8_t scales[8];
};
// 256 weights: per 8 weights a 10-bit grid index (kIq2sGrid; low 8 bits in qs, high 2 in qh) and 8 explicit
// sign bits (the second half of qs); a 4-bit scale per 16.
struct block_iq2_s {
  ggml_half d;
  uint8_t qs[64];
  uint8_t qh[8];
  uint8_t scales[8];
};
// 256 weights: per 4 weights an 8-bit index into kIq3xxsGrid (qs[0..63]), then per 32 weights a u32 of four 7-bit
// sign fields and a 4-bit scale (qs[64..95]); w = d * (0.5 + s) / 2 * grid * sign.
struct block_iq3_xxs {
  ggml_half d;
  uint8_t qs[96];
};
// 256 weights: per 4 weights a 9-bit index into kIq3sGrid (low 8 in qs, the ninth in qh), explicit sign bits, a
// 4-bit scale per 32 (two per byte); w = d * (1 + 2 s) * grid * sign.
struct block_iq3_s {
  ggml_half d;
  uint8_t qs[64];
  uint8_t qh[8];
  uint8_t signs[32];
  uint8_t scales[4];
};
// 256 weights: per 8 an 11-bit index into kIq1sGrid (low 8 in qs, high 3 in qh), per 32 a u16 qh with those high
// bits, a 3-bit scale and the sign of the delta; w = d * (2 s + 1) * (grid +- 1/8).
struct block_iq1_s {
  ggml_half d;
  uint8_t qs[32];
  uint16_t qh[8];
};
// 256 weights: as IQ1_S with the delta's sign per 8 weights, 3-bit scales per 16, and the f16 super-block scale
// spread over the top nibbles of the four u16 in scales.
struct block_iq1_m {
  uint8_t qs[32];
  uint8_t qh[16];
  uint8_t scales[8];
};

// 32 weights (OCP MXFP4): an E8M0 exponent e, the scale 2^(e - 127), and 4-bit E2M1 codes laid out as Q4_0;
// w = kFp4Values[q] * 2^(e - 128) (the table holds the E2M1 values doubled).
struct block_mxfp4 {
  uint8_t e;
  uint8_t qs[16];
};

static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match ggml");
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match ggml");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match ggml");
static_assert(sizeof(block_q4_1) == 20 && sizeof(block_q5_0) == 22 && sizeof(block_q5_1) == 24, "ggml 32-blocks");
static_assert(sizeof(block_q2_K) == 84 && sizeof(block_q3_K) == 110 && sizeof(block_q5_K) == 176 &&
                  sizeof(block_q6_K) == 210,
              "ggml K-quants");
static_assert(sizeof(block_iq4_nl) == 18 && sizeof(block_iq4_xs) == 136, "ggml IQ4");
static_assert(sizeof(block_tq1_0) == 54 && sizeof(block_tq2_0) == 66, "ggml ternary");
static_assert(sizeof(block_mxfp4) == 17, "ggml MXFP4");
static_assert(sizeof(block_iq2_xxs) == 66 && sizeof(block_iq2_xs) == 74 && sizeof(block_iq2_s) == 82 &&
                  sizeof(block_iq3_xxs) == 98 && sizeof(block_iq3_s) == 110 && sizeof(block_iq1_s) == 50 &&
                  sizeof(block_iq1_m) == 56,
              "ggml i-quants");

// Scale k (0..15) of a Q3_K block, unbiased: low 4 bits from byte k % 8 (low nibble for k < 8, high nibble
// after), high 2 bits from byte 8 + k % 4 at bit 2 * (k / 4).
inline int Q3KScale(const uint8_t* s, int k) {
  const int low = k < 8 ? (s[k] & 0xF) : (s[k - 8] >> 4);
  const int high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
  return (low | high << 4) - 32;
}

// Sub-block j (0..7) of a Q4_K super-block: 6-bit scale and min. The first four pairs sit in the low
// six bits of bytes 0..7; the last four are split into a low nibble (bytes 8..11) and two high bits
// borrowed from the top of bytes 0..7.
inline void GetScaleMinK4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

// Reads a little-endian f16 from possibly unaligned memory.
inline float LoadHalf(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}
inline float LoadF32(const void* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}
inline uint32_t LoadU32(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The `bits`-bit code (bits <= 8) at element i of an LSB-first bit stream: bits [i*bits, (i+1)*bits). The
// layout of kQInt rows and of SpQR's codes and statistics.
inline int StreamCode(const uint8_t* stream, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = stream[byte];
  if (shift + bits > 8) v |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

}  // namespace qforge::kernels
