// Sequential calibration, as GPTQ's and QMoE's own pipelines run it: block i is calibrated on the output of the
// already-quantized blocks < i, so each block's quantization sees (and compensates for) the error of the blocks
// before it. The one-pass alternative (core/calib/collect.h) calibrates every block on the full-precision model's
// activations. Measured against each other in docs/calibrated.md.
#pragma once

#include <optional>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/calib/collect.h"
#include "core/model/model.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"

namespace qforge::quant {

struct SequentialCalibration {
  calib::CalibrationStats stats;  // every block's, from its sequential input
  Model model;                    // the input model with the transform applied block by block (the source if none)
};

// For each block in turn: its statistics from the current hidden states (block 0: the embedding of `streams`),
// the model transform on that block (`transform`, PrepareBlock), the block quantized by `recipe` (only_block),
// and the quantized block run over the same hidden states to give the next block's input, rounded to
// options.block_chain (default f16, as the distributed chain stores them). QuantizeModel(result.model, recipe with
// result.stats) then quantizes exactly the blocks the chain ran (QuantizeTensor is deterministic). The classifier's
// statistics (options.include_classifier) come from the last block at full precision on its sequential input.
absl::StatusOr<SequentialCalibration> CalibrateSequentially(
    const Model& model, const std::vector<std::vector<int>>& streams, const QuantRecipe& recipe,
    const std::optional<std::pair<const QuantMethod*, QuantParams>>& transform, const calib::CalibrationOptions& options,
    ThreadPool* pool);

}  // namespace qforge::quant
