// SchedulerStateStore over the RocksDB artifact store (storage/artifact_store.h): the scheduler's durable state
// lives in the store's `jobs` / `tasks` column families, every write synced before it returns OK.
//
//  * jobs  <20-digit decimal job id>                      -> job record (plan or its chunk ids, created, state,
//                                                            message, finished)
//  * tasks <20-digit job id> \0 <10-digit task index>     -> task record (result reference)
//
// Both records are versioned little-endian binary with a trailing CRC-32 and carry their own job id (and task
// index), so a torn, bit-flipped or misplaced value is DATA_LOSS naming the job / task, never a wrong answer.
// A plan larger than `inline_plan_max_bytes` is stored as content-addressed chunks (ArtifactStore::PutBlob)
// pinned by the holder PlanPinHolder(id). The pin is the job's reference to its chunks and is deliberately
// *kept* for the life of the job: the store counts only manifests and pins as references, so releasing it
// would let the release (or CollectGarbage) delete the plan. Chunk puts are unsynced; the synced job write
// that records their ids makes them durable (see docs/storage.md, Durability). docs/scheduler.md has more.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "scheduler/state_store.h"

namespace qforge::storage {
class ArtifactStore;
}

namespace qforge::scheduler {

struct RocksDbStateStoreOptions {
  // Plans up to this many bytes are stored inline in the job record; larger ones as pinned chunks.
  size_t inline_plan_max_bytes = size_t{1} << 20;
};

class RocksDbStateStore : public SchedulerStateStore {
 public:
  // `store` is not owned and must outlive this object.
  explicit RocksDbStateStore(storage::ArtifactStore* store, RocksDbStateStoreOptions options = {})
      : store_(store), options_(options) {}

  absl::Status PutJob(JobId id, const std::string& plan, int64_t created_ms) override;
  absl::Status PutTaskResult(JobId id, uint32_t task, const std::string& result_ref) override;
  absl::Status PutJobState(JobId id, JobState state, const std::string& message, int64_t at_ms) override;
  absl::StatusOr<std::vector<StoredJob>> LoadAll() override;

  // Keys and pin holder, exposed for tests and tools.
  static std::string JobKey(JobId id);           // 20 decimal digits, so keys sort in id order
  static std::string TaskKey(uint32_t task);     // 10 decimal digits
  static std::string PlanPinHolder(JobId id);    // "qforge-scheduler-plan-" + JobKey(id)

 private:
  storage::ArtifactStore* store_;
  RocksDbStateStoreOptions options_;
  // Serialises the read-modify-write of job records (PutJob / PutJobState).
  std::mutex mu_;
};

}  // namespace qforge::scheduler
