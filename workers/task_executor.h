// Runs one scheduler task on this machine: reads the source model, encodes a row slice (quantize) or copies the
// tensors the job keeps unchanged (assemble), and hands the bytes to a ChunkSink. No gRPC here: the worker loop
// (worker.h) supplies a sink over UploadChunk, tests an in-memory one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/model/model.h"
#include "qforge/v1/worker.pb.h"

namespace qforge::workers {

// Where a task's output bytes go: UploadChunk to the scheduler's store, or a map in tests.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // Stores one chunk and returns its id (storage::ChunkIdOf of the bytes).
  virtual absl::StatusOr<std::string> Put(std::span<const uint8_t> bytes) = 0;
};

// Where a task's input artifacts come from (a calibrate task's uploads): GetChunk over ArtifactService in the
// worker, a map in tests. Returned bytes must be the chunk's (checked against its content hash).
class ChunkSource {
 public:
  virtual ~ChunkSource() = default;
  virtual absl::StatusOr<std::vector<uint8_t>> Get(const std::string& chunk_id) = 0;
};

struct ExecutorOptions {
  int threads = 1;
  // Source files must resolve (realpath) to a path under one of these; empty means no restriction.
  std::vector<std::string> allowed_roots;
  // Output tensors are split into chunks of this many bytes (1 .. storage::kMaxChunkBytes).
  size_t chunk_bytes = size_t{16} << 20;
  // Loaded source models kept open between tasks.
  int cached_models = 2;
};

class EvaluateTaskRunner;  // evaluate_task.h

class TaskExecutor {
 public:
  explicit TaskExecutor(ExecutorOptions options);
  ~TaskExecutor();

  // Runs `task`, putting its bytes through `sink`, and fills the outputs / config_json / vocab_chunk_id /
  // tensors fields of `out` (not worker_id / task_id). Not safe for concurrent calls.
  // PERMISSION_DENIED for a source outside the allowed roots, NOT_FOUND for a missing source or tensor,
  // INVALID_ARGUMENT for a malformed task, FAILED_PRECONDITION when the task's encoding is not what its method
  // produces or the method needs calibration and the task carries no statistics, UNIMPLEMENTED for per-block
  // calibrate tasks. `artifacts` reads what a quantize task of a calibrated job names (its statistics and
  // transformed weights) and the version an evaluate task compares (evaluate_task.h); may be null for jobs
  // without either.
  absl::Status Execute(const qforge::v1::Task& task, ChunkSink& sink, qforge::v1::CompleteTaskRequest* out,
                       ChunkSource* artifacts = nullptr);

 private:
  struct CachedModel {
    std::string key;  // realpath, size, mtime: a rewritten file is a different model
    std::shared_ptr<const Model> model;
  };

  absl::StatusOr<std::shared_ptr<const Model>> OpenSource(const std::string& uri);
  absl::Status Quantize(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                        qforge::v1::CompleteTaskRequest* out, ChunkSource* artifacts);
  // calibrate_task.cc: statistics of every linear input and the transformed tensors, uploaded through `sink`;
  // `out` gets the artifacts (calibration) and the transformed tensors (outputs).
  absl::Status Calibrate(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                         qforge::v1::CompleteTaskRequest* out);
  // Puts `bytes` in chunks of at most options_.chunk_bytes and appends their ids to `ids`.
  absl::Status PutBytes(std::span<const uint8_t> bytes, ChunkSink& sink,
                        google::protobuf::RepeatedPtrField<std::string>* ids);
  absl::Status Assemble(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                        qforge::v1::CompleteTaskRequest* out);
  // Puts `t`'s bytes in chunks of at most options_.chunk_bytes, none spanning two planes of a planar encoding
  // (qint, nf4), and appends their ids to `stored`: row slices of a planar tensor are reassembled plane by
  // plane, which needs no chunk split.
  absl::Status PutChunked(const Tensor& t, ChunkSink& sink, qforge::v1::StoredTensor* stored);

  const ExecutorOptions options_;
  // The allowed roots' realpaths, resolved once (a root that does not exist fails every task with its error).
  const absl::StatusOr<std::vector<std::string>> roots_;
  ThreadPool pool_;
  std::list<CachedModel> cache_;  // most recently used first
  std::unique_ptr<EvaluateTaskRunner> evaluator_;
};

}  // namespace qforge::workers
