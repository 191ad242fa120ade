// The grids of ggml's i-quant formats (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M) and their small
// lookup tables. The grids' values are facts of the byte format: iq_grids.cc is generated from ggml-common.h by
// scripts/gen-iq-grids.py. Entry k of a grid packs one point little-endian: element j is byte j.
#pragma once

#include <cstdint>

namespace qforge::kernels {

extern const uint64_t kIq2xxsGrid[256];  // magnitudes from {8, 25, 43}
extern const uint64_t kIq2xsGrid[512];   // magnitudes from {8, 25, 43}
extern const uint64_t kIq2sGrid[1024];   // magnitudes from {8, 25, 43}
extern const uint32_t kIq3xxsGrid[256];  // 4 magnitudes from {4, 12, ..., 52, 62}
extern const uint32_t kIq3sGrid[512];    // 4 magnitudes from {1, 3, ..., 15}
extern const uint64_t kIq1sGrid[2048];   // int8 values from {-1, 0, 1}

// The non-linear 4-bit levels of IQ4_NL and IQ4_XS.
inline constexpr int8_t kIq4nlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

// The 16 E2M1 (FP4) values of MXFP4, doubled: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, times 2.
inline constexpr int8_t kFp4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// IQ1_S / IQ1_M: every grid value is shifted by +-kIq1Delta (the sign from a bit of the block).
inline constexpr float kIq1Delta = 0.125f;

// IQ2 / IQ3 signs: 7 stored sign bits s, the eighth chosen so that the number of minus signs is even. The
// 8-bit sign mask of s (bit j set: element j negative) is s with bit 7 = parity of s.
inline constexpr uint8_t EvenSigns(uint32_t s7) {
  const uint32_t s = s7 & 127;
  return static_cast<uint8_t>(s | ((__builtin_popcount(s) & 1) << 7));
}

// Byte j of a packed grid entry.
inline constexpr uint8_t GridByte(uint64_t entry, int j) { return static_cast<uint8_t>(entry >> (8 * j)); }

}  // namespace qforge::kernels
