#include "core/calib/stats.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

namespace qforge::calib {
namespace {
// Rows per syrk call: the runtime reports chunks of max_batch (64) tokens, too thin for BLAS to be efficient.
constexpr int64_t kPanelRows = 512;
}  // namespace

StatsAccumulator::StatsAccumulator(int64_t cols)
    : cols_(cols),
      xtx_(static_cast<size_t>(cols * cols), 0.0),
      sum_abs_(static_cast<size_t>(cols), 0.0),
      max_abs_(static_cast<size_t>(cols), 0.0) {}

void StatsAccumulator::Add(const float* x, int64_t n) {
  const int64_t c = cols_;
  for (int64_t t = 0; t < n; ++t) {
    if (pending_ == kPanelRows) Flush();
    if (panel_.empty()) panel_.resize(static_cast<size_t>(kPanelRows * c));
    double* row = &panel_[pending_ * c];
    for (int64_t j = 0; j < c; ++j) {
      const double v = x[t * c + j];
      row[j] = v;
      const double a = std::fabs(v);
      sum_abs_[j] += a;
      max_abs_[j] = std::max(max_abs_[j], a);
    }
    ++pending_;
  }
}

void StatsAccumulator::Flush() {
  if (pending_ == 0) return;
  const int c = static_cast<int>(cols_);
  // xtx += Pᵀ P for the pending panel P [pending, c] (row-major); only the upper triangle is written.
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, c, static_cast<int>(pending_), 1.0, panel_.data(), c, 1.0,
              xtx_.data(), c);
  tokens_ += pending_;
  pending_ = 0;
}

LayerStats StatsAccumulator::Finish() {
  Flush();
  LayerStats s;
  s.cols = cols_;
  s.tokens = tokens_;
  const int64_t c = cols_;
  s.hessian.assign(static_cast<size_t>(c * c), 0.0);
  s.mean_abs.assign(static_cast<size_t>(c), 0.0);
  s.max_abs = max_abs_;
  if (tokens_ == 0) return s;
  const double f = 2.0 / static_cast<double>(tokens_);
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = i; j < c; ++j) {
      const double v = f * xtx_[i * c + j];
      s.hessian[i * c + j] = v;
      s.hessian[j * c + i] = v;
    }
    s.mean_abs[i] = sum_abs_[i] / static_cast<double>(tokens_);
  }
  return s;
}

}  // namespace qforge::calib
