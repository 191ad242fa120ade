// What tasks read, in one place: the source model (memory-mapped, only the pages a task touches are read), and
// the artifacts other tasks stored for it — a quantize task's input statistics and transformed weights, a calibrate
// task's input hidden states (the previous block's output). Every task kind of the executor reads through here.
// Statistics are cached by their chunk ids (content hashes, so a hit is the same bytes): the row-slice tasks of one
// tensor that land on this worker fetch its Hessian once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/calib/activations_codec.h"
#include "core/calib/stats.h"
#include "core/model/model.h"
#include "qforge/v1/worker.pb.h"

namespace qforge::workers {

// Where a task's input artifacts come from (other tasks' uploads): GetChunk over ArtifactService in the worker,
// a map in tests. Returned bytes must be the chunk's (checked against its content hash).
class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  virtual absl::StatusOr<std::vector<uint8_t>> Get(const std::string& chunk_id) = 0;
};

struct TaskInputsOptions {
  // Source files must resolve (realpath) to a path under one of these; empty means no restriction.
  std::vector<std::string> allowed_roots;
  int cached_models = 2;  // source models kept open between tasks
  // Decoded statistics kept between tasks, most recently used first: at most this many entries and bytes (the
  // newest entry stays whatever its size). Row slices of one tensor need one entry; a bound that does not grow
  // with the model keeps the worker's memory flat in depth (docs/distributed.md).
  int stats_cache_entries = 4;
  size_t stats_cache_bytes = size_t{256} << 20;
};

class TaskInputs {
 public:
  explicit TaskInputs(TaskInputsOptions options);

  // The source model `uri` names (under the allowed roots), memory-mapped and cached by (realpath, size, mtime).
  // PERMISSION_DENIED outside the roots, NOT_FOUND when missing.
  absl::StatusOr<std::shared_ptr<const Model>> Source(const std::string& uri);
  // `uri` (a tokenizer, a calibration text) resolved under the allowed roots; errors name `what`.
  absl::StatusOr<std::string> Resolve(const std::string& uri, const std::string& what) const;

  // The statistics a quantize task carries (nullptr when it carries none), fetched and decoded, or from the cache.
  // Errors name the tensor: FAILED_PRECONDITION without a ChunkSource, DATA_LOSS for bytes that do not decode or
  // add up.
  absl::StatusOr<std::shared_ptr<const calib::LayerStats>> Stats(const qforge::v1::Task& task, ChunkSource* artifacts);
  // The transformed fp32 weights a quantize task carries, as a tensor owning its bytes (nullopt: none; the task
  // then reads the source). `source` is the tensor of the same name in the source model: shape must match.
  absl::StatusOr<std::optional<Tensor>> Weights(const qforge::v1::Task& task, const Tensor& source,
                                                ChunkSource* artifacts);
  // The hidden states calibrate block i > 0 reads: what block i-1 stored — its output (block i-1's), or in a
  // sequential job its input (block i-2's output; block 0's input, the embedding, counts as block -1's).
  // DATA_LOSS when they do not decode, INVALID_ARGUMENT when the task names none or another block's or dim's.
  absl::StatusOr<calib::BlockActivations> Activations(const qforge::v1::Task& task, int dim, ChunkSource* artifacts);
  // A sequential calibrate task's previous block: `model` with every tensor task.previous_block names (block
  // i-1's quantized and transformed tensors) replaced by the stored one, which must be a tensor of the model of
  // the same shape. DATA_LOSS for bytes that do not add up, INVALID_ARGUMENT for a tensor the model lacks.
  absl::Status OverlayPreviousBlock(const qforge::v1::Task& task, Model& model, ChunkSource* artifacts);

  // Chunk reads made for statistics, and statistics served from the cache instead (tests and logs).
  int64_t stats_chunk_fetches() const { return stats_chunk_fetches_; }
  int64_t stats_cache_hits() const { return stats_cache_hits_; }

 private:
  struct CachedModel {
    std::string key;  // realpath, size, mtime: a rewritten file is a different model
    std::shared_ptr<const Model> model;
  };
  struct CachedStats {
    std::string key;  // the chunk ids, in order
    std::shared_ptr<const calib::LayerStats> stats;
    size_t bytes = 0;
  };

  const TaskInputsOptions options_;
  // The allowed roots' realpaths, resolved once (a root that does not exist fails every task with its error).
  const absl::StatusOr<std::vector<std::string>> roots_;
  std::list<CachedModel> models_;  // most recently used first
  std::list<CachedStats> stats_;   // most recently used first
  int64_t stats_chunk_fetches_ = 0, stats_cache_hits_ = 0;
};

}  // namespace qforge::workers
