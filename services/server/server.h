// qforge-server: quantized models behind gRPC (InferenceService, grpc.health.v1, reflection) and HTTP (an
// OpenAI-compatible /v1/completions and /v1/chat/completions with server-sent events, /v1/models, llama.cpp-style
// /tokenize, /detokenize and /health, /healthz, and Prometheus /metrics).
// docs/serving.md describes the endpoints, the metrics and the cost model.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "services/http/http_server.h"
#include "services/metrics/energy.h"
#include "services/metrics/process_metrics.h"
#include "services/metrics/registry.h"
#include "services/server/model_registry.h"

namespace qforge::server {

struct ServerOptions {
  RegistryOptions registry;
  // The scheduler whose ArtifactService holds the stored versions ("" = files only). `store_channel` (set by
  // embedded mode) takes precedence over the address.
  std::string store_address;
  std::shared_ptr<grpc::Channel> store_channel;
  std::string grpc_address = "127.0.0.1:7701";
  std::string http_address = "127.0.0.1";
  int http_port = 7702;  // 0 picks a free port
  int http_threads = 8;
  // Power: the estimate used where RAPL / NVML cannot be read (watts while the engines compute).
  double estimate_watts = 65;
  // Cost model: price of one GiB of accelerator / host memory for one hour.
  double price_per_gib_hour = 0.005;
};

class InferenceServer {
 public:
  static absl::StatusOr<std::unique_ptr<InferenceServer>> Start(ServerOptions options);
  ~InferenceServer();

  int grpc_port() const { return grpc_port_; }
  int http_port() const;
  ModelRegistry& registry() { return *registry_; }
  metrics::Registry& metrics() { return metrics_; }

  // Stops taking new requests (health NOT_SERVING, new calls UNAVAILABLE), lets in-flight streams finish for up
  // to `grace_ms`, then stops both servers.
  void Shutdown(int64_t grace_ms = 10000);
  void Wait();

  class Impl;

 private:
  InferenceServer() = default;
  metrics::Registry metrics_;
  std::unique_ptr<ModelRegistry> registry_;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<grpc::Server> grpc_;
  std::unique_ptr<http::HttpServer> http_;
  int grpc_port_ = 0;
};

}  // namespace qforge::server
