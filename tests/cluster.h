// A scheduler and worker *processes* on 127.0.0.1 for the end-to-end tests: real binaries, real sockets, real
// SIGKILLs. Every process is killed and reaped when the Cluster goes away.
#pragma once

#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "qforge/v1/jobs.grpc.pb.h"
#include "services/rpc/rpc_util.h"

namespace qforge::testing {

// A fresh, empty directory for one test process: /tmp/qforge-<name>-<pid>.
inline std::string TempDir(const std::string& name) {
  const std::string dir =
      (std::filesystem::temp_directory_path() / ("qforge-" + name + "-" + std::to_string(getpid()))).string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// The shared stories260K checkpoint, canonical as the scheduler resolves it (the path is recorded in the model's
// metadata, source.path), and its candidate tokenizer.
// Called during static initialisation (test discovery), so a missing shared/ must not throw: the path is then
// returned as given and the tests that open it fail naming it.
inline std::string Stories260KPath() {
  const std::string path = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
  std::error_code ec;
  const std::filesystem::path canonical = std::filesystem::canonical(path, ec);
  return ec ? path : canonical.string();
}
inline std::string Tok512Path() {
  return std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model";
}

// A port that was free a moment ago (bound, read, released). The scheduler is restarted on the same port, so
// the workers find it again, which rules out "port 0".
inline int PickFreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  socklen_t len = sizeof(addr);
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

// fork + exec with stdout and stderr appended to `log`.
inline pid_t Spawn(const std::vector<std::string>& argv, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::fopen(log.c_str(), "a");
    if (f != nullptr) {
      dup2(fileno(f), 1);
      dup2(fileno(f), 2);
    }
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  return pid;
}

inline std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Runs `program` to completion with its output in `log`; returns what it printed (stdout and stderr).
inline std::string RunToCompletion(const std::vector<std::string>& argv, const std::string& log,
                                   int* exit_code = nullptr) {
  std::filesystem::remove(log);
  const pid_t pid = Spawn(argv, log);
  int status = 0;
  waitpid(pid, &status, 0);
  if (exit_code != nullptr) *exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return ReadFile(log);
}

// One line of the workers' task log: "lease <task> <kind> <pid>", "commit <task> <pid>", "duplicate <task> <pid>".
struct TaskEvent {
  std::string what, task, kind;
  int pid = 0;
};

inline std::vector<TaskEvent> ParseTaskLog(const std::string& text) {
  std::vector<TaskEvent> events;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    TaskEvent e;
    fields >> e.what >> e.task;
    if (e.what == "lease") fields >> e.kind;
    fields >> e.pid;
    if (!e.task.empty()) events.push_back(e);
  }
  return events;
}

class Cluster {
 public:
  struct Options {
    std::vector<std::string> allowed_roots;
    int lease_ms = 2000;
    int max_attempts = 3;
  };

  Cluster(std::string dir, Options options) : dir_(std::move(dir)), options_(std::move(options)) {
    std::filesystem::create_directories(dir_);
    port_ = PickFreePort();
  }
  ~Cluster() {
    for (auto& [name, pid] : pids_) {
      if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
      }
    }
  }

  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }
  int scheduler_metrics_port() const { return metrics_port_; }
  std::string store_dir() const { return dir_ + "/store"; }
  std::string task_log() const { return dir_ + "/tasks.log"; }

  // Starts (or restarts) the scheduler on the cluster's port and waits until it answers.
  void StartScheduler() {
    const std::string port_file = dir_ + "/port";
    std::filesystem::remove(port_file);
    std::vector<std::string> argv = {QFORGE_SCHEDULER_PATH, "--store", store_dir(), "--listen", address(),
                                     "--port-file", port_file, "--metrics", "127.0.0.1:0",
                                     "--lease-ms", std::to_string(options_.lease_ms),
                                     "--max-attempts", std::to_string(options_.max_attempts)};
    if (!options_.allowed_roots.empty()) {
      std::string roots;
      for (const std::string& r : options_.allowed_roots) roots += (roots.empty() ? "" : ",") + r;
      argv.insert(argv.end(), {"--allowed-roots", roots});
    }
    pids_["scheduler"] = Spawn(argv, dir_ + "/scheduler.log");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!std::filesystem::exists(port_file)) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "scheduler did not start: " << ReadFile(dir_ + "/scheduler.log");
      int status = 0;
      ASSERT_EQ(waitpid(pids_["scheduler"], &status, WNOHANG), 0) << "scheduler exited: " << ReadFile(dir_ + "/scheduler.log");
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    int grpc_port = 0;
    std::istringstream(ReadFile(port_file)) >> grpc_port >> metrics_port_;
    channel_ = rpc::MakeChannel(address());
    jobs_ = qforge::v1::JobService::NewStub(channel_);
    artifacts_ = qforge::v1::ArtifactService::NewStub(channel_);
  }

  // `metrics_port` > 0 also serves the worker's /metrics there.
  void StartWorker(const std::string& name, int threads = 1, int metrics_port = 0) {
    std::vector<std::string> argv = {QFORGE_WORKER_PATH, "--scheduler", address(), "--threads", std::to_string(threads),
                                     "--name", name, "--task-log", task_log()};
    if (metrics_port > 0) argv.insert(argv.end(), {"--metrics", "127.0.0.1:" + std::to_string(metrics_port)});
    if (!options_.allowed_roots.empty()) {
      std::string roots;
      for (const std::string& r : options_.allowed_roots) roots += (roots.empty() ? "" : ",") + r;
      argv.insert(argv.end(), {"--allowed-roots", roots});
    }
    pids_[name] = Spawn(argv, dir_ + "/" + name + ".log");
  }

  pid_t pid(const std::string& name) { return pids_[name]; }

  // SIGKILL: no clean-up, no flush, exactly like a crashed machine's process.
  void Kill(const std::string& name) {
    const pid_t pid = pids_[name];
    ASSERT_GT(pid, 0) << name;
    kill(pid, SIGKILL);
    waitpid(pid, nullptr, 0);
    pids_[name] = 0;
  }

  // SIGTERM and wait: a graceful stop.
  void Stop(const std::string& name) {
    const pid_t pid = pids_[name];
    ASSERT_GT(pid, 0) << name;
    kill(pid, SIGTERM);
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << name << " did not stop cleanly";
    pids_[name] = 0;
  }

  qforge::v1::JobService::Stub& jobs() { return *jobs_; }
  qforge::v1::ArtifactService::Stub& artifacts() { return *artifacts_; }

  grpc::Status Submit(const qforge::v1::SubmitJobRequest& req, std::string* job_id) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    qforge::v1::SubmitJobResponse resp;
    grpc::Status s = jobs_->SubmitJob(&ctx, req, &resp);
    *job_id = resp.job_id();
    return s;
  }

  grpc::Status GetJob(const std::string& job_id, qforge::v1::Job* job) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    qforge::v1::GetJobRequest req;
    req.set_job_id(job_id);
    return jobs_->GetJob(&ctx, req, job);
  }

  // Polls until the job is no longer running (a scheduler being restarted answers UNAVAILABLE meanwhile).
  qforge::v1::Job WaitJob(const std::string& job_id, int timeout_s = 300) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
    qforge::v1::Job job;
    while (std::chrono::steady_clock::now() < deadline) {
      if (GetJob(job_id, &job).ok() && job.progress().state() != qforge::v1::JOB_STATE_RUNNING &&
          job.progress().state() != qforge::v1::JOB_STATE_QUEUED) {
        return job;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    ADD_FAILURE() << "job " << job_id << " did not finish in " << timeout_s << " s; last: " << job.DebugString();
    return job;
  }

  // Submits a plain (uncalibrated) quantize job of `source` with `method` as `output_name` and waits for it; the
  // job as it ended (its failure is reported).
  qforge::v1::Job QuantizeAndWait(const std::string& source, const std::string& output_name, const std::string& method) {
    qforge::v1::SubmitJobRequest submit;
    submit.set_source_uri(source);
    submit.set_output_name(output_name);
    submit.mutable_recipe()->mutable_defaults()->set_method(method);
    std::string job_id;
    if (const grpc::Status s = Submit(submit, &job_id); !s.ok()) {
      ADD_FAILURE() << "submit " << source << ": " << s.error_message();
      return {};
    }
    return WaitJob(job_id);
  }

 private:
  std::string dir_;
  Options options_;
  int port_ = 0, metrics_port_ = 0;
  std::map<std::string, pid_t> pids_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<qforge::v1::JobService::Stub> jobs_;
  std::unique_ptr<qforge::v1::ArtifactService::Stub> artifacts_;
};

// Waits until `pred` holds for the cluster's task log, or fails after `timeout_s`; returns the events it saw.
template <typename Pred>
std::vector<TaskEvent> WaitForLog(Cluster& cluster, Pred pred, int timeout_s = 120) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  while (std::chrono::steady_clock::now() < deadline) {
    auto events = ParseTaskLog(ReadFile(cluster.task_log()));
    if (pred(events)) return events;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ADD_FAILURE() << "the task log never reached the expected state";
  return {};
}

}  // namespace qforge::testing
