#include "core/calib/block_chain.h"

#include <algorithm>
#include <memory>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/calib/accumulators.h"
#include "core/runtime/transformer.h"

namespace qforge::calib {
namespace {

absl::Status CheckInput(const Model& model, int layer, const BlockActivations& input, int max_seq_len) {
  const ModelConfig& c = model.config;
  if (layer < 0 || layer >= c.n_layers) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate block ", layer, ": the model has ", c.n_layers, " blocks"));
  }
  if (input.dim != c.dim) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrate block ", layer, ": input hidden states of dim ", input.dim, ", the model's is ", c.dim));
  }
  int64_t tokens = 0;
  for (int32_t w : input.windows) {
    if (w < 1 || w > max_seq_len) {
      return absl::InvalidArgumentError(absl::StrCat("calibrate block ", layer, ": a window of ", w,
                                                     " tokens; the context holds 1..", max_seq_len));
    }
    tokens += w;
  }
  if (input.windows.empty() || static_cast<int64_t>(input.values.size()) != tokens * c.dim) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate block ", layer, ": ", input.windows.size(),
                                                   " windows of ", tokens, " tokens but ", input.values.size(),
                                                   " values"));
  }
  return absl::OkStatus();
}

// Runs block `layer` over every window of `input` with `ro` (observer included); the output replaces `x`.
absl::Status ChainStep(const Model& model, int layer, const BlockActivations& input, const RuntimeOptions& ro,
                       BlockActivations* x, StatsAccumulator* classifier) {
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Transformer> runtime,
                      Transformer::Create(std::make_shared<const Model>(model), ro));
  QF_RETURN_IF_ERROR(CheckInput(model, layer, input, runtime->max_seq_len()));
  *x = input;
  const size_t dim = static_cast<size_t>(model.config.dim);
  std::vector<float> normed;
  size_t offset = 0;
  for (const int32_t w : x->windows) {
    float* rows = x->values.data() + offset * dim;
    QF_RETURN_IF_ERROR(runtime->ForwardBlock(layer, rows, w));
    if (classifier != nullptr) {
      normed.resize(static_cast<size_t>(w) * dim);
      runtime->FinalNorm(rows, w, normed.data());
      classifier->Add(normed.data(), w);
    }
    offset += static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<BlockActivations> EmbedCalibrationTokens(const Model& model,
                                                        const std::vector<std::vector<int>>& streams,
                                                        const CalibrationOptions& options) {
  RuntimeOptions ro;
  ro.threads = 1;  // a table lookup
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Transformer> runtime,
                      Transformer::Create(std::make_shared<const Model>(model), ro));
  // CollectCalibration's windows: consecutive pieces of each stream, at most `window` tokens.
  const int window = options.window > 0 ? std::min(options.window, runtime->max_seq_len()) : runtime->max_seq_len();
  BlockActivations a;
  a.dim = model.config.dim;
  for (const std::vector<int>& stream : streams) {
    for (size_t start = 0; start < stream.size(); start += window) {
      const size_t len = std::min(stream.size() - start, static_cast<size_t>(window));
      const size_t at = a.values.size();
      a.values.resize(at + len * static_cast<size_t>(a.dim));
      QF_RETURN_IF_ERROR(runtime->Embed(std::span<const int>(stream.data() + start, len), a.values.data() + at));
      a.windows.push_back(static_cast<int32_t>(len));
    }
  }
  if (a.windows.empty()) return absl::InvalidArgumentError("CollectCalibration: no calibration tokens");
  return a;
}

absl::StatusOr<CalibrationStats> CalibrateBlock(const Model& model, int layer, const BlockActivations& input,
                                                const CalibrationOptions& options, BlockActivations* output) {
  const ModelConfig& c = model.config;
  const bool classifier = options.include_classifier && layer == c.n_layers - 1;
  LinearAccumulators accumulators(c, layer, layer + 1, classifier);
  RuntimeOptions ro;
  ro.threads = options.threads;
  ro.linear_observer = accumulators.Observer();
  BlockActivations out;
  QF_RETURN_IF_ERROR(ChainStep(model, layer, input, ro, &out, accumulators.classifier()));
  QF_RETURN_IF_ERROR(accumulators.status());
  if (output != nullptr) *output = std::move(out);
  return accumulators.Finish(options.pool_sparse_experts);
}

absl::Status RunBlock(const Model& model, int layer, const BlockActivations& input, int threads,
                      BlockActivations* output) {
  RuntimeOptions ro;
  ro.threads = threads;
  return ChainStep(model, layer, input, ro, output, nullptr);
}

}  // namespace qforge::calib
