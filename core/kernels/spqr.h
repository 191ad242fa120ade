// SpQR's decoding arithmetic (the kSpQR layout of core/model/tensor.h), header-only so that the kernels and the
// quantizer (core/quant/spqr.cc) compute bit-identical floats: the quantizer chooses codes, and measures the
// error it feeds back, against exactly what these functions return.
#pragma once

#include <cstdint>
#include <cstring>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/model/tensor.h"

namespace qforge::kernels::spqr {

// One 3-bit second-level grid: value = scale * (code - zero), scale and zero stored as f16.
inline float StatValue(int code, float scale, float zero) { return scale * (static_cast<float>(code) - zero); }
// A dense weight on its first-level grid.
inline float WeightValue(int code, float scale, float zero) { return scale * (static_cast<float>(code) - zero); }

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
  *scale = StatValue(StreamCode(data + l.scale_codes_offset, i, kSpqrStatBits), LoadHalf(second), LoadHalf(second + 2));
  *zero = StatValue(StreamCode(data + l.zero_codes_offset, i, kSpqrStatBits), LoadHalf(second + 4), LoadHalf(second + 6));
}

}  // namespace qforge::kernels::spqr
