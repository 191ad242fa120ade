// The evaluate task on a worker (docs/distributed.md, "Evaluation"): after assemble committed the version, each
// of a job's evaluate tasks compares that version with the source model on one share of the evaluation text's
// windows and reports each window's sums (eval::WindowSums). The scheduler merges the shares in window order into
// Job.quality, which is therefore exactly what `qforge eval VERSION --base SOURCE --text FILE` prints: the same
// tokens (tokenizer, BOS, --chunks cut), the same windows and the same per-window sums in the same order.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "core/model/model.h"
#include "qforge/v1/worker.pb.h"
#include "workers/task_inputs.h"

namespace qforge::workers {

class EvaluateTaskRunner {
 public:
  explicit EvaluateTaskRunner(int threads) : threads_(threads) {}

  // Runs evaluate task `task` against `source` (the job's source model); the version's chunks come from
  // `artifacts`, the text and tokenizer resolve through `inputs` (under the allowed roots). Fills out->evaluation. INVALID_ARGUMENT for a
  // malformed task, FAILED_PRECONDITION without an artifact source or a tokenizer for the text, the text's
  // NOT_FOUND / PERMISSION_DENIED naming it.
  absl::Status Run(const qforge::v1::Task& task, const std::shared_ptr<const Model>& source,
                   const TaskInputs& inputs, ChunkSource* artifacts,
                   qforge::v1::CompleteTaskRequest* out);

 private:
  const int threads_;
  // The version evaluated last, kept: a job's shares are often leased by the same worker one after another.
  std::string version_key_;
  std::shared_ptr<const Model> version_;
};

}  // namespace qforge::workers
