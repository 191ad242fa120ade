// Internal to core/calib: the statistics accumulators of a range of blocks, fed by the runtime's linear observer,
// shared by the one-pass collection (collect.cc) and the block chain (block_chain.cc) so both give the same bits.
#pragma once

#include <map>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "core/calib/stats.h"
#include "core/model/model.h"
#include "core/runtime/transformer.h"

namespace qforge::calib {

class LinearAccumulators {
 public:
  // Accumulators for every LinearWeightNames matrix of blocks [first, last) and, with `classifier`, the
  // classifier's input. Weights reading the same activations as an earlier one (k, v after q; up after gate)
  // share its accumulator.
  LinearAccumulators(const ModelConfig& c, int first, int last, bool classifier);

  // Feeds the accumulators (other names are ignored); a column count mismatch is kept for status().
  RuntimeOptions::LinearObserver Observer();
  const absl::Status& status() const { return error_; }
  // The accumulator of the classifier's input (nullptr without one).
  StatsAccumulator* classifier() { return classifier_; }

  // The statistics by weight name, experts of each block completed from their pool when `pool_sparse_experts`
  // (CalibrationOptions::pool_sparse_experts). Call once.
  CalibrationStats Finish(bool pool_sparse_experts);

 private:
  const ModelConfig config_;
  const int first_, last_;
  std::map<std::string, std::unique_ptr<StatsAccumulator>> accumulators_;
  std::map<std::string, std::string> source_;  // weight name -> the name whose accumulator holds its stats
  StatsAccumulator* classifier_ = nullptr;
  absl::Status error_;
};

}  // namespace qforge::calib
