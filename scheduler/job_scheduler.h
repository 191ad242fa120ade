// The task queue with leases. Workers pull: Lease hands out a ready task (all dependencies committed) with a
// deadline, Heartbeat extends it, Complete commits the result reference through the state store before it is
// acknowledged, Fail and lease expiry count attempts and fail the job after max_attempts. Time is passed in
// (now_ms) so tests drive the clock. Thread-safe: one mutex around the whole state.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "scheduler/plan.h"
#include "scheduler/state_store.h"

namespace qforge::scheduler {

struct SchedulerOptions {
  int64_t lease_ms = 30'000;
  int max_attempts = 3;  // failures + expired leases of one task before its job fails
};

struct TaskRef {
  JobId job = 0;
  uint32_t task = 0;
  bool operator==(const TaskRef&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const TaskRef& r) {
    return H::combine(std::move(h), r.job, r.task);
  }
};

// What a worker needs to run a task.
struct TaskSpec {
  TaskKind kind = TaskKind::kQuantize;
  std::string source_uri;
  std::string tensor;  // quantize
  int64_t rows = 0, cols = 0, row_begin = 0, row_end = 0;
  const QuantConfig* config = nullptr;  // quantize; owned by the job's plan, valid while the scheduler lives
  int32_t layer = -1;                   // calibrate
  uint64_t input_bytes = 0;
};

struct LeasedTask {
  TaskRef ref;
  int64_t deadline_ms = 0;
  int attempt = 0;  // 0 on the first lease
  TaskSpec spec;
};

struct JobProgress {
  JobState state = JobState::kRunning;
  uint64_t tasks_done = 0, tasks_total = 0;
  uint64_t bytes_done = 0, bytes_total = 0;  // quantize input bytes
  double eta_seconds = -1;                   // -1 until this process has seen a completion
  std::string message;
  int64_t created_ms = 0, finished_ms = 0;   // finished_ms: 0 while running
};

enum class CompleteOutcome { kCommitted, kDuplicate, kJobNotRunning };

// Events since this process started (for metrics): leases handed out, first completions, duplicate completions,
// failures reported by the lease holder, leases that expired.
struct QueueCounters {
  uint64_t leased = 0, committed = 0, duplicates = 0, failed = 0, expired = 0;
};

// Tasks of the running jobs by state, now (for metrics): waiting on dependencies, ready to lease (the queue a
// worker pool drains), leased, committed. Finished jobs are left out: their tasks wait for nothing.
struct TaskStateCounts {
  uint64_t blocked = 0, ready = 0, leased = 0, done = 0;
};

class JobScheduler {
 public:
  // Rebuilds every job from `store` (not owned): committed tasks stay committed, everything else whose
  // dependencies are committed is ready. An empty store gives an empty scheduler.
  static absl::StatusOr<std::unique_ptr<JobScheduler>> Recover(SchedulerStateStore* store,
                                                               SchedulerOptions options, int64_t now_ms);

  // Persists the plan, then queues its ready tasks.
  absl::StatusOr<JobId> SubmitJob(Plan plan, int64_t now_ms);
  // Expires overdue leases, then hands out the oldest ready task; nullopt when none is ready.
  absl::StatusOr<std::optional<LeasedTask>> Lease(const std::string& worker, int64_t now_ms);
  // Extends the worker's lease; returns the new deadline. FAILED_PRECONDITION when the worker no longer holds
  // it (expired, re-leased or already committed), CANCELLED / ABORTED when the job was cancelled / failed.
  absl::StatusOr<int64_t> Heartbeat(const std::string& worker, TaskRef task, int64_t now_ms);
  // The first completion of a task commits it, whoever sends it (results are deterministic); later ones are
  // kDuplicate. FAILED_PRECONDITION for a task that was never ready.
  absl::StatusOr<CompleteOutcome> Complete(const std::string& worker, TaskRef task, const std::string& result_ref,
                                           int64_t now_ms);
  // Counts an attempt when `worker` holds the lease (a stale worker's report is ignored); after max_attempts
  // the job fails with this error message.
  absl::Status Fail(const std::string& worker, TaskRef task, const std::string& error, int64_t now_ms);
  // Returns overdue leased tasks to the queue, counting an attempt. Returns how many expired.
  absl::StatusOr<int> ExpireLeases(int64_t now_ms);
  absl::Status CancelJob(JobId job, int64_t now_ms);

  absl::StatusOr<JobProgress> Progress(JobId job, int64_t now_ms) const;
  absl::StatusOr<std::string> ResultRef(TaskRef task) const;  // NOT_FOUND until committed
  // The job's plan; valid while the scheduler lives (jobs are never dropped). nullptr for an unknown job.
  const Plan* PlanOf(JobId job) const;
  std::vector<JobId> Jobs() const;
  size_t LeasedCount() const;
  QueueCounters counters() const;
  TaskStateCounts TaskCounts() const;
  // Bytes held by plans, per-task state, queues and leases (not the store).
  size_t MemoryBytes() const;

 private:
  enum class TaskState : uint8_t { kBlocked, kReady, kLeased, kDone };
  struct Job {
    JobId id = 0;
    Plan plan;
    JobState state = JobState::kRunning;
    std::string message;
    std::vector<TaskState> task_state;
    std::vector<uint8_t> attempts;
    std::vector<uint32_t> pending_deps;
    std::vector<uint32_t> dependent_offsets, dependents;  // reverse edges, CSR
    std::string result_arena;
    std::vector<uint64_t> result_pos;  // offset << 24 | length into result_arena
    uint64_t tasks_done = 0, bytes_done = 0;
    int64_t rate_start_ms = -1;  // first completion seen by this process
    uint64_t rate_start_bytes = 0;
    int64_t last_ms = 0;
    int64_t created_ms = 0, finished_ms = 0;
  };
  struct LeaseInfo {
    std::string worker;
    int64_t deadline_ms = 0;
    uint32_t epoch = 0;
  };
  struct Expiry {
    int64_t deadline_ms;
    TaskRef ref;
    uint32_t epoch;
    bool operator>(const Expiry& o) const { return deadline_ms > o.deadline_ms; }
  };

  JobScheduler(SchedulerStateStore* store, SchedulerOptions options) : store_(store), options_(options) {}
  static std::unique_ptr<Job> MakeJob(JobId id, Plan plan);
  void QueueInitiallyReady(Job& job);
  Job* FindJob(JobId id) const;
  absl::Status CheckRef(TaskRef ref, Job** job) const;
  absl::Status FinishJob(Job& job, JobState state, const std::string& message, int64_t now_ms);
  // One more attempt spent on `ref` (leased or failed); re-queues it or fails the job.
  absl::Status SpendAttempt(Job& job, uint32_t task, const std::string& why, int64_t now_ms);
  absl::StatusOr<int> ExpireLocked(int64_t now_ms);
  void DropLeasesOf(JobId job);

  SchedulerStateStore* store_;
  SchedulerOptions options_;
  mutable std::mutex mu_;
  std::map<JobId, std::unique_ptr<Job>> jobs_;
  JobId next_id_ = 1;
  std::deque<TaskRef> ready_;  // may hold stale entries (task no longer kReady): skipped when popped
  absl::flat_hash_map<TaskRef, LeaseInfo> leases_;
  std::priority_queue<Expiry, std::vector<Expiry>, std::greater<Expiry>> expiries_;  // lazily invalidated
  uint32_t next_epoch_ = 1;
  QueueCounters counters_;
};

}  // namespace qforge::scheduler
