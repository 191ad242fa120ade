// The evaluate task (evaluate_task.h).
#include "workers/evaluate_task.h"

#include <algorithm>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/eval/eval.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "services/rpc/rpc_util.h"
#include "storage/model_store.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;

// As `qforge eval` runs both models (model_commands.cc MakeTransformer): its default int8 activations.
absl::StatusOr<std::unique_ptr<Transformer>> Runner(std::shared_ptr<const Model> model, int threads) {
  return Transformer::Create(std::move(model),
                             RuntimeOptions{.threads = threads, .activations = kernels::ActivationMode::kInt8});
}

}  // namespace

absl::Status EvaluateTaskRunner::Run(const v1::Task& task, const std::shared_ptr<const Model>& source,
                                     const TaskInputs& inputs, ChunkSource* artifacts,
                                     v1::CompleteTaskRequest* out) {
  const v1::EvaluationSpec& spec = task.evaluation();
  const std::string what = absl::StrCat("evaluate task ", task.task_id());
  const bool sampled = spec.streams() > 0;
  if (spec.text_uri().empty() == !sampled || spec.streams() < 0 || (sampled && spec.stream_length() < 2) ||
      spec.parts() < 1 || spec.part() < 0 || spec.part() >= spec.parts() || spec.window() < 0 ||
      spec.window() == 1 || spec.max_windows() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": evaluation text '", spec.text_uri().substr(0, 256),
                                                   "', streams ", spec.streams(), " x ", spec.stream_length(),
                                                   ", share ", spec.part(), " of ", spec.parts(), ", window ",
                                                   spec.window(), ", max_windows ", spec.max_windows()));
  }
  if (!task.has_version() || task.version().job_id() != task.job_id()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the task names no version of its job"));
  }
  if (artifacts == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": this executor has no artifact source to read the version"));
  }

  // The version, read once per job's version and kept while this worker's shares of it come in.
  const v1::Manifest& manifest = task.version();
  const std::string key = absl::StrCat(manifest.model().name(), "@", manifest.model().version(), "|", task.job_id());
  if (version_ == nullptr || version_key_ != key) {
    version_.reset();
    QF_ASSIGN_OR_RETURN(Model m, storage::ModelFromManifest(manifest, [artifacts](const std::string& id) {
                          return artifacts->Get(id);
                        }));
    version_ = std::make_shared<const Model>(std::move(m));
    version_key_ = key;
  }
  const Model& version = *version_;
  if (version.config.vocab_size != source->config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the version has vocabulary ", version.config.vocab_size,
                                                   ", the source ", source->config.vocab_size));
  }

  // The tokenizer `qforge eval VERSION --tokenizer TOK` uses: the job's tokenizer_uri, else the version's own
  // vocabulary (which is the source's, or the tokenizer_uri's the version was given). Sampled streams need one
  // only for its BOS id (1 without).
  std::unique_ptr<Tokenizer> tokenizer;
  if (!task.tokenizer_uri().empty()) {
    QF_ASSIGN_OR_RETURN(const std::string path, inputs.Resolve(task.tokenizer_uri(), "tokenizer"));
    QF_ASSIGN_OR_RETURN(tokenizer, LoadTokenizer(path, version.config.vocab_size));
  } else if (version.vocab) {
    QF_ASSIGN_OR_RETURN(tokenizer, TokenizerFromVocab(*version.vocab));
  } else if (!sampled) {
    return absl::FailedPreconditionError(absl::StrCat("evaluation text ", spec.text_uri(), ": ", task.source_uri(),
                                                      " has no vocabulary to tokenize it with; the job must name a "
                                                      "tokenizer_uri"));
  }
  if (tokenizer && tokenizer->vocab_size() != version.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the tokenizer has ", tokenizer->vocab_size(),
                                                   " tokens, the model ", version.config.vocab_size));
  }

  QF_ASSIGN_OR_RETURN(auto base, Runner(source, threads_));
  QF_ASSIGN_OR_RETURN(auto quant, Runner(version_, threads_));
  const int context = std::min(base->max_seq_len(), quant->max_seq_len());
  std::vector<int> tokens;                  // the text's
  std::vector<std::vector<int>> streams;    // or the share's sampled streams
  std::vector<std::span<const int>> windows;
  size_t n = 0, begin = 0, end = 0, first = 0;  // windows[i] is window first + i of the n in all
  const auto share_of = [&](size_t total) {  // the scheduler's ShareOf: [part * n / parts, (part + 1) * n / parts)
    n = total;
    begin = static_cast<size_t>(spec.part()) * n / static_cast<size_t>(spec.parts());
    end = static_cast<size_t>(spec.part() + 1) * n / static_cast<size_t>(spec.parts());
  };
  if (sampled) {
    // Every stream has stream_length tokens and so the same k windows: the share's windows lie in streams
    // begin / k .. (end - 1) / k, and only those are sampled (stream i seeded from (seed, i), as in one process).
    const std::vector<int> probe(static_cast<size_t>(spec.stream_length()), 0);
    QF_ASSIGN_OR_RETURN(const auto per_stream,
                        eval::MakeWindows({std::span<const int>(probe)}, spec.window(), context, base->vocab_size()));
    const size_t k = per_stream.size();
    share_of(k * static_cast<size_t>(spec.streams()));
    const size_t first_stream = begin / k, end_stream = end > begin ? (end - 1) / k + 1 : first_stream;
    QF_ASSIGN_OR_RETURN(streams, eval::SampleStreams(*base, static_cast<int>(end_stream - first_stream),
                                                     spec.stream_length(), spec.seed(), 1.0f,
                                                     tokenizer ? tokenizer->bos_id() : 1,
                                                     static_cast<int>(first_stream)));
    const std::vector<std::span<const int>> spans(streams.begin(), streams.end());
    QF_ASSIGN_OR_RETURN(windows, eval::MakeWindows(spans, spec.window(), context, base->vocab_size()));
    first = first_stream * k;
  } else {
    QF_ASSIGN_OR_RETURN(const std::string path, inputs.Resolve(spec.text_uri(), "evaluation text"));
    QF_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    QF_ASSIGN_OR_RETURN(tokens, tokenizer->Encode(text, /*add_bos=*/true));
    eval::KeepFirstWindows(tokens, spec.max_windows(), spec.window(), context);
    QF_ASSIGN_OR_RETURN(windows, eval::CompareWindowsOf(*base, *quant, tokens, spec.window()));
    share_of(windows.size());
  }
  QF_ASSIGN_OR_RETURN(const std::vector<eval::WindowSums> sums,
                      eval::CompareWindows(*base, *quant, std::span(windows).subspan(begin - first, end - begin)));

  v1::EvaluationResult* r = out->mutable_evaluation();
  r->set_total_windows(static_cast<int64_t>(n));
  r->set_window_begin(static_cast<int64_t>(begin));
  r->set_window(spec.window() > 0 ? spec.window() : context);
  for (const eval::WindowSums& s : sums) {
    v1::WindowSums* w = r->add_windows();
    w->set_nll_base(s.nll_base);
    w->set_nll_quantized(s.nll_quant);
    w->set_kl_sum(s.kl_sum);
    w->set_kl_max(s.kl_max);
    w->set_positions(s.positions);
    w->set_top1_agree(s.top1_agree);
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
