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

static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match ggml");
static_assert(sizeof(block_q4_0) == 18, "block_q4_0 must match ggml");
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match ggml");

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
