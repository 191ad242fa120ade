#include "core/quant/packing.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/base/half.h"

namespace qforge::quant {

QIntGrid ChooseQIntGrid(const float* xg, int64_t n, int bits, bool symmetric) {
  const int levels = (1 << bits) - 1;
  constexpr float kMaxHalf = 65504.0f;  // scales beyond f16 range saturate instead of becoming inf
  float range_min = 0;
  float scale_f32;
  if (symmetric) {
    float amax = 0;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xg[i]));
    scale_f32 = amax / static_cast<float>((1 << (bits - 1)) - 1);
  } else {
    float mx = 0;  // the range always contains 0, so the zero point fits in [0, 2^bits - 1]
    for (int64_t i = 0; i < n; ++i) {
      range_min = std::min(range_min, xg[i]);
      mx = std::max(mx, xg[i]);
    }
    scale_f32 = (mx - range_min) / static_cast<float>(levels);
  }
  QIntGrid g;
  g.max_code = levels;
  g.scale_half = FloatToHalf(std::min(scale_f32, kMaxHalf));
  g.scale = HalfToFloat(g.scale_half);
  g.zero = symmetric     ? 1 << (bits - 1)
           : g.scale > 0 ? std::clamp(static_cast<int>(std::nearbyint(-range_min / g.scale)), 0, levels)
                         : 0;
  return g;
}

namespace {
inline void PutCode(uint8_t* row_codes, int64_t c, int bits, uint32_t code) {
  const int64_t bit = c * bits;
  const uint32_t shifted = code << (bit & 7);
  row_codes[bit >> 3] |= static_cast<uint8_t>(shifted);
  if ((bit & 7) + bits > 8) row_codes[(bit >> 3) + 1] |= static_cast<uint8_t>(shifted >> 8);
}
}  // namespace

void QuantizeRowQInt(const float* x, int64_t r, int64_t cols, const WeightFormat& f, const QIntLayout& l,
                     uint8_t* tensor_bytes) {
  const int bits = f.bits;
  uint8_t* codes = tensor_bytes + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
  uint8_t* scales = tensor_bytes + l.scales_offset + 2 * static_cast<size_t>(r * l.groups_per_row);
  uint8_t* zeros = f.symmetric ? nullptr : tensor_bytes + l.zeros_offset + static_cast<size_t>(r * l.groups_per_row);
  for (int64_t g = 0; g < l.groups_per_row; ++g) {
    const float* xg = x + g * l.group;
    const QIntGrid grid = ChooseQIntGrid(xg, l.group, bits, f.symmetric);
    std::memcpy(scales + 2 * g, &grid.scale_half, 2);
    if (zeros) zeros[g] = static_cast<uint8_t>(grid.zero);
    const float s = grid.scale;
    for (int64_t i = 0; i < l.group; ++i) {
      const int q = s > 0 ? static_cast<int>(std::nearbyint(xg[i] / s)) + grid.zero : grid.zero;
      PutCode(codes, g * l.group + i, bits, static_cast<uint32_t>(std::clamp(q, 0, grid.max_code)));
    }
  }
}

void PackQInt(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t rows, int64_t cols,
              const WeightFormat& f, const QIntLayout& l, uint8_t* tensor_bytes) {
  const size_t groups = static_cast<size_t>(rows * l.groups_per_row);
  std::memcpy(tensor_bytes + l.scales_offset, scales, 2 * groups);
  if (!f.symmetric) std::memcpy(tensor_bytes + l.zeros_offset, zeros, groups);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row_codes = tensor_bytes + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
    for (int64_t c = 0; c < cols; ++c) PutCode(row_codes, c, f.bits, codes[r * cols + c]);
  }
}

int Nf4NearestCode(float v) {
  // Levels ascend, so the nearest one is found by comparing against the midpoints between neighbours.
  int code = 0;
  for (int k = 1; k < 16; ++k) {
    if (v > 0.5f * (kNf4Levels[k - 1] + kNf4Levels[k])) code = k;
  }
  return code;
}

void EncodeNf4Block(const float* x, int64_t n, float scale, uint8_t* codes) {
  constexpr int kZeroCode = 7;
  for (int64_t i = 0; i < n; i += 2) {
    const int lo = scale != 0 ? Nf4NearestCode(x[i] / scale) : kZeroCode;
    const int hi = scale != 0 ? Nf4NearestCode(x[i + 1] / scale) : kZeroCode;
    codes[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

void DoubleQuantizeAbsmax(const float* absmax, int64_t blocks, int8_t* q, float* dq_scale, float* dq_offset) {
  double sum = 0;
  for (int64_t b = 0; b < blocks; ++b) sum += absmax[b];
  const float offset = blocks > 0 ? static_cast<float>(sum / static_cast<double>(blocks)) : 0.0f;
  *dq_offset = offset;
  for (int64_t g0 = 0, gi = 0; g0 < blocks; g0 += kNf4DoubleQuantGroup, ++gi) {
    const int64_t g1 = std::min<int64_t>(blocks, g0 + kNf4DoubleQuantGroup);
    float m = 0;
    for (int64_t b = g0; b < g1; ++b) m = std::max(m, std::fabs(absmax[b] - offset));
    const float scale = m / 127.0f;
    dq_scale[gi] = scale;
    for (int64_t b = g0; b < g1; ++b) {
      const int v = scale > 0 ? static_cast<int>(std::nearbyint((absmax[b] - offset) / scale)) : 0;
      q[b] = static_cast<int8_t>(std::clamp(v, -127, 127));
    }
  }
}

}  // namespace qforge::quant
