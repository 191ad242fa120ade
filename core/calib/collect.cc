#include "core/calib/collect.h"

#include <algorithm>
#include <map>
#include <memory>
#include <span>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/runtime/transformer.h"

namespace qforge::calib {

absl::StatusOr<CalibrationStats> CollectCalibration(const Model& model, const std::vector<std::vector<int>>& streams,
                                                    const CalibrationOptions& options) {
  const ModelConfig& c = model.config;
  // Which accumulator each observed weight feeds. Weights reading the same activations as an earlier one
  // (k, v after q; up after gate) map to nullptr: their input is the very same buffer, counted once.
  std::map<std::string, std::unique_ptr<StatsAccumulator>> accumulators;
  std::map<std::string, std::string> source;  // weight name -> the name whose accumulator holds its stats
  auto add = [&](const std::string& name, int64_t cols) {
    accumulators[name] = std::make_unique<StatsAccumulator>(cols);
    source[name] = name;
  };
  for (int l = 0; l < c.n_layers; ++l) {
    add(names::AttnQ(l), c.dim);
    source[names::AttnK(l)] = names::AttnQ(l);
    source[names::AttnV(l)] = names::AttnQ(l);
    add(names::AttnOutput(l), c.dim);
    if (!c.is_moe()) {
      add(names::FfnGate(l), c.dim);
      source[names::FfnUp(l)] = names::FfnGate(l);
      add(names::FfnDown(l), c.hidden_dim);
      continue;
    }
    // Each expert sees only the tokens routed to it: its statistics are its own.
    for (int e = 0; e < c.n_experts; ++e) {
      add(names::FfnGateExpert(l, e), c.dim);
      source[names::FfnUpExpert(l, e)] = names::FfnGateExpert(l, e);
      add(names::FfnDownExpert(l, e), c.hidden_dim);
    }
  }
  const std::string classifier = c.tied_embeddings ? names::kTokenEmbd : names::kOutput;
  if (options.include_classifier) add(classifier, c.dim);

  absl::Status observer_error;
  RuntimeOptions ro;
  ro.threads = options.threads;
  ro.linear_observer = [&](const std::string& name, const float* x, int n, int cols) {
    auto it = accumulators.find(name);
    if (it == accumulators.end()) return;
    if (cols != it->second->cols()) {
      if (observer_error.ok()) {
        observer_error = absl::InternalError(
            absl::StrCat(name, ": observed ", cols, " input columns, expected ", it->second->cols()));
      }
      return;
    }
    it->second->Add(x, n);
  };
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Transformer> runtime,
                      Transformer::Create(std::make_shared<const Model>(model), ro));
  const int window = options.window > 0 ? std::min(options.window, runtime->max_seq_len()) : runtime->max_seq_len();
  std::vector<float> logits;
  int64_t total = 0;
  for (const std::vector<int>& stream : streams) {
    for (size_t start = 0; start < stream.size(); start += window) {
      const size_t len = std::min(stream.size() - start, static_cast<size_t>(window));
      std::span<const int> tokens(stream.data() + start, len);
      float* out = nullptr;
      if (options.include_classifier) {
        logits.resize(len * static_cast<size_t>(c.vocab_size));
        out = logits.data();
      }
      runtime->Reset();
      QF_RETURN_IF_ERROR(runtime->Forward(tokens, 0, out, /*all_logits=*/true));
      QF_RETURN_IF_ERROR(observer_error);
      total += static_cast<int64_t>(len);
    }
  }
  if (total == 0) return absl::InvalidArgumentError("CollectCalibration: no calibration tokens");

  std::map<std::string, std::shared_ptr<const LayerStats>> finished;
  for (auto& [name, acc] : accumulators) finished[name] = std::make_shared<const LayerStats>(acc->Finish());
  CalibrationStats out;
  for (const auto& [name, from] : source) out[name] = finished.at(from);
  return out;
}

}  // namespace qforge::calib
