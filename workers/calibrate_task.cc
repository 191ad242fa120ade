// The calibrate task (TaskExecutor::Calibrate, task_executor.h; docs/distributed.md, "Calibrated jobs"): one block
// of the per-block chain — block i's statistics from block i-1's stored output hidden states (block 0: the
// calibration tokens' embedding), the method's model transform on that block, and block i's output for block i+1 —
// or, for a task of layer -1 (plans made before the chain), the whole model in one pass. In a sequential job
// block i makes its own input from block i-1's quantized weights and stored input, and hands that input on.
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
  const bool sequential = task.sequential_calibration();
  if (sequential && layer < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibrate task ", task.task_id(), ": sequential calibration needs one task per block"));
  }
  calib::CalibrationStats stats;
  // What the next block reads: this block's output, or (sequential) this block's input, in `handed_on_format`.
  calib::BlockActivations handed_on;
  calib::ActivationFormat handed_on_format = calib::kChainActivationFormat;
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
      // quant::CalibrateSequentially runs block 0 on the embedding unrounded: hand it on exactly.
      if (sequential) handed_on_format = calib::ActivationFormat::kF32;
    } else if (sequential) {
      // Block i's input is block i-1, as quantized, over block i-1's input: the step CalibrateSequentially takes.
      QF_ASSIGN_OR_RETURN(const calib::BlockActivations previous_input,
                          inputs_.Activations(task, source.config.dim, artifacts));
      Model previous = source;
      QF_RETURN_IF_ERROR(inputs_.OverlayPreviousBlock(task, previous, artifacts));
      QF_RETURN_IF_ERROR(calib::RunBlock(previous, layer - 1, previous_input, options_.threads, &input));
      QF_RETURN_IF_ERROR(calib::RoundActivations(input, calib::kChainActivationFormat));
    } else {
      QF_ASSIGN_OR_RETURN(input, inputs_.Activations(task, source.config.dim, artifacts));
    }
    if (sequential) {
      QF_ASSIGN_OR_RETURN(stats, calib::CalibrateBlock(model, layer, input, options, nullptr));
      handed_on = std::move(input);
    } else {
      QF_ASSIGN_OR_RETURN(stats, calib::CalibrateBlock(model, layer, input, options, &handed_on));
    }
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

  // What the next block reads; the last block hands on nothing (nobody reads it).
  if (layer >= 0 && layer + 1 < n_layers) {
    QF_ASSIGN_OR_RETURN(const std::string bytes, calib::EncodeActivations(handed_on, handed_on_format));
    v1::ActivationArtifact* a = out->mutable_activations();
    a->set_layer(sequential ? layer - 1 : layer);  // whose output they are (-1: the embedding)
    a->set_format(calib::ActivationFormatName(handed_on_format));
    a->set_dim(handed_on.dim);
    a->set_windows(static_cast<int64_t>(handed_on.windows.size()));
    a->set_tokens(handed_on.tokens());
    a->set_nbytes(bytes.size());
    QF_RETURN_IF_ERROR(
        PutBytes({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, sink, a->mutable_chunk_ids()));
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
