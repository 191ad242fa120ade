// The persistence boundary of the scheduler. Every transition that must survive a crash goes through this
// interface and is acknowledged only after the call returns OK: job created (with its serialized plan), task
// committed (with its result reference), job finished (succeeded, failed, cancelled). Leases, attempts and the
// ready queue are not persisted: Recover() rebuilds them, and a lease that was live at the crash simply lapses.
// A RocksDB implementation (storage/) maps these onto its jobs / tasks column families.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge::scheduler {

using JobId = uint64_t;

enum class JobState : uint8_t { kRunning = 1, kSucceeded = 2, kFailed = 3, kCancelled = 4 };
const char* JobStateName(JobState s);

struct StoredJob {
  JobId id = 0;
  std::string plan;  // SerializePlan
  int64_t created_ms = 0;
  JobState state = JobState::kRunning;
  std::string message;  // the error of a failed job
  int64_t finished_ms = 0;
  std::vector<std::pair<uint32_t, std::string>> results;  // committed tasks: index -> result reference
};

class SchedulerStateStore {
 public:
  virtual ~SchedulerStateStore() = default;
  // Each call is durable when it returns OK. Calls for one job arrive after its PutJob.
  virtual absl::Status PutJob(JobId id, const std::string& plan, int64_t created_ms) = 0;
  // At most once per (job, task) from one scheduler; after a crash a re-commit carries the same reference
  // (tasks are deterministic), so overwriting is fine.
  virtual absl::Status PutTaskResult(JobId id, uint32_t task, const std::string& result_ref) = 0;
  virtual absl::Status PutJobState(JobId id, JobState state, const std::string& message, int64_t at_ms) = 0;
  // Every job with its state and committed tasks, in id order.
  virtual absl::StatusOr<std::vector<StoredJob>> LoadAll() = 0;
};

// For tests and embedded experiments: everything in a map; can inject write failures and counts commits.
class InMemoryStateStore : public SchedulerStateStore {
 public:
  absl::Status PutJob(JobId id, const std::string& plan, int64_t created_ms) override;
  absl::Status PutTaskResult(JobId id, uint32_t task, const std::string& result_ref) override;
  absl::Status PutJobState(JobId id, JobState state, const std::string& message, int64_t at_ms) override;
  absl::StatusOr<std::vector<StoredJob>> LoadAll() override;

  // The next `n` writes fail with UNAVAILABLE (and store nothing).
  void FailNextWrites(int n);
  // How many times PutTaskResult succeeded for this task (1 when every task is committed exactly once).
  int CommitCount(JobId id, uint32_t task) const;

 private:
  absl::Status MaybeFail();
  mutable std::mutex mu_;
  int fail_next_ = 0;
  std::map<JobId, StoredJob> jobs_;
  std::map<std::pair<JobId, uint32_t>, std::pair<std::string, int>> results_;
};

}  // namespace qforge::scheduler
