// qforge-scheduler: the scheduler process (JobService, WorkerService, ArtifactService over one artifact store).
#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_split.h"
#include "services/cli/flags.h"
#include "services/rpc/rpc_util.h"
#include "services/scheduler/scheduler_service.h"

namespace {

constexpr char kUsage[] =
    "usage: qforge-scheduler --store DIR [--listen HOST:PORT] [--allowed-roots DIR[,DIR...]]\n"
    "                        [--lease-ms N] [--max-attempts N] [--max-task-mib N] [--metrics HOST:PORT]\n"
    "                        [--port-file FILE]\n"
    "  --store DIR          the RocksDB artifact store (created if missing); every job's state lives there\n"
    "  --listen HOST:PORT   where to serve gRPC (default 127.0.0.1:7700; port 0 picks a free one)\n"
    "  --allowed-roots      source models must resolve under one of these directories (default: anywhere)\n"
    "  --lease-ms N         a task's lease without a heartbeat (default 30000)\n"
    "  --max-attempts N     failures + expired leases of one task before its job fails (default 3)\n"
    "  --max-task-mib N     split tensors larger than this into row slices (default 256)\n"
    "  --metrics HOST:PORT  serve Prometheus /metrics and /healthz over HTTP there (port 0 picks a free one)\n"
    "  --port-file FILE     write \"GRPC_PORT METRICS_PORT\" to FILE once serving (for scripts and tests)\n";

int Fail(absl::string_view message, int code) { return qforge::cli::PrintError("qforge-scheduler", message, code); }

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && (args[0] == "--help" || args[0] == "help")) {
    std::cout << kUsage;
    return 0;
  }
  auto flags = qforge::cli::Flags::Parse(
      args, {"store", "listen", "allowed-roots", "lease-ms", "max-attempts", "max-task-mib", "port-file", "metrics"}, {});
  if (!flags.ok()) return Fail(flags.status().message(), 2);
  if (!flags->positional().empty()) return Fail("unexpected argument '" + flags->positional()[0] + "'", 2);
  if (flags->Get("store").empty()) return Fail("--store DIR is required", 2);
  qforge::services::SchedulerServiceOptions options;
  const std::string roots = flags->Get("allowed-roots");
  if (!roots.empty()) options.allowed_roots = absl::StrSplit(roots, ',', absl::SkipEmpty());
  auto lease = flags->GetInt("lease-ms", 30000, 100, 3600000);
  auto attempts = flags->GetInt("max-attempts", 3, 1, 255);
  auto task_mib = flags->GetInt("max-task-mib", 256, 1, 65536);
  for (const auto* s : {&lease.status(), &attempts.status(), &task_mib.status()}) {
    if (!s->ok()) return Fail(std::string(s->message()), 2);
  }
  options.scheduler.lease_ms = *lease;
  options.scheduler.max_attempts = *attempts;
  options.max_task_bytes = uint64_t(*task_mib) << 20;

  qforge::cli::StopSignals stop_signals;  // before any thread starts

  auto server = qforge::services::SchedulerServer::Open(flags->Get("store"), options);
  if (!server.ok()) return Fail(server.status().message(), 1);
  auto port = (*server)->Start(flags->Get("listen", "127.0.0.1:7700"));
  if (!port.ok()) return Fail(port.status().message(), 1);
  int metrics_port = 0;
  if (flags->Has("metrics")) {
    auto where = qforge::rpc::SplitHostPort(flags->Get("metrics"), "--metrics");
    if (!where.ok()) return Fail(where.status().message(), 2);
    auto bound = (*server)->StartMetrics(where->first, where->second);
    if (!bound.ok()) return Fail(bound.status().message(), 1);
    metrics_port = *bound;
  }
  if (const std::string pf = flags->Get("port-file"); !pf.empty()) {
    // Written to a temporary name and renamed, so a reader never sees a half-written number.
    const std::string tmp = pf + ".tmp";
    std::ofstream(tmp) << *port << " " << metrics_port << "\n";
    if (std::rename(tmp.c_str(), pf.c_str()) != 0) return Fail("cannot write --port-file " + pf, 1);
  }
  std::cerr << "qforge-scheduler: serving on port " << *port << ", store " << flags->Get("store") << "\n";
  const int sig = stop_signals.Wait();
  std::cerr << "qforge-scheduler: stopping (signal " << sig << ")\n";
  (*server)->Shutdown(5000);
  (*server)->Wait();
  return 0;
}
