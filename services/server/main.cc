// qforge-server: serves quantized models over gRPC and HTTP (see services/server/server.h).
#include <signal.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <tuple>

#include "absl/strings/str_split.h"
#include "services/cli/flags.h"
#include "services/rpc/rpc_util.h"
#include "services/server/server.h"

namespace {

constexpr char kUsage[] =
    "usage: qforge-server [--grpc HOST:PORT] [--http HOST:PORT] [--scheduler HOST:PORT]\n"
    "                     [--model NAME=PATH[,NAME=PATH...]] [--tokenizer FILE] [--memory-budget-mib N]\n"
    "                     [--threads N] [--max-running N] [--max-queue N] [--context N] [--no-prefix-cache]\n"
    "                     [--estimate-watts W] [--price-per-gib-hour P] [--port-file FILE] [--adapter-root DIR]\n"
    "  --grpc             InferenceService, grpc.health.v1 and reflection (default 127.0.0.1:7701)\n"
    "  --http             /v1/completions and /v1/chat/completions (OpenAI), /v1/models, /tokenize,\n"
    "                     /detokenize, /health, /healthz, /metrics (default 127.0.0.1:7702)\n"
    "  --scheduler        where stored versions (NAME@VERSION) are read from (ArtifactService)\n"
    "  --model            files to load at start, each as NAME@file; --tokenizer gives them a vocabulary\n"
    "  --memory-budget-mib  weights of all loaded models together; least recently used unload first\n"
    "  --max-running      sequences batched together per model; --max-queue: waiting requests before\n"
    "                     RESOURCE_EXHAUSTED\n"
    "  --no-prefix-cache  feed every prompt whole (by default a request reuses the KV cache of a finished\n"
    "                     request on the same model and adapter sharing its longest prompt prefix)\n"
    "  --estimate-watts   power assumed while computing where RAPL / NVML cannot be read\n"
    "  --price-per-gib-hour  memory price for the cost metrics\n"
    "  --adapter-root     POST /v1/adapters reads LoRA adapters (GGUF, PEFT directories) only under DIR\n"
    "  --port-file        write \"GRPC_PORT HTTP_PORT\" once serving (scripts and tests)\n";

int Fail(absl::string_view message, int code) { return qforge::cli::PrintError("qforge-server", message, code); }

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "help")) {
    std::cout << kUsage;
    return 0;
  }
  auto flags = qforge::cli::Flags::Parse(args,
                                         {"grpc", "http", "scheduler", "model", "tokenizer", "memory-budget-mib",
                                          "threads", "max-running", "max-queue", "context", "estimate-watts",
                                          "price-per-gib-hour", "port-file", "adapter-root"},
                                         {"no-prefix-cache"});
  if (!flags.ok()) return Fail(flags.status().message(), 2);
  if (!flags->positional().empty()) return Fail("unexpected argument '" + flags->positional()[0] + "'", 2);
  qforge::server::ServerOptions options;
  options.grpc_address = flags->Get("grpc", options.grpc_address);
  auto http = qforge::rpc::SplitHostPort(flags->Get("http", "127.0.0.1:7702"), "--http");
  if (!http.ok()) return Fail(http.status().message(), 2);
  std::tie(options.http_address, options.http_port) = *http;
  options.store_address = flags->Get("scheduler");
  auto budget = flags->GetInt("memory-budget-mib", 0, 0, 1 << 30);
  auto threads = flags->GetInt("threads", 0, 0, 1024);
  auto running = flags->GetInt("max-running", 32, 1, 4096);
  auto queue = flags->GetInt("max-queue", 256, 0, 1 << 20);
  auto context = flags->GetInt("context", 0, 0, 1 << 24);
  auto watts = flags->GetDouble("estimate-watts", options.estimate_watts, 0, 1e6);
  auto price = flags->GetDouble("price-per-gib-hour", options.price_per_gib_hour, 0, 1e6);
  for (const absl::Status* s : {&budget.status(), &threads.status(), &running.status(), &queue.status(),
                                &context.status(), &watts.status(), &price.status()}) {
    if (!s->ok()) return Fail(std::string(s->message()), 2);
  }
  options.registry.memory_budget_bytes = uint64_t(*budget) << 20;
  options.registry.engine.threads = *threads;
  options.registry.engine.max_running = *running;
  options.registry.engine.max_queue = *queue;
  options.registry.engine.context = *context;
  options.registry.engine.prefix_cache = !flags->GetBool("no-prefix-cache");
  options.registry.adapter_root = flags->Get("adapter-root");
  options.estimate_watts = *watts;
  options.price_per_gib_hour = *price;

  qforge::cli::StopSignals stop_signals;  // before any thread starts

  auto server = qforge::server::InferenceServer::Start(options);
  if (!server.ok()) return Fail(server.status().message(), 1);
  for (const std::string& spec : std::vector<std::string>(absl::StrSplit(flags->Get("model"), ',', absl::SkipEmpty()))) {
    const size_t eq = spec.find('=');
    if (eq == std::string::npos) return Fail("--model takes NAME=PATH, got '" + spec + "'", 2);
    auto lm = (*server)->registry().Load(spec.substr(0, eq), "file", spec.substr(eq + 1), flags->Get("tokenizer"));
    if (!lm.ok()) return Fail(lm.status().message(), 1);
    std::cerr << "qforge-server: loaded " << (*lm)->ref() << " (" << (*lm)->encoding << ", " << (*lm)->weight_bytes
              << " bytes)\n";
  }
  if (const std::string pf = flags->Get("port-file"); !pf.empty()) {
    const std::string tmp = pf + ".tmp";
    std::ofstream(tmp) << (*server)->grpc_port() << " " << (*server)->http_port() << "\n";
    if (std::rename(tmp.c_str(), pf.c_str()) != 0) return Fail("cannot write --port-file " + pf, 1);
  }
  std::cerr << "qforge-server: gRPC on port " << (*server)->grpc_port() << ", HTTP on port " << (*server)->http_port()
            << "\n";
  const int sig = stop_signals.Wait();
  std::cerr << "qforge-server: stopping (signal " << sig << "), finishing in-flight streams\n";
  (*server)->Shutdown(10000);
  (*server)->Wait();
  return 0;
}
