// The quantizer interface and its registry. A method turns an fp32 [rows, cols] matrix into the bytes of
// one WeightFormat. Adding a method = one class in core/quant plus one line in the registry table.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/calib/stats.h"
#include "core/model/tensor.h"

namespace qforge {
struct Model;
}

namespace qforge::quant {

struct QuantParams {
  int bits = 4;              // rtn: 2..8. Fixed-format methods (q8_0, q4_0, q4_k, nf4, f16) ignore it.
  int group = 128;           // rtn: elements per scale, 0 = one scale per row; nf4: block size
  bool symmetric = true;     // rtn only
  bool double_quant = true;  // nf4 only
  // gptq only (docs/calibrated.md): column order by descending Hessian diagonal; group grids fixed from the
  // original weights before the pass (implied by act_order with group > 0); damping as a fraction of mean(diag H).
  bool act_order = false;
  bool static_groups = false;
  float damp = 0.01f;
  // smoothquant only: migration strength, s_j = max|x_j|^α / max|W_:,j|^(1-α).
  float alpha = 0.5f;
  // spqr only (τ): a weight is an outlier when its sensitivity ((w - q(w)) / U_jj)² exceeds
  // τ · mean_j(Var_i(W_ij) / U_jj²), the reference implementation's relative rule (core/quant/spqr.h).
  float outlier_threshold = 0.2f;
  // quip only: seed of the random orthogonal transforms (stored in the tensor, so the runtime can undo them).
  uint32_t seed = 0;
  bool operator==(const QuantParams&) const = default;
};

// "bits=4 group=128 sym" style, for metadata and reports.
std::string ParamsToString(const QuantParams& p);

class QuantMethod {
 public:
  virtual ~QuantMethod() = default;
  virtual std::string name() const = 0;
  virtual std::string description() const = 0;
  virtual QuantParams DefaultParams() const = 0;
  // Shape-independent checks; errors name the offending field.
  virtual absl::Status Validate(const QuantParams& p) const = 0;
  // The format a [rows, cols] matrix gets, or an error when cols does not fit the method's blocks.
  virtual absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const = 0;
  // The format of the bytes Quantize returned for a [rows, cols] matrix: OutputFormat's, unless the encoding
  // depends on the data (spqr: the outlier count, read back from the bytes). What QuantizeTensor and the workers
  // record for the tensor.
  virtual absl::StatusOr<WeightFormat> EncodedFormat(const QuantParams& p, int64_t rows, int64_t cols,
                                                     std::span<const uint8_t> bytes) const {
    return OutputFormat(p, rows, cols);
  }
  // Encodes row-major w. Rows are split over `pool` (may be null); the bytes never depend on the split.
  // `calib`: statistics of this layer's inputs (cols == calib->cols); calibration-free methods ignore it,
  // methods that NeedsCalibration() fail with FAILED_PRECONDITION without it.
  virtual absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols,
                                                        const QuantParams& p, ThreadPool* pool = nullptr,
                                                        const calib::LayerStats* calib = nullptr) const = 0;
  // True for methods that need calibration statistics (gptq).
  virtual bool NeedsCalibration() const { return false; }
  // The model-level half of a method, run once per job after calibration and before any tensor is quantized:
  // AWQ and SmoothQuant fold per-channel scales into the ops that produce a layer's input (the RMSNorm weights)
  // and into the matrices reading it. Rewrites `model`'s fp32 tensors and the affected entries of `stats` in
  // place so that Quantize sees the transformed weights with consistent statistics. Most methods have none.
  virtual bool HasModelTransform() const { return false; }
  virtual absl::Status PrepareModel(Model& model, calib::CalibrationStats& stats, const QuantParams& p) const {
    return absl::OkStatus();
  }
  // The method and params to try when OutputFormat rejects a shape; nullopt when there is none.
  virtual std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const = 0;
};

// nullptr when unknown.
const QuantMethod* FindMethod(const std::string& name);
// Every registered method, in registry order.
std::vector<const QuantMethod*> ListMethods();

}  // namespace qforge::quant
