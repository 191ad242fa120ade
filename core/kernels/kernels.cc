// Interim scalar implementation (f32/f16/bf16 only); replaced by the full kernel set.
#include "core/kernels/kernels.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"

namespace qforge::kernels {

Isa DetectIsa() { return Isa::kScalar; }
Isa ActiveIsa() { return Isa::kScalar; }
Isa SetIsa(Isa) { return Isa::kScalar; }
const char* IsaName(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "scalar"; }

absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t cols = w.cols();
  if (row_begin < 0 || row_end > w.rows() || row_begin > row_end) return absl::OutOfRangeError("bad row range");
  const int64_t n = (row_end - row_begin) * cols;
  const int64_t off = row_begin * cols;
  switch (w.format.type) {
    case WeightType::kF32: {
      const float* p = reinterpret_cast<const float*>(w.data) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      return absl::OkStatus();
    }
    case WeightType::kF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = HalfToFloat(p[i]);
      return absl::OkStatus();
    }
    case WeightType::kBF16: {
      const uint16_t* p = reinterpret_cast<const uint16_t*>(w.data) + off;
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(p[i]);
      return absl::OkStatus();
    }
    default:
      return absl::UnimplementedError(absl::StrCat("no kernel for ", FormatName(w.format)));
  }
}

absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride) {
  const int64_t cols = w.cols();
  std::vector<float> row(cols);
  for (int64_t r = row_begin; r < row_end; ++r) {
    auto s = DequantizeRows(w, r, r + 1, row.data());
    if (!s.ok()) return s;
    for (int64_t t = 0; t < n; ++t) {
      float acc = 0;
      for (int64_t c = 0; c < cols; ++c) acc += row[c] * x[t * cols + c];
      y[t * y_stride + r] = acc;
    }
  }
  return absl::OkStatus();
}

}  // namespace qforge::kernels
