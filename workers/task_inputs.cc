#include "workers/task_inputs.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/status_macros.h"
#include "core/calib/stats_codec.h"
#include "core/formats/formats.h"
#include "services/rpc/rpc_util.h"
#include "storage/model_store.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;

// The concatenated chunks `ids`, which must add up to `nbytes`; *fetches counts the reads.
absl::StatusOr<std::vector<uint8_t>> FetchAll(const google::protobuf::RepeatedPtrField<std::string>& ids,
                                              uint64_t nbytes, ChunkSource& artifacts, const std::string& what,
                                              int64_t* fetches = nullptr) {
  std::vector<uint8_t> out;
  out.reserve(nbytes);
  for (const std::string& id : ids) {
    QF_ASSIGN_OR_RETURN(std::vector<uint8_t> chunk, artifacts.Get(id));
    if (fetches != nullptr) ++*fetches;
    if (out.size() + chunk.size() > nbytes) break;
    out.insert(out.end(), chunk.begin(), chunk.end());
  }
  if (out.size() != nbytes) {
    return absl::DataLossError(absl::StrCat(what, ": the chunks do not hold the ", nbytes, " bytes the task names"));
  }
  return out;
}

absl::Status NeedSource(const ChunkSource* artifacts, const std::string& what) {
  if (artifacts != nullptr) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(what, ": this executor has no artifact source to read them"));
}

}  // namespace

TaskInputs::TaskInputs(TaskInputsOptions options)
    : options_(std::move(options)), roots_(rpc::ResolveRoots(options_.allowed_roots)) {}

absl::StatusOr<std::string> TaskInputs::Resolve(const std::string& uri, const std::string& what) const {
  QF_RETURN_IF_ERROR(roots_.status());
  return rpc::ResolveUnderRoots(uri, *roots_, what);
}

absl::StatusOr<std::shared_ptr<const Model>> TaskInputs::Source(const std::string& uri) {
  QF_ASSIGN_OR_RETURN(const std::string real, Resolve(uri, "source"));
  struct stat st {};
  if (::stat(real.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("source '", uri, "': ", std::strerror(errno)));
  }
  const std::string key = absl::StrCat(real, "|", st.st_size, "|", st.st_mtim.tv_sec, ".", st.st_mtim.tv_nsec);
  for (auto it = models_.begin(); it != models_.end(); ++it) {
    if (it->key == key) {
      models_.splice(models_.begin(), models_, it);
      return models_.front().model;
    }
  }
  auto loaded = formats::LoadModel(real);
  if (!loaded.ok()) {
    const absl::string_view msg = loaded.status().message();
    if (absl::StrContains(msg, real)) return loaded.status();
    return absl::Status(loaded.status().code(), absl::StrCat("source '", uri, "': ", msg));
  }
  auto model = std::make_shared<const Model>(*std::move(loaded));
  if (options_.cached_models > 0) {
    models_.push_front({key, model});
    if (models_.size() > static_cast<size_t>(options_.cached_models)) models_.pop_back();
  }
  return model;
}

absl::StatusOr<std::shared_ptr<const calib::LayerStats>> TaskInputs::Stats(const v1::Task& task,
                                                                            ChunkSource* artifacts) {
  if (!task.has_stats()) return std::shared_ptr<const calib::LayerStats>();
  const std::string name = task.tensor_names_size() == 1 ? task.tensor_names(0) : std::string("?");
  const std::string what = absl::StrCat("calibration statistics of '", name, "'");
  const v1::CalibrationArtifact& a = task.stats();
  // Chunk ids are content hashes: the same list is the same bytes, whichever tensor (q/k/v share one) asks.
  const std::string key = absl::StrCat(a.nbytes(), ":", absl::StrJoin(a.chunk_ids(), ","));
  for (auto it = stats_.begin(); it != stats_.end(); ++it) {
    if (it->key != key) continue;
    stats_.splice(stats_.begin(), stats_, it);
    if (stats_.front().stats->cols != a.cols()) {
      return absl::DataLossError(absl::StrCat(what, ": ", stats_.front().stats->cols, " inputs, the task says ",
                                              a.cols()));
    }
    ++stats_cache_hits_;
    return stats_.front().stats;
  }
  QF_RETURN_IF_ERROR(NeedSource(artifacts, what));
  QF_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes,
                      FetchAll(a.chunk_ids(), a.nbytes(), *artifacts, what, &stats_chunk_fetches_));
  QF_ASSIGN_OR_RETURN(calib::LayerStats s, calib::DecodeLayerStats(bytes, what));
  if (s.cols != a.cols()) {
    return absl::DataLossError(absl::StrCat(what, ": ", s.cols, " inputs, the task says ", a.cols()));
  }
  auto stats = std::make_shared<const calib::LayerStats>(std::move(s));
  stats_.push_front({key, stats, bytes.size()});
  size_t held = 0;
  int entries = 0;
  for (auto it = stats_.begin(); it != stats_.end();) {
    held += it->bytes;
    ++entries;
    if (it != stats_.begin() && (held > options_.stats_cache_bytes || entries > options_.stats_cache_entries)) {
      it = stats_.erase(it);
    } else {
      ++it;
    }
  }
  return stats;
}

absl::StatusOr<std::optional<Tensor>> TaskInputs::Weights(const v1::Task& task, const Tensor& source,
                                                          ChunkSource* artifacts) {
  if (!task.has_weights()) return std::optional<Tensor>();
  const v1::StoredTensor& w = task.weights();
  const std::string what = absl::StrCat("transformed weights of '", source.name, "'");
  QF_RETURN_IF_ERROR(NeedSource(artifacts, what));
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

absl::StatusOr<calib::BlockActivations> TaskInputs::Activations(const v1::Task& task, int dim,
                                                                 ChunkSource* artifacts) {
  const std::string what = absl::StrCat("input hidden states of calibrate block ", task.layer());
  const int64_t of_block = task.layer() - (task.sequential_calibration() ? 2 : 1);
  if (!task.has_activations() || task.activations().layer() != of_block) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": the task names ",
                                                   task.has_activations()
                                                       ? absl::StrCat("block ", task.activations().layer(), "'s output")
                                                       : std::string("none")));
  }
  QF_RETURN_IF_ERROR(NeedSource(artifacts, what));
  const v1::ActivationArtifact& a = task.activations();
  QF_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, FetchAll(a.chunk_ids(), a.nbytes(), *artifacts, what));
  QF_ASSIGN_OR_RETURN(calib::BlockActivations x, calib::DecodeActivations(bytes, what));
  if (x.dim != dim || x.tokens() != a.tokens() || static_cast<int64_t>(x.windows.size()) != a.windows()) {
    return absl::DataLossError(absl::StrCat(what, ": ", x.windows.size(), " windows of ", x.tokens(),
                                            " tokens x dim ", x.dim, "; the task says ", a.windows(), " of ",
                                            a.tokens(), " x ", dim));
  }
  return x;
}

absl::Status TaskInputs::OverlayPreviousBlock(const v1::Task& task, Model& model, ChunkSource* artifacts) {
  const std::string what = absl::StrCat("block ", task.layer() - 1, " of calibrate task ", task.task_id());
  if (task.previous_block().empty()) return absl::OkStatus();
  QF_RETURN_IF_ERROR(NeedSource(artifacts, what));
  const storage::ChunkFetcher fetch = [&](const std::string& id) { return artifacts->Get(id); };
  for (const v1::ManifestTensor& mt : task.previous_block()) {
    auto it = model.tensors.find(mt.name());
    if (it == model.tensors.end() ||
        !std::equal(mt.shape().begin(), mt.shape().end(), it->second.shape.begin(), it->second.shape.end())) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": tensor '", mt.name().substr(0, 128), "' is not one of the model's of that shape"));
    }
    QF_ASSIGN_OR_RETURN(Tensor t, storage::TensorFromManifest(mt, fetch, what));
    it->second = std::move(t);
  }
  return absl::OkStatus();
}

}  // namespace qforge::workers
