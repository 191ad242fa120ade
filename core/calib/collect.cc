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

namespace {

// CalibrationOptions::pool_sparse_experts for one projection of one layer's experts.
void PoolSparseExperts(const std::vector<std::string>& experts,
                       std::map<std::string, std::shared_ptr<const LayerStats>>& stats) {
  const LayerStats& first = *stats.at(experts.front());
  const int64_t cols = first.cols;
  const size_t cc = static_cast<size_t>(cols * cols);
  LayerStats pool;
  pool.cols = cols;
  pool.hessian.assign(cc, 0.0);
  pool.mean_abs.assign(static_cast<size_t>(cols), 0.0);
  pool.max_abs.assign(static_cast<size_t>(cols), 0.0);
  for (const std::string& name : experts) {
    const LayerStats& s = *stats.at(name);
    const double n = static_cast<double>(s.tokens);
    for (size_t i = 0; i < cc; ++i) pool.hessian[i] += n * s.hessian[i];
    for (int64_t i = 0; i < cols; ++i) {
      pool.mean_abs[i] += n * s.mean_abs[i];
      pool.max_abs[i] = std::max(pool.max_abs[i], s.max_abs[i]);
    }
    pool.tokens += s.tokens;
  }
  if (pool.tokens == 0) return;  // nothing to lend
  const double total = static_cast<double>(pool.tokens);
  for (double& h : pool.hessian) h /= total;
  for (double& m : pool.mean_abs) m /= total;
  for (const std::string& name : experts) {
    const LayerStats& own = *stats.at(name);
    if (own.tokens >= cols) continue;
    const double n = static_cast<double>(own.tokens), borrowed = static_cast<double>(cols - own.tokens);
    LayerStats s;
    s.cols = cols;
    s.tokens = cols;
    s.pooled_tokens = cols - own.tokens;
    s.hessian.resize(cc);
    for (size_t i = 0; i < cc; ++i) s.hessian[i] = (n * own.hessian[i] + borrowed * pool.hessian[i]) / cols;
    s.mean_abs.resize(static_cast<size_t>(cols));
    s.max_abs.resize(static_cast<size_t>(cols));
    for (int64_t i = 0; i < cols; ++i) {
      s.mean_abs[i] = (n * own.mean_abs[i] + borrowed * pool.mean_abs[i]) / cols;
      s.max_abs[i] = std::max(own.max_abs[i], pool.max_abs[i]);
    }
    stats[name] = std::make_shared<const LayerStats>(std::move(s));
  }
}

}  // namespace

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
  if (c.is_moe() && options.pool_sparse_experts) {
    for (int l = 0; l < c.n_layers; ++l) {
      for (auto expert_name : {&names::FfnGateExpert, &names::FfnDownExpert}) {
        std::vector<std::string> experts;
        for (int e = 0; e < c.n_experts; ++e) experts.push_back((*expert_name)(l, e));
        PoolSparseExperts(experts, finished);
      }
    }
  }
  CalibrationStats out;
  for (const auto& [name, from] : source) out[name] = finished.at(from);
  return out;
}

}  // namespace qforge::calib
