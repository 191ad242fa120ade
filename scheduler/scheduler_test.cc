#include <cstdio>
#include <filesystem>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "scheduler/job_scheduler.h"
#include "scheduler/model_description.h"
#include "scheduler/plan.h"
#include "scheduler/state_store.h"

namespace qforge::scheduler {
namespace {

using ::testing::HasSubstr;

ModelDescription TinyDescription() {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("qforge_sched_" + std::to_string(::getpid()) + ".gguf")).string();
  const Model m = MakeSyntheticModel(TinyTestConfig(), 7);
  EXPECT_TRUE(formats::WriteGguf(m, path).ok());
  auto d = DescribeModel(path);
  std::remove(path.c_str());
  EXPECT_TRUE(d.ok()) << d.status();
  return *std::move(d);
}

JobRecipe Rtn4() {
  JobRecipe r;
  r.method = "rtn";
  r.params = quant::QuantParams{4, 32, true, false};
  return r;
}

TEST(PlanTest, RealModelOneTaskPerLinearTensorPlusAssemble) {
  const ModelDescription d = TinyDescription();
  EXPECT_EQ(d.file_format, "gguf");
  auto plan = PlanJob(d, Rtn4());
  ASSERT_TRUE(plan.ok()) << plan.status();
  const std::vector<std::string> linear = LinearWeightNames(TinyTestConfig());
  ASSERT_EQ(plan->tasks.size(), linear.size() + 1);
  std::set<std::string> planned;
  for (uint32_t t = 0; t + 1 < plan->tasks.size(); ++t) {
    ASSERT_EQ(plan->tasks[t].kind, TaskKind::kQuantize);
    const TensorDesc& td = plan->model.tensors[plan->tasks[t].tensor];
    EXPECT_EQ(plan->tasks[t].row_begin, 0u);
    EXPECT_EQ(plan->tasks[t].row_end, td.rows);
    planned.insert(std::string(plan->model.name(plan->tasks[t].tensor)));
  }
  EXPECT_EQ(planned, std::set<std::string>(linear.begin(), linear.end()));
  const uint32_t a = static_cast<uint32_t>(plan->tasks.size() - 1);
  EXPECT_EQ(plan->tasks[a].kind, TaskKind::kAssemble);
  EXPECT_EQ(plan->DepsOf(a).size(), linear.size());
}

TEST(PlanTest, RowSlicesKeepTasksUnderTheBudget) {
  const ModelDescription d = TinyDescription();
  PlanOptions o;
  o.max_task_input_bytes = 4096;  // f32 rows of 64 -> 16 rows per slice
  auto plan = PlanJob(d, Rtn4(), o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::map<uint32_t, int64_t> covered;
  for (const PlanTask& t : plan->tasks) {
    if (t.kind != TaskKind::kQuantize) continue;
    EXPECT_LE(t.input_bytes, o.max_task_input_bytes);
    EXPECT_EQ(t.row_begin, covered[t.tensor]);  // contiguous, in order
    covered[t.tensor] = t.row_end;
  }
  for (const auto& [tensor, rows] : covered) EXPECT_EQ(rows, plan->model.tensors[tensor].rows);
  EXPECT_GT(plan->tasks.size(), covered.size() + 1);
}

TEST(PlanTest, ValidationNamesTheField) {
  const ModelDescription d = TinyDescription();
  JobRecipe r = Rtn4();
  r.method = "nope";
  EXPECT_THAT(std::string(PlanJob(d, r).status().message()), HasSubstr("recipe.method"));
  r = Rtn4();
  r.params->bits = 9;
  auto s = PlanJob(d, r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bits"));
  r = Rtn4();
  r.params->group = 48;  // does not divide 64
  r.allow_fallback = false;
  s = PlanJob(d, r).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("group"));
  r.allow_fallback = true;  // falls back per tensor like QuantizeModel
  auto plan = PlanJob(d, r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->configs[plan->tasks[0].config].params.group, 0);
}

TEST(PlanTest, LayerRulesChooseMethodPerTensor) {
  JobRecipe r = Rtn4();
  r.layers.push_back({"blk.*.ffn_down.weight", "q8_0", std::nullopt});
  r.layers.push_back({"blk.1.*", "rtn", quant::QuantParams{8, 32, true, false}});
  auto plan = PlanJob(TinyDescription(), r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (const PlanTask& t : plan->tasks) {
    if (t.kind != TaskKind::kQuantize) continue;
    const std::string name(plan->model.name(t.tensor));
    const QuantConfig& c = plan->configs[t.config];
    if (name.find("ffn_down") != std::string::npos) {
      EXPECT_EQ(c.method, "q8_0") << name;
    } else if (name.rfind("blk.1.", 0) == 0) {
      EXPECT_EQ(c.params.bits, 8) << name;
    } else {
      EXPECT_EQ(c.params.bits, 4) << name;
    }
  }
  r.layers[1].params->bits = 1;
  EXPECT_THAT(std::string(PlanJob(TinyDescription(), r).status().message()), HasSubstr("recipe.layers[1].params"));
  r.layers[1].method = "nope";
  EXPECT_THAT(std::string(PlanJob(TinyDescription(), r).status().message()), HasSubstr("recipe.layers[1].method"));
}

TEST(PlanTest, CalibratedMethodChainsCalibrateTasks) {
  const ModelDescription d = TinyDescription();
  JobRecipe r;
  r.method = "gptq";
  r.params = quant::QuantParams{4, 32, true, false};
  r.calibration_text_uri = "text.txt";
  r.evaluation_text_uri = "eval.txt";
  auto plan = PlanJob(d, r, PlanOptions{.calibrate_per_block = true});
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<uint32_t> calib;
  for (uint32_t t = 0; t < plan->tasks.size(); ++t) {
    const PlanTask& p = plan->tasks[t];
    if (p.kind == TaskKind::kCalibrate) {
      if (!calib.empty()) {
        EXPECT_THAT(plan->DepsOf(t), ::testing::ElementsAre(calib.back()));
      }
      calib.push_back(t);
    } else if (p.kind == TaskKind::kQuantize) {
      EXPECT_THAT(plan->DepsOf(t), ::testing::ElementsAre(calib[static_cast<size_t>(p.layer)]));
    }
  }
  EXPECT_EQ(calib.size(), static_cast<size_t>(TinyTestConfig().n_layers));
  EXPECT_EQ(plan->tasks.back().kind, TaskKind::kEvaluate);
}

// Sequential calibration: calibrate(i) waits for calibrate(i-1) and for every quantize task of block i-1 (it runs
// block i-1's quantized weights); a method without calibration, or a plan without the per-block chain, is refused
// naming the field.
TEST(PlanTest, SequentialCalibrationWaitsForThePreviousBlocksQuantizeTasks) {
  JobRecipe r;
  r.method = "gptq";
  r.params = quant::QuantParams{4, 32, true, false};
  r.sequential_calibration = true;
  auto plan = PlanJob(TinyDescription(), r, PlanOptions{.max_task_input_bytes = 4096, .calibrate_per_block = true});
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<uint32_t> calib;
  std::vector<std::vector<uint32_t>> quantize_of_block(static_cast<size_t>(TinyTestConfig().n_layers));
  for (uint32_t t = 0; t < plan->tasks.size(); ++t) {
    const PlanTask& p = plan->tasks[t];
    if (p.kind == TaskKind::kCalibrate) {
      std::vector<uint32_t> want;
      if (!calib.empty()) {
        want.push_back(calib.back());
        const auto& previous = quantize_of_block[static_cast<size_t>(p.layer - 1)];
        want.insert(want.end(), previous.begin(), previous.end());
        EXPECT_GT(previous.size(), 1u) << "4 KiB slices: several quantize tasks per block";
      }
      EXPECT_THAT(plan->DepsOf(t), ::testing::ElementsAreArray(want)) << plan->Describe(t);
      calib.push_back(t);
    } else if (p.kind == TaskKind::kQuantize && p.layer >= 0) {
      quantize_of_block[static_cast<size_t>(p.layer)].push_back(t);
    }
  }
  EXPECT_EQ(calib.size(), static_cast<size_t>(TinyTestConfig().n_layers));
  auto back = DeserializePlan(SerializePlan(*plan));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->deps, plan->deps);

  EXPECT_THAT(std::string(PlanJob(TinyDescription(), r).status().message()),
              HasSubstr("recipe.sequential_calibration: needs the per-block calibrate chain"));
  r.method = "q8_0";
  r.params.reset();
  EXPECT_THAT(std::string(PlanJob(TinyDescription(), r, PlanOptions{.calibrate_per_block = true}).status().message()),
              HasSubstr("recipe.sequential_calibration: method q8_0 (and every layer rule's) needs no calibration"));
}

// Evaluation text: recipe.evaluation_tasks evaluate tasks after assemble, share i of n each, none before the
// version exists; the count is checked and survives serialization.
TEST(PlanTest, EvaluationIsSharedOverTasksAfterAssemble) {
  JobRecipe r;
  r.method = "q8_0";
  r.evaluation_text_uri = "eval.txt";
  r.evaluation_tasks = 3;
  auto plan = PlanJob(TinyDescription(), r);
  ASSERT_TRUE(plan.ok()) << plan.status();
  const uint32_t n = static_cast<uint32_t>(plan->tasks.size());
  ASSERT_GE(n, 4u);
  const uint32_t assemble = n - 4;
  EXPECT_EQ(plan->tasks[assemble].kind, TaskKind::kAssemble);
  for (uint32_t part = 0; part < 3; ++part) {
    const PlanTask& e = plan->tasks[assemble + 1 + part];
    EXPECT_EQ(e.kind, TaskKind::kEvaluate);
    EXPECT_EQ(e.row_begin, part);
    EXPECT_EQ(e.row_end, 3u);
    EXPECT_THAT(plan->DepsOf(assemble + 1 + part), ::testing::ElementsAre(assemble));
    EXPECT_EQ(plan->Describe(assemble + 1 + part), absl::StrCat("evaluate share ", part, " of 3"));
  }
  auto back = DeserializePlan(SerializePlan(*plan));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tasks.back().row_begin, 2u);
  EXPECT_EQ(back->tasks.back().row_end, 3u);

  r.evaluation_tasks = 0;
  auto bad = PlanJob(TinyDescription(), r);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), ::testing::HasSubstr("recipe.evaluation_tasks"));
}

// What the service plans today: one calibrate task for the whole job (sampled streams need no text), first,
// and every quantize task waits for it; methods with a model transform (awq) calibrate too. A method without
// calibration plans no calibrate task.
TEST(PlanTest, CalibratedJobHasOneCalibrateTaskFirst) {
  const ModelDescription d = TinyDescription();
  for (const char* method : {"gptq", "awq"}) {
    JobRecipe r;
    r.method = method;
    r.params = quant::QuantParams{4, 32, true, false};
    auto plan = PlanJob(d, r, PlanOptions{.max_task_input_bytes = 1024});
    ASSERT_TRUE(plan.ok()) << method << ": " << plan.status();
    ASSERT_EQ(plan->tasks[0].kind, TaskKind::kCalibrate) << method;
    EXPECT_EQ(plan->tasks[0].layer, -1);
    EXPECT_EQ(plan->Describe(0), "calibrate");
    int quantize = 0;
    for (uint32_t t = 1; t < plan->tasks.size(); ++t) {
      EXPECT_NE(plan->tasks[t].kind, TaskKind::kCalibrate) << method << " task " << t;
      if (plan->tasks[t].kind != TaskKind::kQuantize) continue;
      ++quantize;
      EXPECT_THAT(plan->DepsOf(t), ::testing::ElementsAre(0u)) << method << " task " << t;
    }
    EXPECT_GT(quantize, 7 * TinyTestConfig().n_layers) << "the 1 KiB budget should slice tensors";
    EXPECT_TRUE(ValidatePlan(*plan).ok());
  }
  auto plain = PlanJob(d, Rtn4());
  ASSERT_TRUE(plain.ok());
  for (const PlanTask& t : plain->tasks) EXPECT_NE(t.kind, TaskKind::kCalibrate);
}

TEST(PlanTest, SerializationRoundTrips) {
  ModelDescription d = TinyDescription();
  // Every config field survives (a restarted scheduler compares the assemble's config with the plan's).
  d.config.tied_embeddings = !d.config.tied_embeddings;
  d.config.rope_theta = 500000.0f;
  d.config.norm_eps = 1e-6f;
  d.config.n_experts = 8;  // the expert counts too (a restarted scheduler read an MoE plan back as dense)
  d.config.n_experts_used = 2;
  auto plan = PlanJob(d, Rtn4());
  ASSERT_TRUE(plan.ok());
  plan->attachment = std::string("the service's request\0with a NUL", 33);
  const std::string blob = SerializePlan(*plan);
  auto back = DeserializePlan(blob);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->model.config, d.config);
  EXPECT_EQ(back->attachment, plan->attachment);
  EXPECT_EQ(SerializePlan(*back), blob);
  EXPECT_FALSE(DeserializePlan(blob.substr(0, blob.size() - 3)).ok());
}

TEST(PlanTest, SyntheticMoEIsDescribedNotLoaded) {
  MoEShape s;
  s.n_layers = 2;
  s.n_experts = 8;
  s.dim = 256;
  s.expert_hidden_dim = 512;
  s.vocab_size = 1000;
  auto d = DescribeSyntheticMoE(s);
  ASSERT_TRUE(d.ok());
  int32_t layer, expert;
  ParseTensorName("blk.1.ffn_down.7.weight", &layer, &expert);
  EXPECT_EQ(layer, 1);
  EXPECT_EQ(expert, 7);
  auto plan = PlanJob(*d, JobRecipe{});
  ASSERT_TRUE(plan.ok()) << plan.status();
  // Per block: 4 attention matrices + 3 per expert; the router, norms and embeddings are not quantized.
  EXPECT_EQ(plan->tasks.size(), static_cast<size_t>(2 * (4 + 3 * 8) + 1));
  // The default shape is the 1.6T-parameter model.
  MoEShape big;
  const int64_t params = int64_t{big.n_layers} * (4LL * big.dim * big.dim + 3LL * big.n_experts * big.dim *
                                                                               big.expert_hidden_dim);
  EXPECT_GT(params, 1'600'000'000'000LL);
}

// --- the queue ---------------------------------------------------------------------------------------------

struct Fixture {
  InMemoryStateStore store;
  std::unique_ptr<JobScheduler> sched;
  JobId job = 0;
  Plan plan;
  explicit Fixture(SchedulerOptions o = {}, PlanOptions po = {}) {
    plan = *PlanJob(TinyDescription(), Rtn4(), po);
    sched = *JobScheduler::Recover(&store, o, 0);
    job = *sched->SubmitJob(plan, 0);
  }
};

TEST(QueueTest, AssembleOnlyAfterEveryQuantizeTask) {
  Fixture f;
  std::vector<LeasedTask> leased;
  while (true) {
    auto t = f.sched->Lease("w", 1);
    ASSERT_TRUE(t.ok());
    if (!t->has_value()) break;
    EXPECT_EQ((*t)->spec.kind, TaskKind::kQuantize);
    leased.push_back(**t);
  }
  ASSERT_EQ(leased.size(), f.plan.tasks.size() - 1);
  for (size_t i = 0; i < leased.size(); ++i) {
    ASSERT_EQ(*f.sched->Complete("w", leased[i].ref, "r" + std::to_string(i), 2), CompleteOutcome::kCommitted);
    auto next = f.sched->Lease("w", 2);
    ASSERT_TRUE(next.ok());
    EXPECT_EQ(next->has_value(), i + 1 == leased.size());
    if (next->has_value()) {
      EXPECT_EQ((*next)->spec.kind, TaskKind::kAssemble);
      ASSERT_EQ(*f.sched->Complete("w", (*next)->ref, "manifest", 3), CompleteOutcome::kCommitted);
    }
  }
  EXPECT_EQ(f.sched->Progress(f.job, 3)->state, JobState::kSucceeded);
  EXPECT_EQ(*f.sched->ResultRef({f.job, 0}), "r0");
}

TEST(QueueTest, ExpiredLeaseRequeuesAndHeartbeatKeepsItAlive) {
  SchedulerOptions o;
  o.lease_ms = 100;
  o.max_attempts = 5;
  Fixture f(o);
  auto a = *f.sched->Lease("a", 0);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->deadline_ms, 100);
  // Heartbeats every 60 ms keep it alive well past the first deadline.
  for (int64_t t = 60; t <= 600; t += 60) {
    ASSERT_EQ(*f.sched->Heartbeat("a", a->ref, t), t + 100);
    ASSERT_EQ(*f.sched->ExpireLeases(t), 0);
  }
  EXPECT_EQ(f.sched->Heartbeat("b", a->ref, 600).status().code(), absl::StatusCode::kFailedPrecondition);
  // Silence: it expires and goes back to the queue with one attempt counted.
  EXPECT_EQ(*f.sched->ExpireLeases(701), 1);
  EXPECT_EQ(f.sched->Heartbeat("a", a->ref, 702).status().code(), absl::StatusCode::kFailedPrecondition);
  std::optional<LeasedTask> again;
  for (auto t = *f.sched->Lease("b", 702); t.has_value(); t = *f.sched->Lease("b", 702)) {
    if (t->ref == a->ref) again = t;
  }
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->attempt, 1);
}

TEST(QueueTest, DuplicateAndLateCompletionsAreHarmless) {
  SchedulerOptions o;
  o.lease_ms = 10;
  Fixture f(o);
  auto a = *f.sched->Lease("slow", 0);
  ASSERT_EQ(*f.sched->ExpireLeases(20), 1);
  auto b = *f.sched->Lease("fast", 20);
  // The queue is FIFO and the expired task went to the back, so drain until it comes round.
  while (b.has_value() && !(b->ref == a->ref)) b = *f.sched->Lease("fast", 20);
  ASSERT_TRUE(b.has_value());
  // The slow worker finishes first after losing its lease: the first completion wins.
  EXPECT_EQ(*f.sched->Complete("slow", a->ref, "same", 21), CompleteOutcome::kCommitted);
  EXPECT_EQ(*f.sched->Complete("fast", b->ref, "same", 22), CompleteOutcome::kDuplicate);
  EXPECT_EQ(*f.sched->Complete("slow", a->ref, "same", 23), CompleteOutcome::kDuplicate);
  EXPECT_EQ(f.store.CommitCount(f.job, a->ref.task), 1);
  EXPECT_EQ(f.sched->Progress(f.job, 23)->tasks_done, 1u);
  // A stale failure report from the worker that lost the lease changes nothing.
  EXPECT_TRUE(f.sched->Fail("slow", a->ref, "boom", 24).ok());
  EXPECT_EQ(f.sched->Progress(f.job, 24)->state, JobState::kRunning);
  // The metrics counters saw exactly that: one expiry, one commit, two duplicates, no counted failure.
  const QueueCounters c = f.sched->counters();
  EXPECT_EQ(c.expired, 1u);
  EXPECT_EQ(c.committed, 1u);
  EXPECT_EQ(c.duplicates, 2u);
  EXPECT_EQ(c.failed, 0u);
  EXPECT_GE(c.leased, 2u);
}

TEST(QueueTest, TaskCountsFollowTasksThroughTheirStatesAndLeaveFinishedJobsOut) {
  Fixture f;
  const uint64_t quantize = f.plan.tasks.size() - 1;  // the assemble task waits for all of them
  auto counts = [&f] {
    const TaskStateCounts c = f.sched->TaskCounts();
    return std::vector<uint64_t>{c.blocked, c.ready, c.leased, c.done};
  };
  EXPECT_EQ(counts(), (std::vector<uint64_t>{1, quantize, 0, 0}));
  auto a = *f.sched->Lease("w", 1);
  auto b = *f.sched->Lease("w", 1);
  ASSERT_TRUE(a.has_value() && b.has_value());
  EXPECT_EQ(counts(), (std::vector<uint64_t>{1, quantize - 2, 2, 0}));
  ASSERT_EQ(*f.sched->Complete("w", a->ref, "r", 2), CompleteOutcome::kCommitted);
  EXPECT_EQ(counts(), (std::vector<uint64_t>{1, quantize - 2, 1, 1}));
  // A failed attempt puts the task back in the queue.
  ASSERT_TRUE(f.sched->Fail("w", b->ref, "boom", 3).ok());
  EXPECT_EQ(counts(), (std::vector<uint64_t>{1, quantize - 1, 0, 1}));
  // A cancelled job's tasks are no longer anyone's work.
  ASSERT_TRUE(f.sched->CancelJob(f.job, 4).ok());
  EXPECT_EQ(counts(), (std::vector<uint64_t>{0, 0, 0, 0}));
}

TEST(QueueTest, NFailuresFailTheJobWithTheWorkersMessage) {
  SchedulerOptions o;
  o.max_attempts = 3;
  Fixture f(o);
  const TaskRef bad = (*f.sched->Lease("w", 0))->ref;
  ASSERT_TRUE(f.sched->Fail("w", bad, "disk full on /scratch", 0).ok());
  int failures = 1;
  for (int64_t now = 1; failures < 3 && now < 10000; ++now) {
    auto t = *f.sched->Lease("w", now);
    ASSERT_TRUE(t.has_value());
    if (t->ref == bad) {
      ASSERT_TRUE(f.sched->Fail("w", bad, "disk full on /scratch", now).ok());
      ++failures;
    } else {
      ASSERT_TRUE(f.sched->Complete("w", t->ref, "ok", now).ok());
    }
  }
  ASSERT_EQ(failures, 3);
  auto p = *f.sched->Progress(f.job, 10000);
  EXPECT_EQ(p.state, JobState::kFailed);
  EXPECT_THAT(p.message, HasSubstr("disk full on /scratch"));
  EXPECT_THAT(p.message, HasSubstr("failed 3 times"));
  EXPECT_FALSE((*f.sched->Lease("w", 10001)).has_value());
  // Persisted: a recovered scheduler sees the failed job with its message.
  auto again = *JobScheduler::Recover(&f.store, o, 10002);
  EXPECT_THAT(again->Progress(f.job, 10002)->message, HasSubstr("disk full on /scratch"));
}

TEST(QueueTest, CancelStopsLeasingAndHeartbeats) {
  Fixture f;
  auto t = *f.sched->Lease("w", 0);
  ASSERT_TRUE(f.sched->CancelJob(f.job, 1).ok());
  EXPECT_EQ(f.sched->Heartbeat("w", t->ref, 2).status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(*f.sched->Complete("w", t->ref, "r", 2), CompleteOutcome::kJobNotRunning);
  EXPECT_FALSE((*f.sched->Lease("w", 3)).has_value());
  EXPECT_EQ(f.sched->LeasedCount(), 0u);
}

TEST(QueueTest, StoreFailureIsNotAcknowledged) {
  Fixture f;
  auto t = *f.sched->Lease("w", 0);
  f.store.FailNextWrites(1);
  EXPECT_FALSE(f.sched->Complete("w", t->ref, "r", 1).ok());
  EXPECT_EQ(f.sched->Progress(f.job, 1)->tasks_done, 0u);
  EXPECT_EQ(*f.sched->Complete("w", t->ref, "r", 2), CompleteOutcome::kCommitted);
}

TEST(QueueTest, ProgressHasAnEta) {
  Fixture f;
  auto t = *f.sched->Lease("w", 0);
  EXPECT_EQ(f.sched->Progress(f.job, 0)->eta_seconds, -1);
  ASSERT_TRUE(f.sched->Complete("w", t->ref, "r", 1000).ok());
  t = *f.sched->Lease("w", 1000);
  ASSERT_TRUE(f.sched->Complete("w", t->ref, "r", 2000).ok());
  auto p = *f.sched->Progress(f.job, 2000);
  EXPECT_EQ(p.tasks_done, 2u);
  EXPECT_GT(p.eta_seconds, 0);
  EXPECT_LT(p.bytes_done, p.bytes_total);
}

// --- recovery and simulation ---------------------------------------------------------------------------

TEST(RecoveryTest, CrashRedoesNoCommittedTask) {
  SchedulerOptions o;
  o.lease_ms = 50;
  Fixture f(o, PlanOptions{4096, false});
  std::map<uint32_t, int> executions;
  int64_t now = 0;
  // Run half the tasks, leave three leased (in flight at the crash), then drop the scheduler.
  const size_t n = f.plan.tasks.size();
  for (size_t i = 0; i < n / 2; ++i) {
    auto t = *f.sched->Lease("w", ++now);
    ++executions[t->ref.task];
    ASSERT_TRUE(f.sched->Complete("w", t->ref, "r", now).ok());
  }
  for (int i = 0; i < 3; ++i) ++executions[(*f.sched->Lease("w", now))->ref.task];
  f.sched.reset();

  f.sched = *JobScheduler::Recover(&f.store, o, now);
  EXPECT_EQ(f.sched->Progress(f.job, now)->tasks_done, n / 2);
  for (auto t = *f.sched->Lease("w2", ++now); t.has_value(); t = *f.sched->Lease("w2", ++now)) {
    ++executions[t->ref.task];
    ASSERT_EQ(*f.sched->Complete("w2", t->ref, "r", now), CompleteOutcome::kCommitted);
  }
  EXPECT_EQ(f.sched->Progress(f.job, now)->state, JobState::kSucceeded);
  int reruns = 0;
  for (uint32_t t = 0; t < n; ++t) {
    EXPECT_EQ(f.store.CommitCount(f.job, t), 1) << t;
    reruns += executions[t] - 1;
  }
  EXPECT_EQ(reruns, 3);  // only the three in flight at the crash ran twice
}

// Many simulated workers (some crash mid-task, some are slow and complete after losing the lease, some
// complete twice, some fail transiently), two jobs and random scheduler crashes: every job finishes, every task
// is committed exactly once, and no task is leased before its dependencies are committed.
TEST(SimulationTest, RandomWorkersAndCrashesAlwaysFinish) {
  const Plan base = *PlanJob(TinyDescription(), Rtn4(), PlanOptions{8192, false});
  int scheduler_crashes = 0, worker_crashes = 0, duplicates = 0, failures = 0;
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    std::mt19937_64 rng(seed);
    SchedulerOptions o;
    o.lease_ms = 20;
    o.max_attempts = 200;
    InMemoryStateStore store;
    auto sched = *JobScheduler::Recover(&store, o, 0);
    const JobId j1 = *sched->SubmitJob(base, 0), j2 = *sched->SubmitJob(base, 0);
    struct Worker {
      std::optional<LeasedTask> task;
      int64_t finish_at = 0;
      bool dead = false;
    };
    std::vector<Worker> workers(12);
    auto done = [&] {
      return sched->Progress(j1, 0)->state == JobState::kSucceeded &&
             sched->Progress(j2, 0)->state == JobState::kSucceeded;
    };
    int64_t now = 0;
    for (; now < 200000 && !done(); ++now) {
      if (rng() % 100 == 0) {  // kill -9 of the scheduler
        sched = *JobScheduler::Recover(&store, o, now);
        ++scheduler_crashes;
      }
      for (size_t w = 0; w < workers.size(); ++w) {
        Worker& wk = workers[w];
        const std::string id = "w" + std::to_string(w);
        if (wk.dead) {
          if (rng() % 50 == 0) wk = Worker{};  // a replacement pod
          continue;
        }
        if (!wk.task) {
          auto t = sched->Lease(id, now);
          ASSERT_TRUE(t.ok()) << t.status();
          if (!t->has_value()) continue;
          const Plan& p = base;
          for (uint32_t d : p.DepsOf((*t)->ref.task)) ASSERT_EQ(store.CommitCount((*t)->ref.job, d), 1);
          wk.task = **t;
          wk.finish_at = now + 1 + static_cast<int64_t>(rng() % (rng() % 8 == 0 ? 60 : 10));  // some slow
          continue;
        }
        if (now < wk.finish_at) {
          if (rng() % 2 == 0) (void)sched->Heartbeat(id, wk.task->ref, now);
          continue;
        }
        const uint64_t r = rng() % 20;
        if (r == 0) {
          wk.dead = true;  // crashed mid-task: never reports
          ++worker_crashes;
          wk.task.reset();
          continue;
        }
        if (r == 1) {
          ASSERT_TRUE(sched->Fail(id, wk.task->ref, "transient", now).ok());
          ++failures;
        } else {
          const std::string ref = "t" + std::to_string(wk.task->ref.task);
          auto c = sched->Complete(id, wk.task->ref, ref, now);
          ASSERT_TRUE(c.ok()) << c.status();
          if (r == 2) {
            ASSERT_NE(*sched->Complete(id, wk.task->ref, ref, now), CompleteOutcome::kCommitted);
            ++duplicates;
          }
        }
        wk.task.reset();
      }
    }
    ASSERT_TRUE(done()) << "seed " << seed << " stuck at t=" << now;
    for (JobId j : {j1, j2}) {
      for (uint32_t t = 0; t < base.tasks.size(); ++t) ASSERT_EQ(store.CommitCount(j, t), 1) << seed;
    }
  }
  // The faults really happened.
  EXPECT_GT(scheduler_crashes, 10);
  EXPECT_GT(worker_crashes, 10);
  EXPECT_GT(duplicates, 10);
  EXPECT_GT(failures, 10);
  std::printf("tasks per job %zu; scheduler crashes %d, worker crashes %d, duplicates %d, failures %d\n",
              base.tasks.size(), scheduler_crashes, worker_crashes, duplicates, failures);
}

}  // namespace
}  // namespace qforge::scheduler
