// AWQ (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
// per-input-channel scales s = mean|x|^α protect the weight columns that meet large activations. The weight is
// quantized as Q(W·diag(s)) and the layer computes Q(W·diag(s)) · (diag(s)⁻¹ x); the 1/s is folded into the
// op that produces x (the RMSNorm weight), so nothing is added at inference. α is searched over a grid by the
// exact layer-output error from the calibration Hessian H = 2XᵀX/n:
//   err(α) = tr(ΔW H ΔWᵀ),  ΔW = W − Q(W·diag(s))·diag(s)⁻¹.
// Plus the paper's clipping search (per kQInt group, shrink the range; the error of a group measured with the
// group's diagonal block of H). Hot numeric code and the model transform; the method class is in methods.cc.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/calib/stats.h"
#include "core/model/model.h"

namespace qforge::quant {

struct AwqOptions {
  int bits = 4;
  int group = 128;  // columns per kQInt (scale, zero); 0 = one per row
  bool symmetric = true;
  int grid = 20;    // α ∈ {0, 1/grid, ..., (grid-1)/grid}
};

// One weight reading the shared input (q, k, v; or gate, up): [rows, cols] row-major fp32.
struct AwqWeight {
  const float* w = nullptr;
  int64_t rows = 0;
};

struct AwqScaleResult {
  double alpha = 0;               // the chosen α
  std::vector<float> scales;      // [cols]: s_j = max(mean|x_j|, 1e-4)^α / sqrt(max_k s_k · min_k s_k)
  std::vector<double> errors;     // [grid]: summed tr(ΔW H ΔWᵀ) of every weight at α = i/grid
  double error = 0;               // errors at the chosen α (<= errors[0], which is plain RTN's error)
};

// The channel scales for exponent α (the normalisation of the reference implementation).
std::vector<float> AwqChannelScales(const std::vector<double>& mean_abs, double alpha);

// Q(W·diag(s))·diag(s)⁻¹ with the kQInt grid rtn uses (ChooseQIntGrid, f16 scales): what the layer computes
// once 1/s is folded into its input. s == nullptr means all ones (then it is exactly rtn's dequantized weight).
void AwqFakeQuantize(const float* w, int64_t rows, int64_t cols, const float* s, const AwqOptions& o, float* w_hat);

// The α search for the weights sharing one input with statistics `stats` (cols == stats.cols).
// INVALID_ARGUMENT for bad options or shapes (the message names the field).
absl::StatusOr<AwqScaleResult> AwqSearchScales(const std::vector<AwqWeight>& weights, int64_t cols,
                                               const calib::LayerStats& stats, const AwqOptions& o);

// Clipping search on one weight (applied after scaling): for each row and group, the range is shrunk by
// r ∈ {1, 1 - 1/grid, ..., 1 - (grid/2 - 1)/grid} (the reference's max_shrink 0.5: 1.00..0.55 for grid 20; r = 1
// first, so never worse per group), choosing the r minimising δ_gᵀ H_gg δ_g (the group's own output error; the
// reference likewise measures each group against its own input columns). Writes the kQInt codes [rows, cols], f16 scales and zeros [rows, groups] ready for PackQInt.
absl::Status AwqClipQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian, const AwqOptions& o,
                             int grid, std::vector<uint8_t>* codes, std::vector<uint16_t>* scales,
                             std::vector<uint8_t>* zeros);

// The values of the fp32 tensor `name` of m (FAILED_PRECONDITION, prefixed by `method`, when it is stored in another
// encoding: the scale folds work on fp32 models), and writing them back. For the model transforms of AWQ and
// SmoothQuant.
absl::StatusOr<std::vector<float>> ReadF32Tensor(const Model& m, const std::string& name, const char* method);
void WriteF32Tensor(Model& m, const std::string& name, const std::vector<float>& v);

// Per-block scales for the model-level fold; an empty vector leaves that pair unscaled.
struct AwqLayerScales {
  std::vector<float> attn;  // [dim]: attn_norm /= s, q/k/v columns *= s
  std::vector<float> ffn;   // [dim]: ffn_norm /= s, gate/up columns *= s
};

// Folds the scales into an fp32 model (norms and the matrices listed above must be F32): the fp function is
// unchanged up to rounding. o_proj and down_proj are not scaled (see docs/calibrated.md).
absl::Status AwqFoldScales(Model& m, const std::vector<AwqLayerScales>& layers);

// Statistics of the inputs after the fold (x' = x / s): H' = diag(1/s) H diag(1/s), mean/max |x| divided by s.
calib::LayerStats AwqScaleStats(const calib::LayerStats& stats, const std::vector<float>& s);

// The whole per-model step: searches one s for q/k/v and one for gate/up of every block from `stats` (the fp32
// model's calibration), folds them into `m`, and rewrites the affected entries of `stats` to the folded inputs so
// that a following QuantizeModel (method awq or rtn) sees consistent statistics. *chosen gets the α per block pair
// (attn, ffn) when not null. A group that does not divide dim is searched per channel (the quantizer's fallback).
absl::Status AwqScaleModel(Model& m, calib::CalibrationStats& stats, const AwqOptions& o,
                           std::vector<std::pair<double, double>>* chosen = nullptr);

}  // namespace qforge::quant
