// Automatic mixed precision: measures how much each weight matrix loses under each candidate (method, params)
// and picks one candidate per matrix so that the total loss is minimal under a bits-per-weight budget.
// The answer is a list of exact-name LayerRules, so QuantizeModel (or the scheduler) reproduces it byte for byte.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/calib/stats.h"
#include "core/model/model.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"

namespace qforge::quant {

struct PrecisionCandidate {
  std::string method;
  QuantParams params;
};

// rtn 2/g64, 3/g64, 4/g128, 4/g64, q4_k, rtn 5/g64, 6/g128, 8/g128 (see docs/quantizers.md "Mixed precision").
std::vector<PrecisionCandidate> DefaultPrecisionCandidates();

struct MixedPrecisionOptions {
  // Budget: 8 * (bytes of every quantized matrix: codes, scales, zeros) <= target_bpw * (their weights).
  double target_bpw = 4.0;
  std::vector<PrecisionCandidate> candidates;  // empty: DefaultPrecisionCandidates()
  bool quantize_embeddings = false;            // also plan token_embd.weight / output.weight
  // Optional (not owned): tensors with statistics are scored by their layer-output error instead.
  const calib::CalibrationStats* calibration = nullptr;
  ThreadPool* pool = nullptr;  // may be null
};

struct TensorPrecisionChoice {
  std::string name;
  int64_t weights = 0;
  int candidate = -1;    // index into the candidates used
  std::string format;    // FormatName of what QuantizeModel will write (after any fallback)
  size_t bytes = 0;      // stored bytes at that choice
  double loss = 0;       // weights * relative squared error at that choice
};

struct MixedPrecisionPlan {
  std::vector<LayerRule> rules;  // one per planned tensor, pattern = the exact tensor name
  std::vector<TensorPrecisionChoice> tensors;
  std::vector<PrecisionCandidate> candidates;
  int64_t weights = 0;
  size_t bytes = 0;
  double bits_per_weight = 0;  // 8 * bytes / weights, <= target_bpw
  double loss = 0;             // sum of the tensors' losses (the minimised objective)
};

// The per-tensor loss of a candidate is weights * e², e = the relative error QuantizeTensor measures:
// ||(W-Ŵ)X||/||WX|| when the tensor has calibration statistics, else ||W-Ŵ||_F/||W||_F.
// INVALID_ARGUMENT for a bad candidate (naming candidates[i]) or a target below what the cheapest candidates
// need; FAILED_PRECONDITION when a candidate needs calibration the options do not give.
absl::StatusOr<MixedPrecisionPlan> PlanMixedPrecisionDetailed(const Model& model, const MixedPrecisionOptions& o);

// Just the rules of PlanMixedPrecisionDetailed.
absl::StatusOr<std::vector<LayerRule>> PlanMixedPrecision(const Model& model, const MixedPrecisionOptions& o);

}  // namespace qforge::quant
