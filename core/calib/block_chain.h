// Calibration block by block: the chain that lets calibration run across workers (docs/distributed.md). Block i
// reads only its own weights and the hidden states block i-1 produced (block 0: the embedding of the calibration
// tokens), collects its linears' statistics and hands its output hidden states on. Between blocks the hidden
// states are stored compactly (fp16 or bf16, activations_codec.h), so the chain rounds them at every block
// boundary; CollectCalibration(chain_format = ...) runs the same chain in one process, so both give the same bits.
// With no rounding (ActivationFormat::kF32) the chain reproduces CollectCalibration's one pass bit for bit.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/calib/activations_codec.h"
#include "core/calib/collect.h"
#include "core/calib/stats.h"
#include "core/model/model.h"

namespace qforge::calib {

// What the service's chain stores between blocks, and what `qforge quantize` therefore rounds to.
inline constexpr ActivationFormat kChainActivationFormat = ActivationFormat::kF16;

// Block 0's input: `streams` cut into windows of options.window tokens (<= 0: the model's context), embedded.
// INVALID_ARGUMENT when no stream has a token, or for out-of-range token ids.
absl::StatusOr<BlockActivations> EmbedCalibrationTokens(const Model& model,
                                                        const std::vector<std::vector<int>>& streams,
                                                        const CalibrationOptions& options = {});

// One link of the chain: block `layer` of `model` over `input`. Returns the statistics of the block's linears
// (q/k/v sharing one, gate/up sharing one, experts from their routed tokens and pooled as CollectCalibration
// does) and, for the last block with options.include_classifier, the classifier's; writes the block's output
// hidden states to `output` (may be null when not wanted). Touches no other block's weights.
absl::StatusOr<CalibrationStats> CalibrateBlock(const Model& model, int layer, const BlockActivations& input,
                                                const CalibrationOptions& options, BlockActivations* output);

// Only the block's output, without statistics (the sequential chain runs the quantized block this way).
absl::Status RunBlock(const Model& model, int layer, const BlockActivations& input, int threads,
                      BlockActivations* output);

}  // namespace qforge::calib
