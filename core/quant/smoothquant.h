// SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
// Language Models"): W8A8 with the activation outliers migrated into the weights. For a layer input x whose
// channel j reaches max|x_j| and the weights W reading it,
//   s_j = max|x_j|^α / max_k |W_kj|^(1-α)          (α: migration strength, QuantParams::alpha)
// and the layer computes (W·diag(s)) (diag(s)⁻¹ x): the same function, with flatter activations and the
// difficulty moved to the weights in proportion α. The 1/s is folded into whatever produces x, so nothing is
// added at inference:
//   attn_norm /= s, q/k/v columns *= s;  ffn_norm /= s, gate/up columns *= s  (AwqFoldScales)
//   up_proj rows /= s, down_proj columns *= s     (silu(gate x)·(up x) / s is exactly the scaled down input)
// o_proj stays unsmoothed: with GQA one v row feeds several o_proj input channels. Weights are then int8 per
// output channel (kW8A8) and the kernels quantize activations per token at run time (core/kernels).
// The method class is built here and registered by one line in methods.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/calib/stats.h"
#include "core/model/model.h"
#include "core/quant/awq.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {

// The reference implementation's guard: weight maxima and the scales themselves are clamped to at least this.
inline constexpr double kSmoothQuantMinScale = 1e-5;

// s_j for one input shared by `weights` ([rows, cols] each): the weight max of column j is taken over all of
// them. act_max: max |x_j| over the calibration tokens (LayerStats::max_abs). INVALID_ARGUMENT (naming the
// field) for α outside [0, 1], empty or mismatched inputs, and negative or non-finite maxima.
absl::StatusOr<std::vector<float>> SmoothQuantScales(const std::vector<AwqWeight>& weights, int64_t cols,
                                                     const std::vector<double>& act_max, double alpha);

// Per-block scales of the three smoothed inputs; an empty vector leaves that input unscaled.
struct SmoothQuantLayerScales {
  std::vector<float> attn;  // [dim]: attn_norm /= s, q/k/v columns *= s
  std::vector<float> ffn;   // [dim]: ffn_norm /= s, gate/up columns *= s
  std::vector<float> down;  // [hidden]: up rows /= s, down columns *= s
};

// Folds the scales into an fp32 model (the tensors involved must be F32): the fp function is unchanged up to
// rounding. attn/ffn go through AwqFoldScales; down is folded here.
absl::Status SmoothQuantFoldScales(Model& m, const std::vector<SmoothQuantLayerScales>& layers);

// The whole model transform: computes the three scales of every block from `stats` (the fp32 model's
// calibration) at `alpha`, all from the weights as they were before any fold, folds them into `m`, and rewrites
// the statistics of the affected inputs (q/k/v, gate/up, down) to the folded inputs x / s (AwqScaleStats).
// *applied gets the scales when not null. FAILED_PRECONDITION when a block's statistics are missing.
absl::Status SmoothQuantModel(Model& m, calib::CalibrationStats& stats, double alpha,
                              std::vector<SmoothQuantLayerScales>* applied = nullptr);

// The registry's "smoothquant" method: NeedsCalibration, HasModelTransform (PrepareModel = SmoothQuantModel at
// QuantParams::alpha, which must be in [0, 1]; bits must be 8). Quantize: symmetric int8 per output channel into
// kW8A8, scale_r = max_c |w_rc| / 127 (f32), code = round-half-even(w / scale_r) clamped to ±127 (an all-zero row
// gets scale 0); FAILED_PRECONDITION without calibration statistics.
std::unique_ptr<QuantMethod> MakeSmoothQuantMethod();

}  // namespace qforge::quant
