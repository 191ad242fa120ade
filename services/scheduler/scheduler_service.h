// The scheduler process: JobService (platform teams submit quantize jobs), WorkerService (workers lease,
// upload, complete) and ArtifactService (models and chunks in the store), over one RocksDB artifact store
// that holds every durable bit: plans, committed task results, chunks and versions. docs/distributed.md has
// the protocol; the short version:
//
//  * SubmitJob checks the request up front (source under an allowed root and a real model, output name,
//    recipe), plans it from the file's header (scheduler/plan.h) and persists the plan before answering.
//  * A quantize task's result is its chunk ids. They are verified (read back, sizes added up) before the
//    completion is committed, so a worker can never commit bytes the store does not hold intact.
//  * Uploads are pinned to their job, so garbage collection cannot take them before the version commits; the
//    commit releases the pins in the same atomic write. Failed and cancelled jobs release theirs.
//  * Completing the assemble task commits the version. The commit records the job id in the manifest, so an
//    assemble re-run after a crash finds its version instead of committing a second one.
//  * After kill -9, a restart recovers every job from the store (JobScheduler::Recover): committed tasks stay
//    committed, the rest run again.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "scheduler/job_scheduler.h"
#include "scheduler/rocksdb_state_store.h"
#include "services/http/http_server.h"
#include "storage/artifact_store.h"

namespace qforge::services {

struct SchedulerServiceOptions {
  // Source models (and export targets) must resolve under one of these directories; empty: any local path
  // (embedded mode on a laptop).
  std::vector<std::string> allowed_roots;
  // Tensors larger than this are split into row slices, one quantize task each (SubmitJobRequest can lower it).
  uint64_t max_task_bytes = uint64_t{256} << 20;
  scheduler::SchedulerOptions scheduler;  // lease length, attempts before a job fails
  int64_t expiry_scan_ms = 500;           // how often overdue leases are returned to the queue
};

class SchedulerServer {
 public:
  // Opens the store in `store_dir` (created if missing) and recovers every job in it.
  static absl::StatusOr<std::unique_ptr<SchedulerServer>> Open(const std::string& store_dir,
                                                               SchedulerServiceOptions options);
  ~SchedulerServer();

  // Listens on `address` ("127.0.0.1:0" picks a free port) and returns the bound port.
  absl::StatusOr<int> Start(const std::string& address);
  // Serves /metrics (Prometheus text: jobs by state, task events, lease expiries, bytes quantized, compression
  // ratio, process memory) and /healthz over HTTP on `address`:`port` (0 picks); returns the bound port.
  absl::StatusOr<int> StartMetrics(const std::string& address, int port);
  // A channel to this server that bypasses the network (embedded mode's workers and CLI).
  std::shared_ptr<grpc::Channel> InProcessChannel();
  // Ends WatchJob streams, lets in-flight calls finish (up to `grace_ms`), then stops.
  void Shutdown(int64_t grace_ms = 5000);
  void Wait();

  storage::ArtifactStore& store() { return *store_; }
  scheduler::JobScheduler& jobs() { return *jobs_; }

  class Impl;  // the three services and their shared state (scheduler_service.cc)

 private:
  SchedulerServer() = default;
  std::unique_ptr<storage::ArtifactStore> store_;
  std::unique_ptr<scheduler::RocksDbStateStore> state_;
  std::unique_ptr<scheduler::JobScheduler> jobs_;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<http::HttpServer> metrics_http_;
  std::thread ticker_;
};

// Pin holder of a job's uploads.
std::string JobPinHolder(scheduler::JobId job);

}  // namespace qforge::services
