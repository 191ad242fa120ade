// Scalar reference kernels: the definition of what every format's bytes mean. SIMD paths must produce
// the same decoded floats; tests compare them against these functions.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/kernels_internal.h"

namespace qforge::kernels::internal {
namespace {

void DecodeQIntScalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const WeightFormat& f = v.format;
  const QIntLayout& l = v.qint;
  const uint8_t* codes = v.data + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
  const uint8_t* scales = v.data + l.scales_offset + 2 * static_cast<size_t>(r * l.groups_per_row);
  const uint8_t* zeros = f.symmetric ? nullptr : v.data + l.zeros_offset + static_cast<size_t>(r * l.groups_per_row);
  const int sym_zero = 1 << (f.bits - 1);
  const int64_t end = c0 + len;
  for (int64_t c = c0; c < end;) {
    const int64_t g = c / l.group;
    const int64_t group_end = std::min(end, (g + 1) * l.group);
    const float scale = LoadHalf(scales + 2 * g);
    const int zero = zeros ? zeros[g] : sym_zero;
    for (; c < group_end; ++c) out[c - c0] = scale * static_cast<float>(StreamCode(codes, c, f.bits) - zero);
  }
}

void DecodeNf4Scalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const int64_t base = r * v.cols + c0;
  int64_t cached_block = -1;
  float scale = 0;
  for (int64_t i = 0; i < len; ++i) {
    const int64_t e = base + i;
    const int64_t block = e / v.nf4.block;
    if (block != cached_block) {
      scale = Nf4BlockScale(v, block);
      cached_block = block;
    }
    const uint8_t byte = v.data[v.nf4.codes_offset + static_cast<size_t>(e >> 1)];
    const int code = (e & 1) ? (byte >> 4) : (byte & 0xF);
    out[i] = scale * kNf4Levels[code];
  }
}

}  // namespace

void DecodeScalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  if (v.ggml != nullptr) {  // every ggml type, through its row of the table (ggml_kernels.h)
    v.ggml->dequantize(GgmlBlocksAt(v, r, c0), len / v.block, out);
    return;
  }
  switch (v.format.type) {
    case WeightType::kQInt:
      DecodeQIntScalar(v, r, c0, len, out);
      return;
    case WeightType::kNF4:
      DecodeNf4Scalar(v, r, c0, len, out);
      return;
    case WeightType::kSpQR:
      DecodeSpqrScalar(v, r, c0, len, out);
      return;
    case WeightType::kW8A8:
      DecodeW8A8Scalar(v, r, c0, len, out);
      return;
    case WeightType::kQuip:  // never viewed row by row: kernels.cc routes it to quip.cc
      return;
    default:  // the ggml types: v.ggml above
      return;
  }
}

void MatMulScalar(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                  int64_t y_stride) {
  std::vector<float> row(static_cast<size_t>(v.cols));
  for (int64_t r = r0; r < r1; ++r) {
    DecodeScalar(v, r, 0, v.cols, row.data());
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * v.cols;
      double acc = 0;
      for (int64_t c = 0; c < v.cols; ++c) acc += static_cast<double>(row[c]) * xt[c];
      y[t * y_stride + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace qforge::kernels::internal
