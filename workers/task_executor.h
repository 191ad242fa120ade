// Runs one scheduler task on this machine: calibrates one block of the chain (calibrate_task.cc), encodes a row
// slice (quantize) or copies the tensors the job keeps unchanged (assemble), reading its inputs through
// TaskInputs (task_inputs.h), and hands the bytes to a ChunkSink. No gRPC here: the worker loop (worker.h) supplies
// a sink over UploadChunk and a source over GetChunk, tests in-memory ones.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/model/model.h"
#include "qforge/v1/worker.pb.h"
#include "workers/task_inputs.h"

namespace qforge::workers {

// Where a task's output bytes go: UploadChunk to the scheduler's store, or a map in tests.
class ChunkSink {
 public:
  virtual ~ChunkSink() = default;
  // Stores one chunk and returns its id (storage::ChunkIdOf of the bytes).
  virtual absl::StatusOr<std::string> Put(std::span<const uint8_t> bytes) = 0;
};

struct ExecutorOptions {
  int threads = 1;
  // Source files must resolve (realpath) to a path under one of these; empty means no restriction.
  std::vector<std::string> allowed_roots;
  // Output tensors are split into chunks of this many bytes (1 .. storage::kMaxChunkBytes).
  size_t chunk_bytes = size_t{16} << 20;
  // Loaded source models kept open between tasks.
  int cached_models = 2;
  // Decoded calibration statistics kept between tasks (TaskInputsOptions).
  int stats_cache_entries = 4;
  size_t stats_cache_bytes = size_t{256} << 20;
  // After each task, hand the source mappings' resident pages back to the page cache (MappedFile::
  // DropResidentPages) and the heap's free memory back to the system (malloc_trim), so a worker's resident
  // memory is one task's, not every block's it ever read.
  bool release_memory_between_tasks = true;
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
  // produces or the method needs calibration and the task carries no statistics. `artifacts` reads what a task
  // names from other tasks (a quantize task's statistics and transformed weights, a calibrate block's input hidden
  // states, the version an evaluate task compares: evaluate_task.h); may be null for jobs without any.
  absl::Status Execute(const qforge::v1::Task& task, ChunkSink& sink, qforge::v1::CompleteTaskRequest* out,
                       ChunkSource* artifacts = nullptr);

  // What tasks read (the statistics cache's counters, for tests).
  const TaskInputs& inputs() const { return inputs_; }

 private:
  absl::Status Run(const qforge::v1::Task& task, ChunkSink& sink, qforge::v1::CompleteTaskRequest* out,
                   ChunkSource* artifacts);
  absl::Status Quantize(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                        qforge::v1::CompleteTaskRequest* out, ChunkSource* artifacts);
  // calibrate_task.cc: statistics of every linear input of the task's block (layer -1: of the whole model) and
  // the transformed tensors, uploaded through `sink`; `out` gets the artifacts (calibration), the transformed
  // tensors (outputs) and, for a block below the last, the block's output hidden states (activations).
  absl::Status Calibrate(const qforge::v1::Task& task, const Model& source, ChunkSink& sink,
                         qforge::v1::CompleteTaskRequest* out, ChunkSource* artifacts);
  // The calibration tokens of a calibrate task (its text tokenized, or streams sampled from `model`, whose
  // vocabulary becomes the task's tokenizer_uri's when it names one).
  absl::StatusOr<std::vector<std::vector<int>>> CalibrationTokens(const qforge::v1::Task& task, Model& model);
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
  TaskInputs inputs_;
  ThreadPool pool_;
  std::unique_ptr<EvaluateTaskRunner> evaluator_;
};

}  // namespace qforge::workers
