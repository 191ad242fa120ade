// Per-layer calibration statistics of a linear layer's inputs: the GPTQ Hessian H = 2 XᵀX / n (fp64) and
// per-input-channel mean |x| and max |x| (what AWQ and SmoothQuant scale by). Plain data plus the
// accumulator that builds it; the runtime plumbing that feeds it is in collect.h.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace qforge::calib {

struct LayerStats {
  int64_t cols = 0;              // input features of the layer (the weight's row length)
  int64_t tokens = 0;            // n: input rows seen
  // Of `tokens`, how many stand for the layer's pool rather than rows this weight saw: an expert routed fewer
  // tokens than it has inputs has its statistics completed from all the layer's experts (collect.h).
  int64_t pooled_tokens = 0;
  std::vector<double> hessian;   // [cols, cols] row-major, symmetric: 2/n * sum_t x_t x_tᵀ
  std::vector<double> mean_abs;  // [cols]: 1/n * sum_t |x_t|
  std::vector<double> max_abs;   // [cols]: max_t |x_t|
  // [cols] or empty: an importance per input column brought from outside (llama.cpp's imatrix: 1/n sum_t x_tj²,
  // `qforge quantize --imatrix`), with no Hessian; the plain ggml methods with a weighted fit weigh rounding errors
  // by it (kernels::HasWeightedEncoding).
  std::vector<double> importance;
};

// Weight tensor name -> statistics of its input. Layers fed by the same activations (q/k/v; gate/up) share
// one LayerStats object.
using CalibrationStats = std::map<std::string, std::shared_ptr<const LayerStats>>;

// Accumulates sum_t x_t x_tᵀ in fp64 (BLAS syrk on the upper triangle) and the channel statistics.
class StatsAccumulator {
 public:
  explicit StatsAccumulator(int64_t cols);
  // x: n rows of cols floats, row-major. Rows are buffered so that syrk runs on large panels.
  void Add(const float* x, int64_t n);
  int64_t cols() const { return cols_; }
  int64_t tokens() const { return tokens_ + pending_; }
  // H = 2/n XᵀX with both triangles filled; all zero when no token was seen.
  LayerStats Finish();

 private:
  void Flush();

  int64_t cols_;
  int64_t tokens_ = 0;   // rows already folded into xtx_
  int64_t pending_ = 0;  // rows waiting in panel_
  std::vector<double> xtx_;  // upper triangle valid
  std::vector<double> sum_abs_, max_abs_;
  std::vector<double> panel_;  // pending rows converted to fp64
};

}  // namespace qforge::calib
