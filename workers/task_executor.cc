#include "workers/task_executor.h"

#include <malloc.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "core/tokenizer/tokenizer.h"
#include "services/rpc/rpc_util.h"
#include "storage/chunk_codec.h"
#include "storage/model_store.h"
#include "workers/evaluate_task.h"

namespace qforge::workers {
namespace {

// Rows [row_begin, row_end) of `t` as a tensor of their own: a view into `t` when its encoding stores rows one
// after another (every one-plane, row-independent encoding), otherwise dequantized into `scratch`.
absl::StatusOr<Tensor> RowSlice(const Tensor& t, int64_t row_begin, int64_t row_end, std::vector<float>* scratch) {
  const int64_t rows = row_end - row_begin, cols = t.cols();
  QF_ASSIGN_OR_RETURN(const std::vector<size_t> planes, PlaneSizes(t.format, t.rows(), cols));
  const bool rows_contiguous = planes.size() == 1 && !(t.format.type == WeightType::kNF4 && t.format.double_quant) &&
                               t.format.type != WeightType::kQuip && t.format.type != WeightType::kSpQR &&
                               t.format.type != WeightType::kQMoE && t.format.type != WeightType::kBiLLM;
  if (rows_contiguous) {
    QF_ASSIGN_OR_RETURN(const size_t row_bytes, EncodedBytes(t.format, 1, cols));
    return Tensor::View(t.name, {rows, cols}, t.format, t.owner, t.data + static_cast<size_t>(row_begin) * row_bytes,
                        static_cast<size_t>(rows) * row_bytes);
  }
  scratch->resize(static_cast<size_t>(rows * cols));
  QF_RETURN_IF_ERROR(kernels::DequantizeRows(t, row_begin, row_end, scratch->data()));
  return Tensor::View(t.name, {rows, cols}, WeightFormat::F32(), nullptr,
                      reinterpret_cast<const uint8_t*>(scratch->data()), scratch->size() * sizeof(float));
}

void SetShape(const std::vector<int64_t>& shape, google::protobuf::RepeatedField<int64_t>* out) {
  for (int64_t d : shape) out->Add(d);
}

}  // namespace

TaskExecutor::TaskExecutor(ExecutorOptions options)
    : options_(std::move(options)),
      inputs_(TaskInputsOptions{.allowed_roots = options_.allowed_roots,
                                .cached_models = options_.cached_models,
                                .stats_cache_entries = options_.stats_cache_entries,
                                .stats_cache_bytes = options_.stats_cache_bytes}),
      pool_(options_.threads),
      evaluator_(std::make_unique<EvaluateTaskRunner>(options_.threads)) {}

TaskExecutor::~TaskExecutor() = default;

absl::Status TaskExecutor::Execute(const qforge::v1::Task& task, ChunkSink& sink,
                                   qforge::v1::CompleteTaskRequest* out, ChunkSource* artifacts) {
  absl::Status s = Run(task, sink, out, artifacts);
  // The next task touches other pages (another block): what this one read need not stay resident.
  if (options_.release_memory_between_tasks) {
    MappedFile::DropResidentPages();
    malloc_trim(0);
  }
  return s;
}

absl::Status TaskExecutor::Run(const qforge::v1::Task& task, ChunkSink& sink, qforge::v1::CompleteTaskRequest* out,
                               ChunkSource* artifacts) {
  const bool reads_source = task.kind() == qforge::v1::TASK_KIND_QUANTIZE ||
                            task.kind() == qforge::v1::TASK_KIND_ASSEMBLE ||
                            task.kind() == qforge::v1::TASK_KIND_EVALUATE ||
                            task.kind() == qforge::v1::TASK_KIND_CALIBRATE;
  if (!reads_source) {
    return absl::UnimplementedError(absl::StrCat("task ", task.task_id(), ": ",
                                                 qforge::v1::TaskKind_Name(task.kind()),
                                                 " tasks are not run by workers yet"));
  }
  QF_ASSIGN_OR_RETURN(const std::shared_ptr<const Model> source, inputs_.Source(task.source_uri()));
  if (task.kind() == qforge::v1::TASK_KIND_QUANTIZE) return Quantize(task, *source, sink, out, artifacts);
  if (task.kind() == qforge::v1::TASK_KIND_CALIBRATE) return Calibrate(task, *source, sink, out, artifacts);
  if (task.kind() == qforge::v1::TASK_KIND_EVALUATE) return evaluator_->Run(task, source, inputs_, artifacts, out);
  return Assemble(task, *source, sink, out);
}

absl::Status TaskExecutor::PutChunked(const Tensor& t, ChunkSink& sink, qforge::v1::StoredTensor* stored) {
  // Chunks never cross a plane (PlaneSizes), so the scheduler can assemble a sliced tensor plane by plane.
  QF_ASSIGN_OR_RETURN(const std::vector<size_t> planes, PlaneSizes(t.format, t.rows(), t.cols()));
  size_t offset = 0, plane_end = 0;
  for (const size_t plane : planes) {
    plane_end += plane;
    while (offset < plane_end) {
      const size_t n = std::min(options_.chunk_bytes, plane_end - offset);
      QF_ASSIGN_OR_RETURN(std::string id, sink.Put(t.bytes().subspan(offset, n)));
      stored->add_chunk_ids(std::move(id));
      offset += n;
    }
  }
  return absl::OkStatus();
}

absl::Status TaskExecutor::Quantize(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                                    qforge::v1::CompleteTaskRequest* out, ChunkSource* artifacts) {
  if (task.tensor_names_size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat("quantize task ", task.task_id(), ": tensor_names holds ",
                                                   task.tensor_names_size(), " names, expected exactly one"));
  }
  const std::string& name = task.tensor_names(0);
  const Tensor* t = source.Find(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor '", name, "' is not in ", task.source_uri()));
  if (t->shape.size() < 2) return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "' is not a matrix"));
  const int64_t rows = t->rows(), cols = t->cols();
  const int64_t row_begin = task.row_begin(), row_end = task.row_end();
  if (row_begin < 0 || row_begin >= row_end || row_end > rows) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': rows [", row_begin, ", ", row_end,
                                                   ") are not a non-empty slice of its ", rows, " rows"));
  }
  const int64_t slice_rows = row_end - row_begin;

  QF_ASSIGN_OR_RETURN(const auto resolved, rpc::ParamsFromProto(task.params(), "task.params"));
  const quant::QuantMethod& method = *resolved.first;
  const quant::QuantParams& params = resolved.second;
  // A calibrated job's task names its statistics and, where the model transform changed the tensor, its
  // transformed weights (task_inputs.h); QuantizeModel likewise passes every tensor's statistics.
  QF_ASSIGN_OR_RETURN(const std::shared_ptr<const calib::LayerStats> stats, inputs_.Stats(task, artifacts));
  QF_ASSIGN_OR_RETURN(const std::optional<Tensor> transformed, inputs_.Weights(task, *t, artifacts));
  if (method.NeedsCalibration() && !stats) {
    return absl::FailedPreconditionError(absl::StrCat("method '", method.name(), "' needs calibration statistics; task ",
                                                      task.task_id(), " carries none for '", name, "'"));
  }
  if (transformed) t = &*transformed;
  QF_RETURN_IF_ERROR(method.Validate(params));
  auto wanted = ParseFormatName(task.format());
  if (!wanted.ok()) return absl::InvalidArgumentError(absl::StrCat("task.format: ", wanted.status().message()));
  // The planner resolved any fallback already, so the method must give exactly the task's encoding; anything
  // else means the scheduler and this worker disagree about the method, and the bytes would not match `format`.
  const std::string what = absl::StrCat("tensor '", name, "' rows [", row_begin, ", ", row_end, ") of [", rows, ", ",
                                        cols, "]: method ", method.name(), " (", quant::ParamsToString(params), ")");
  auto produced = method.OutputFormat(params, slice_rows, cols);
  if (!produced.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(what, " cannot encode the slice (", produced.status().message(),
                                                      "); the task asks for ", task.format()));
  }
  if (!(*produced == *wanted)) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " encodes as ", FormatName(*produced), ", the task asks for ", task.format()));
  }

  std::vector<float> scratch;
  QF_ASSIGN_OR_RETURN(const Tensor slice, RowSlice(*t, row_begin, row_end, &scratch));
  quant::TensorQuantReport r;
  QF_ASSIGN_OR_RETURN(const Tensor encoded,
                      quant::QuantizeTensor(slice, method, params, &pool_, &r, stats.get()));
  // The task's format is the planned one; an spqr tensor's outlier count and a qmoe tensor's codeword count are
  // known only now, and the stored tensor carries them (the scheduler records what the worker reports).
  WeightFormat planned = encoded.format;
  if (wanted->type == WeightType::kSpQR && wanted->outliers == 0) planned.outliers = 0;
  if (wanted->type == WeightType::kQMoE && wanted->codewords == 0) planned.codewords = 0;
  if (!(planned == *wanted)) {
    return absl::InternalError(absl::StrCat(what, " produced ", FormatName(encoded.format)));
  }

  qforge::v1::StoredTensor* stored = out->add_outputs();
  stored->set_name(name);
  stored->set_format(FormatName(encoded.format));
  SetShape(encoded.shape, stored->mutable_shape());
  stored->set_nbytes(encoded.nbytes);
  QF_RETURN_IF_ERROR(PutChunked(encoded, sink, stored));

  qforge::v1::TensorReport* report = out->add_tensors();
  report->set_name(name);
  report->set_format(FormatName(encoded.format));
  SetShape(encoded.shape, report->mutable_shape());
  report->set_bits_per_weight(r.bits_per_weight);
  report->set_bytes_before(r.bytes_f32);
  report->set_bytes_after(r.bytes_after);
  report->set_rmse(r.rmse);
  report->set_relative_error(r.rel_error);
  return absl::OkStatus();
}

absl::Status TaskExecutor::Assemble(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                                    qforge::v1::CompleteTaskRequest* out) {
  for (const std::string& name : task.tensor_names()) {
    const Tensor* t = source.Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor '", name, "' is not in ", task.source_uri()));
    qforge::v1::StoredTensor* stored = out->add_outputs();
    stored->set_name(name);
    stored->set_format(FormatName(t->format));
    SetShape(t->shape, stored->mutable_shape());
    stored->set_nbytes(t->nbytes);
    QF_RETURN_IF_ERROR(PutChunked(*t, sink, stored));
  }

  // Only the config and metadata go into config_json; the tensors travel as chunks.
  Model described;
  described.config = source.config;
  described.metadata = source.metadata;
  for (const auto& [key, value] : task.metadata()) described.metadata[key] = value;
  QF_ASSIGN_OR_RETURN(*out->mutable_config_json(), storage::ManifestConfigJson(described));

  std::optional<Vocab> vocab_source = source.vocab;
  if (!task.tokenizer_uri().empty()) {
    QF_ASSIGN_OR_RETURN(const std::string path, inputs_.Resolve(task.tokenizer_uri(), "tokenizer"));
    QF_ASSIGN_OR_RETURN(vocab_source, ReadVocabFile(path, source.config.vocab_size));
    if (static_cast<int>(vocab_source->tokens.size()) != source.config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer ", path, " has ", vocab_source->tokens.size(),
                                                     " tokens, the model has ", source.config.vocab_size));
    }
  }
  if (vocab_source) {
    const std::string vocab = storage::EncodeVocabChunk(*vocab_source);
    if (vocab.size() > storage::kMaxChunkBytes) {
      return absl::InvalidArgumentError(absl::StrCat("the vocabulary of ", task.source_uri(), " encodes to ",
                                                     vocab.size(), " bytes, over the chunk limit ",
                                                     storage::kMaxChunkBytes));
    }
    QF_ASSIGN_OR_RETURN(*out->mutable_vocab_chunk_id(),
                        sink.Put({reinterpret_cast<const uint8_t*>(vocab.data()), vocab.size()}));
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
