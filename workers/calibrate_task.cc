// The calibrate task and the artifacts it hands to quantize tasks (calibrate_task.h).
#include "workers/calibrate_task.h"

#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/calib/collect.h"
#include "core/calib/stats_codec.h"
#include "core/eval/eval.h"
#include "core/quant/quant_method.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "services/rpc/rpc_util.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;

// The concatenated chunks `ids`, which must add up to `nbytes`.
absl::StatusOr<std::vector<uint8_t>> FetchAll(const google::protobuf::RepeatedPtrField<std::string>& ids,
                                              uint64_t nbytes, ChunkSource& artifacts, const std::string& what) {
  std::vector<uint8_t> out;
  out.reserve(nbytes);
  for (const std::string& id : ids) {
    QF_ASSIGN_OR_RETURN(std::vector<uint8_t> chunk, artifacts.Get(id));
    if (out.size() + chunk.size() > nbytes) break;
    out.insert(out.end(), chunk.begin(), chunk.end());
  }
  if (out.size() != nbytes) {
    return absl::DataLossError(absl::StrCat(what, ": the chunks do not hold the ", nbytes, " bytes the task names"));
  }
  return out;
}

}  // namespace

absl::StatusOr<std::optional<calib::LayerStats>> FetchTaskStats(const v1::Task& task, ChunkSource* artifacts) {
  if (!task.has_stats()) return std::optional<calib::LayerStats>();
  const std::string name = task.tensor_names_size() == 1 ? task.tensor_names(0) : std::string("?");
  const std::string what = absl::StrCat("calibration statistics of '", name, "'");
  if (artifacts == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": this executor has no artifact source to read them"));
  }
  QF_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes,
                      FetchAll(task.stats().chunk_ids(), task.stats().nbytes(), *artifacts, what));
  QF_ASSIGN_OR_RETURN(calib::LayerStats s, calib::DecodeLayerStats(bytes, what));
  if (s.cols != task.stats().cols()) {
    return absl::DataLossError(absl::StrCat(what, ": ", s.cols, " inputs, the task says ", task.stats().cols()));
  }
  return std::optional<calib::LayerStats>(std::move(s));
}

absl::StatusOr<std::optional<Tensor>> FetchTaskWeights(const v1::Task& task, const Tensor& source,
                                                       ChunkSource* artifacts) {
  if (!task.has_weights()) return std::optional<Tensor>();
  const v1::StoredTensor& w = task.weights();
  const std::string what = absl::StrCat("transformed weights of '", source.name, "'");
  if (artifacts == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(what, ": this executor has no artifact source to read them"));
  }
  if (w.name() != source.name || w.format() != FormatName(WeightFormat::F32()) ||
      !std::equal(w.shape().begin(), w.shape().end(), source.shape.begin(), source.shape.end()) ||
      w.nbytes() != static_cast<uint64_t>(source.numel()) * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the task names '", w.name().substr(0, 128), "' ",
                                                   w.format().substr(0, 32), " of ", w.nbytes(), " bytes"));
  }
  QF_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, FetchAll(w.chunk_ids(), w.nbytes(), *artifacts, what));
  std::vector<float> values(static_cast<size_t>(source.numel()));
  std::memcpy(values.data(), bytes.data(), bytes.size());
  return std::optional<Tensor>(Tensor::FromFloats(source.name, source.shape, values));
}

absl::Status TaskExecutor::PutBytes(std::span<const uint8_t> bytes, ChunkSink& sink,
                                    google::protobuf::RepeatedPtrField<std::string>* ids) {
  size_t offset = 0;
  do {
    const size_t n = std::min(options_.chunk_bytes, bytes.size() - offset);
    QF_ASSIGN_OR_RETURN(std::string id, sink.Put(bytes.subspan(offset, n)));
    ids->Add(std::move(id));
    offset += n;
  } while (offset < bytes.size());
  return absl::OkStatus();
}

// What `qforge quantize` does before QuantizeModel (services/cli/model_commands.cc, Calibrate): the same tokens
// (the text, or SampleStreams with the same count, length, seed and BOS), CollectCalibration, PrepareModel, so
// that the version equals the in-process result byte for byte. Deterministic: a re-run after a crash uploads the
// same chunks.
absl::Status TaskExecutor::Calibrate(const v1::Task& task, const Model& source, ChunkSink& sink,
                                     v1::CompleteTaskRequest* out) {
  Model model = source;  // tensors are views of the mapped file; the transform replaces the ones it changes
  std::unique_ptr<Tokenizer> tokenizer;
  if (!task.tokenizer_uri().empty()) {
    QF_RETURN_IF_ERROR(roots_.status());
    QF_ASSIGN_OR_RETURN(const std::string path, rpc::ResolveUnderRoots(task.tokenizer_uri(), *roots_, "tokenizer"));
    QF_ASSIGN_OR_RETURN(Vocab vocab, ReadVocabFile(path, source.config.vocab_size));
    model.vocab = std::move(vocab);
    if (!task.calibration_text_uri().empty()) {
      QF_ASSIGN_OR_RETURN(tokenizer, LoadTokenizer(path, source.config.vocab_size));
    }
  } else if (!task.calibration_text_uri().empty() && model.vocab) {
    QF_ASSIGN_OR_RETURN(tokenizer, TokenizerFromVocab(*model.vocab));
  }

  std::vector<std::vector<int>> tokens;
  if (!task.calibration_text_uri().empty()) {
    if (!tokenizer) {
      return absl::FailedPreconditionError(absl::StrCat(
          "calibration text ", task.calibration_text_uri(), ": ", task.source_uri(),
          " has no vocabulary to tokenize it with; the job must name a tokenizer_uri"));
    }
    QF_RETURN_IF_ERROR(roots_.status());
    QF_ASSIGN_OR_RETURN(const std::string path,
                        rpc::ResolveUnderRoots(task.calibration_text_uri(), *roots_, "calibration text"));
    QF_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    QF_ASSIGN_OR_RETURN(std::vector<int> ids, tokenizer->Encode(text, /*add_bos=*/true));
    tokens.push_back(std::move(ids));
  } else {
    if (task.calibration_samples() < 1 || task.calibration_length() < 2) {
      return absl::InvalidArgumentError(absl::StrCat("calibrate task ", task.task_id(), ": ",
                                                     task.calibration_samples(), " streams of ",
                                                     task.calibration_length(), " tokens"));
    }
    QF_ASSIGN_OR_RETURN(auto runner, Transformer::Create(std::make_shared<const Model>(model),
                                                         RuntimeOptions{.threads = options_.threads}));
    const int bos = model.vocab ? model.vocab->bos_id : 1;
    QF_ASSIGN_OR_RETURN(tokens, eval::SampleStreams(*runner, task.calibration_samples(), task.calibration_length(),
                                                    task.calibration_seed(), 1.0f, bos));
  }
  QF_ASSIGN_OR_RETURN(calib::CalibrationStats stats,
                      calib::CollectCalibration(model, tokens, calib::CalibrationOptions{.threads = options_.threads}));

  if (!task.params().method().empty()) {
    QF_ASSIGN_OR_RETURN(const auto resolved, rpc::ParamsFromProto(task.params(), "task.params"));
    if (!resolved.first->HasModelTransform()) {
      return absl::InvalidArgumentError(
          absl::StrCat("calibrate task ", task.task_id(), ": method ", resolved.first->name(), " has no model transform"));
    }
    QF_RETURN_IF_ERROR(resolved.first->Validate(resolved.second));
    QF_RETURN_IF_ERROR(resolved.first->PrepareModel(model, stats, resolved.second));
  }

  // One artifact per accumulator: q/k/v (and gate/up) share their LayerStats object, so they share the bytes.
  std::map<const calib::LayerStats*, v1::CalibrationArtifact*> artifact_of;
  for (const auto& [name, s] : stats) {
    if (s == nullptr) continue;
    v1::CalibrationArtifact*& a = artifact_of[s.get()];
    if (a == nullptr) {
      a = out->add_calibration();
      a->set_cols(s->cols);
      a->set_tokens(s->tokens);
      QF_ASSIGN_OR_RETURN(const std::string bytes, calib::EncodeLayerStats(*s));
      a->set_nbytes(bytes.size());
      QF_RETURN_IF_ERROR(
          PutBytes({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, sink, a->mutable_chunk_ids()));
    }
    a->add_tensor_names(name);
  }

  // Every tensor the transform changed, in fp32 (a rewritten tensor with the source's very bytes is not one).
  for (const auto& [name, t] : model.tensors) {
    const Tensor* before = source.Find(name);
    if (before != nullptr && (t.data == before->data ||
                              (t.nbytes == before->nbytes && std::memcmp(t.data, before->data, t.nbytes) == 0))) {
      continue;
    }
    if (!(t.format == WeightFormat::F32())) {
      return absl::InternalError(absl::StrCat("the model transform left ", name, " as ", FormatName(t.format)));
    }
    v1::StoredTensor* stored = out->add_outputs();
    stored->set_name(name);
    stored->set_format(FormatName(t.format));
    for (int64_t d : t.shape) stored->add_shape(d);
    stored->set_nbytes(t.nbytes);
    QF_RETURN_IF_ERROR(PutBytes(t.bytes(), sink, stored->mutable_chunk_ids()));
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
