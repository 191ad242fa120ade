// Model quality measurements: perplexity over token streams, KL divergence and top-1 agreement of a
// quantized model against its base, tokenizer-free sampled evaluation streams, and text-file perplexity.
//
// Windowing (everywhere): a stream is cut into consecutive, non-overlapping windows of `window` tokens
// (the last one may be shorter); each window starts with an empty KV cache, its first token is context
// only, and each later token is predicted from the tokens before it in the window. A window of n tokens
// therefore contributes n - 1 predictions; a final window of one token contributes none. window <= 0
// means the model's context length (Transformer::max_seq_len()).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"

namespace qforge::eval {

struct PerplexityResult {
  double mean_nll = 0.0;    // mean negative log-likelihood per predicted token, in nats
  double perplexity = 0.0;  // exp(mean_nll)
  int64_t tokens = 0;       // predicted tokens
  int64_t windows = 0;
};

struct CompareResult {
  double mean_kl = 0.0;         // mean over predicted positions of KL(P_base || P_quant), nats
  double max_kl = 0.0;          // largest per-position KL
  double top1_agreement = 0.0;  // fraction of positions where both argmaxes agree, in [0, 1]
  int64_t positions = 0;
  PerplexityResult base;        // both models on the same tokens and windows
  PerplexityResult quant;
};

// One window's sums over its predicted positions, accumulated in double in position order. Comparisons sum each
// window on its own and merge the windows in order (MergeWindows), so a comparison split over several processes
// (the service's evaluate tasks, one share of the windows each) gives the very same doubles as one that ran whole.
struct WindowSums {
  double nll_base = 0.0, nll_quant = 0.0;  // sums of -log p(target)
  double kl_sum = 0.0, kl_max = 0.0;       // KL(P_base || P_quant) summed, and its largest value
  int64_t positions = 0;
  int64_t top1_agree = 0;                  // positions where both argmaxes agree
};

// The windows an evaluation of `streams` visits, in order (see the top of this file; window <= 0 means
// max_seq_len). INVALID_ARGUMENT for window 1 or above max_seq_len, token ids outside [0, vocab), or nothing
// to predict.
absl::StatusOr<std::vector<std::span<const int>>> MakeWindows(const std::vector<std::span<const int>>& streams,
                                                              int window, int max_seq_len, int vocab);
// The windows CompareModels(base, quant, tokens, window) visits (the smaller context of the two bounds them).
absl::StatusOr<std::vector<std::span<const int>>> CompareWindowsOf(const Transformer& base, const Transformer& quant,
                                                                   std::span<const int> tokens, int window);
// llama-perplexity's --chunks N (`qforge eval --chunks`, the service's recipe.evaluation_chunks): keeps the
// first `chunks` windows of a text's tokens; chunks <= 0 keeps everything. window <= 0 means max_seq_len.
void KeepFirstWindows(std::vector<int>& tokens, int chunks, int window, int max_seq_len);

// Both models over each of `windows`, one WindowSums per window. The models must share a vocabulary size.
absl::StatusOr<std::vector<WindowSums>> CompareWindows(Transformer& base, Transformer& quant,
                                                       std::span<const std::span<const int>> windows);
// The comparison of consecutive windows from their sums, added in the order given.
CompareResult MergeWindows(std::span<const WindowSums> windows);

// Perplexity of `tokens` (one stream). INVALID_ARGUMENT for fewer than two tokens, window == 1, or bad ids.
absl::StatusOr<PerplexityResult> Perplexity(Transformer& model, std::span<const int> tokens, int window = 0);
// Several independent streams (e.g. SampleStreams' output): windows never span two streams.
absl::StatusOr<PerplexityResult> Perplexity(Transformer& model, const std::vector<std::vector<int>>& streams,
                                            int window = 0);

// Runs both models over the same windows (CompareWindows, then MergeWindows). The models must share a
// vocabulary size.
absl::StatusOr<CompareResult> CompareModels(Transformer& base, Transformer& quant, std::span<const int> tokens,
                                            int window = 0);
absl::StatusOr<CompareResult> CompareModels(Transformer& base, Transformer& quant,
                                            const std::vector<std::vector<int>>& streams, int window = 0);

// n_streams token streams of `length` tokens each (including the leading BOS = bos_id), sampled from `model`
// at `temperature` (no top-p), stream i seeded from (seed, i) so that each stream is reproducible on its
// own. Sampling never stops early (EOS and BOS are ordinary tokens here). length <= max_seq_len().
// `first_stream` > 0 samples streams first_stream .. first_stream + n_streams - 1 of that sequence (a share of
// the service's evaluate tasks samples only its own).
absl::StatusOr<std::vector<std::vector<int>>> SampleStreams(Transformer& model, int n_streams, int length,
                                                            uint64_t seed, float temperature = 1.0f,
                                                            int bos_id = 1, int first_stream = 0);

// Reads the text file at `path`, tokenizes it whole (with BOS), and measures perplexity.
absl::StatusOr<PerplexityResult> EvalText(Transformer& model, const Tokenizer& tokenizer, const std::string& path,
                                          int window = 0);

}  // namespace qforge::eval
