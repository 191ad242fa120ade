// The worker loop: registers with the scheduler's WorkerService, leases tasks, runs them with TaskExecutor,
// uploads the bytes (UploadChunk), heartbeats while a task runs, and completes or fails each task.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "qforge/v1/worker.grpc.pb.h"
#include "services/metrics/registry.h"
#include "workers/task_executor.h"

namespace qforge::workers {

struct WorkerOptions {
  std::string name;  // hostname shown to the scheduler
  int threads = 1;
  std::vector<std::string> allowed_roots;  // see ExecutorOptions
  int max_idle_poll_ms = 500;
  // When set, one line per event is appended: "lease <task_id> <kind> <pid>", "commit <task_id> <pid>",
  // "duplicate <task_id> <pid>". The end-to-end crash tests read it to see which process ran what.
  std::string task_log_path;
  int64_t memory_bytes = 0;  // reported at registration
  bool verbose = false;      // one line per task on stderr (errors are always printed)
  // When set, the worker counts its tasks (by kind and outcome), uploaded bytes and busy seconds here (busy
  // seconds from construction on, so the series exists before the first task).
  metrics::Registry* metrics = nullptr;
};

class Worker {
 public:
  Worker(std::shared_ptr<grpc::Channel> channel, WorkerOptions options);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Registers, then leases and runs tasks until `stop` becomes true (checked between tasks and while idle; a
  // running task is finished and completed first). UNAVAILABLE / DEADLINE_EXCEEDED from the scheduler are
  // retried with backoff until `stop`; a scheduler that no longer knows this worker (NOT_FOUND on LeaseTask) is
  // registered with again. Returns OK when stopped, or the error that makes going on pointless (the task log
  // cannot be opened, the scheduler refuses registration or leases with another code).
  absl::Status Run(const std::atomic<bool>& stop);

  // Tasks whose CompleteTask was acknowledged (committed or duplicate).
  int64_t tasks_completed() const { return tasks_completed_.load(); }

 private:
  absl::Status Register(const std::atomic<bool>& stop);
  void RunTask(const qforge::v1::LeaseTaskResponse& lease, const std::atomic<bool>& stop);
  void Fail(const qforge::v1::Task& task, const std::string& error, const std::atomic<bool>& stop);
  void LogEvent(const std::string& line);
  // Counts one finished task in options_.metrics (no-op without a registry).
  void CountTask(const qforge::v1::Task& task, const std::string& outcome,
                 const qforge::v1::CompleteTaskRequest& done);

  std::unique_ptr<qforge::v1::WorkerService::Stub> stub_;
  std::unique_ptr<qforge::v1::ArtifactService::Stub> artifacts_;  // a calibrate task's uploads, for quantize tasks
  const WorkerOptions options_;
  TaskExecutor executor_;
  std::string worker_id_;
  int task_log_fd_ = -1;  // opened by Run
  std::atomic<int64_t> tasks_completed_{0};
  // qforge_worker_busy_seconds_total, advanced while a task executes (also at every scrape, so that a long task
  // shows as busy while it runs, not as one jump when it ends). Shared with the registry's collector, which
  // may outlive this worker. Null without a registry.
  struct BusyClock;
  std::shared_ptr<BusyClock> busy_;
};

}  // namespace qforge::workers
