// The scheduler's half of evaluation as tasks (docs/distributed.md, "Evaluation"): checking a recipe's evaluation
// fields at submit, what an evaluate task is told at lease, checking its completion, and merging the committed
// shares into Job.quality. The numbers are merged exactly: each share reports per-window sums
// (eval::WindowSums), and the merge adds every window of the text in window order (eval::MergeWindows), as
// `qforge eval` does in one process.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "qforge/v1/jobs.pb.h"
#include "qforge/v1/worker.pb.h"
#include "scheduler/model_description.h"
#include "scheduler/plan.h"

namespace qforge::services {

// The most evaluate tasks the scheduler plans on its own (recipe.evaluation_tasks unset).
inline constexpr int kDefaultMaxEvaluationTasks = 16;

// SubmitJob's check of `recipe`'s evaluation fields (JobRecipe::evaluates()). Sampled streams: their length fits
// the context (unset: the smaller of 256 and the context, filled in). A text: it resolves
// under `roots` to a regular file (missing: INVALID_ARGUMENT, outside the roots: PERMISSION_DENIED, both naming
// recipe.evaluation_text_uri), there is a vocabulary to tokenize it (the job's tokenizer_uri, `tokenizer`, or
// the source's own, ModelDescription::has_vocab) and the window fits the model's context
// (recipe.evaluation_window). Fills in the
// text's realpath and, when the request left it unset, the task count: about four windows per task estimated
// from the text's size, at most kDefaultMaxEvaluationTasks. `stored` (the request the job records) gets both.
absl::Status ResolveEvaluation(const std::vector<std::string>& roots, const scheduler::ModelDescription& model,
                               const std::string& tokenizer, scheduler::JobRecipe* recipe,
                               qforge::v1::Recipe* stored);

// What Job.quality's text_source says: the text's path, or the sampled streams in `qforge eval`'s words.
std::string EvaluationSource(const qforge::v1::Recipe& recipe);

// Task index -> its committed result (NOT_FOUND while it has none).
using CommittedResult = std::function<absl::StatusOr<std::string>(uint32_t task)>;

// What evaluate task `task` of `plan` is told: the text, windows and share (from the job's stored `recipe`), the
// vocabulary the job tokenizes with, and `version` (the committed version's manifest).
absl::Status FillEvaluateTask(const scheduler::Plan& plan, uint32_t task, const qforge::v1::Job& record,
                              const qforge::v1::Manifest& version, qforge::v1::Task* out);

// An evaluate completion: its share is the planned one of the window count it reports, which every committed
// share agrees on, and every window's sums are sane (finite, 1.. window positions). Returns the result to commit.
absl::StatusOr<std::string> CheckEvaluation(const scheduler::Plan& plan, uint32_t task,
                                            const qforge::v1::CompleteTaskRequest& req,
                                            const CommittedResult& committed, const std::string& what);

// Job.quality from the committed evaluate tasks of `plan`, merged in window order; nullopt for a plan without
// evaluate tasks. `text_source` names the text in the report.
absl::StatusOr<std::optional<qforge::v1::QualityReport>> MergeQuality(const scheduler::Plan& plan,
                                                                      const std::string& text_source,
                                                                      const CommittedResult& committed);

}  // namespace qforge::services
