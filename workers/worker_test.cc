#include "workers/worker.h"

#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "workers/test_util.h"

namespace qforge::workers {
namespace {

namespace v1 = qforge::v1;
using ::testing::HasSubstr;
using ::testing::StartsWith;

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// A WorkerService that hands out a fixed list of tasks and records what the worker sends. Like a scheduler
// coming back from a restart, it first answers UNAVAILABLE, then NOT_FOUND for the worker id it issued.
class FakeWorkerService final : public v1::WorkerService::Service {
 public:
  static constexpr int64_t kLeaseMs = 900;

  explicit FakeWorkerService(std::vector<v1::Task> tasks) : tasks_(std::move(tasks)) {}

  // Uploads for these tasks take this long (heartbeats must keep the lease meanwhile).
  std::set<std::string> slow_upload_tasks;
  // Heartbeats for this task answer FAILED_PRECONDITION (the lease was lost).
  std::string lease_lost_task;
  // CompleteTask for this task answers duplicate.
  std::string duplicate_task;

  grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* response) override {
    std::lock_guard<std::mutex> lock(mu);
    registrations.push_back(*request);
    worker_id_ = absl::StrCat("w", registrations.size());
    response->set_worker_id(worker_id_);
    return grpc::Status::OK;
  }

  grpc::Status LeaseTask(grpc::ServerContext*, const v1::LeaseTaskRequest* request,
                         v1::LeaseTaskResponse* response) override {
    std::lock_guard<std::mutex> lock(mu);
    if (++lease_calls_ == 1) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "restarting");
    if (lease_calls_ == 2) worker_id_.clear();  // the restart forgot every worker
    if (request->worker_id() != worker_id_ || worker_id_.empty()) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown worker");
    }
    if (next_ == tasks_.size()) {
      ++idle_polls;
      return grpc::Status::OK;
    }
    response->set_available(true);
    *response->mutable_task() = tasks_[next_++];
    response->set_lease_deadline_unix_ms(NowUnixMs() + kLeaseMs);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override {
    std::lock_guard<std::mutex> lock(mu);
    ++heartbeats[request->task_id()];
    if (request->task_id() == lease_lost_task) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "lease lost");
    response->set_lease_deadline_unix_ms(NowUnixMs() + kLeaseMs);
    return grpc::Status::OK;
  }

  grpc::Status UploadChunk(grpc::ServerContext*, grpc::ServerReader<v1::UploadChunkRequest>* reader,
                           v1::UploadChunkResponse* response) override {
    v1::UploadChunkRequest piece;
    std::string task_id;
    std::vector<uint8_t> bytes;
    for (int i = 0; reader->Read(&piece); ++i) {
      if ((i == 0) == piece.task_id().empty() || (i == 0) == piece.worker_id().empty()) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ids belong in the first message only");
      }
      if (i == 0) task_id = piece.task_id();
      if (piece.data().size() > rpc::kChunkPieceBytes) {
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "piece too large");
      }
      bytes.insert(bytes.end(), piece.data().begin(), piece.data().end());
      std::lock_guard<std::mutex> lock(mu);
      max_pieces = std::max(max_pieces, i + 1);
    }
    bool slow = false;
    {
      std::lock_guard<std::mutex> lock(mu);
      slow = slow_upload_tasks.erase(task_id) > 0;
    }
    if (slow) std::this_thread::sleep_for(std::chrono::milliseconds(1000));
    const std::string id = storage::ChunkIdOf(bytes);
    std::lock_guard<std::mutex> lock(mu);
    chunks[id] = std::move(bytes);
    uploaded[task_id].insert(id);
    response->set_chunk_id(id);
    response->set_size(chunks[id].size());
    return grpc::Status::OK;
  }

  grpc::Status CompleteTask(grpc::ServerContext*, const v1::CompleteTaskRequest* request,
                            v1::CompleteTaskResponse* response) override {
    std::lock_guard<std::mutex> lock(mu);
    completions.push_back(*request);
    response->set_duplicate(request->task_id() == duplicate_task);
    return grpc::Status::OK;
  }

  grpc::Status FailTask(grpc::ServerContext*, const v1::FailTaskRequest* request, v1::FailTaskResponse*) override {
    std::lock_guard<std::mutex> lock(mu);
    failures.push_back(*request);
    return grpc::Status::OK;
  }

  size_t Reported() {
    std::lock_guard<std::mutex> lock(mu);
    return completions.size() + failures.size();
  }
  int IdlePolls() {
    std::lock_guard<std::mutex> lock(mu);
    return idle_polls;
  }

  std::mutex mu;
  std::vector<v1::RegisterWorkerRequest> registrations;
  std::map<std::string, int> heartbeats;
  std::map<std::string, std::vector<uint8_t>> chunks;
  std::map<std::string, std::set<std::string>> uploaded;  // task id -> chunk ids uploaded for it
  std::vector<v1::CompleteTaskRequest> completions;
  std::vector<v1::FailTaskRequest> failures;
  int max_pieces = 0;
  int idle_polls = 0;

 private:
  std::vector<v1::Task> tasks_;
  size_t next_ = 0;
  int lease_calls_ = 0;
  std::string worker_id_;
};

TEST(WorkerTest, RunsLeasedTasksAndStopsWhenAsked) {
  const std::string dir = testing::TempDir("worker_loop");
  const std::string path = dir + "/model.gguf";
  ModelConfig config = Q4kTestConfig();
  config.vocab_size = 2560;  // token_embd is 2.5 MiB of f32: an upload of three pieces
  testing::WriteTestModel(path, config, 11);

  const quant::QuantParams q8 = quant::FindMethod("q8_0")->DefaultParams();
  const quant::QuantParams q4k = quant::FindMethod("q4_k")->DefaultParams();
  std::vector<v1::Task> tasks = {
      testing::QuantizeTask(path, "blk.0.attn_q.weight", 0, 100, 256, "q8_0", q8),
      testing::QuantizeTask(path, "blk.0.attn_q.weight", 100, 256, 256, "q8_0", q8),
      testing::QuantizeTask(path, "blk.1.ffn_down.weight", 0, 256, 768, "q4_k", q4k),
      testing::QuantizeTask(path, "blk.0.ffn_up.weight", 0, 64, 256, "q8_0", q8),
  };
  tasks[3].set_format("q4_0");  // the worker must refuse it and report why
  v1::Task assemble;
  assemble.set_kind(v1::TASK_KIND_ASSEMBLE);
  assemble.set_source_uri(path);
  assemble.add_tensor_names("token_embd.weight");
  assemble.add_tensor_names("output_norm.weight");
  tasks.push_back(assemble);
  for (size_t i = 0; i < tasks.size(); ++i) tasks[i].set_task_id(absl::StrCat("1/", i));

  FakeWorkerService service(tasks);
  service.slow_upload_tasks = {"1/0", "1/1"};
  service.lease_lost_task = "1/1";
  service.duplicate_task = "1/2";
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  rpc::ConfigureServer(builder);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  const std::string task_log = dir + "/tasks.log";
  WorkerOptions options;
  options.name = "test-host";
  options.threads = 2;
  options.allowed_roots = {dir};
  options.max_idle_poll_ms = 50;
  options.task_log_path = task_log;
  options.memory_bytes = 1 << 30;
  Worker worker(rpc::MakeChannel(absl::StrCat("127.0.0.1:", port)), options);
  std::atomic<bool> stop{false};
  absl::Status run_status = absl::UnknownError("Run did not return");
  std::thread runner([&] { run_status = worker.Run(stop); });
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (service.Reported() < tasks.size() && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  while (service.IdlePolls() < 2 && std::chrono::steady_clock::now() < give_up) {  // idle polling goes on
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  const auto stop_at = std::chrono::steady_clock::now();
  stop = true;
  runner.join();
  EXPECT_LT(std::chrono::steady_clock::now() - stop_at, std::chrono::seconds(2));
  ASSERT_TRUE(run_status.ok()) << run_status;
  server->Shutdown();

  // Registered again after the scheduler forgot it; everything after that under the new id.
  ASSERT_EQ(service.registrations.size(), 2u);
  EXPECT_EQ(service.registrations[1].hostname(), "test-host");
  EXPECT_EQ(service.registrations[1].threads(), 2);
  EXPECT_EQ(service.registrations[1].memory_bytes(), 1 << 30);

  // Every task but the refused one completed exactly once, with the executor's bytes, all of them uploaded for
  // that task.
  EXPECT_EQ(worker.tasks_completed(), 4);
  std::map<std::string, v1::Task> by_id;
  for (const v1::Task& task : tasks) by_id[task.task_id()] = task;
  std::map<std::string, int> completed;
  for (const v1::CompleteTaskRequest& done : service.completions) {
    SCOPED_TRACE(done.task_id());
    ++completed[done.task_id()];
    EXPECT_EQ(done.worker_id(), "w2");
    const v1::Task& task = by_id.at(done.task_id());
    testing::MapSink sink;
    v1::CompleteTaskRequest expected;
    TaskExecutor executor({});
    ASSERT_TRUE(executor.Execute(task, sink, &expected).ok());
    ASSERT_EQ(done.outputs_size(), expected.outputs_size());
    for (int i = 0; i < done.outputs_size(); ++i) {
      EXPECT_EQ(done.outputs(i).name(), expected.outputs(i).name());
      EXPECT_EQ(done.outputs(i).format(), expected.outputs(i).format());
      EXPECT_EQ(done.outputs(i).nbytes(), expected.outputs(i).nbytes());
      ASSERT_EQ(done.outputs(i).chunk_ids_size(), expected.outputs(i).chunk_ids_size());
      for (int c = 0; c < done.outputs(i).chunk_ids_size(); ++c) {
        const std::string& id = done.outputs(i).chunk_ids(c);
        EXPECT_EQ(id, expected.outputs(i).chunk_ids(c));
        EXPECT_TRUE(service.uploaded[done.task_id()].count(id)) << id;
        EXPECT_EQ(service.chunks[id], sink.chunks[id]);
      }
    }
    EXPECT_EQ(done.config_json(), expected.config_json());
    EXPECT_EQ(done.vocab_chunk_id(), expected.vocab_chunk_id());
    if (!done.vocab_chunk_id().empty()) {
      EXPECT_TRUE(service.chunks.count(done.vocab_chunk_id()));
    }
  }
  EXPECT_EQ(completed, (std::map<std::string, int>{{"1/0", 1}, {"1/1", 1}, {"1/2", 1}, {"1/4", 1}}));
  EXPECT_EQ(service.max_pieces, 3);

  ASSERT_EQ(service.failures.size(), 1u);
  EXPECT_EQ(service.failures[0].task_id(), "1/3");
  EXPECT_THAT(service.failures[0].error(), StartsWith("FAILED_PRECONDITION: "));
  EXPECT_THAT(service.failures[0].error(), HasSubstr("q4_0"));

  // Heartbeats kept the slow task's lease (900 ms, every ~300 ms over a 1 s upload); a lost lease stopped them.
  EXPECT_GE(service.heartbeats["1/0"], 2);
  EXPECT_EQ(service.heartbeats["1/1"], 1);

  std::ifstream log(task_log);
  std::vector<std::string> lines;
  for (std::string line; std::getline(log, line);) lines.push_back(line);
  const std::string pid = absl::StrCat(::getpid());
  EXPECT_EQ(lines, (std::vector<std::string>{
                       "lease 1/0 quantize " + pid, "commit 1/0 " + pid,
                       "lease 1/1 quantize " + pid, "commit 1/1 " + pid,
                       "lease 1/2 quantize " + pid, "duplicate 1/2 " + pid,
                       "lease 1/3 quantize " + pid,
                       "lease 1/4 assemble " + pid, "commit 1/4 " + pid,
                   }));
}

// The value of an unlabelled sample in Registry::Render's text; -1 when it is absent.
double SampleValue(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + name.size() + 2));
}

TEST(WorkerTest, BusySecondsAdvanceWhileATaskRunsAndStopWhenIdle) {
  const std::string dir = testing::TempDir("worker_busy");
  const std::string path = dir + "/model.gguf";
  testing::WriteTestModel(path, Q4kTestConfig(), 11);
  std::vector<v1::Task> tasks = {testing::QuantizeTask(path, "blk.0.attn_q.weight", 0, 256, 256, "q8_0",
                                                       quant::FindMethod("q8_0")->DefaultParams())};
  tasks[0].set_task_id("1/0");
  FakeWorkerService service(tasks);
  service.slow_upload_tasks = {"1/0"};  // the task takes over a second, inside Execute
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  rpc::ConfigureServer(builder);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);

  metrics::Registry registry;
  WorkerOptions options;
  options.name = "test-host";
  options.allowed_roots = {dir};
  options.max_idle_poll_ms = 50;
  options.metrics = &registry;
  Worker worker(rpc::MakeChannel(absl::StrCat("127.0.0.1:", port)), options);
  // Exported before any task, so a utilisation query has a series for an idle worker.
  EXPECT_EQ(SampleValue(registry.Render(), "qforge_worker_busy_seconds_total"), 0);

  std::atomic<bool> stop{false};
  std::thread runner([&] { EXPECT_TRUE(worker.Run(stop).ok()); });
  // Scraped while the task is still running (not yet reported), busy time has already accrued.
  double busy_mid_task = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (service.Reported() == 0 && std::chrono::steady_clock::now() < give_up) {
    const double busy = SampleValue(registry.Render(), "qforge_worker_busy_seconds_total");
    if (service.Reported() == 0) busy_mid_task = std::max(busy_mid_task, busy);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(service.Reported(), 1u);
  EXPECT_GT(busy_mid_task, 0.5);
  // Idle afterwards: the counter stands still.
  const double after = SampleValue(registry.Render(), "qforge_worker_busy_seconds_total");
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(SampleValue(registry.Render(), "qforge_worker_busy_seconds_total"), after);
  EXPECT_GE(after, 1.0);
  EXPECT_GE(after, busy_mid_task);
  stop = true;
  runner.join();
  server->Shutdown();
  EXPECT_NE(registry.Render().find("qforge_worker_tasks_total{kind=\"quantize\",outcome=\"committed\"} 1\n"),
            std::string::npos);
}

TEST(WorkerTest, StopsWhileTheSchedulerIsUnreachable) {
  // Nothing listens on this port (bound, then closed); Run keeps retrying until stop.
  int port = 0;
  {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    FakeWorkerService unused({});
    builder.RegisterService(&unused);
    builder.BuildAndStart()->Shutdown();
  }
  WorkerOptions options;
  options.name = "test-host";
  Worker worker(rpc::MakeChannel(absl::StrCat("127.0.0.1:", port)), options);
  std::atomic<bool> stop{false};
  absl::Status run_status = absl::UnknownError("Run did not return");
  std::thread runner([&] { run_status = worker.Run(stop); });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  stop = true;
  runner.join();
  EXPECT_TRUE(run_status.ok()) << run_status;
  EXPECT_EQ(worker.tasks_completed(), 0);
}

TEST(WorkerTest, UnopenableTaskLogIsAnError) {
  WorkerOptions options;
  options.task_log_path = "/nonexistent-dir/tasks.log";
  Worker worker(rpc::MakeChannel("127.0.0.1:1"), options);
  std::atomic<bool> stop{false};
  const absl::Status s = worker.Run(stop);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_THAT(s.message(), HasSubstr("/nonexistent-dir/tasks.log"));
}

}  // namespace
}  // namespace qforge::workers
