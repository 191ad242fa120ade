// QuIP (Chee, Cai, Kuleshov, De Sa 2023, "QuIP: 2-Bit Quantization of Large Language Models With Guarantees"):
// incoherence processing by seeded random orthogonal transforms, then LDLQ (GPTQ's rounding rule) in the
// rotated basis, optionally followed by greedy coordinate-descent passes. Writes WeightType::kQuip
// (tensor.h QuipLayout). Hot numeric code only; the method class is in quip.cc, registered in methods.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {

struct QuipOptions {
  int bits = 2;
  int group = 0;  // columns of W' per (scale, zero); 0 = one per row (the paper's per-row scale)
  bool symmetric = true;
  bool act_order = false;  // LDLQ column order by descending diag(H')
  double percdamp = 0.01;  // λ = percdamp * mean(diag H), as gptq
  // The paper's diagonal rescaling before the rotation: W ← W D̃, H ← D̃⁻¹ H D̃⁻¹, D̃ = (diag H / diag WᵀW)^¼.
  bool rescale = true;
  // Greedy passes after LDLQ ("LDLQ-RG"): each re-rounds every code to the grid point minimising
  // tr(ΔW H' ΔWᵀ) with all other codes fixed. Never increases that loss.
  int greedy_passes = 0;
  // Instead of GptqQuantize's grids (chosen from the error-updated weights as each group comes up): per (row,
  // group) grids fixed before the pass from W' by a range-shrink search minimising the rounding MSE, then LDLQ on
  // those grids (no lazy batches, O(rows·cols²)). act_order is ignored then.
  bool mse_grid = false;
  uint64_t seed = 0;  // the tensor's seed (QuipTensorSeed), stored in the header
};

// The seed stored in a tensor: QuantParams::seed mixed with a hash of the matrix's shape and fp32 bytes, so
// every tensor of a model gets its own transforms and a rerun on the same weights the same ones.
uint64_t QuipTensorSeed(uint32_t seed, const float* w, int64_t rows, int64_t cols);

// The bytes of a kQuip tensor (FormatName "quip<bits>_<g|pc>_<sym|asym>") for w [rows, cols] row-major with
// input second moment `hessian` [cols, cols]. INVALID_ARGUMENT for bad shapes/options (a side whose Kronecker
// factor exceeds kernels::kQuipMaxFactor included), FAILED_PRECONDITION when the damped rotated Hessian is not
// positive definite.
absl::StatusOr<std::vector<uint8_t>> QuipQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                                  const QuipOptions& options);

// The registry entry (methods.cc): method "quip", NeedsCalibration, fallbacks quip g -> quip per-row -> gptq.
std::unique_ptr<QuantMethod> MakeQuipMethod();

}  // namespace qforge::quant
