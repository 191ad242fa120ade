// Calibration capture: runs a model over token streams with the runtime's linear_observer hook and
// accumulates, per linear weight, the statistics of its inputs (stats.h).
//
// Every block is calibrated on the activations of the model it is given (normally fp32): the "all blocks
// from fp32 inputs" (one-pass) variant. Sequential calibration, where block i is calibrated on the outputs of the
// already-quantized blocks < i, interleaves quantization with the block chain (block_chain.h).
#pragma once

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/calib/activations_codec.h"
#include "core/calib/stats.h"
#include "core/model/model.h"

namespace qforge::calib {

struct CalibrationOptions {
  // Tokens per forward window: each stream is cut into consecutive windows of this many tokens, each run
  // from an empty KV cache (as eval's perplexity does). <= 0: the model's context length.
  int window = 0;
  int threads = 0;  // runtime threads; <= 0: hardware concurrency
  // Also collect the classifier's input (output.weight, or token_embd.weight when tied). Costs a
  // vocab x dim product per token.
  bool include_classifier = true;
  // Completes the statistics of experts routed fewer tokens than they have inputs (their Hessian is then rank
  // deficient; with no token at all, zero) from the layer's pool of the same projection, the token-weighted mean
  // over all its experts: with n own tokens of cols, H = (n H_own + (cols - n) H_pool) / cols, and likewise the
  // mean magnitudes; max magnitudes are the larger of the two. tokens becomes cols, pooled_tokens cols - n, so a
  // quantize report can say which experts were completed.
  bool pool_sparse_experts = true;
  // nullopt: one forward pass of the whole model over each window (the reference). A format: block by block
  // (block_chain.h), the hidden states rounded to that format between blocks, as the distributed calibrate chain
  // stores them; kF32 gives the one pass's bits (the chain's test), kF16 what `qforge quantize` and the service use.
  std::optional<ActivationFormat> block_chain;
};

// Statistics for every LinearWeightNames matrix (plus the classifier when asked). q/k/v share one
// LayerStats, and so do gate/up, because they read the same normalized activations.
// INVALID_ARGUMENT when no stream has a token, or for out-of-range token ids.
absl::StatusOr<CalibrationStats> CollectCalibration(const Model& model, const std::vector<std::vector<int>>& streams,
                                                    const CalibrationOptions& options = {});

}  // namespace qforge::calib
