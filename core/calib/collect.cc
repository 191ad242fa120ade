#include "core/calib/collect.h"

#include <algorithm>
#include <map>
#include <memory>
#include <span>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/calib/accumulators.h"
#include "core/calib/block_chain.h"
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

LinearAccumulators::LinearAccumulators(const ModelConfig& c, int first, int last, bool classifier)
    : config_(c), first_(first), last_(last) {
  auto add = [&](const std::string& name, int64_t cols) {
    accumulators_[name] = std::make_unique<StatsAccumulator>(cols);
    source_[name] = name;
  };
  for (int l = first; l < last; ++l) {
    add(names::AttnQ(l), c.dim);
    source_[names::AttnK(l)] = names::AttnQ(l);
    source_[names::AttnV(l)] = names::AttnQ(l);
    add(names::AttnOutput(l), c.dim);
    if (!c.is_moe()) {
      add(names::FfnGate(l), c.dim);
      source_[names::FfnUp(l)] = names::FfnGate(l);
      add(names::FfnDown(l), c.hidden_dim);
      continue;
    }
    // Each expert sees only the tokens routed to it: its statistics are its own.
    for (int e = 0; e < c.n_experts; ++e) {
      add(names::FfnGateExpert(l, e), c.dim);
      source_[names::FfnUpExpert(l, e)] = names::FfnGateExpert(l, e);
      add(names::FfnDownExpert(l, e), c.hidden_dim);
    }
  }
  if (classifier) {
    const std::string name = c.tied_embeddings ? names::kTokenEmbd : names::kOutput;
    add(name, c.dim);
    classifier_ = accumulators_.at(name).get();
  }
}

RuntimeOptions::LinearObserver LinearAccumulators::Observer() {
  return [this](const std::string& name, const float* x, int n, int cols) {
    auto it = accumulators_.find(name);
    if (it == accumulators_.end()) return;
    if (cols != it->second->cols()) {
      if (error_.ok()) {
        error_ = absl::InternalError(
            absl::StrCat(name, ": observed ", cols, " input columns, expected ", it->second->cols()));
      }
      return;
    }
    it->second->Add(x, n);
  };
}

CalibrationStats LinearAccumulators::Finish(bool pool_sparse_experts) {
  std::map<std::string, std::shared_ptr<const LayerStats>> finished;
  for (auto& [name, acc] : accumulators_) finished[name] = std::make_shared<const LayerStats>(acc->Finish());
  if (config_.is_moe() && pool_sparse_experts) {
    for (int l = first_; l < last_; ++l) {
      for (auto expert_name : {&names::FfnGateExpert, &names::FfnDownExpert}) {
        std::vector<std::string> experts;
        for (int e = 0; e < config_.n_experts; ++e) experts.push_back((*expert_name)(l, e));
        PoolSparseExperts(experts, finished);
      }
    }
  }
  CalibrationStats out;
  for (const auto& [name, from] : source_) out[name] = finished.at(from);
  return out;
}

absl::StatusOr<CalibrationStats> CollectCalibration(const Model& model, const std::vector<std::vector<int>>& streams,
                                                    const CalibrationOptions& options) {
  if (options.block_chain) {
    // Block by block, rounding the hidden states between blocks as the distributed chain stores them.
    QF_ASSIGN_OR_RETURN(BlockActivations x, EmbedCalibrationTokens(model, streams, options));
    CalibrationStats out;
    for (int l = 0; l < model.config.n_layers; ++l) {
      BlockActivations next;
      QF_ASSIGN_OR_RETURN(CalibrationStats block, CalibrateBlock(model, l, x, options, &next));
      QF_RETURN_IF_ERROR(RoundActivations(next, *options.block_chain));
      out.merge(block);
      x = std::move(next);
    }
    return out;
  }
  const ModelConfig& c = model.config;
  LinearAccumulators accumulators(c, 0, c.n_layers, options.include_classifier);
  RuntimeOptions ro;
  ro.threads = options.threads;
  ro.linear_observer = accumulators.Observer();
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
      QF_RETURN_IF_ERROR(accumulators.status());
      total += static_cast<int64_t>(len);
    }
  }
  if (total == 0) return absl::InvalidArgumentError("CollectCalibration: no calibration tokens");
  return accumulators.Finish(options.pool_sparse_experts);
}

}  // namespace qforge::calib
