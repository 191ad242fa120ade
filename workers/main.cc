// qforge-worker: leases tasks from a qforge scheduler and runs them until SIGTERM / SIGINT, which let the current
// task finish and complete before the process exits 0.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_split.h"
#include "services/cli/flags.h"
#include "services/http/http_server.h"
#include "services/metrics/process_metrics.h"
#include "services/rpc/rpc_util.h"
#include "workers/worker.h"

namespace {

constexpr char kUsage[] =
    "usage: qforge-worker --scheduler HOST:PORT [--threads N] [--allowed-roots DIR[,DIR...]] [--name NAME]\n"
    "                     [--task-log FILE] [--metrics HOST:PORT] [--verbose]\n"
    "  --scheduler HOST:PORT    the scheduler's WorkerService\n"
    "  --threads N              threads per task (default: every core)\n"
    "  --allowed-roots DIRS     read source models only under these directories (default: anywhere)\n"
    "  --name NAME              the name shown to the scheduler (default: the hostname)\n"
    "  --task-log FILE          append 'lease' / 'commit' / 'duplicate' lines per task (for tests)\n"
    "  --metrics HOST:PORT      serve Prometheus /metrics there (tasks, bytes, busy time)\n"
    "  --verbose                one line per task on stderr\n";

std::atomic<bool> g_stop{false};

void OnSignal(int) { g_stop.store(true); }

std::string Hostname() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "unknown";
  return name;
}

int64_t PhysicalMemoryBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page_size = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page_size > 0 ? static_cast<int64_t>(pages) * page_size : 0;
}

absl::StatusOr<qforge::workers::WorkerOptions> ParseOptions(const std::vector<std::string>& args,
                                                           std::string* scheduler, std::string* metrics) {
  using qforge::cli::UsageError;
  auto flags = qforge::cli::Flags::Parse(args, {"scheduler", "threads", "allowed-roots", "name", "task-log", "metrics"},
                                         {"verbose"});
  if (!flags.ok()) return flags.status();
  if (!flags->positional().empty()) return UsageError("unexpected argument '" + flags->positional()[0] + "'");
  *scheduler = flags->Get("scheduler");
  if (scheduler->empty()) return UsageError("--scheduler HOST:PORT is required");
  qforge::workers::WorkerOptions options;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto threads = flags->GetInt("threads", cores, 1, 1024);
  if (!threads.ok()) return threads.status();
  options.threads = *threads;
  if (flags->Has("allowed-roots")) {
    options.allowed_roots = absl::StrSplit(flags->Get("allowed-roots"), ',', absl::SkipEmpty());
    if (options.allowed_roots.empty()) return UsageError("--allowed-roots names no directory");
  }
  options.name = flags->Get("name", Hostname());
  options.task_log_path = flags->Get("task-log");
  options.verbose = flags->GetBool("verbose");
  options.memory_bytes = PhysicalMemoryBytes();
  *metrics = flags->Get("metrics");
  return options;
}

int Die(const absl::Status& status, int code) { return qforge::cli::PrintError("qforge-worker", status.message(), code); }

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  for (const std::string& a : args) {
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      return 0;
    }
  }
  std::string scheduler, metrics_address;
  auto options = ParseOptions(args, &scheduler, &metrics_address);
  if (!options.ok()) return Die(options.status(), 2);
  // Optional Prometheus endpoint: task counts, bytes, busy time, process memory.
  qforge::metrics::Registry metrics;
  qforge::http::HttpServer metrics_http;
  if (!metrics_address.empty()) {
    auto where = qforge::rpc::SplitHostPort(metrics_address, "--metrics");
    if (!where.ok()) return Die(where.status(), 2);
    qforge::metrics::RegisterProcessCollectors(metrics, nullptr);
    metrics_http.Route("GET", "/metrics", [&metrics](const qforge::http::Request&, qforge::http::ResponseWriter& w) {
      w.Send(200, qforge::metrics::kTextContentType, metrics.Render());
    });
    qforge::http::HttpServerOptions http_options;
    http_options.address = where->first;
    http_options.port = where->second;
    if (absl::Status s = metrics_http.Start(http_options); !s.ok()) return Die(s, 1);
    options->metrics = &metrics;
    std::cerr << "qforge-worker: metrics on port " << metrics_http.port() << "\n";
  }

  struct sigaction action {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGTERM, &action, nullptr);
  ::sigaction(SIGINT, &action, nullptr);

  qforge::workers::Worker worker(qforge::rpc::MakeChannel(scheduler), *std::move(options));
  const absl::Status status = worker.Run(g_stop);
  metrics_http.Shutdown();
  if (!status.ok()) return Die(status, 1);
  return 0;
}
