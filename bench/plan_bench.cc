// Plan-and-schedule throughput for a described (not loaded) SwitchTransformer-class MoE: describe, plan, submit,
// then dispatch every task to simulated workers (lease -> complete) in one thread. docs/scheduler.md records the
// results. Flags: --layers N --experts N --dim N --hidden N --slice_mib N --workers N --store=discard|memory
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "scheduler/job_scheduler.h"
#include "scheduler/model_description.h"
#include "scheduler/plan.h"
#include "scheduler/state_store.h"

namespace qs = qforge::scheduler;

namespace {

// Peak resident set (VmHWM) in KiB.
long PeakRssKib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  }
  return -1;
}

// Acknowledges every write and keeps nothing: measures the scheduler alone (the RocksDB store has its own bench).
class DiscardingStore : public qs::SchedulerStateStore {
 public:
  absl::Status PutJob(qs::JobId, const std::string& plan, int64_t) override {
    plan_bytes = plan.size();
    return absl::OkStatus();
  }
  absl::Status PutTaskResult(qs::JobId, uint32_t, const std::string&) override { return absl::OkStatus(); }
  absl::Status PutJobState(qs::JobId, qs::JobState, const std::string&, int64_t) override { return absl::OkStatus(); }
  absl::StatusOr<std::vector<qs::StoredJob>> LoadAll() override { return std::vector<qs::StoredJob>{}; }
  size_t plan_bytes = 0;
};

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  qs::MoEShape shape;
  uint64_t slice_mib = 256;
  int n_workers = 1000;
  std::string store_kind = "discard";
  for (int i = 1; i < argc; ++i) {
    auto flag = [&](const char* name, auto* v) {
      const size_t n = std::strlen(name);
      if (std::strncmp(argv[i], name, n) == 0 && argv[i][n] == '=') {
        *v = static_cast<std::remove_pointer_t<decltype(v)>>(std::stoll(argv[i] + n + 1));
        return true;
      }
      return false;
    };
    if (flag("--layers", &shape.n_layers) || flag("--experts", &shape.n_experts) || flag("--dim", &shape.dim) ||
        flag("--hidden", &shape.expert_hidden_dim) || flag("--slice_mib", &slice_mib) ||
        flag("--workers", &n_workers)) {
      continue;
    }
    if (std::strncmp(argv[i], "--store=", 8) == 0) {
      store_kind = argv[i] + 8;
      continue;
    }
    std::fprintf(stderr, "unknown flag %s\n", argv[i]);
    return 2;
  }
  const long rss0 = PeakRssKib();
  auto t0 = std::chrono::steady_clock::now();
  auto desc = qs::DescribeSyntheticMoE(shape);
  if (!desc.ok()) {
    std::fprintf(stderr, "%s\n", desc.status().ToString().c_str());
    return 1;
  }
  const double t_describe = Seconds(t0);
  std::printf("model: %d blocks x %d experts, dim %d, expert hidden %d: %zu tensors, %.4g parameters, %.3f TB source\n",
              shape.n_layers, shape.n_experts, shape.dim, shape.expert_hidden_dim, desc->tensors.size(),
              static_cast<double>(desc->ParameterCount()), desc->SourceBytes() / 1e12);
  std::printf("describe: %.3f s, %.1f MiB, peak RSS %.1f MiB\n", t_describe, desc->MemoryBytes() / 1048576.0,
              PeakRssKib() / 1024.0);

  qs::JobRecipe recipe;
  recipe.method = "rtn";
  recipe.params = qforge::quant::QuantParams{4, 128, true, false};
  qs::PlanOptions po;
  po.max_task_input_bytes = slice_mib << 20;
  t0 = std::chrono::steady_clock::now();
  auto plan = qs::PlanJob(*std::move(desc), recipe, po);
  if (!plan.ok()) {
    std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  const double t_plan = Seconds(t0);
  const size_t n_tasks = plan->tasks.size();
  std::printf("plan (rtn 4-bit g128, slices <= %llu MiB): %zu tasks, %zu edges, %.3f s (%.0f tasks/s), plan %.1f MiB "
              "(%.0f B/task), input %.3f TB -> output %.3f TB, peak RSS %.1f MiB\n",
              static_cast<unsigned long long>(slice_mib), n_tasks, plan->deps.size(), t_plan, n_tasks / t_plan,
              plan->MemoryBytes() / 1048576.0, static_cast<double>(plan->MemoryBytes()) / n_tasks,
              plan->total_input_bytes / 1e12, plan->total_output_bytes / 1e12, PeakRssKib() / 1024.0);

  DiscardingStore discard;
  qs::InMemoryStateStore memory;
  qs::SchedulerStateStore* store = store_kind == "memory" ? static_cast<qs::SchedulerStateStore*>(&memory) : &discard;
  qs::SchedulerOptions so;
  so.lease_ms = 60'000;
  auto sched = *qs::JobScheduler::Recover(store, so, 0);
  t0 = std::chrono::steady_clock::now();
  const qs::JobId job = *sched->SubmitJob(*std::move(plan), 0);
  const double t_submit = Seconds(t0);
  std::printf("submit (serialize + persist to %s store, build queue): %.3f s, scheduler %.1f MiB, peak RSS %.1f MiB\n",
              store_kind.c_str(), t_submit, sched->MemoryBytes() / 1048576.0, PeakRssKib() / 1024.0);

  // Each simulated worker holds at most one task: per round every worker completes what it holds and leases the
  // next. One simulated millisecond per round.
  std::vector<std::string> ids(n_workers);
  for (int w = 0; w < n_workers; ++w) ids[w] = "worker-" + std::to_string(w);
  std::vector<std::optional<qs::LeasedTask>> held(n_workers);
  size_t dispatched = 0, completed = 0;
  int64_t now = 1;
  size_t peak_sched_bytes = 0;
  t0 = std::chrono::steady_clock::now();
  while (completed < n_tasks) {
    bool progress = false;
    for (int w = 0; w < n_workers; ++w) {
      if (held[w]) {
        auto c = sched->Complete(ids[w], held[w]->ref, "chunk-" + std::to_string(held[w]->ref.task), now);
        if (!c.ok()) return 1;
        ++completed;
        held[w].reset();
        progress = true;
      }
      auto t = sched->Lease(ids[w], now);
      if (!t.ok()) return 1;
      if (t->has_value()) {
        held[w] = std::move(*t);
        ++dispatched;
        progress = true;
      }
    }
    if (now % 64 == 0) peak_sched_bytes = std::max(peak_sched_bytes, sched->MemoryBytes());
    ++now;
    if (!progress) break;
  }
  const double t_dispatch = Seconds(t0);
  peak_sched_bytes = std::max(peak_sched_bytes, sched->MemoryBytes());
  const auto p = *sched->Progress(job, now);
  std::printf("dispatch to %d simulated workers: %zu leases + %zu completions in %.3f s = %.0f tasks/s; job %s "
              "(%llu/%llu); scheduler peak %.1f MiB; peak RSS %.1f MiB (baseline %.1f MiB)\n",
              n_workers, dispatched, completed, t_dispatch, completed / t_dispatch, qs::JobStateName(p.state),
              static_cast<unsigned long long>(p.tasks_done), static_cast<unsigned long long>(p.tasks_total),
              peak_sched_bytes / 1048576.0, PeakRssKib() / 1024.0, rss0 / 1024.0);
  return p.state == qs::JobState::kSucceeded ? 0 : 1;
}
