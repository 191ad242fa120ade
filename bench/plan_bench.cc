// Plan-and-schedule throughput for a described (not loaded) SwitchTransformer-class MoE: describe, plan, submit,
// then dispatch every task to simulated workers (lease -> complete) in one thread. docs/scheduler.md records the
// results.
//
// --method=qmoe plans the experts with the real qmoe method (attention q8_0) and then, after the scheduler's
// memory has been measured, quantizes one sample matrix of each expert shape with the actual QmoeMethod (random
// Gaussian weights, the Hessian of random Gaussian calibration inputs): its bits/weight at that row width give
// the predicted output size (a prediction from a sample: qmoe's size depends on the data), its time per
// parameter the modelled task durations of a fleet simulation over the plan's DAG (makespan per worker count).
//
// Flags: --layers N --experts N --dim N --hidden N --slice_mib N --workers N --store=discard|memory
//        --method=rtn|qmoe --sample_rows N (0: the whole matrix) --sample_threads N --calib_tokens N
//        --calibrate_per_block=0|1 --fleet=1,10,100,...
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <queue>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "core/base/half.h"
#include "core/base/thread_pool.h"
#include "core/calib/stats.h"
#include "core/quant/quant_method.h"
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

// xorshift64* with an Irwin-Hall(4) approximate unit Gaussian (as bench/gptq_bench.cc): the sample needs tens of
// millions of draws in seconds, and Gaussian-shaped values, not exact normality.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 0x2545F4914F6CDD1DULL;
  }
  float Uniform() { return static_cast<float>(Next() >> 40) * (1.0f / 16777216.0f); }
  float Gauss() { return (Uniform() + Uniform() + Uniform() + Uniform() - 2.0f) * 1.7320508f; }
};

// One expert-shaped matrix quantized by a real method: what its bytes and time say per parameter.
struct CodecSample {
  std::string method;
  int64_t rows = 0, cols = 0;
  int64_t tokens = 0;          // calibration inputs behind the Hessian (0: none)
  double hessian_s = 0;        // StatsAccumulator over tokens x cols
  double quantize_s = 0;       // QuantMethod::Quantize, the whole of a worker's compute for this matrix
  size_t bytes = 0;
  double zero_fraction = -1;   // qmoe: p0 of the dictionary the codec chose (header zero_code)
  double BitsPerWeight() const { return 8.0 * static_cast<double>(bytes) / static_cast<double>(rows * cols); }
  double SecondsPerParam() const { return quantize_s / static_cast<double>(rows * cols); }
};

// Weights ~ N(0, 1/cols) (an initialisation-scale matrix), calibration inputs ~ N(0, 1), so H = 2/n XᵀX is the
// identity up to Marchenko-Pastur spread (n = 2 cols: eigenvalues within about [0.09, 2.9] of the mean).
absl::StatusOr<CodecSample> MeasureMethod(const std::string& method_name, int64_t rows, int64_t cols,
                                          int64_t tokens, int threads, uint64_t seed) {
  const qforge::quant::QuantMethod* method = qforge::quant::FindMethod(method_name);
  if (method == nullptr) return absl::NotFoundError("no method " + method_name);
  CodecSample s;
  s.method = method_name;
  s.rows = rows;
  s.cols = cols;
  Rng rng{seed};
  std::vector<float> w(static_cast<size_t>(rows * cols));
  const float sigma = 1.0f / std::sqrt(static_cast<float>(cols));
  for (float& v : w) v = sigma * rng.Gauss();
  std::optional<qforge::calib::LayerStats> stats;
  if (method->NeedsCalibration()) {
    s.tokens = tokens;
    auto t0 = std::chrono::steady_clock::now();
    qforge::calib::StatsAccumulator acc(cols);
    constexpr int64_t kPanel = 1024;
    std::vector<float> x(static_cast<size_t>(kPanel * cols));
    for (int64_t done = 0; done < tokens; done += kPanel) {
      const int64_t n = std::min(kPanel, tokens - done);
      for (int64_t i = 0; i < n * cols; ++i) x[i] = rng.Gauss();
      acc.Add(x.data(), n);
    }
    stats = acc.Finish();
    s.hessian_s = Seconds(t0);
  }
  qforge::ThreadPool pool(threads);
  auto t0 = std::chrono::steady_clock::now();
  auto bytes = method->Quantize(w.data(), rows, cols, method->DefaultParams(), &pool, stats ? &*stats : nullptr);
  s.quantize_s = Seconds(t0);
  if (!bytes.ok()) return bytes.status();
  s.bytes = bytes->size();
  // kQMoE header: u32 magic | u8 version | u8 zero_code (tensor.h QmoeLayout); p0 = (zero_code + 0.5) / 256.
  if (method_name == "qmoe" && bytes->size() > 5) s.zero_fraction = ((*bytes)[5] + 0.5) / 256.0;
  return s;
}

void PrintSample(const CodecSample& s) {
  std::printf("sample %s [%lld, %lld]: %.4f bits/weight (%zu bytes)", s.method.c_str(),
              static_cast<long long>(s.rows), static_cast<long long>(s.cols), s.BitsPerWeight(), s.bytes);
  if (s.zero_fraction >= 0) std::printf(", codec p0 %.3f", s.zero_fraction);
  if (s.tokens > 0) std::printf(", Hessian of %lld tokens %.2f s", static_cast<long long>(s.tokens), s.hessian_s);
  std::printf(", quantize %.2f s = %.3g s/param\n", s.quantize_s, s.SecondsPerParam());
}

// List scheduling of the plan's DAG on `workers` identical workers, as the scheduler dispatches it: a task is
// ready once every dependency finished, ready tasks are taken oldest first (FIFO), a free worker takes the next
// ready one at once (no RPC, transfer or lease overhead). Returns the makespan in seconds.
double SimulateFleet(const qs::Plan& plan, const std::vector<double>& duration_s, int64_t workers) {
  const size_t n = plan.tasks.size();
  std::vector<uint32_t> pending(n), dependent_offsets(n + 1, 0), dependents(plan.deps.size());
  for (uint32_t t = 0; t < n; ++t) {
    pending[t] = static_cast<uint32_t>(plan.DepsOf(t).size());
    for (uint32_t d : plan.DepsOf(t)) ++dependent_offsets[d + 1];
  }
  for (size_t t = 0; t < n; ++t) dependent_offsets[t + 1] += dependent_offsets[t];
  std::vector<uint32_t> fill(dependent_offsets.begin(), dependent_offsets.end() - 1);
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t d : plan.DepsOf(t)) dependents[fill[d]++] = t;
  }
  std::deque<uint32_t> ready;
  for (uint32_t t = 0; t < n; ++t) {
    if (pending[t] == 0) ready.push_back(t);
  }
  using Event = std::pair<double, uint32_t>;  // (finish time, task)
  std::priority_queue<Event, std::vector<Event>, std::greater<>> running;
  double now = 0;
  int64_t idle = workers;
  size_t finished = 0;
  while (finished < n) {
    while (idle > 0 && !ready.empty()) {
      running.push({now + duration_s[ready.front()], ready.front()});
      ready.pop_front();
      --idle;
    }
    if (running.empty()) return -1;  // a cycle or an unreachable task: ValidatePlan forbids both
    const auto [at, t] = running.top();
    running.pop();
    now = at;
    ++idle;
    ++finished;
    for (uint32_t k = dependent_offsets[t]; k < dependent_offsets[t + 1]; ++k) {
      if (--pending[dependents[k]] == 0) ready.push_back(dependents[k]);
    }
  }
  return now;
}

std::string Human(double s) {
  char buf[64];
  if (s < 120) std::snprintf(buf, sizeof buf, "%.1f s", s);
  else if (s < 7200) std::snprintf(buf, sizeof buf, "%.1f min", s / 60);
  else if (s < 3 * 86400) std::snprintf(buf, sizeof buf, "%.1f h", s / 3600);
  else std::snprintf(buf, sizeof buf, "%.1f days", s / 86400);
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  qs::MoEShape shape;
  uint64_t slice_mib = 256;
  int n_workers = 1000;
  std::string store_kind = "discard", method = "rtn";
  int64_t sample_rows = 0, sample_threads = 2, calib_tokens = 64 * 256, per_block = 0;
  std::vector<int64_t> fleet = {1, 10, 100, 1000, 10000, 100000};
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
        flag("--workers", &n_workers) || flag("--sample_rows", &sample_rows) ||
        flag("--sample_threads", &sample_threads) || flag("--calib_tokens", &calib_tokens) ||
        flag("--calibrate_per_block", &per_block)) {
      continue;
    }
    if (std::strncmp(argv[i], "--store=", 8) == 0) {
      store_kind = argv[i] + 8;
      continue;
    }
    if (std::strncmp(argv[i], "--method=", 9) == 0) {
      method = argv[i] + 9;
      continue;
    }
    if (std::strncmp(argv[i], "--fleet=", 8) == 0) {
      fleet.clear();
      for (absl::string_view part : absl::StrSplit(argv[i] + 8, ',')) {
        int64_t v = 0;
        if (!absl::SimpleAtoi(part, &v) || v <= 0) {
          std::fprintf(stderr, "bad --fleet value %s\n", argv[i]);
          return 2;
        }
        fleet.push_back(v);
      }
      continue;
    }
    std::fprintf(stderr, "unknown flag %s\n", argv[i]);
    return 2;
  }
  if (method != "rtn" && method != "qmoe") {
    std::fprintf(stderr, "--method must be rtn or qmoe, got %s\n", method.c_str());
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
  std::string recipe_text;
  if (method == "rtn") {
    recipe.method = "rtn";
    recipe.params = qforge::quant::QuantParams{4, 128, true, false};
    recipe_text = "rtn 4-bit g128";
  } else {
    // The experts qmoe (one whole-tensor task each: its rows are variable-length), attention q8_0; the router,
    // norms and embeddings are copied in the source precision (what the planner targets).
    recipe.method = "q8_0";
    for (const char* p : {"blk.*.ffn_gate.*.weight", "blk.*.ffn_up.*.weight", "blk.*.ffn_down.*.weight"}) {
      recipe.layers.push_back({p, "qmoe", std::nullopt});
    }
    recipe_text = "experts qmoe, attention q8_0";
  }
  qs::PlanOptions po;
  po.max_task_input_bytes = slice_mib << 20;
  po.calibrate_per_block = per_block != 0;
  t0 = std::chrono::steady_clock::now();
  auto plan = qs::PlanJob(*std::move(desc), recipe, po);
  if (!plan.ok()) {
    std::fprintf(stderr, "%s\n", plan.status().ToString().c_str());
    return 1;
  }
  const double t_plan = Seconds(t0);
  const size_t n_tasks = plan->tasks.size();
  // qmoe's size is known only after encoding (its planned format has 0 codewords), so the planner's output bytes
  // count only the fixed part of qmoe tensors; the prediction below replaces them.
  std::printf("plan (%s, slices <= %llu MiB): %zu tasks, %zu edges, %.3f s (%.0f tasks/s), plan %.1f MiB "
              "(%.0f B/task), input %.3f TB -> planned output %.3f TB%s, peak RSS %.1f MiB\n",
              recipe_text.c_str(), static_cast<unsigned long long>(slice_mib), n_tasks, plan->deps.size(), t_plan,
              n_tasks / t_plan, plan->MemoryBytes() / 1048576.0, static_cast<double>(plan->MemoryBytes()) / n_tasks,
              plan->total_input_bytes / 1e12, plan->total_output_bytes / 1e12,
              method == "qmoe" ? " (qmoe codewords not counted)" : "", PeakRssKib() / 1024.0);

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
  if (p.state != qs::JobState::kSucceeded) return 1;
  if (method != "qmoe") return 0;

  // ---- The codec on samples (after the scheduler's memory was measured: the samples' buffers are not its) ----
  const qs::Plan& planned = *sched->PlanOf(job);
  const int64_t dim = shape.dim, hidden = shape.expert_hidden_dim;
  openblas_set_num_threads(static_cast<int>(sample_threads));
  std::vector<CodecSample> samples;
  // gate/up [hidden, dim] and down [dim, hidden]: the row widths differ, and with them qmoe's per-row overhead
  // and GPTQ's cost per parameter (~cols), so each shape gets its own sample.
  for (const auto& [rows, cols] : {std::pair{hidden, dim}, std::pair{dim, hidden}}) {
    const int64_t r = sample_rows > 0 ? std::min(sample_rows, rows) : rows;
    auto s = MeasureMethod("qmoe", r, cols, 2 * cols, static_cast<int>(sample_threads), 0x9E3779B97F4A7C15ULL + cols);
    if (!s.ok()) {
      std::fprintf(stderr, "qmoe sample [%lld, %lld]: %s\n", static_cast<long long>(r), static_cast<long long>(cols),
                   s.status().ToString().c_str());
      return 1;
    }
    PrintSample(*s);
    samples.push_back(*s);
  }
  auto q8 = MeasureMethod("q8_0", dim, dim, 0, static_cast<int>(sample_threads), 7);
  if (!q8.ok()) return 1;
  PrintSample(*q8);
  auto qmoe_sample = [&](int64_t cols) -> const CodecSample* {
    for (const CodecSample& s : samples) {
      if (s.cols == cols) return &s;
    }
    return nullptr;
  };

  // ---- Predicted output: params x measured bits for qmoe tensors, exact bytes for the rest ----
  double expert_bytes = 0, other_quantized_bytes = 0, copied_bytes = 0;
  int64_t expert_params = 0;
  std::vector<bool> targeted(planned.model.tensors.size(), false);
  std::vector<double> duration(planned.tasks.size(), 0.0);
  for (size_t t = 0; t < planned.tasks.size(); ++t) {
    const qs::PlanTask& k = planned.tasks[t];
    if (k.kind != qs::TaskKind::kQuantize) continue;
    const qs::TensorDesc& td = planned.model.tensors[k.tensor];
    targeted[k.tensor] = true;
    const int64_t params = static_cast<int64_t>(k.row_end - k.row_begin) * td.cols;
    const qs::QuantConfig& c = planned.configs[k.config];
    if (c.format.type == qforge::WeightType::kQMoE) {
      const CodecSample* s = qmoe_sample(td.cols);
      if (s == nullptr) {
        std::fprintf(stderr, "no qmoe sample with row length %lld\n", static_cast<long long>(td.cols));
        return 1;
      }
      expert_bytes += static_cast<double>(params) * s->BitsPerWeight() / 8.0;
      expert_params += params;
      duration[t] = static_cast<double>(params) * s->SecondsPerParam();
    } else {
      other_quantized_bytes += static_cast<double>(*qforge::EncodedBytes(c.format, k.row_end - k.row_begin, td.cols));
      duration[t] = static_cast<double>(params) * q8->SecondsPerParam();
    }
  }
  for (size_t i = 0; i < planned.model.tensors.size(); ++i) {
    if (!targeted[i]) copied_bytes += static_cast<double>(planned.model.tensors[i].source_bytes);
  }
  const double total = expert_bytes + other_quantized_bytes + copied_bytes;
  std::printf("predicted output (qmoe bits measured on the samples above, everything else exact): experts %.2f GB "
              "(%.4g params at %.4f bits/param), attention q8_0 %.2f GB, copied in source precision (embeddings, "
              "router, norms) %.2f GB; total %.2f GB (%s 160 GB), %.4f bits/param over the model\n",
              expert_bytes / 1e9, static_cast<double>(expert_params), 8.0 * expert_bytes / expert_params,
              other_quantized_bytes / 1e9, copied_bytes / 1e9, total / 1e9, total <= 160e9 ? "<=" : "ABOVE",
              8.0 * total / static_cast<double>(planned.model.ParameterCount()));

  // ---- Fleet simulation over the real plan ----
  // Calibration is modelled, not measured: the Hessian accumulation of calib_tokens routed top-1 through each
  // block (q/k/v and attention output see dim inputs, one expert's gate/up dim, its down hidden), at the
  // accumulator's rate measured on the samples (seconds per token x cols²). The forward pass itself is not
  // counted: a lower bound.
  double accumulate_s_per_token_col2 = 0;
  for (const CodecSample& s : samples) {
    accumulate_s_per_token_col2 = std::max(accumulate_s_per_token_col2,
                                           s.hessian_s / (static_cast<double>(s.tokens) * s.cols * s.cols));
  }
  const double block_calibrate_s = static_cast<double>(calib_tokens) *
                                   (3.0 * dim * dim + static_cast<double>(hidden) * hidden) *
                                   accumulate_s_per_token_col2;
  double quantize_total_s = 0;
  for (size_t t = 0; t < planned.tasks.size(); ++t) {
    const qs::PlanTask& k = planned.tasks[t];
    if (k.kind == qs::TaskKind::kQuantize) quantize_total_s += duration[t];
    if (k.kind == qs::TaskKind::kCalibrate) {
      duration[t] = k.layer < 0 ? block_calibrate_s * shape.n_layers : block_calibrate_s;
    }
  }
  std::printf("fleet model: quantize tasks %.4g s of worker time in all (%s at %lld threads); calibrate %s: %.1f s "
              "per block (%lld tokens, Hessians only); assemble 0 s\n",
              quantize_total_s, Human(quantize_total_s).c_str(), static_cast<long long>(sample_threads),
              po.calibrate_per_block ? "one task per block, chained" : "one task for the whole model",
              block_calibrate_s, static_cast<long long>(calib_tokens));
  std::vector<double> no_calibration = duration;
  for (size_t t = 0; t < planned.tasks.size(); ++t) {
    if (planned.tasks[t].kind == qs::TaskKind::kCalibrate) no_calibration[t] = 0;
  }
  std::printf("%10s  %14s  %14s  %14s  %s\n", "workers", "makespan", "w/o calibrate", "ideal W/N", "tasks/s needed");
  for (int64_t w : fleet) {
    t0 = std::chrono::steady_clock::now();
    const double m = SimulateFleet(planned, duration, w);
    const double m0 = SimulateFleet(planned, no_calibration, w);
    std::printf("%10lld  %14s  %14s  %14s  %.3g   (simulated in %.2f s)\n", static_cast<long long>(w),
                Human(m).c_str(), Human(m0).c_str(), Human(quantize_total_s / static_cast<double>(w)).c_str(),
                static_cast<double>(n_tasks) / m0, Seconds(t0));
  }
  return 0;
}
