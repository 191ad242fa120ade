// The calibrate task (TaskExecutor::Calibrate, task_executor.h; docs/distributed.md, "Calibrated jobs"): one block
// of the per-block chain — block i's statistics from block i-1's stored output hidden states (block 0: the
// calibration tokens' embedding), the method's model transform on that block, and block i's output for block i+1 —
// or, for a task of layer -1 (plans made before the chain), the whole model in one pass.
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/calib/block_chain.h"
#include "core/calib/collect.h"
#include "core/calib/stats_codec.h"
#include "core/eval/eval.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "services/rpc/rpc_util.h"
#include "workers/task_executor.h"

namespace qforge::workers {

namespace v1 = qforge::v1;

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

// What `qforge quantize` tokenizes or samples (services/cli/model_commands.cc, Calibrate): the text, or
// SampleStreams with the same count, length, seed and BOS. Sampling generates from the whole model: of the chain,
// only block 0 with sampled streams reads every block's weights.
absl::StatusOr<std::vector<std::vector<int>>> TaskExecutor::CalibrationTokens(const v1::Task& task, Model& model) {
  std::unique_ptr<Tokenizer> tokenizer;
  if (!task.tokenizer_uri().empty()) {
    QF_ASSIGN_OR_RETURN(const std::string path, inputs_.Resolve(task.tokenizer_uri(), "tokenizer"));
    QF_ASSIGN_OR_RETURN(Vocab vocab, ReadVocabFile(path, model.config.vocab_size));
    model.vocab = std::move(vocab);
    if (!task.calibration_text_uri().empty()) {
      QF_ASSIGN_OR_RETURN(tokenizer, LoadTokenizer(path, model.config.vocab_size));
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
    QF_ASSIGN_OR_RETURN(const std::string path, inputs_.Resolve(task.calibration_text_uri(), "calibration text"));
    QF_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path));
    QF_ASSIGN_OR_RETURN(std::vector<int> ids, tokenizer->Encode(text, /*add_bos=*/true));
    tokens.push_back(std::move(ids));
    return tokens;
  }
  if (task.calibration_samples() < 1 || task.calibration_length() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("calibrate task ", task.task_id(), ": ",
                                                   task.calibration_samples(), " streams of ",
                                                   task.calibration_length(), " tokens"));
  }
  QF_ASSIGN_OR_RETURN(auto runner, Transformer::Create(std::make_shared<const Model>(model),
                                                       RuntimeOptions{.threads = options_.threads}));
  const int bos = model.vocab ? model.vocab->bos_id : 1;
  return eval::SampleStreams(*runner, task.calibration_samples(), task.calibration_length(), task.calibration_seed(),
                             1.0f, bos);
}

// Deterministic: a re-run after a crash uploads the same chunks. The chain stores hidden states in
// calib::kChainActivationFormat, which `qforge quantize` rounds to as well (CollectCalibration's block_chain), so
// the version equals the in-process result byte for byte.
absl::Status TaskExecutor::Calibrate(const v1::Task& task, const Model& source, ChunkSink& sink,
                                     v1::CompleteTaskRequest* out, ChunkSource* artifacts) {
  const int n_layers = source.config.n_layers;
  const int layer = task.layer();
  if (layer < -1 || layer >= n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrate task ", task.task_id(), ": block ", layer, " of a model with ", n_layers));
  }
  Model model = source;  // tensors are views of the mapped file; the transform replaces the ones it changes
  // A whole-model task (layer -1) runs the same chain in one process: the same bits as the per-block tasks.
  const calib::CalibrationOptions options{.threads = options_.threads, .block_chain = calib::kChainActivationFormat};
  calib::CalibrationStats stats;
  calib::BlockActivations output;
  if (layer < 0) {
    QF_ASSIGN_OR_RETURN(const std::vector<std::vector<int>> tokens, CalibrationTokens(task, model));
    QF_ASSIGN_OR_RETURN(stats, calib::CollectCalibration(model, tokens, options));
  } else {
    calib::BlockActivations input;
    if (layer == 0) {
      QF_ASSIGN_OR_RETURN(const std::vector<std::vector<int>> tokens, CalibrationTokens(task, model));
      // Sampling read the whole model; the block needs only its own pages from here on.
      if (options_.release_memory_between_tasks) MappedFile::DropResidentPages();
      QF_ASSIGN_OR_RETURN(input, calib::EmbedCalibrationTokens(model, tokens, options));
    } else {
      QF_ASSIGN_OR_RETURN(input, inputs_.Activations(task, source.config.dim, artifacts));
    }
    QF_ASSIGN_OR_RETURN(stats, calib::CalibrateBlock(model, layer, input, options, &output));
  }

  if (!task.params().method().empty()) {
    QF_ASSIGN_OR_RETURN(const auto resolved, rpc::ParamsFromProto(task.params(), "task.params"));
    if (!resolved.first->HasModelTransform()) {
      return absl::InvalidArgumentError(
          absl::StrCat("calibrate task ", task.task_id(), ": method ", resolved.first->name(), " has no model transform"));
    }
    QF_RETURN_IF_ERROR(resolved.first->Validate(resolved.second));
    if (layer < 0) {
      QF_RETURN_IF_ERROR(resolved.first->PrepareModel(model, stats, resolved.second));
    } else {
      QF_RETURN_IF_ERROR(quant::PrepareBlock(*resolved.first, model, layer, stats, resolved.second));
    }
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

  // The next block's input; the last block's output is read by nobody.
  if (layer >= 0 && layer + 1 < n_layers) {
    QF_ASSIGN_OR_RETURN(const std::string bytes, calib::EncodeActivations(output, calib::kChainActivationFormat));
    v1::ActivationArtifact* a = out->mutable_activations();
    a->set_layer(layer);
    a->set_format(calib::ActivationFormatName(calib::kChainActivationFormat));
    a->set_dim(output.dim);
    a->set_windows(static_cast<int64_t>(output.windows.size()));
    a->set_tokens(output.tokens());
    a->set_nbytes(bytes.size());
    QF_RETURN_IF_ERROR(
        PutBytes({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, sink, a->mutable_chunk_ids()));
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
