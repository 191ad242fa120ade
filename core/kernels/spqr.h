// SpQR's decoding arithmetic (the kSpQR layout of core/model/tensor.h), header-only so that the kernels and the
// quantizer (core/quant/spqr.cc) compute bit-identical floats: the quantizer chooses codes, and measures the
// error it feeds back, against exactly what these functions return.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/base/half.h"
#include "core/model/tensor.h"

namespace qforge::kernels::spqr {

// The `bits`-bit code at element index i of an LSB-first bit stream (bits <= 8).
inline int StreamCode(const uint8_t* stream, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int shift = static_cast<int>(bit & 7);
  uint32_t v = stream[byte];
  if (shift + bits > 8) v |= static_cast<uint32_t>(stream[byte + 1]) << 8;
  return static_cast<int>((v >> shift) & ((1u << bits) - 1));
}

// One 3-bit second-level grid: value = scale * (code - zero), scale and zero stored as f16.
inline float StatValue(int code, float scale, float zero) { return scale * (static_cast<float>(code) - zero); }
// A dense weight on its first-level grid.
inline float WeightValue(int code, float scale, float zero) { return scale * (static_cast<float>(code) - zero); }

inline float LoadF16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return HalfToFloat(h);
}
inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint32_t LoadIndex(const uint8_t* p, int index_bytes) {
  if (index_bytes == 4) return LoadU32(p);
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The decoded first-level (scale, zero) of row r, group k.
inline void GroupStats(const uint8_t* data, const SpqrLayout& l, int64_t r, int64_t k, float* scale, float* zero) {
  const int64_t i = r * l.groups_per_row + k;
  const uint8_t* second = data + l.second_offset + 8 * static_cast<size_t>((r / kSpqrStatGroup) * l.groups_per_row + k);
  *scale = StatValue(StreamCode(data + l.scale_codes_offset, i, kSpqrStatBits), LoadF16(second), LoadF16(second + 2));
  *zero = StatValue(StreamCode(data + l.zero_codes_offset, i, kSpqrStatBits), LoadF16(second + 4), LoadF16(second + 6));
}

}  // namespace qforge::kernels::spqr
