// End-to-end tests of the distributed pipeline: a real qforge-scheduler and qforge-worker processes on
// 127.0.0.1. Every successful job's version is compared tensor by tensor, byte by byte, with quantizing the same
// model in this process (QuantizeModel, what `qforge quantize` runs), including through worker and scheduler
// crashes (SIGKILL).
#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>

#include "core/calib/block_chain.h"
#include "core/calib/collect.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/quant/sequential.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "storage/artifact_store.h"
#include "storage/test_util.h"
#include "tests/cluster.h"
#include "tests/http_client.h"

namespace qforge {
namespace {

namespace v1 = qforge::v1;
using testing::Cluster;
using testing::WaitForLog;

using testing::TempDir;
const std::string kStories = testing::Stories260KPath();

v1::SubmitJobRequest Request(const std::string& source, const std::string& method, const quant::QuantParams& params,
                             const std::string& name, uint64_t max_task_bytes = 0) {
  v1::SubmitJobRequest req;
  req.set_source_uri(source);
  req.set_output_name(name);
  req.set_max_task_bytes(max_task_bytes);
  *req.mutable_recipe()->mutable_defaults() = rpc::ParamsToProto(method, params);
  return req;
}

// What `qforge quantize` makes of the same model.
Model QuantizeInProcess(const std::string& source, const std::string& method, const quant::QuantParams& params) {
  auto in = formats::LoadModel(source);
  EXPECT_TRUE(in.ok()) << in.status();
  ThreadPool pool(2);
  auto out = quant::QuantizeModel(*in, quant::QuantRecipe{.method = method, .params = params}, &pool);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? std::move(out->model) : Model();
}

// Sampled calibration streams, as a recipe names them.
struct Calibration {
  int samples = 8, length = 64;
  uint64_t seed = 1000;
  bool sequential = false;  // recipe.sequential_calibration, `qforge quantize --calib-sequential`
};

v1::SubmitJobRequest CalibratedRequest(const std::string& source, const std::string& method,
                                       const quant::QuantParams& params, const std::string& name, Calibration c,
                                       uint64_t max_task_bytes = 0) {
  v1::SubmitJobRequest req = Request(source, method, params, name, max_task_bytes);
  req.mutable_recipe()->set_calibration_samples(c.samples);
  req.mutable_recipe()->set_calibration_length(c.length);
  req.mutable_recipe()->set_calibration_seed(c.seed);
  req.mutable_recipe()->set_sequential_calibration(c.sequential);
  return req;
}

// What `qforge quantize --method M --calib-streams N --calib-len L --calib-seed S` makes: the same streams sampled
// from the source, CollectCalibration block by block with the hidden states rounded as the service's calibrate
// chain stores them, PrepareModel for a method with a model transform, then QuantizeModel with the statistics;
// with c.sequential, quant::CalibrateSequentially (`--calib-sequential`) in place of the first two.
// Threads differ from the workers' on purpose: the bytes must not depend on them.
Model QuantizeCalibratedInProcess(const std::string& source, const std::string& method,
                                  const quant::QuantParams& params, Calibration c, Model* transformed = nullptr,
                                  const std::vector<quant::LayerRule>& layers = {}) {
  auto in = formats::LoadModel(source);
  EXPECT_TRUE(in.ok()) << in.status();
  if (!in.ok()) return Model();
  auto runner = Transformer::Create(std::make_shared<const Model>(*in), RuntimeOptions{.threads = 3});
  EXPECT_TRUE(runner.ok()) << runner.status();
  auto tokens = eval::SampleStreams(**runner, c.samples, c.length, c.seed, 1.0f, in->vocab ? in->vocab->bos_id : 1);
  EXPECT_TRUE(tokens.ok()) << tokens.status();
  const calib::CalibrationOptions options{.threads = 3, .block_chain = calib::kChainActivationFormat};
  ThreadPool pool(3);
  absl::StatusOr<calib::CalibrationStats> stats;
  if (c.sequential) {
    auto transform = quant::ModelTransformOf(method, params, layers, "method", "layers");
    EXPECT_TRUE(transform.ok()) << transform.status();
    if (!transform.ok()) return Model();
    auto sequential = quant::CalibrateSequentially(
        *in, *tokens, quant::QuantRecipe{.method = method, .params = params, .layers = layers}, *transform, options,
        &pool);
    EXPECT_TRUE(sequential.ok()) << sequential.status();
    if (!sequential.ok()) return Model();
    stats = std::move(sequential->stats);
    *in = std::move(sequential->model);
  } else {
    stats = calib::CollectCalibration(*in, *tokens, options);
    EXPECT_TRUE(stats.ok()) << stats.status();
    const quant::QuantMethod* m = quant::FindMethod(method);
    if (m->HasModelTransform()) {
      const absl::Status s = m->PrepareModel(*in, *stats, params);
      EXPECT_TRUE(s.ok()) << s;
    }
  }
  if (transformed != nullptr) *transformed = *in;
  auto out = quant::QuantizeModel(
      *in, quant::QuantRecipe{.method = method, .params = params, .calibration = &*stats, .layers = layers}, &pool);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? std::move(out->model) : Model();
}

// The stored version, read back over ArtifactService, equals `expected` exactly: every tensor's name, encoding,
// shape and bytes, the configuration, the vocabulary and the metadata.
void ExpectVersionEquals(Cluster& cluster, const v1::Job& job, const Model& expected) {
  SCOPED_TRACE("job " + job.job_id() + " (" + job.request().output_name() + ")");
  ASSERT_EQ(job.progress().state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  uint64_t version = 0;
  ASSERT_TRUE(absl::SimpleAtoi(job.result().version(), &version)) << job.DebugString();
  auto got = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{job.result().name(), version});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->config, expected.config);
  EXPECT_EQ(got->metadata, expected.metadata);
  ASSERT_EQ(got->vocab.has_value(), expected.vocab.has_value());
  if (expected.vocab) {
    EXPECT_EQ(got->vocab->tokens, expected.vocab->tokens);
  }
  ASSERT_EQ(got->tensors.size(), expected.tensors.size());
  for (const auto& [name, want] : expected.tensors) {
    const Tensor* t = got->Find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(FormatName(t->format), FormatName(want.format)) << name;
    EXPECT_EQ(t->shape, want.shape) << name;
    ASSERT_EQ(t->nbytes, want.nbytes) << name;
    EXPECT_EQ(std::memcmp(t->data, want.data, want.nbytes), 0) << name << ": bytes differ";
  }
}

std::vector<std::string> ListModelNames(Cluster& cluster) {
  grpc::ClientContext ctx;
  v1::ListModelsResponse resp;
  EXPECT_TRUE(cluster.artifacts().ListModels(&ctx, {}, &resp).ok());
  std::vector<std::string> names;
  for (const auto& m : resp.models()) names.push_back(m.name());
  return names;
}


int Count(const std::vector<testing::TaskEvent>& events, const std::string& what) {
  return static_cast<int>(std::count_if(events.begin(), events.end(), [&](const auto& e) { return e.what == what; }));
}

// gptq 4-bit, static groups of 32 in act-order: the calibrated tests' GPTQ recipe.
quant::QuantParams GptqActOrder4g32() {
  quant::QuantParams p = quant::FindMethod("gptq")->DefaultParams();
  p.bits = 4;
  p.group = 32;
  p.act_order = true;
  return p;
}

// The generated MoE models of these tests: vocabulary 512 (with tokens), top-2 routing; `shape` gives the rest.
ModelConfig MoeConfig(ModelConfig shape) {
  shape.vocab_size = 512;
  shape.n_experts_used = 2;
  return shape;
}

// Writes a generated model with a vocabulary under DIR/models (the cluster's allowed root); returns its path.
std::string WriteMoeModel(const std::string& dir, const ModelConfig& c, uint64_t seed) {
  std::filesystem::create_directories(dir + "/models");
  const std::string path = dir + "/models/moe.gguf";
  const absl::Status s = formats::WriteGguf(MakeSyntheticModel(c, seed, /*with_vocab=*/true), path);
  EXPECT_TRUE(s.ok()) << s;
  return path;
}

// The calibrate tasks of `job_id` in the order they were first leased (the chain's block order), and how often each
// was leased.
std::vector<std::pair<std::string, int>> CalibrateLeases(const std::vector<testing::TaskEvent>& events,
                                                         const std::string& job_id) {
  std::vector<std::pair<std::string, int>> leases;
  for (const auto& e : events) {
    if (e.what != "lease" || e.kind != "calibrate" || e.task.rfind(job_id + "/", 0) != 0) continue;
    auto it = std::find_if(leases.begin(), leases.end(), [&](const auto& l) { return l.first == e.task; });
    if (it == leases.end()) {
      leases.push_back({e.task, 1});
    } else {
      ++it->second;
    }
  }
  return leases;
}

// A calibrated job (CalibratedRequest) through `cluster`: submitted, waited for, its version compared byte for
// byte with the in-process pipeline. Returns the job.
v1::Job RunCalibratedJob(Cluster& cluster, const std::string& source, const std::string& method,
                         const quant::QuantParams& params, const std::string& name, Calibration c,
                         uint64_t max_task_bytes = 0) {
  std::string job_id;
  const grpc::Status submitted = cluster.Submit(CalibratedRequest(source, method, params, name, c, max_task_bytes),
                                                &job_id);
  EXPECT_TRUE(submitted.ok()) << submitted.error_message();
  if (!submitted.ok()) return v1::Job();
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, QuantizeCalibratedInProcess(source, method, params, c));
  return job;
}

// The per-block calibrate chain through crashes: the only worker is SIGKILLed as soon as it leased calibrate
// block `worker_kill_block`; two workers carry on (one calibrates that block again once the lease expired, unless
// the victim's completion had landed); the scheduler is SIGKILLed as soon as calibrate block n_layers - 1 is
// leased — calibration still running — and restarted on the same store: no calibrate task committed before the
// crash is leased again, the chain resumes from the stored hidden states, and the version equals the in-process
// pipeline byte for byte.
void ExpectChainSurvivesCrashes(const std::string& dir, const std::vector<std::string>& roots,
                                const std::string& source, int n_layers, const std::string& method,
                                const quant::QuantParams& params, Calibration c, uint64_t max_task_bytes,
                                int worker_kill_block) {
  SCOPED_TRACE(method + (c.sequential ? " (sequential)" : ""));
  Cluster cluster(dir, {.allowed_roots = roots, .lease_ms = 1500});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("victim");
  std::string job_id;
  const grpc::Status submitted =
      cluster.Submit(CalibratedRequest(source, method, params, method + "-chain", c, max_task_bytes), &job_id);
  ASSERT_TRUE(submitted.ok()) << submitted.error_message();
  // The victim is the only worker: every lease so far is its.
  WaitForLog(cluster, [&](const auto& events) {
    return static_cast<int>(CalibrateLeases(events, job_id).size()) > worker_kill_block;
  });
  cluster.Kill("victim");
  const auto at_kill = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  const std::string victim_block = CalibrateLeases(at_kill, job_id)[worker_kill_block].first;
  cluster.StartWorker("w2");
  cluster.StartWorker("w3");
  WaitForLog(cluster, [&](const auto& events) {
    return static_cast<int>(CalibrateLeases(events, job_id).size()) == n_layers;
  });
  cluster.Kill("scheduler");
  const auto at_crash = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, QuantizeCalibratedInProcess(source, method, params, c));

  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  const auto leases = CalibrateLeases(events, job_id);
  ASSERT_EQ(static_cast<int>(leases.size()), n_layers) << "one calibrate task per block";
  std::set<std::string> committed_at_crash, committed;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].what != "commit") continue;
    committed.insert(events[i].task);
    if (i < at_crash.size()) committed_at_crash.insert(events[i].task);
  }
  EXPECT_FALSE(committed_at_crash.contains(leases.back().first)) << "the scheduler died after calibration";
  int calibrations_after_restart = 0;
  for (size_t i = at_crash.size(); i < events.size(); ++i) {
    const auto& e = events[i];
    if (e.what != "lease") continue;
    EXPECT_FALSE(committed_at_crash.contains(e.task)) << e.task << " was committed before the crash, leased again";
    if (e.kind == "calibrate") ++calibrations_after_restart;
  }
  for (const auto& [task, n] : leases) EXPECT_TRUE(committed.contains(task)) << task;
  const int victim_block_leases =
      std::find_if(leases.begin(), leases.end(), [&](const auto& l) { return l.first == victim_block; })->second;
  std::cout << method << ": calibrate block " << worker_kill_block << " leased " << victim_block_leases
            << " times (the victim's, then again after its lease expired unless its completion had landed); "
            << calibrations_after_restart << " calibrate leases after the scheduler restart\n";
}

// ---------------------------------------------------------------------------------------------------------------

TEST(DistributedTest, Stories260KMatchesQuantizingInOneProcess) {
  const std::string dir = TempDir("stories");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  const int worker_metrics = testing::PickFreePort();
  cluster.StartWorker("w1", 1, worker_metrics);
  cluster.StartWorker("w2");

  // q4_0 falls back on ffn_down (row length 172); rtn 3-bit asymmetric in 4 KiB row slices is assembled plane by
  // plane (codes | scales | zeros of every slice).
  quant::QuantParams rtn = quant::FindMethod("rtn")->DefaultParams();
  rtn.bits = 3;
  rtn.group = 32;
  rtn.symmetric = false;
  const quant::QuantParams q4_0 = quant::FindMethod("q4_0")->DefaultParams();
  std::string q4_job, rtn_job;
  ASSERT_TRUE(cluster.Submit(Request(kStories, "q4_0", q4_0, "stories"), &q4_job).ok());
  ASSERT_TRUE(cluster.Submit(Request(kStories, "rtn", rtn, "stories", 4096), &rtn_job).ok());
  const v1::Job q4 = cluster.WaitJob(q4_job);
  const v1::Job r = cluster.WaitJob(rtn_job);
  ExpectVersionEquals(cluster, q4, QuantizeInProcess(kStories, "q4_0", q4_0));
  ExpectVersionEquals(cluster, r, QuantizeInProcess(kStories, "rtn", rtn));
  EXPECT_GT(r.progress().tasks_total(), q4.progress().tasks_total()) << "the 4 KiB budget should slice tensors";
  // A tokenizer named by the job gives the llama2.c source's version a vocabulary (as quantize --tokenizer does).
  const std::string tok512 = testing::Tok512Path();
  v1::SubmitJobRequest with_vocab = Request(kStories, "q4_0", q4_0, "stories-tok");
  with_vocab.set_tokenizer_uri(tok512);
  std::string vocab_job;
  ASSERT_TRUE(cluster.Submit(with_vocab, &vocab_job).ok());
  Model expected = QuantizeInProcess(kStories, "q4_0", q4_0);
  auto vocab = ReadVocabFile(tok512, expected.config.vocab_size);
  ASSERT_TRUE(vocab.ok()) << vocab.status();
  expected.vocab = *vocab;
  ExpectVersionEquals(cluster, cluster.WaitJob(vocab_job), expected);
  // Two versions of one name; both workers took part.
  EXPECT_NE(q4.result().version(), r.result().version());
  std::set<int> pids;
  for (const auto& e : testing::ParseTaskLog(testing::ReadFile(cluster.task_log()))) pids.insert(e.pid);
  EXPECT_EQ(pids.size(), 2u);

  // The scheduler's and a worker's /metrics: promtool accepts them, and they count what happened.
  const auto scheduler = testing::HttpRequest(cluster.scheduler_metrics_port(), "GET", "/metrics");
  ASSERT_EQ(scheduler.status, 200);
  const auto samples = testing::ParseSamples(scheduler.body);
  EXPECT_EQ(samples.at("qforge_scheduler_jobs{state=\"succeeded\"}"), 3);
  const int64_t tasks = q4.progress().tasks_total() + r.progress().tasks_total() + q4.progress().tasks_total();
  EXPECT_EQ(samples.at("qforge_scheduler_task_events_total{event=\"committed\"}"), tasks);
  EXPECT_GT(samples.at("qforge_scheduler_compression_ratio"), 2.0);  // f32 source, 4-bit and 3-bit versions
  EXPECT_TRUE(testing::PromtoolAccepts(scheduler.body, dir)) << scheduler.body;
  const auto worker = testing::HttpRequest(worker_metrics, "GET", "/metrics");
  ASSERT_EQ(worker.status, 200);
  EXPECT_NE(worker.body.find("qforge_worker_tasks_total{kind=\"quantize\",outcome=\"committed\"}"), std::string::npos)
      << worker.body;
  EXPECT_TRUE(testing::PromtoolAccepts(worker.body, dir)) << worker.body;
}

// A generated Llama of ~340 MB (f32), shared by the tests below: written once, quantized in this process once per
// recipe.
class GeneratedModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(TempDir("generated"));
    ModelConfig c;
    c.dim = 1024;
    c.hidden_dim = 2816;
    c.n_layers = 6;
    c.n_heads = 16;
    c.n_kv_heads = 16;
    c.vocab_size = 4096;
    c.seq_len = 256;
    path_ = new std::string(*dir_ + "/models/generated.gguf");
    std::filesystem::create_directories(*dir_ + "/models");
    ASSERT_TRUE(formats::WriteGguf(MakeSyntheticModel(c, 7, /*with_vocab=*/true), *path_).ok());
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
    delete path_;
  }
  static const Model& Reference(const std::string& method) {
    static std::map<std::string, Model>* cache = new std::map<std::string, Model>();
    auto it = cache->find(method);
    if (it == cache->end()) {
      it = cache->emplace(method, QuantizeInProcess(*path_, method, quant::FindMethod(method)->DefaultParams())).first;
    }
    return it->second;
  }
  static v1::SubmitJobRequest Job(const std::string& method, uint64_t slice_bytes) {
    return Request(*path_, method, quant::FindMethod(method)->DefaultParams(), "generated", slice_bytes);
  }
  static std::string* dir_;
  static std::string* path_;
};
std::string* GeneratedModelTest::dir_ = nullptr;
std::string* GeneratedModelTest::path_ = nullptr;

TEST_F(GeneratedModelTest, FewHundredMegabyteModelMatchesQuantizingInOneProcess) {
  Cluster cluster(*dir_ + "/match", {.allowed_roots = {*dir_ + "/models"}});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  cluster.StartWorker("w2");
  std::string job_id;
  // Q4_K in 4 MiB slices: ffn matrices (11.5 MB) become 3 tasks each.
  ASSERT_TRUE(cluster.Submit(Job("q4_k", 4 << 20), &job_id).ok());
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, Reference("q4_k"));
  EXPECT_GT(job.progress().bytes_in_total(), int64_t{280} << 20);  // the weight matrices (embeddings are copied)
}

TEST_F(GeneratedModelTest, WorkerKilledMidTaskJobCompletesIdentically) {
  Cluster cluster(*dir_ + "/worker-kill", {.allowed_roots = {*dir_ + "/models"}, .lease_ms = 1500});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("victim");
  cluster.StartWorker("survivor");
  std::string job_id;
  ASSERT_TRUE(cluster.Submit(Job("q8_0", 1 << 20), &job_id).ok());
  const int victim = cluster.pid("victim");
  // Kill the victim while it holds a lease: after some commits, right when its latest event is a lease.
  std::string held;
  WaitForLog(cluster, [&](const std::vector<testing::TaskEvent>& events) {
    if (Count(events, "commit") < 20) return false;
    for (auto e = events.rbegin(); e != events.rend(); ++e) {
      if (e->pid != victim) continue;
      if (e->what != "lease") return false;
      held = e->task;
      return true;
    }
    return false;
  });
  ASSERT_FALSE(held.empty());
  cluster.Kill("victim");
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, Reference("q8_0"));
  // The task the victim held: either its completion reached the scheduler just before the kill (the victim died
  // before logging it; nobody leases it again), or its lease expired and the survivor ran it to the end.
  bool survivor_leased = false, survivor_finished = false;
  for (const auto& e : testing::ParseTaskLog(testing::ReadFile(cluster.task_log()))) {
    if (e.task != held || e.pid != cluster.pid("survivor")) continue;
    survivor_leased |= e.what == "lease";
    survivor_finished |= e.what == "commit" || e.what == "duplicate";
  }
  const auto metrics = testing::ParseSamples(
      testing::HttpRequest(cluster.scheduler_metrics_port(), "GET", "/metrics").body);
  const double expired = metrics.at("qforge_scheduler_task_events_total{event=\"lease_expired\"}");
  if (survivor_leased) {
    EXPECT_TRUE(survivor_finished) << "the survivor leased task " << held << " but never completed it";
    EXPECT_GE(expired, 1) << "task " << held << " was leased again without its lease expiring";
  } else {
    std::cout << "task " << held << " was completed by the victim just before the kill\n";
  }
}

TEST_F(GeneratedModelTest, SchedulerKilledMidJobRestartsWithoutRedoingCommittedTasks) {
  Cluster cluster(*dir_ + "/scheduler-kill", {.allowed_roots = {*dir_ + "/models"}});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  cluster.StartWorker("w2");
  std::string job_id;
  ASSERT_TRUE(cluster.Submit(Job("q8_0", 1 << 20), &job_id).ok());
  v1::Job before;
  ASSERT_TRUE(cluster.GetJob(job_id, &before).ok());
  const int64_t total = before.progress().tasks_total();
  // A user watching the job across the crash: `qforge watch` must reconnect and report the outcome.
  const std::string watch_log = *dir_ + "/scheduler-kill/watch.log";
  const pid_t watcher = testing::Spawn({QFORGE_CLI_PATH, "watch", job_id, "--scheduler", cluster.address()}, watch_log);
  WaitForLog(cluster, [&](const auto& events) { return Count(events, "commit") >= total / 3; });
  cluster.Kill("scheduler");
  // Everything in the log now happened before the crash; anything after this offset, after it.
  const auto at_crash = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  ASSERT_LT(Count(at_crash, "commit"), total) << "the job finished before the kill; nothing was tested";
  std::set<std::string> committed_before;
  for (const auto& e : at_crash) {
    if (e.what == "commit") committed_before.insert(e.task);
  }
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());  // same store, same port: the workers reconnect
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, Reference("q8_0"));
  int watch_status = -1;
  ASSERT_EQ(waitpid(watcher, &watch_status, 0), watcher);
  EXPECT_TRUE(WIFEXITED(watch_status) && WEXITSTATUS(watch_status) == 0) << testing::ReadFile(watch_log);
  EXPECT_NE(testing::ReadFile(watch_log).find("reconnecting"), std::string::npos) << testing::ReadFile(watch_log);
  EXPECT_NE(testing::ReadFile(watch_log).find("succeeded: generated@"), std::string::npos) << testing::ReadFile(watch_log);

  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  int leased_again = 0, rerun_after_crash = 0;
  std::set<std::string> committed;
  for (size_t i = 0; i < events.size(); ++i) {
    // A completion the scheduler committed just before it died reaches the worker, retried after the restart, as
    // "duplicate": that task was still committed exactly once, by the first call.
    if (events[i].what == "commit" || events[i].what == "duplicate") committed.insert(events[i].task);
    if (i < at_crash.size() || events[i].what != "lease") continue;
    ++rerun_after_crash;
    if (committed_before.contains(events[i].task)) ++leased_again;
  }
  EXPECT_EQ(leased_again, 0) << "a task acknowledged before the crash ran again";
  EXPECT_EQ(static_cast<int64_t>(committed.size()), total);  // every task acknowledged to some worker
  EXPECT_EQ(job.progress().tasks_done(), total);
  EXPECT_GT(rerun_after_crash, 0);
  std::cout << "tasks " << total << ", committed before the crash " << committed_before.size()
            << ", leased after the restart " << rerun_after_crash << "\n";
}

TEST(DistributedTest, BadRequestsGetClearErrorsAndLeaveNoVersion) {
  const std::string dir = TempDir("bad");
  const std::string root = dir + "/models", outside = dir + "/elsewhere";
  std::filesystem::create_directories(root);
  std::filesystem::create_directories(outside);
  std::filesystem::copy_file(kStories, root + "/stories.bin");
  std::filesystem::copy_file(kStories, outside + "/stories.bin");
  std::ofstream(root + "/notes.bin") << "these are not weights\n";
  Cluster cluster(dir + "/cluster", {.allowed_roots = {root}, .lease_ms = 1000});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());

  const quant::QuantParams rtn = quant::FindMethod("rtn")->DefaultParams();
  struct Case {
    std::string what;
    v1::SubmitJobRequest req;
    grpc::StatusCode code;
    std::string message_has;
  };
  std::vector<Case> cases;
  auto good = [&] { return Request(root + "/stories.bin", "rtn", rtn, "stories"); };
  cases.push_back({"unknown method", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.defaults.method: unknown method 'awq2'"});
  cases.back().req.mutable_recipe()->mutable_defaults()->set_method("awq2");
  cases.push_back({"bits out of range", good(), grpc::StatusCode::INVALID_ARGUMENT, "bits"});
  cases.back().req.mutable_recipe()->mutable_defaults()->set_bits(9);
  cases.push_back({"nf4 block size -3", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.params"});
  cases.back().req.mutable_recipe()->mutable_defaults()->set_method("nf4");
  cases.back().req.mutable_recipe()->mutable_defaults()->set_group_size(-3);
  cases.push_back({"no method", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.defaults.method: empty"});
  cases.back().req.mutable_recipe()->mutable_defaults()->clear_method();
  cases.push_back({"group not dividing the rows, no fallback", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.params: tensor blk.0."});
  cases.back().req.mutable_recipe()->mutable_defaults()->set_group_size(48);
  cases.back().req.mutable_recipe()->set_no_fallback(true);
  cases.push_back({"missing model", good(), grpc::StatusCode::NOT_FOUND, "source_uri"});
  cases.back().req.set_source_uri(root + "/missing.bin");
  cases.push_back({"outside the allowed roots", good(), grpc::StatusCode::PERMISSION_DENIED, "outside the allowed roots"});
  cases.back().req.set_source_uri(outside + "/stories.bin");
  cases.push_back({"escaping the root with ..", good(), grpc::StatusCode::PERMISSION_DENIED, "outside the allowed roots"});
  cases.back().req.set_source_uri(root + "/../elsewhere/stories.bin");
  cases.push_back({"a URI, not a path", good(), grpc::StatusCode::INVALID_ARGUMENT, "only local paths"});
  cases.back().req.set_source_uri("s3://bucket/stories.bin");
  cases.push_back({"not a model", good(), grpc::StatusCode::INVALID_ARGUMENT, "is not a model"});
  cases.back().req.set_source_uri(root + "/notes.bin");
  cases.push_back({"bad output name", good(), grpc::StatusCode::INVALID_ARGUMENT, "output_name"});
  cases.back().req.set_output_name("Not A Name!");
  cases.push_back({"sequential calibration without calibration", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.sequential_calibration: method rtn (and every layer rule's) needs no calibration"});
  cases.back().req.mutable_recipe()->set_sequential_calibration(true);
  // Calibration fields of gptq / awq jobs.
  auto calibrated = [&](const std::string& method) {
    v1::SubmitJobRequest req = good();
    *req.mutable_recipe()->mutable_defaults() = rpc::ParamsToProto(method, quant::FindMethod(method)->DefaultParams());
    return req;
  };
  cases.push_back({"no calibration streams", calibrated("gptq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.calibration_samples: must be 1.."});
  cases.back().req.mutable_recipe()->set_calibration_samples(0);
  cases.push_back({"one-token streams", calibrated("awq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.calibration_length: must be 2.."});
  cases.back().req.mutable_recipe()->set_calibration_length(1);
  cases.push_back({"streams longer than the context", calibrated("gptq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.calibration_length: 100000 is more than the model's context length 512"});
  cases.back().req.mutable_recipe()->set_calibration_length(100000);
  cases.push_back({"missing calibration text", calibrated("gptq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.calibration_text_uri"});
  cases.back().req.mutable_recipe()->set_calibration_text_uri(root + "/missing.txt");
  cases.push_back({"calibration text outside the roots", calibrated("awq"), grpc::StatusCode::PERMISSION_DENIED,
                   "recipe.calibration_text_uri"});
  cases.back().req.mutable_recipe()->set_calibration_text_uri(outside + "/stories.bin");
  cases.push_back({"text and sampled streams at once", calibrated("gptq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.calibration_text_uri: given together with calibration_samples"});
  cases.back().req.mutable_recipe()->set_calibration_text_uri(root + "/notes.bin");
  cases.back().req.mutable_recipe()->set_calibration_samples(4);
  cases.push_back({"two model transforms", calibrated("awq"), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.layers[0].method: awq"});
  {
    quant::QuantParams awq3 = quant::FindMethod("awq")->DefaultParams();
    awq3.bits = 3;
    v1::LayerRule* rule = cases.back().req.mutable_recipe()->add_layers();
    rule->set_pattern("blk.1.*");
    *rule->mutable_params() = rpc::ParamsToProto("awq", awq3);
  }
  for (const Case& c : cases) {
    std::string id;
    const grpc::Status s = cluster.Submit(c.req, &id);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.message_has), std::string::npos) << c.what << ": " << s.error_message();
  }
  v1::Job job;
  EXPECT_EQ(cluster.GetJob("abc", &job).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(cluster.GetJob("999", &job).error_code(), grpc::StatusCode::NOT_FOUND);

  // A source that stops being a model after the submit: the workers fail the task max_attempts times, the job
  // fails with their message, and no version appears.
  std::string id;
  ASSERT_TRUE(cluster.Submit(good(), &id).ok());
  const auto size = std::filesystem::file_size(root + "/stories.bin");
  std::ofstream(root + "/stories.bin", std::ios::trunc) << std::string(size, '\0');
  cluster.StartWorker("w1");
  job = cluster.WaitJob(id);
  EXPECT_EQ(job.progress().state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(job.error().find("failed 3 times"), std::string::npos) << job.error();
  EXPECT_NE(job.error().find("stories.bin"), std::string::npos) << job.error();
  EXPECT_TRUE(ListModelNames(cluster).empty());
  grpc::ClientContext ctx;
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(cluster.jobs().ListJobs(&ctx, {}, &jobs).ok());
  EXPECT_EQ(jobs.jobs_size(), 1);  // only the valid submit made a job
}

// Calibrated jobs run as calibrate -> quantize -> assemble. gptq with act-order (static g32 groups; ffn_down,
// 172 wide, falls back per channel) in 4 KiB row slices, and awq, whose scale fold rewrites the q/k/v and
// gate/up weights and the RMSNorm weights: every tensor (norms included), the config and metadata equal the
// in-process result on the same calibration.
TEST(DistributedTest, CalibratedJobsMatchQuantizingInOneProcess) {
  const std::string dir = TempDir("calibrated");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1", 2);
  cluster.StartWorker("w2");

  const quant::QuantParams gptq = GptqActOrder4g32();
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 32;
  const Calibration c{.samples = 8, .length = 64, .seed = 1000};
  std::string gptq_job, awq_job;
  ASSERT_TRUE(cluster.Submit(CalibratedRequest(kStories, "gptq", gptq, "stories-gptq", c, 4096), &gptq_job).ok());
  const grpc::Status awq_submit = cluster.Submit(CalibratedRequest(kStories, "awq", awq, "stories-awq", c), &awq_job);
  ASSERT_TRUE(awq_submit.ok()) << awq_submit.error_message();
  const v1::Job g = cluster.WaitJob(gptq_job);
  const v1::Job a = cluster.WaitJob(awq_job);
  ExpectVersionEquals(cluster, g, QuantizeCalibratedInProcess(kStories, "gptq", gptq, c));
  Model folded;
  const Model awq_expected = QuantizeCalibratedInProcess(kStories, "awq", awq, c, &folded);
  ExpectVersionEquals(cluster, a, awq_expected);

  // The fold really changed the norms, so the version's norms came from the calibrate task's artifacts.
  auto source = formats::LoadModel(kStories);
  ASSERT_TRUE(source.ok());
  for (const std::string name : {"blk.0.attn_norm.weight", "blk.4.ffn_norm.weight"}) {
    const Tensor* before = source->Find(name);
    const Tensor* after = folded.Find(name);
    ASSERT_TRUE(before != nullptr && after != nullptr) << name;
    EXPECT_NE(std::memcmp(before->data, after->data, before->nbytes), 0) << name << " is not changed by the fold";
  }
  EXPECT_GT(g.progress().tasks_total(), a.progress().tasks_total()) << "the 4 KiB budget should slice tensors";
  // One calibrate task per block (stories260K has 5), each leased once, block 0 first in the plan.
  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  for (const std::string& job : {gptq_job, awq_job}) {
    const auto leases = CalibrateLeases(events, job);
    ASSERT_EQ(leases.size(), 5u) << job;
    EXPECT_EQ(leases.front().first, job + "/0");
    for (const auto& [task, n] : leases) EXPECT_EQ(n, 1) << task;
  }
}

// GPTQ and AWQ through the per-block chain with a worker SIGKILLed during calibration and the scheduler SIGKILLed
// mid-chain (ExpectChainSurvivesCrashes): identical to the in-process pipeline.
TEST(DistributedTest, CalibrateChainSurvivesWorkerAndSchedulerCrashes) {
  const quant::QuantParams gptq = GptqActOrder4g32();
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 0;
  const Calibration c{.samples = 16, .length = 128, .seed = 7};
  // 4 KiB slices: hundreds of quantize tasks, which the chain's later blocks wait behind.
  ExpectChainSurvivesCrashes(TempDir("chain-gptq"), {}, kStories, 5, "gptq", gptq, c, 4096, 1);
  ExpectChainSurvivesCrashes(TempDir("chain-awq"), {}, kStories, 5, "awq", awq, c, 4096, 2);
}

// Sequential calibration through the service (recipe.sequential_calibration): calibrate(i) runs block i-1 as its
// quantize tasks committed it over the hidden states calibrate(i-1) stored, so each block sees the error of the
// quantized blocks before it. Through both crashes the version equals `qforge quantize --calib-sequential` byte
// for byte — and differs from the one-pass chain's (the statistics of blocks > 0 come from other inputs).
TEST(DistributedTest, SequentialCalibrationSurvivesCrashesAndMatchesInProcess) {
  const quant::QuantParams gptq = GptqActOrder4g32();
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 0;
  const Calibration c{.samples = 16, .length = 128, .seed = 7, .sequential = true};
  ExpectChainSurvivesCrashes(TempDir("sequential-gptq"), {}, kStories, 5, "gptq", gptq, c, 4096, 1);
  ExpectChainSurvivesCrashes(TempDir("sequential-awq"), {}, kStories, 5, "awq", awq, c, 4096, 2);

  Calibration one_pass = c;
  one_pass.sequential = false;
  const Model sequential = QuantizeCalibratedInProcess(kStories, "gptq", gptq, c);
  const Model chain = QuantizeCalibratedInProcess(kStories, "gptq", gptq, one_pass);
  for (const std::string name : {"blk.0.attn_q.weight", "blk.3.ffn_down.weight"}) {
    const Tensor* a = sequential.Find(name);
    const Tensor* b = chain.Find(name);
    ASSERT_TRUE(a != nullptr && b != nullptr && a->nbytes == b->nbytes) << name;
    // Block 0 reads the embedding either way; later blocks read the quantized blocks' output.
    EXPECT_EQ(std::memcmp(a->data, b->data, a->nbytes) == 0, name.starts_with("blk.0.")) << name;
  }
}

// Ternary on a generated MoE through the chain and both crashes: each block's experts get their statistics from
// the tokens the router sent them (pooled where too few, as in one process), identical to the in-process pipeline.
TEST(DistributedTest, TernaryMoEChainSurvivesWorkerAndSchedulerCrashes) {
  const std::string dir = TempDir("chain-moe");
  const ModelConfig c = MoeConfig({.dim = 128, .hidden_dim = 256, .n_layers = 3, .n_heads = 4, .n_kv_heads = 2,
                                   .seq_len = 128, .n_experts = 4});
  const std::string path = WriteMoeModel(dir, c, 5);
  const quant::QuantParams ternary = quant::FindMethod("ternary")->DefaultParams();
  ExpectChainSurvivesCrashes(dir + "/cluster", {dir + "/models"}, path, c.n_layers, "ternary", ternary,
                             Calibration{.samples = 8, .length = 64, .seed = 1000}, 8 << 10, 1);
  // Sequentially: the experts' routed tokens come from the ternary blocks before them.
  ExpectChainSurvivesCrashes(dir + "/sequential", {dir + "/models"}, path, c.n_layers, "ternary", ternary,
                             Calibration{.samples = 8, .length = 64, .seed = 1000, .sequential = true}, 8 << 10, 1);
}

// The other calibrated methods through scheduler + workers: SmoothQuant (a model transform and the w8a8 encoding)
// and QuIP (whole-tensor tasks, transforms undone by the runtime). Each version equals the in-process pipeline's,
// and the runtime runs it from the store: SmoothQuant close to fp32, QuIP 3-bit closer than RTN 3-bit.
TEST(DistributedTest, SmoothQuantAndQuipJobsRunThroughThePipeline) {
  const std::string dir = TempDir("calibrated-more");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  cluster.StartWorker("w2");
  const quant::QuantParams sq = quant::FindMethod("smoothquant")->DefaultParams();
  quant::QuantParams quip = quant::FindMethod("quip")->DefaultParams();
  quip.bits = 3;
  quip.group = 0;
  const Calibration c{.samples = 8, .length = 64, .seed = 1000};
  std::string sq_job, quip_job;
  ASSERT_TRUE(cluster.Submit(CalibratedRequest(kStories, "smoothquant", sq, "stories-sq", c), &sq_job).ok());
  ASSERT_TRUE(cluster.Submit(CalibratedRequest(kStories, "quip", quip, "stories-quip", c), &quip_job).ok());
  const v1::Job s = cluster.WaitJob(sq_job);
  const v1::Job q = cluster.WaitJob(quip_job);
  ExpectVersionEquals(cluster, s, QuantizeCalibratedInProcess(kStories, "smoothquant", sq, c));
  ExpectVersionEquals(cluster, q, QuantizeCalibratedInProcess(kStories, "quip", quip, c));

  auto source = formats::LoadModel(kStories);
  ASSERT_TRUE(source.ok()) << source.status();
  auto base = Transformer::Create(std::make_shared<const Model>(*source), RuntimeOptions{.threads = 2});
  ASSERT_TRUE(base.ok()) << base.status();
  auto streams = eval::SampleStreams(**base, 4, 64, /*seed=*/1);
  ASSERT_TRUE(streams.ok()) << streams.status();
  auto kl_of = [&](const Model& m) {
    auto t = Transformer::Create(std::make_shared<const Model>(m), RuntimeOptions{.threads = 2});
    EXPECT_TRUE(t.ok()) << t.status();
    if (!t.ok()) return 1e9;
    auto r = eval::CompareModels(**base, **t, *streams);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->mean_kl : 1e9;
  };
  auto stored = [&](const v1::Job& job) {
    uint64_t version = 0;
    EXPECT_TRUE(absl::SimpleAtoi(job.result().version(), &version));
    auto m = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{job.result().name(), version});
    EXPECT_TRUE(m.ok()) << m.status();
    return m.ok() ? *std::move(m) : Model();
  };
  quant::QuantRecipe rtn;
  rtn.method = "rtn";
  rtn.params = quant::FindMethod("rtn")->DefaultParams();
  rtn.params->bits = 3;
  rtn.params->group = 0;
  auto rtn_model = quant::QuantizeModel(*source, rtn, nullptr);
  ASSERT_TRUE(rtn_model.ok()) << rtn_model.status();
  const double kl_sq = kl_of(stored(s)), kl_quip = kl_of(stored(q)), kl_rtn = kl_of(rtn_model->model);
  EXPECT_LT(kl_sq, 0.2) << "smoothquant W8A8";
  EXPECT_LT(kl_quip, kl_rtn) << "quip 3-bit vs rtn 3-bit";
}

// A worker SIGKILLed while it holds the calibrate lease (or just after it completed it): the survivor calibrates
// again once the lease expired, unless the victim's completion had landed; then the scheduler is SIGKILLed
// after calibration committed, and the restart does not calibrate again. The output is the in-process one.
TEST(DistributedTest, CrashesDuringAndAfterCalibrationKeepTheOutputIdentical) {
  const std::string dir = TempDir("calibrate-kill");
  Cluster cluster(dir, {.lease_ms = 1500});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("victim");
  quant::QuantParams awq = quant::FindMethod("awq")->DefaultParams();
  awq.bits = 4;
  awq.group = 0;
  const Calibration c{.samples = 16, .length = 128, .seed = 7};
  std::string job_id;
  // 4 KiB slices: a few hundred quantize tasks, so the job is still running when the scheduler dies.
  ASSERT_TRUE(cluster.Submit(CalibratedRequest(kStories, "awq", awq, "stories-awq", c, 4096), &job_id).ok());
  const std::string calibrate = job_id + "/0";
  WaitForLog(cluster, [&](const auto& events) {
    return std::any_of(events.begin(), events.end(), [&](const auto& e) { return e.task == calibrate; });
  });
  cluster.Kill("victim");
  const auto at_kill = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  cluster.StartWorker("survivor");
  const int survivor = cluster.pid("survivor");
  // Calibration committed (by the survivor, or by the victim just before it died: then the survivor quantizes).
  WaitForLog(cluster, [&](const auto& events) {
    return std::any_of(events.begin(), events.end(), [&](const auto& e) {
      return e.pid == survivor && ((e.what == "commit" && e.task == calibrate) || e.kind == "quantize");
    });
  });
  cluster.Kill("scheduler");
  const auto at_crash = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, QuantizeCalibratedInProcess(kStories, "awq", awq, c));

  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  int victim_commits = 0, survivor_calibrations = 0, after_restart = 0, quantize_after_restart = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const auto& e = events[i];
    if (e.task != calibrate) {
      if (i >= at_crash.size() && e.what == "lease") ++quantize_after_restart;
      continue;
    }
    if (i < at_kill.size() && e.what == "commit") ++victim_commits;
    if (e.pid == survivor && e.what == "lease") ++survivor_calibrations;
    if (i >= at_crash.size() && e.what == "lease") ++after_restart;
  }
  EXPECT_EQ(after_restart, 0) << "calibration committed before the scheduler crash ran again";
  EXPECT_GT(quantize_after_restart, 0) << "the job had finished before the scheduler crash; nothing was tested";
  if (survivor_calibrations == 0) {
    std::cout << "the victim's calibration completed just before the kill\n";
  } else {
    EXPECT_EQ(survivor_calibrations, 1);
    EXPECT_EQ(victim_commits, 0);
    std::cout << "the victim was killed during calibration; the survivor calibrated again\n";
  }
}

TEST(DistributedTest, IdempotentSubmitCancelAndTenantListing) {
  const std::string dir = TempDir("cancel");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  // No workers yet: the jobs stay running until cancelled.
  v1::SubmitJobRequest req = Request(kStories, "q8_0", quant::FindMethod("q8_0")->DefaultParams(), "stories");
  req.set_tenant("team-a");
  req.set_idempotency_key("nightly-42");
  std::string first, retry, other;
  ASSERT_TRUE(cluster.Submit(req, &first).ok());
  ASSERT_TRUE(cluster.Submit(req, &retry).ok());
  EXPECT_EQ(first, retry) << "a retried submit with the same key made a second job";
  req.set_tenant("team-b");
  ASSERT_TRUE(cluster.Submit(req, &other).ok());
  EXPECT_NE(other, first) << "idempotency keys are per tenant";

  grpc::ClientContext cancel_ctx;
  v1::CancelJobRequest cancel;
  cancel.set_job_id(first);
  v1::Job cancelled;
  ASSERT_TRUE(cluster.jobs().CancelJob(&cancel_ctx, cancel, &cancelled).ok());
  EXPECT_EQ(cancelled.progress().state(), v1::JOB_STATE_CANCELLED);

  grpc::ClientContext list_ctx;
  v1::ListJobsRequest list;
  list.set_tenant("team-a");
  v1::ListJobsResponse listed;
  ASSERT_TRUE(cluster.jobs().ListJobs(&list_ctx, list, &listed).ok());
  ASSERT_EQ(listed.jobs_size(), 1);
  EXPECT_EQ(listed.jobs(0).job_id(), first);
  EXPECT_EQ(listed.jobs(0).request().output_name(), "stories");

  // A worker now runs only the job that was not cancelled; the cancelled one never makes a version.
  cluster.StartWorker("w1");
  const v1::Job done = cluster.WaitJob(other);
  ASSERT_EQ(done.progress().state(), v1::JOB_STATE_SUCCEEDED) << done.error();
  EXPECT_EQ(done.result().version(), "1");
  for (const auto& e : testing::ParseTaskLog(testing::ReadFile(cluster.task_log()))) {
    EXPECT_NE(e.task.substr(0, e.task.find('/')), first) << "a task of the cancelled job ran";
  }
  v1::Job still;
  ASSERT_TRUE(cluster.GetJob(first, &still).ok());
  EXPECT_EQ(still.progress().state(), v1::JOB_STATE_CANCELLED);
}

TEST(DistributedTest, CorruptedChunkIsDataLossNamingIt) {
  const std::string dir = TempDir("corrupt");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  std::string id;
  ASSERT_TRUE(cluster.Submit(Request(kStories, "q8_0", quant::FindMethod("q8_0")->DefaultParams(), "stories"), &id).ok());
  const v1::Job job = cluster.WaitJob(id);
  ASSERT_EQ(job.progress().state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  auto manifest = rpc::FetchManifest(cluster.artifacts(), storage::ModelRef{"stories", 1});
  ASSERT_TRUE(manifest.ok()) << manifest.status();
  std::string victim;
  for (const auto& t : manifest->tensors()) {
    if (t.name() == "blk.2.attn_q.weight") victim = t.chunk_ids(0);
  }
  ASSERT_FALSE(victim.empty());
  cluster.Stop("w1");
  cluster.Stop("scheduler");
  {
    // Flip one payload bit through plain RocksDB, so RocksDB's own checksums stay valid and only ours can tell.
    storage::testing::RawDb raw(cluster.store_dir());
    std::string value = raw.Get(storage::cf::kChunks, victim);
    value[value.size() / 2] ^= 0x04;
    raw.Put(storage::cf::kChunks, victim, value);
  }
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  auto chunk = rpc::FetchChunk(cluster.artifacts(), victim);
  ASSERT_FALSE(chunk.ok()) << "corrupted bytes were returned";
  EXPECT_EQ(chunk.status().code(), absl::StatusCode::kDataLoss) << chunk.status();
  EXPECT_NE(chunk.status().message().find(victim), std::string::npos) << chunk.status();
  auto model = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{"stories", 1});
  EXPECT_EQ(model.status().code(), absl::StatusCode::kDataLoss) << model.status();
  EXPECT_NE(model.status().message().find("blk.2.attn_q.weight"), std::string::npos) << model.status();
}

// spqr: the planner cannot know a tensor's outlier count, so a task's format is spqr3_g16_o0; the worker reports the
// real one (spqr3_g16_o<n>), the scheduler checks the bytes against it and records it in the manifest. spqr tensors
// stay whole even under a 4 KiB slice budget (16-row second-level statistics, one CSR per matrix).
TEST(DistributedTest, SpqrJobRecordsEachTensorsOutlierCount) {
  const std::string dir = TempDir("spqr");
  Cluster cluster(dir, {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1", 2);
  const quant::QuantParams spqr = quant::FindMethod("spqr")->DefaultParams();
  const Calibration c{.samples = 8, .length = 64, .seed = 1000};
  std::string job_id;
  ASSERT_TRUE(cluster.Submit(CalibratedRequest(kStories, "spqr", spqr, "stories-spqr", c, 4096), &job_id).ok());
  const v1::Job job = cluster.WaitJob(job_id);
  const Model expected = QuantizeCalibratedInProcess(kStories, "spqr", spqr, c);
  ExpectVersionEquals(cluster, job, expected);
  int with_outliers = 0;
  for (const auto& [name, t] : expected.tensors) with_outliers += t.format.type == WeightType::kSpQR && t.format.outliers > 0;
  EXPECT_EQ(with_outliers, 30) << "every matrix but the five 172-column ffn_down ones";
}

// A Mixture-of-Experts model (8 experts x 2 layers, 48 expert matrices, tiny dims) through the pipeline with both
// kinds of crash in one job: a worker SIGKILLed while it holds a lease, then the scheduler SIGKILLed and
// restarted. The version equals quantizing in this process byte for byte; the calibrated ternary job (each
// expert's GPTQ fed by the tokens routed to it) does too; a qmoe-experts job does too. bench/moe-distributed.sh is the same at 64 experts x 8
// layers and GB scale (docs/distributed.md).
TEST(DistributedTest, MoEWithWorkerAndSchedulerKilledMatchesQuantizingInOneProcess) {
  const std::string dir = TempDir("moe");
  // seq_len 256: the recipe's default calibration length must fit, whatever the method.
  const ModelConfig c = MoeConfig({.dim = 256, .hidden_dim = 512, .n_layers = 2, .n_heads = 4, .n_kv_heads = 4,
                                   .seq_len = 256, .n_experts = 8});
  const std::string path = WriteMoeModel(dir, c, 11);

  Cluster cluster(dir + "/cluster", {.allowed_roots = {dir + "/models"}, .lease_ms = 1500});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("victim");
  cluster.StartWorker("w2");
  const quant::QuantParams q4_k = quant::FindMethod("q4_k")->DefaultParams();
  // 32 KiB slices: every expert matrix (512 KiB of f32) becomes 16 tasks, so the job outlives both kills.
  std::string job_id;
  const grpc::Status submitted = cluster.Submit(Request(path, "q4_k", q4_k, "moe", 32 << 10), &job_id);
  ASSERT_TRUE(submitted.ok()) << submitted.error_message();
  v1::Job before;
  ASSERT_TRUE(cluster.GetJob(job_id, &before).ok());
  const int64_t total = before.progress().tasks_total();
  EXPECT_GT(total, 48 * 16) << "every expert matrix should be sliced";

  const int victim = cluster.pid("victim");
  std::string held;
  WaitForLog(cluster, [&](const std::vector<testing::TaskEvent>& events) {
    if (Count(events, "commit") < total / 5) return false;
    for (auto e = events.rbegin(); e != events.rend(); ++e) {
      if (e->pid != victim) continue;
      if (e->what != "lease") return false;
      held = e->task;
      return true;
    }
    return false;
  });
  ASSERT_FALSE(held.empty());
  cluster.Kill("victim");

  WaitForLog(cluster, [&](const auto& events) { return Count(events, "commit") >= total / 2; });
  cluster.Kill("scheduler");
  const auto at_crash = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  ASSERT_LT(Count(at_crash, "commit"), total) << "the job finished before the scheduler was killed";
  std::set<std::string> committed_before;
  for (const auto& e : at_crash) {
    if (e.what == "commit") committed_before.insert(e.task);
  }
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w3");  // two workers again after the victim's death
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectVersionEquals(cluster, job, QuantizeInProcess(path, "q4_k", q4_k));

  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  int leased_again = 0;
  std::set<std::string> committed;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i].what == "commit" || events[i].what == "duplicate") committed.insert(events[i].task);
    if (i >= at_crash.size() && events[i].what == "lease" && committed_before.contains(events[i].task)) ++leased_again;
  }
  EXPECT_EQ(leased_again, 0) << "a task acknowledged before the scheduler crash ran again";
  EXPECT_EQ(job.progress().tasks_done(), total);
  // Every task was acknowledged to some worker, except completions in flight at a kill, which the scheduler may
  // have committed without the worker ever logging it: the victim's (it died), and those the scheduler committed
  // just before its own death (the worker's retry after the restart may not be the one that logs it).
  std::set<std::string> in_flight;
  for (const auto& e : events) {
    if (e.pid == victim && e.what == "lease") in_flight.insert(e.task);
  }
  std::set<std::string> committed_at_crash;
  for (const auto& e : at_crash) {
    if (e.what == "commit" || e.what == "duplicate") committed_at_crash.insert(e.task);
  }
  for (const auto& e : at_crash) {
    if (e.what == "lease" && !committed_at_crash.contains(e.task)) in_flight.insert(e.task);
  }
  for (int64_t i = 0; i < total; ++i) {
    const std::string task = absl::StrCat(job_id, "/", i);
    EXPECT_TRUE(committed.contains(task) || in_flight.contains(task)) << task << " was never acknowledged to a worker";
  }

  // Calibrated: ternary's GPTQ per expert from the tokens the router sent it, statistics computed by the
  // calibrate task and fetched by every quantize task.
  const quant::QuantParams ternary = quant::FindMethod("ternary")->DefaultParams();
  const Calibration calib{.samples = 4, .length = 32, .seed = 1000};
  RunCalibratedJob(cluster, path, "ternary", ternary, "moe-ternary", calib);

  // qmoe on the experts (whole-tensor tasks whatever the slice budget: variable-length rows), q8_0 elsewhere, as
  // bench/moe-table.sh quantizes the trained MoE.
  const quant::QuantParams q8_0 = quant::FindMethod("q8_0")->DefaultParams();
  const quant::QuantParams qmoe = quant::FindMethod("qmoe")->DefaultParams();
  std::vector<quant::LayerRule> rules;
  v1::SubmitJobRequest qmoe_req = CalibratedRequest(path, "q8_0", q8_0, "moe-qmoe", calib, 32 << 10);
  for (const char* pattern : {"blk.*.ffn_gate.*.weight", "blk.*.ffn_up.*.weight", "blk.*.ffn_down.*.weight"}) {
    rules.push_back({pattern, "qmoe", qmoe});
    v1::LayerRule* r = qmoe_req.mutable_recipe()->add_layers();
    r->set_pattern(pattern);
    *r->mutable_params() = rpc::ParamsToProto("qmoe", qmoe);
  }
  std::string qmoe_job;
  ASSERT_TRUE(cluster.Submit(qmoe_req, &qmoe_job).ok());
  const v1::Job qmoe_done = cluster.WaitJob(qmoe_job);
  ASSERT_EQ(qmoe_done.progress().state(), v1::JOB_STATE_SUCCEEDED) << qmoe_done.error();
  // Byte for byte, the qmoe experts too. (They differed in some runs until the float kernels' ISA stopped being
  // chosen by timing: the calibrate task's forward pass and the in-process one could run different ISAs, and the
  // dead-zone bisection turned the tiny difference into other codes.)
  const Model qmoe_expected = QuantizeCalibratedInProcess(path, "q8_0", q8_0, calib, nullptr, rules);
  auto qmoe_got = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{"moe-qmoe", 1});
  ASSERT_TRUE(qmoe_got.ok()) << qmoe_got.status();
  int qmoe_tensors = 0;
  for (const auto& [name, want] : qmoe_expected.tensors) {
    const Tensor* t = qmoe_got->Find(name);
    ASSERT_NE(t, nullptr) << name;
    if (want.format.type == WeightType::kQMoE) ++qmoe_tensors;
    EXPECT_EQ(FormatName(t->format), FormatName(want.format)) << name;
    ASSERT_EQ(t->nbytes, want.nbytes) << name;
    EXPECT_EQ(std::memcmp(t->data, want.data, want.nbytes), 0) << name << ": bytes differ";
  }
  EXPECT_EQ(qmoe_tensors, 48);
}

}  // namespace
}  // namespace qforge
