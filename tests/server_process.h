// A qforge-server *process* for the end-to-end tests (tests/serving_test.cc, tests/chat_test.cc): started on free
// ports with --port-file, reached over gRPC and HTTP, killed and reaped when it goes away.
#pragma once

#include <signal.h>
#include <sys/wait.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "qforge/v1/inference.grpc.pb.h"
#include "services/rpc/rpc_util.h"
#include "tests/cluster.h"

namespace qforge::testing {

namespace v1 = qforge::v1;

// A qforge-server process; killed and reaped on destruction.
class ServerProcess {
 public:
  ServerProcess(const std::string& dir, std::vector<std::string> args) : dir_(dir) {
    const std::string port_file = dir + "/server.ports";
    std::vector<std::string> argv = {QFORGE_SERVER_PATH, "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0",
                                     "--port-file", port_file, "--threads", "2"};
    argv.insert(argv.end(), args.begin(), args.end());
    pid_ = Spawn(argv, dir + "/server.log");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (!std::filesystem::exists(port_file) && std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid_, nullptr, WNOHANG) != 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::istringstream(ReadFile(port_file)) >> grpc_port_ >> http_port_;
    EXPECT_GT(grpc_port_, 0) << ReadFile(dir + "/server.log");
    channel_ = rpc::MakeChannel("127.0.0.1:" + std::to_string(grpc_port_));
    stub_ = v1::InferenceService::NewStub(channel_);
    health_ = grpc::health::v1::Health::NewStub(channel_);
  }
  ~ServerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  // SIGTERM; returns the exit status.
  int Stop() {
    kill(pid_, SIGTERM);
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = 0;
    return status;
  }
  v1::InferenceService::Stub& stub() { return *stub_; }
  int http_port() const { return http_port_; }
  std::string log() const { return ReadFile(dir_ + "/server.log"); }

  // LoadModel of a stored version (`name`, `version`) with a tokenizer file.
  grpc::Status LoadStored(const std::string& name, const std::string& version, const std::string& tokenizer_path,
                          v1::LoadModelResponse* loaded) {
    grpc::ClientContext ctx;
    v1::LoadModelRequest load;
    load.mutable_model()->set_name(name);
    load.mutable_model()->set_version(version);
    load.set_tokenizer_path(tokenizer_path);
    return stub_->LoadModel(&ctx, load, loaded);
  }

  grpc::health::v1::HealthCheckResponse::ServingStatus Health() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckRequest req;
    grpc::health::v1::HealthCheckResponse resp;
    if (!health_->Check(&ctx, req, &resp).ok()) return grpc::health::v1::HealthCheckResponse::UNKNOWN;
    return resp.status();
  }

  struct Stream {
    grpc::Status status;
    std::vector<v1::GenerateResponse> messages;
    std::string text;
    std::vector<int> tokens;
  };
  Stream Generate(const v1::GenerateRequest& req, int stop_after_messages = -1) {
    Stream s;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    auto reader = stub_->Generate(&ctx, req);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      s.messages.push_back(r);
      s.text += r.text();
      s.tokens.insert(s.tokens.end(), r.token_ids().begin(), r.token_ids().end());
      if (stop_after_messages > 0 && static_cast<int>(s.messages.size()) >= stop_after_messages) {
        ctx.TryCancel();  // the client goes away mid-stream
        break;
      }
    }
    s.status = reader->Finish();
    return s;
  }

 private:
  std::string dir_;
  pid_t pid_ = 0;
  int grpc_port_ = 0, http_port_ = 0;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::InferenceService::Stub> stub_;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_;
};

// The "data: X" payloads of a server-sent-event body, in order ("data: X\n\n" -> X).
inline std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  for (size_t pos = 0; (pos = body.find("data: ", pos)) != std::string::npos;) {
    const size_t end = body.find("\n\n", pos);
    out.push_back(body.substr(pos + 6, end - pos - 6));
    pos = end;
  }
  return out;
}

}  // namespace qforge::testing
