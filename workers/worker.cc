#include "workers/worker.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "storage/chunk_codec.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;
using std::chrono::milliseconds;

constexpr auto kRpcTimeout = std::chrono::seconds(60);
// A 64 MiB chunk at a slow 1 MiB/s still fits.
constexpr auto kUploadTimeout = std::chrono::minutes(10);
constexpr int kRetryMinMs = 100;
constexpr int kRetryMaxMs = 5000;
constexpr int kIdleMinMs = 10;
// Heartbeats go out at a third of the remaining lease, but never more often than this: with clock skew between
// worker and scheduler the remaining time can look negative.
constexpr int64_t kMinHeartbeatMs = 250;

void LogLine(const std::string& line) {
  const std::string text = absl::StrCat("qforge-worker: ", line, "\n");
  std::fwrite(text.data(), 1, text.size(), stderr);
}

std::string StatusText(const absl::Status& s) {
  return absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message());
}

// The scheduler is restarting or unreachable: worth trying again.
bool Retryable(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<milliseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

template <typename Duration>
void SetTimeout(grpc::ClientContext* ctx, Duration timeout) {
  ctx->set_deadline(std::chrono::system_clock::now() + timeout);
}

// Sleeps `ms`, waking early when `stop` is set (a signal handler sets it, so there is nothing to wait on).
void SleepUnlessStopped(int ms, const std::atomic<bool>& stop) {
  const auto end = std::chrono::steady_clock::now() + milliseconds(ms);
  while (!stop) {
    const auto left = end - std::chrono::steady_clock::now();
    if (left <= std::chrono::steady_clock::duration::zero()) return;
    std::this_thread::sleep_for(std::min<std::chrono::steady_clock::duration>(left, milliseconds(20)));
  }
}

// Runs `call` (one RPC with a fresh ClientContext) until it returns anything but UNAVAILABLE / DEADLINE_EXCEEDED,
// backing off 100 ms -> 5 s. Once `stop` is set it gives up after the try in progress. The first failure of a
// run of retries is logged, so a worker pointed at the wrong address says so.
template <typename Call>
grpc::Status CallWithRetry(const char* what, const std::atomic<bool>& stop, Call call) {
  int backoff_ms = kRetryMinMs;
  for (bool logged = false;; logged = true) {
    grpc::Status s = call();
    if (s.ok() || !Retryable(s) || stop) return s;
    if (!logged) LogLine(absl::StrCat(what, ": ", s.error_message(), "; retrying"));
    SleepUnlessStopped(backoff_ms, stop);
    backoff_ms = std::min(backoff_ms * 2, kRetryMaxMs);
  }
}

std::string KindName(v1::TaskKind kind) {
  std::string name = v1::TaskKind_Name(kind);
  constexpr std::string_view kPrefix = "TASK_KIND_";
  if (name.starts_with(kPrefix)) name.erase(0, kPrefix.size());
  return absl::AsciiStrToLower(name);
}

std::string Describe(const v1::Task& task) {
  std::string s = absl::StrCat(task.task_id(), " ", KindName(task.kind()));
  if (task.kind() == v1::TASK_KIND_QUANTIZE && task.tensor_names_size() == 1) {
    absl::StrAppend(&s, " ", task.tensor_names(0), " rows [", task.row_begin(), ", ", task.row_end(), ")");
  }
  return s;
}

// ChunkSink over UploadChunk: one client stream per chunk, in pieces of rpc::kChunkPieceBytes, the first naming
// the worker and the task. The returned id must be the content hash of what was sent.
class GrpcChunkSink : public ChunkSink {
 public:
  GrpcChunkSink(v1::WorkerService::Stub& stub, const std::string& worker_id, const std::string& task_id,
                const std::atomic<bool>& stop)
      : stub_(stub), worker_id_(worker_id), task_id_(task_id), stop_(stop) {}

  absl::StatusOr<std::string> Put(std::span<const uint8_t> bytes) override {
    const std::string expected = storage::ChunkIdOf(bytes);
    v1::UploadChunkResponse response;
    const grpc::Status s = CallWithRetry("UploadChunk", stop_, [&] {
      grpc::ClientContext ctx;
      SetTimeout(&ctx, kUploadTimeout);
      std::unique_ptr<grpc::ClientWriter<v1::UploadChunkRequest>> writer = stub_.UploadChunk(&ctx, &response);
      v1::UploadChunkRequest piece;
      piece.set_worker_id(worker_id_);
      piece.set_task_id(task_id_);
      size_t offset = 0;
      do {  // at least one message, so even an empty chunk names its worker and task
        const size_t n = std::min(rpc::kChunkPieceBytes, bytes.size() - offset);
        piece.set_data(bytes.data() + offset, n);
        if (!writer->Write(piece)) break;  // the server ended the call; Finish says why
        piece.clear_worker_id();
        piece.clear_task_id();
        offset += n;
      } while (offset < bytes.size());
      writer->WritesDone();
      return writer->Finish();
    });
    if (!s.ok()) return rpc::FromGrpc(s);
    if (response.chunk_id() != expected) {
      return absl::DataLossError(absl::StrCat("UploadChunk of ", bytes.size(), " bytes returned chunk id '",
                                              response.chunk_id().substr(0, 64), "', the bytes' id is ", expected));
    }
    return expected;
  }

 private:
  v1::WorkerService::Stub& stub_;
  const std::string& worker_id_;
  const std::string& task_id_;
  const std::atomic<bool>& stop_;
};

// ChunkSource over ArtifactService.GetChunk (rpc::FetchChunk checks every chunk's content hash on arrival);
// retries a scheduler that is away like every other call.
class GrpcChunkSource : public ChunkSource {
 public:
  GrpcChunkSource(v1::ArtifactService::Stub& stub, const std::atomic<bool>& stop) : stub_(stub), stop_(stop) {}

  absl::StatusOr<std::vector<uint8_t>> Get(const std::string& chunk_id) override {
    int backoff_ms = kRetryMinMs;
    while (true) {
      absl::StatusOr<std::vector<uint8_t>> bytes = rpc::FetchChunk(stub_, chunk_id);
      const bool retry = absl::IsUnavailable(bytes.status()) || absl::IsDeadlineExceeded(bytes.status());
      if (!retry || stop_) return bytes;
      SleepUnlessStopped(backoff_ms, stop_);
      backoff_ms = std::min(backoff_ms * 2, kRetryMaxMs);
    }
  }

 private:
  v1::ArtifactService::Stub& stub_;
  const std::atomic<bool>& stop_;
};

// Keeps a lease alive while its task runs: a thread that heartbeats at a third of the remaining lease until it
// is destroyed, or until the scheduler says the lease is gone.
class Heartbeater {
 public:
  Heartbeater(v1::WorkerService::Stub& stub, const std::string& worker_id, const std::string& task_id,
              int64_t lease_deadline_unix_ms, bool verbose)
      : stub_(stub), verbose_(verbose), deadline_ms_(lease_deadline_unix_ms) {
    request_.set_worker_id(worker_id);
    request_.set_task_id(task_id);
    thread_ = std::thread([this] { Loop(); });
  }

  ~Heartbeater() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
      if (in_flight_ != nullptr) in_flight_->TryCancel();  // the task is finished; do not wait out the RPC
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      const int64_t wait_ms = std::max(kMinHeartbeatMs, (deadline_ms_ - NowUnixMs()) / 3);
      if (cv_.wait_for(lock, milliseconds(wait_ms), [this] { return done_; })) return;
      grpc::ClientContext ctx;
      SetTimeout(&ctx, kRpcTimeout);
      in_flight_ = &ctx;
      lock.unlock();
      v1::HeartbeatResponse response;
      const grpc::Status s = stub_.Heartbeat(&ctx, request_, &response);
      lock.lock();
      in_flight_ = nullptr;
      if (done_) return;
      if (s.ok()) {
        deadline_ms_ = response.lease_deadline_unix_ms();
      } else if (!Retryable(s)) {
        // FAILED_PRECONDITION (lease lost), CANCELLED / ABORTED (job ended) or anything else that will not get
        // better: stop heartbeating; the task still finishes and completes, which the scheduler ignores or
        // counts as a duplicate.
        const bool lease_gone = s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
                                s.error_code() == grpc::StatusCode::CANCELLED ||
                                s.error_code() == grpc::StatusCode::ABORTED;
        if (verbose_ || !lease_gone) {
          LogLine(absl::StrCat("task ", request_.task_id(), ": heartbeat: ", StatusText(rpc::FromGrpc(s)),
                               "; no more heartbeats for this task"));
        }
        return;
      }
    }
  }

  v1::WorkerService::Stub& stub_;
  v1::HeartbeatRequest request_;
  const bool verbose_;
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t deadline_ms_;                     // guarded by mu_
  bool done_ = false;                       // guarded by mu_
  grpc::ClientContext* in_flight_ = nullptr;  // guarded by mu_
  std::thread thread_;
};

}  // namespace

struct Worker::BusyClock {
  using Clock = std::chrono::steady_clock;
  metrics::Counter* seconds = nullptr;

  void Start() {
    std::lock_guard<std::mutex> l(mu);
    since = Clock::now();
  }
  // Adds the time since the last call to the counter while a task runs.
  void Accrue() {
    std::lock_guard<std::mutex> l(mu);
    AccrueLocked();
  }
  void Stop() {
    std::lock_guard<std::mutex> l(mu);
    AccrueLocked();
    since.reset();
  }

 private:
  void AccrueLocked() {
    if (!since.has_value()) return;
    const Clock::time_point now = Clock::now();
    seconds->Inc(std::chrono::duration<double>(now - *since).count());
    since = now;
  }
  std::mutex mu;
  std::optional<Clock::time_point> since;  // set while a task executes: accounted up to here
};

Worker::Worker(std::shared_ptr<grpc::Channel> channel, WorkerOptions options)
    : stub_(v1::WorkerService::NewStub(channel)),
      artifacts_(v1::ArtifactService::NewStub(channel)),
      options_(std::move(options)),
      executor_(ExecutorOptions{.threads = options_.threads, .allowed_roots = options_.allowed_roots}) {
  if (options_.metrics == nullptr) return;
  auto seconds = options_.metrics->GetCounter("qforge_worker_busy_seconds_total", "Seconds spent executing tasks");
  if (!seconds.ok()) return;
  busy_ = std::make_shared<BusyClock>();
  busy_->seconds = *seconds;
  options_.metrics->AddCollector([busy = busy_](metrics::Registry&) { busy->Accrue(); });
}

Worker::~Worker() {
  if (task_log_fd_ >= 0) ::close(task_log_fd_);
}

void Worker::LogEvent(const std::string& line) {
  if (task_log_fd_ < 0) return;
  // One write(2) on an O_APPEND descriptor: lines from several worker processes never interleave.
  const std::string text = absl::StrCat(line, "\n");
  if (::write(task_log_fd_, text.data(), text.size()) != static_cast<ssize_t>(text.size())) {
    LogLine(absl::StrCat("writing the task log ", options_.task_log_path, ": ", std::strerror(errno)));
  }
}

absl::Status Worker::Register(const std::atomic<bool>& stop) {
  v1::RegisterWorkerRequest request;
  request.set_hostname(options_.name);
  request.set_threads(options_.threads);
  request.set_memory_bytes(options_.memory_bytes);
  v1::RegisterWorkerResponse response;
  const grpc::Status s = CallWithRetry("RegisterWorker", stop, [&] {
    grpc::ClientContext ctx;
    SetTimeout(&ctx, kRpcTimeout);
    return stub_->RegisterWorker(&ctx, request, &response);
  });
  if (s.ok()) {
    worker_id_ = response.worker_id();
    if (options_.verbose) LogLine(absl::StrCat("registered as ", worker_id_));
    return absl::OkStatus();
  }
  if (Retryable(s)) return absl::OkStatus();  // stopped while the scheduler was away
  return absl::Status(rpc::FromGrpc(s).code(), absl::StrCat("RegisterWorker: ", s.error_message()));
}

absl::Status Worker::Run(const std::atomic<bool>& stop) {
  if (!options_.task_log_path.empty() && task_log_fd_ < 0) {
    task_log_fd_ = ::open(options_.task_log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (task_log_fd_ < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot open the task log ", options_.task_log_path, ": ", std::strerror(errno)));
    }
  }
  int idle_ms = kIdleMinMs;
  while (!stop) {
    if (worker_id_.empty()) {
      if (absl::Status s = Register(stop); !s.ok()) return s;
      continue;
    }
    v1::LeaseTaskRequest request;
    request.set_worker_id(worker_id_);
    v1::LeaseTaskResponse lease;
    const grpc::Status s = CallWithRetry("LeaseTask", stop, [&] {
      grpc::ClientContext ctx;
      SetTimeout(&ctx, kRpcTimeout);
      return stub_->LeaseTask(&ctx, request, &lease);
    });
    if (!s.ok()) {
      if (Retryable(s)) continue;  // stopped while the scheduler was away
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        // A restarted scheduler has forgotten its workers (registrations are not persisted).
        if (options_.verbose) LogLine(absl::StrCat("LeaseTask: ", s.error_message(), "; registering again"));
        worker_id_.clear();
        continue;
      }
      return absl::Status(rpc::FromGrpc(s).code(), absl::StrCat("LeaseTask: ", s.error_message()));
    }
    if (!lease.available()) {
      SleepUnlessStopped(idle_ms, stop);
      idle_ms = std::min(idle_ms * 2, std::max(kIdleMinMs, options_.max_idle_poll_ms));
      continue;
    }
    RunTask(lease, stop);  // even when stop came during the lease: the task is ours now
    idle_ms = kIdleMinMs;
  }
  return absl::OkStatus();
}

void Worker::RunTask(const v1::LeaseTaskResponse& lease, const std::atomic<bool>& stop) {
  const v1::Task& task = lease.task();
  LogEvent(absl::StrCat("lease ", task.task_id(), " ", KindName(task.kind()), " ", ::getpid()));
  const auto start = std::chrono::steady_clock::now();
  if (busy_) busy_->Start();

  v1::CompleteTaskRequest done;
  done.set_worker_id(worker_id_);
  done.set_task_id(task.task_id());
  absl::Status result;
  {
    const Heartbeater heartbeat(*stub_, worker_id_, task.task_id(), lease.lease_deadline_unix_ms(), options_.verbose);
    GrpcChunkSink sink(*stub_, worker_id_, task.task_id(), stop);
    GrpcChunkSource artifacts(*artifacts_, stop);
    result = executor_.Execute(task, sink, &done, &artifacts);
  }
  if (busy_) busy_->Stop();
  if (!result.ok()) {
    LogLine(absl::StrCat("task ", Describe(task), " failed: ", StatusText(result)));
    CountTask(task, "failed", done);
    Fail(task, StatusText(result), stop);
    return;
  }

  v1::CompleteTaskResponse response;
  const grpc::Status s = CallWithRetry("CompleteTask", stop, [&] {
    grpc::ClientContext ctx;
    SetTimeout(&ctx, kRpcTimeout);
    return stub_->CompleteTask(&ctx, done, &response);
  });
  CountTask(task, s.ok() ? (response.duplicate() ? "duplicate" : "committed") : "rejected", done);
  if (s.ok()) {
    ++tasks_completed_;
    LogEvent(absl::StrCat(response.duplicate() ? "duplicate " : "commit ", task.task_id(), " ", ::getpid()));
    if (options_.verbose) {
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      LogLine(absl::StrFormat("task %s: %s in %.2f s", Describe(task),
                              response.duplicate() ? "duplicate" : "committed", seconds));
    }
    return;
  }
  if (Retryable(s)) {
    LogLine(absl::StrCat("task ", Describe(task), ": CompleteTask: ", s.error_message(),
                         "; stopping, the lease will expire"));
    return;
  }
  const std::string error = absl::StrCat("CompleteTask rejected the result: ", StatusText(rpc::FromGrpc(s)));
  LogLine(absl::StrCat("task ", Describe(task), ": ", error));
  Fail(task, error, stop);
}

void Worker::CountTask(const v1::Task& task, const std::string& outcome, const v1::CompleteTaskRequest& done) {
  if (options_.metrics == nullptr) return;
  metrics::Registry& m = *options_.metrics;
  if (auto c = m.GetCounter("qforge_worker_tasks_total", "Tasks this worker ran, by kind and outcome",
                            {{"kind", KindName(task.kind())}, {"outcome", outcome}});
      c.ok()) {
    (*c)->Inc();
  }
  uint64_t bytes = 0;
  for (const v1::StoredTensor& t : done.outputs()) bytes += t.nbytes();
  if (auto c = m.GetCounter("qforge_worker_output_bytes_total", "Bytes of tensors this worker encoded and uploaded");
      c.ok()) {
    (*c)->Inc(static_cast<double>(bytes));
  }
  for (const v1::TensorReport& r : done.tensors()) {
    if (auto c = m.GetCounter("qforge_worker_input_bytes_total", "fp32 bytes of the weights this worker quantized");
        c.ok()) {
      (*c)->Inc(static_cast<double>(r.bytes_before()));
    }
  }
}

void Worker::Fail(const v1::Task& task, const std::string& error, const std::atomic<bool>& stop) {
  v1::FailTaskRequest request;
  request.set_worker_id(worker_id_);
  request.set_task_id(task.task_id());
  request.set_error(error);
  v1::FailTaskResponse response;
  const grpc::Status s = CallWithRetry("FailTask", stop, [&] {
    grpc::ClientContext ctx;
    SetTimeout(&ctx, kRpcTimeout);
    return stub_->FailTask(&ctx, request, &response);
  });
  // Nothing more to do either way: an unreported failure comes back when the lease expires.
  if (!s.ok()) LogLine(absl::StrCat("task ", task.task_id(), ": FailTask: ", StatusText(rpc::FromGrpc(s))));
}

}  // namespace qforge::workers
