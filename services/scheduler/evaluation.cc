// Evaluation as tasks, the scheduler's half (evaluation.h).
#include "services/scheduler/evaluation.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/status_macros.h"
#include "core/eval/eval.h"
#include "services/rpc/rpc_util.h"

namespace qforge::services {
namespace {

namespace v1 = qforge::v1;

// Bytes of text per token assumed for the task count estimate: Llama's and TinyStories' tokenizers average
// about four characters a token on English prose. Only the number of tasks depends on it, never the numbers.
constexpr uint64_t kBytesPerTokenEstimate = 4;
constexpr uint64_t kWindowsPerTaskEstimate = 4;

absl::StatusOr<v1::EvaluationResult> ParseResult(const std::string& ref, uint32_t task) {
  v1::EvaluationResult r;
  if (!r.ParseFromString(ref)) {
    return absl::DataLossError(absl::StrCat("evaluate task ", task, ": unreadable committed result"));
  }
  return r;
}

// Share `part` of `parts` of `total` windows: [part * total / parts, (part + 1) * total / parts).
std::pair<int64_t, int64_t> ShareOf(int64_t total, uint32_t part, uint32_t parts) {
  return {total * part / parts, total * (part + 1) / parts};
}

}  // namespace

absl::Status ResolveEvaluation(const std::vector<std::string>& roots, const scheduler::ModelDescription& model,
                               const std::string& tokenizer, scheduler::JobRecipe* recipe, v1::Recipe* stored) {
  const int context = model.config.seq_len;
  if (recipe->evaluation_window > context) {
    return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_window: ", recipe->evaluation_window,
                                                   " is more than the model's context length ", context));
  }
  const uint64_t window = static_cast<uint64_t>(recipe->evaluation_window > 0 ? recipe->evaluation_window
                                                                             : std::max(context, 2));
  uint64_t windows = 0;  // estimated, for the task count only
  if (recipe->eval_streams > 0) {
    // `qforge eval --streams`'s default length: the smaller of 256 and the context.
    if (recipe->eval_stream_length == 0) {
      recipe->eval_stream_length = std::min(256, context);
      stored->set_eval_stream_length(recipe->eval_stream_length);
    }
    if (recipe->eval_stream_length < 2 || recipe->eval_stream_length > context) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.eval_stream_length: ", recipe->eval_stream_length,
                                                     " is outside [2, ", context, "], the model's context length"));
    }
    windows = static_cast<uint64_t>(recipe->eval_streams) *
              ((static_cast<uint64_t>(recipe->eval_stream_length) + window - 1) / window);
  } else {
    auto path = rpc::ResolveUnderRoots(recipe->evaluation_text_uri, roots, "recipe.evaluation_text_uri");
    // A missing text is a bad recipe like any other field (the source model's NOT_FOUND is about the job's input).
    if (absl::IsNotFound(path.status())) return absl::InvalidArgumentError(path.status().message());
    QF_RETURN_IF_ERROR(path.status());
    std::error_code ec;
    if (!std::filesystem::is_regular_file(*path, ec)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_text_uri: '", recipe->evaluation_text_uri,
                                                     "' is not a regular file"));
    }
    if (tokenizer.empty() && !model.has_vocab) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_text_uri: ", model.source_uri,
                                                     " carries no vocabulary to tokenize the text with; give the "
                                                     "job a tokenizer_uri"));
    }
    windows = std::max<uint64_t>(1, std::filesystem::file_size(*path, ec) / kBytesPerTokenEstimate / window);
    if (recipe->evaluation_chunks > 0) windows = std::min<uint64_t>(windows, recipe->evaluation_chunks);
    recipe->evaluation_text_uri = *path;
    stored->set_evaluation_text_uri(*path);
  }
  if (!stored->has_evaluation_tasks()) {
    const uint64_t tasks = (windows + kWindowsPerTaskEstimate - 1) / kWindowsPerTaskEstimate;
    recipe->evaluation_tasks = static_cast<int>(std::clamp<uint64_t>(tasks, 1, kDefaultMaxEvaluationTasks));
    stored->set_evaluation_tasks(recipe->evaluation_tasks);
  }
  return absl::OkStatus();
}

std::string EvaluationSource(const v1::Recipe& recipe) {
  if (recipe.eval_streams() == 0) return recipe.evaluation_text_uri();
  // The words `qforge eval VERSION --base SOURCE --streams N` reports its streams with.
  return absl::StrFormat("streams (%d x %d tokens sampled from the base model, seed %d, T=%g)", recipe.eval_streams(),
                         recipe.eval_stream_length(), recipe.has_eval_seed() ? recipe.eval_seed() : 1, 1.0);
}

absl::Status FillEvaluateTask(const scheduler::Plan& plan, uint32_t task, const v1::Job& record,
                              const v1::Manifest& version, v1::Task* out) {
  const scheduler::PlanTask& pt = plan.tasks[task];
  const v1::Recipe& recipe = record.request().recipe();
  v1::EvaluationSpec* spec = out->mutable_evaluation();
  spec->set_text_uri(recipe.evaluation_text_uri());
  spec->set_window(recipe.evaluation_window());
  spec->set_max_windows(recipe.evaluation_chunks());
  spec->set_streams(recipe.eval_streams());
  spec->set_stream_length(recipe.eval_stream_length());
  spec->set_seed(recipe.has_eval_seed() ? recipe.eval_seed() : 1);
  spec->set_part(static_cast<int32_t>(pt.row_begin));
  spec->set_parts(static_cast<int32_t>(pt.row_end));
  out->set_tokenizer_uri(record.request().tokenizer_uri());
  *out->mutable_version() = version;
  return absl::OkStatus();
}

absl::StatusOr<std::string> CheckEvaluation(const scheduler::Plan& plan, uint32_t task,
                                            const v1::CompleteTaskRequest& req, const CommittedResult& committed,
                                            const std::string& what) {
  const scheduler::PlanTask& pt = plan.tasks[task];
  if (!req.has_evaluation()) return absl::InvalidArgumentError(absl::StrCat(what, ": no evaluation result"));
  const v1::EvaluationResult& r = req.evaluation();
  if (r.total_windows() < 1 || r.total_windows() > (int64_t{1} << 40) || r.window() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", r.total_windows(), " windows of ", r.window(),
                                                   " tokens"));
  }
  const auto [begin, end] = ShareOf(r.total_windows(), pt.row_begin, pt.row_end);
  if (r.window_begin() != begin || r.windows_size() != end - begin) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": reports windows [", r.window_begin(), ", ",
                                                   r.window_begin() + r.windows_size(), ") of ", r.total_windows(),
                                                   ", its share is [", begin, ", ", end, ")"));
  }
  for (const v1::WindowSums& w : r.windows()) {
    const bool finite = std::isfinite(w.nll_base()) && std::isfinite(w.nll_quantized()) &&
                        std::isfinite(w.kl_sum()) && std::isfinite(w.kl_max());
    if (!finite || w.positions() < 1 || w.positions() >= r.window() || w.top1_agree() < 0 ||
        w.top1_agree() > w.positions()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": a window's sums are not possible (", w.ShortDebugString(),
                                                     ")"));
    }
  }
  // Every share counts the windows of the same tokens: a share that disagrees ran on other text or settings.
  for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
    if (t == task || plan.tasks[t].kind != scheduler::TaskKind::kEvaluate) continue;
    auto ref = committed(t);
    if (!ref.ok()) continue;
    QF_ASSIGN_OR_RETURN(const v1::EvaluationResult other, ParseResult(*ref, t));
    if (other.total_windows() != r.total_windows() || other.window() != r.window()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", r.total_windows(), " windows of ", r.window(),
                                                     " tokens, a committed share counted ", other.total_windows(),
                                                     " of ", other.window()));
    }
  }
  std::string bytes = r.SerializeAsString();
  if (bytes.size() >= (size_t{1} << 24)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the result takes ", bytes.size(),
                                                   " bytes, over the 16 MiB a task result may hold; plan more "
                                                   "evaluate tasks (recipe.evaluation_tasks)"));
  }
  return bytes;
}

absl::StatusOr<std::optional<v1::QualityReport>> MergeQuality(const scheduler::Plan& plan,
                                                              const std::string& text_source,
                                                              const CommittedResult& committed) {
  // Shares are planned in part order, and share i's windows precede share i + 1's: plan order is window order.
  std::vector<eval::WindowSums> windows;
  int32_t window = 0;
  int64_t total = 0;
  bool any = false;
  for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
    if (plan.tasks[t].kind != scheduler::TaskKind::kEvaluate) continue;
    any = true;
    QF_ASSIGN_OR_RETURN(const std::string ref, committed(t));
    QF_ASSIGN_OR_RETURN(const v1::EvaluationResult r, ParseResult(ref, t));
    if (r.window_begin() != static_cast<int64_t>(windows.size())) {
      return absl::DataLossError(absl::StrCat("evaluate task ", t, ": starts at window ", r.window_begin(), ", ",
                                              windows.size(), " came before it"));
    }
    window = r.window();
    total = r.total_windows();
    for (const v1::WindowSums& w : r.windows()) {
      windows.push_back({.nll_base = w.nll_base(),
                         .nll_quant = w.nll_quantized(),
                         .kl_sum = w.kl_sum(),
                         .kl_max = w.kl_max(),
                         .positions = w.positions(),
                         .top1_agree = w.top1_agree()});
    }
  }
  if (!any) return std::optional<v1::QualityReport>();
  if (static_cast<int64_t>(windows.size()) != total) {
    return absl::DataLossError(absl::StrCat("evaluate tasks: their shares hold ", windows.size(), " of ", total,
                                            " windows"));
  }
  const eval::CompareResult c = eval::MergeWindows(windows);
  v1::QualityReport q;
  q.set_perplexity_base(c.base.perplexity);
  q.set_perplexity_quantized(c.quant.perplexity);
  q.set_kl_mean(c.mean_kl);
  q.set_kl_max(c.max_kl);
  q.set_top1_agreement(c.top1_agreement);
  q.set_tokens(c.positions);
  q.set_windows(c.base.windows);
  q.set_window(window);
  q.set_text_source(text_source);
  return std::optional<v1::QualityReport>(std::move(q));
}

}  // namespace qforge::services
