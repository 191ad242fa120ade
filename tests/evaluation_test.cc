// End-to-end tests of evaluation as tasks (docs/distributed.md, "Evaluation"): real qforge-scheduler and
// qforge-worker processes on 127.0.0.1 (tests/cluster.h). A job given evaluation text must report in Job.quality
// exactly the numbers `qforge eval VERSION --base SOURCE --text FILE` computes, also when a worker is SIGKILLed
// during evaluation and the scheduler after part of it committed; bad evaluation fields get errors naming them.
#include <sys/wait.h>

#include <algorithm>
#include <filesystem>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/mapped_file.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "tests/cluster.h"
#include "tests/http_client.h"

namespace qforge {
namespace {

namespace v1 = qforge::v1;
using testing::Cluster;
using testing::WaitForLog;
using testing::TempDir;

const std::string kStories = testing::Stories260KPath();
const std::string kTok512 = testing::Tok512Path();
const std::string kEvalText = std::filesystem::canonical(std::string(QFORGE_SHARED_DIR) + "/data/tinystories-eval.txt")
                                  .string();

struct Evaluation {
  int window = 0, chunks = 0, tasks = 0;  // 0: unset
};

v1::SubmitJobRequest EvalRequest(const std::string& method, const std::string& name, Evaluation e) {
  v1::SubmitJobRequest req;
  req.set_source_uri(kStories);
  req.set_output_name(name);
  req.set_tokenizer_uri(kTok512);
  *req.mutable_recipe()->mutable_defaults() = rpc::ParamsToProto(method, quant::FindMethod(method)->DefaultParams());
  req.mutable_recipe()->set_evaluation_text_uri(kEvalText);
  if (e.window > 0) req.mutable_recipe()->set_evaluation_window(e.window);
  if (e.chunks > 0) req.mutable_recipe()->set_evaluation_chunks(e.chunks);
  if (e.tasks > 0) req.mutable_recipe()->set_evaluation_tasks(e.tasks);
  return req;
}

// What `qforge eval VERSION --base stories260K.bin --text FILE --tokenizer tok512 --window W --chunks N` computes,
// here in this process on the version read back over ArtifactService: the same tokens, cut and windows
// (eval::KeepFirstWindows, CompareModels), runtimes with other thread counts than the workers'.
eval::CompareResult EvalInProcess(Cluster& cluster, const v1::Job& job, Evaluation e) {
  uint64_t version = 0;
  EXPECT_TRUE(absl::SimpleAtoi(job.result().version(), &version)) << job.DebugString();
  auto quant = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{job.result().name(), version});
  auto base = formats::LoadModel(kStories);
  auto tokenizer = LoadTokenizer(kTok512, 512);
  auto text = ReadFileToString(kEvalText);
  if (!quant.ok() || !base.ok() || !tokenizer.ok() || !text.ok()) {
    ADD_FAILURE() << quant.status() << base.status() << tokenizer.status() << text.status();
    return {};
  }
  auto b = Transformer::Create(std::make_shared<const Model>(*std::move(base)), RuntimeOptions{.threads = 3});
  auto q = Transformer::Create(std::make_shared<const Model>(*std::move(quant)), RuntimeOptions{.threads = 3});
  auto tokens = (*tokenizer)->Encode(*text, /*add_bos=*/true);
  EXPECT_TRUE(b.ok() && q.ok() && tokens.ok());
  eval::KeepFirstWindows(*tokens, e.chunks, e.window, std::min((*b)->max_seq_len(), (*q)->max_seq_len()));
  auto r = eval::CompareModels(**b, **q, *tokens, e.window);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *r : eval::CompareResult{};
}

// Job.quality holds exactly (bit for bit) the in-process comparison's numbers.
void ExpectQualityEquals(const v1::Job& job, const eval::CompareResult& want, Evaluation e) {
  SCOPED_TRACE("job " + job.job_id());
  ASSERT_EQ(job.progress().state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  ASSERT_TRUE(job.has_quality()) << job.DebugString();
  const v1::QualityReport& q = job.quality();
  EXPECT_EQ(q.perplexity_base(), want.base.perplexity);
  EXPECT_EQ(q.perplexity_quantized(), want.quant.perplexity);
  EXPECT_EQ(q.kl_mean(), want.mean_kl);
  EXPECT_EQ(q.kl_max(), want.max_kl);
  EXPECT_EQ(q.top1_agreement(), want.top1_agreement);
  EXPECT_EQ(q.tokens(), want.positions);
  EXPECT_EQ(q.windows(), want.base.windows);
  if (e.window > 0) EXPECT_EQ(q.window(), e.window);
  EXPECT_EQ(q.text_source(), kEvalText);
  // A real comparison: the quantized model differs from its source.
  EXPECT_GT(q.kl_mean(), 0.0);
  EXPECT_LT(q.top1_agreement(), 1.0);
  EXPECT_GT(q.top1_agreement(), 0.5);
}

// Runs the qforge CLI to completion; returns what it printed (stdout and stderr).
std::string RunCli(const std::vector<std::string>& args, const std::string& log, int* exit_code = nullptr) {
  std::vector<std::string> argv = {QFORGE_CLI_PATH};
  argv.insert(argv.end(), args.begin(), args.end());
  return testing::RunToCompletion(argv, log, exit_code);
}

// The lines of `text` that start with `prefix`.
std::vector<std::string> LinesStartingWith(const std::string& text, const std::string& prefix) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) out.push_back(line);
  }
  return out;
}

// Two jobs on two workers (one and two threads): q4_0 with 48 windows of 128 tokens over 5 evaluate tasks (shares
// of 9 and 10 windows), and q8_0 in 4 KiB row slices at the model's context with the first 12 windows and the
// scheduler's own task count. Job.quality equals the in-process comparison exactly; `qforge watch` prints the very
// lines `qforge eval` prints for the exported version; `qforge jobs` and the scheduler's /metrics show the numbers;
// Job.tensors is QuantizeModel's per-tensor report.
TEST(EvaluationTest, JobQualityEqualsQforgeEvalExactly) {
  const std::string dir = TempDir("evaluation");
  Cluster cluster(dir, {.lease_ms = 5000});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1", 1);
  cluster.StartWorker("w2", 2);

  const Evaluation e1{.window = 128, .chunks = 48, .tasks = 5}, e2{.chunks = 12};
  std::string id1, id2;
  ASSERT_TRUE(cluster.Submit(EvalRequest("q4_0", "stories-q4", e1), &id1).ok());
  v1::SubmitJobRequest sliced = EvalRequest("q8_0", "stories-q8", e2);
  sliced.set_max_task_bytes(4096);
  ASSERT_TRUE(cluster.Submit(sliced, &id2).ok());
  const v1::Job job1 = cluster.WaitJob(id1), job2 = cluster.WaitJob(id2);
  // Planned: one evaluate task per share after the quantize tasks and assemble.
  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  std::map<std::string, std::set<std::string>> evaluate_tasks;  // job -> its evaluate tasks
  for (const auto& e : events) {
    if (e.what == "lease" && e.kind == "evaluate") evaluate_tasks[e.task.substr(0, e.task.find('/'))].insert(e.task);
  }
  EXPECT_EQ(evaluate_tasks[id1].size(), 5u);
  // q8_0: 12 windows of 512 tokens, about four a task.
  EXPECT_EQ(evaluate_tasks[id2].size(), 3u);
  std::set<int> evaluating_pids;
  for (const auto& e : events) {
    if (e.what == "lease" && e.kind == "evaluate") evaluating_pids.insert(e.pid);
  }
  std::cout << "evaluate tasks ran on " << evaluating_pids.size() << " worker(s)\n";

  const eval::CompareResult want1 = EvalInProcess(cluster, job1, e1), want2 = EvalInProcess(cluster, job2, e2);
  ExpectQualityEquals(job1, want1, e1);
  ExpectQualityEquals(job2, want2, e2);
  EXPECT_EQ(job1.quality().windows(), 48);
  EXPECT_EQ(job1.quality().tokens(), 48 * 127);
  EXPECT_EQ(job2.quality().windows(), 12);
  EXPECT_EQ(job2.quality().window(), 512);
  // q4_0 costs more than q8_0.
  EXPECT_GT(job1.quality().kl_mean(), job2.quality().kl_mean());

  // Job.tensors is kept beside Job.quality: QuantizeModel's per-tensor report (format, bits/weight, error), the
  // q8_0 job's errors added up over its 4 KiB row slices.
  for (const auto& [job, method] : {std::pair<const v1::Job*, const char*>{&job1, "q4_0"}, {&job2, "q8_0"}}) {
    SCOPED_TRACE(method);
    auto in = formats::LoadModel(kStories);
    ASSERT_TRUE(in.ok()) << in.status();
    auto want = quant::QuantizeModel(
        *in, quant::QuantRecipe{.method = method, .params = quant::FindMethod(method)->DefaultParams()}, nullptr);
    ASSERT_TRUE(want.ok()) << want.status();
    ASSERT_EQ(job->tensors_size(), static_cast<int>(want->report.tensors.size()));
    std::map<std::string, const v1::TensorReport*> got;
    for (const v1::TensorReport& t : job->tensors()) got[t.name()] = &t;
    for (const quant::TensorQuantReport& w : want->report.tensors) {
      ASSERT_TRUE(got.contains(w.name)) << w.name;
      const v1::TensorReport& t = *got[w.name];
      EXPECT_EQ(t.format(), w.format) << w.name;
      EXPECT_EQ(t.bits_per_weight(), w.bits_per_weight) << w.name;
      EXPECT_EQ(t.bytes_after(), w.bytes_after) << w.name;
      EXPECT_EQ(t.bytes_before(), w.bytes_f32) << w.name;
      EXPECT_NEAR(t.rmse(), w.rmse, 1e-9 * w.rmse) << w.name;
      EXPECT_NEAR(t.relative_error(), w.rel_error, 1e-9 * w.rel_error) << w.name;
      EXPECT_GT(t.rmse(), 0.0) << w.name;
    }
  }

  // The CLI: `qforge eval` on the exported version prints the two lines `qforge watch` prints for the job.
  const std::string exported = dir + "/stories-q4.gguf";
  int rc = 0;
  RunCli({"export", "stories-q4@" + job1.result().version(), "--format", "gguf", exported, "--scheduler",
          cluster.address()},
         dir + "/export.log", &rc);
  ASSERT_EQ(rc, 0) << testing::ReadFile(dir + "/export.log");
  const std::string evaluated =
      RunCli({"eval", exported, "--base", kStories, "--tokenizer", kTok512, "--text", kEvalText, "--window", "128",
              "--chunks", "48", "--streams", "0"},
             dir + "/eval.log", &rc);
  ASSERT_EQ(rc, 0) << evaluated;
  const std::string watched = RunCli({"watch", id1, "--scheduler", cluster.address()}, dir + "/watch.log", &rc);
  ASSERT_EQ(rc, 0) << watched;
  const auto eval_lines = LinesStartingWith(evaluated, "text ");
  ASSERT_EQ(eval_lines.size(), 2u) << evaluated;
  EXPECT_EQ(LinesStartingWith(watched, "text "), eval_lines) << watched;
  EXPECT_NE(watched.find("evaluation: 48 windows of 128 tokens of " + kEvalText), std::string::npos) << watched;

  const std::string listed = RunCli({"jobs", "--scheduler", cluster.address()}, dir + "/jobs.log", &rc);
  ASSERT_EQ(rc, 0) << listed;
  EXPECT_NE(listed.find(absl::StrFormat("ppl %.4f->%.4f KL %.6f", want1.base.perplexity, want1.quant.perplexity,
                                        want1.mean_kl)),
            std::string::npos)
      << listed;

  const auto metrics = testing::HttpRequest(cluster.scheduler_metrics_port(), "GET", "/metrics");
  ASSERT_EQ(metrics.status, 200);
  const auto samples = testing::ParseSamples(metrics.body);
  const std::string job = absl::StrCat("{job_id=\"", id1, "\"");
  EXPECT_EQ(samples.at("qforge_job_quality_kl" + job + "}"), want1.mean_kl);
  EXPECT_EQ(samples.at("qforge_job_quality_top1" + job + "}"), want1.top1_agreement);
  EXPECT_EQ(samples.at("qforge_job_quality_perplexity" + job + ",model=\"source\"}"), want1.base.perplexity);
  EXPECT_EQ(samples.at("qforge_job_quality_perplexity" + job + ",model=\"version\"}"), want1.quant.perplexity);
  EXPECT_TRUE(testing::PromtoolAccepts(metrics.body, dir)) << testing::ReadFile(dir + "/promtool-input.txt.out");
}

// Tokenizer-free evaluation (recipe.eval_streams): 6 streams of 200 tokens sampled from the source, windows of 64
// (four per stream, the last of 8 tokens), shared over 5 tasks so that shares begin and end inside streams. The job
// prints the very lines `qforge eval VERSION --base SOURCE --streams 6 --stream-len 200 --seed 7 --window 64`
// prints, whose numbers come from sampling all six streams in one process.
TEST(EvaluationTest, SampledStreamsJobEqualsQforgeEvalStreams) {
  const std::string dir = TempDir("evaluation-streams");
  Cluster cluster(dir, {.lease_ms = 5000});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1", 1);
  cluster.StartWorker("w2", 2);

  v1::SubmitJobRequest req = EvalRequest("q4_0", "stories-q4s", {.window = 64, .tasks = 5});
  req.mutable_recipe()->clear_evaluation_text_uri();
  req.mutable_recipe()->set_eval_streams(6);
  req.mutable_recipe()->set_eval_stream_length(200);
  req.mutable_recipe()->set_eval_seed(7);
  std::string id;
  ASSERT_TRUE(cluster.Submit(req, &id).ok());
  const v1::Job job = cluster.WaitJob(id);
  ASSERT_EQ(job.progress().state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  ASSERT_TRUE(job.has_quality()) << job.DebugString();
  const v1::QualityReport& q = job.quality();
  EXPECT_EQ(q.windows(), 24);
  EXPECT_EQ(q.tokens(), 6 * (3 * 63 + 7));
  EXPECT_EQ(q.window(), 64);
  const std::string label = "streams (6 x 200 tokens sampled from the base model, seed 7, T=1)";
  EXPECT_EQ(q.text_source(), label);
  EXPECT_GT(q.kl_mean(), 0.0);
  EXPECT_GT(q.top1_agreement(), 0.5);
  EXPECT_LT(q.top1_agreement(), 1.0);

  const std::string exported = dir + "/stories-q4s.gguf";
  int rc = 0;
  RunCli({"export", "stories-q4s@" + job.result().version(), "--format", "gguf", exported, "--scheduler",
          cluster.address()},
         dir + "/export.log", &rc);
  ASSERT_EQ(rc, 0) << testing::ReadFile(dir + "/export.log");
  const std::string evaluated = RunCli({"eval", exported, "--base", kStories, "--tokenizer", kTok512, "--streams", "6",
                                        "--stream-len", "200", "--seed", "7", "--window", "64"},
                                       dir + "/eval.log", &rc);
  ASSERT_EQ(rc, 0) << evaluated;
  const std::string watched = RunCli({"watch", id, "--scheduler", cluster.address()}, dir + "/watch.log", &rc);
  ASSERT_EQ(rc, 0) << watched;
  const auto eval_lines = LinesStartingWith(evaluated, label);
  ASSERT_EQ(eval_lines.size(), 2u) << evaluated;
  EXPECT_EQ(LinesStartingWith(watched, label), eval_lines) << watched;
  // Five shares, each leased.
  std::set<std::string> evaluate_tasks;
  for (const auto& e : testing::ParseTaskLog(testing::ReadFile(cluster.task_log()))) {
    if (e.what == "lease" && e.kind == "evaluate") evaluate_tasks.insert(e.task);
  }
  EXPECT_EQ(evaluate_tasks.size(), 5u);
}

// The only worker SIGKILLed while it holds an evaluate task: another worker runs that share again after the lease
// expired. Then the scheduler is SIGKILLed with part of the evaluation committed and restarted on the same store:
// committed shares are not leased again. Job.quality still equals the in-process comparison exactly.
TEST(EvaluationTest, WorkerAndSchedulerKilledDuringEvaluationGiveTheSameNumbers) {
  const std::string dir = TempDir("evaluation-kill");
  Cluster cluster(dir, {.lease_ms = 1500});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("victim");
  // 8 shares of 30 windows of 128 tokens: each share runs long enough for the kills to land inside evaluation.
  const Evaluation e{.window = 128, .chunks = 240, .tasks = 8};
  std::string job_id;
  ASSERT_TRUE(cluster.Submit(EvalRequest("q4_0", "stories-kill", e), &job_id).ok());
  std::string victim_task;
  WaitForLog(cluster, [&](const auto& events) {
    for (const auto& ev : events) {
      if (ev.what == "lease" && ev.kind == "evaluate") victim_task = ev.task;
    }
    return !victim_task.empty();
  });
  cluster.Kill("victim");
  const auto at_kill = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  const bool victim_committed = std::any_of(at_kill.begin(), at_kill.end(), [&](const auto& ev) {
    return ev.what == "commit" && ev.task == victim_task;
  });
  cluster.StartWorker("survivor");
  const int survivor = cluster.pid("survivor");
  // Two shares committed by the survivor, then the scheduler dies.
  WaitForLog(cluster, [&](const auto& events) {
    std::set<std::string> evaluating;
    int n = 0;
    for (const auto& ev : events) {
      if (ev.what == "lease" && ev.kind == "evaluate") evaluating.insert(ev.task);
      n += ev.pid == survivor && ev.what == "commit" && evaluating.contains(ev.task);
    }
    return n >= 2;
  });
  cluster.Kill("scheduler");
  const auto at_crash = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  std::set<std::string> committed_before;
  for (const auto& ev : at_crash) {
    if (ev.what == "commit") committed_before.insert(ev.task);
  }
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  const v1::Job job = cluster.WaitJob(job_id);
  ExpectQualityEquals(job, EvalInProcess(cluster, job, e), e);
  EXPECT_EQ(job.quality().windows(), 240);

  const auto events = testing::ParseTaskLog(testing::ReadFile(cluster.task_log()));
  int survivor_ran_victims = 0, evaluate_after_restart = 0;
  for (size_t i = 0; i < events.size(); ++i) {
    const auto& ev = events[i];
    if (ev.what != "lease") continue;
    if (ev.pid == survivor && ev.task == victim_task) ++survivor_ran_victims;
    if (i >= at_crash.size()) {
      EXPECT_FALSE(committed_before.contains(ev.task)) << ev.task << " was committed before the crash and ran again";
      evaluate_after_restart += ev.kind == "evaluate";
    }
  }
  EXPECT_GT(evaluate_after_restart, 0) << "the evaluation had finished before the scheduler crash; nothing was tested";
  if (victim_committed) {
    std::cout << "the victim's evaluate task completed just before the kill\n";
  } else {
    EXPECT_EQ(survivor_ran_victims, 1) << "the killed worker's evaluate task " << victim_task << " was not re-run";
    std::cout << "the victim was killed during " << victim_task << "; the survivor evaluated that share again\n";
  }
}

// Bad evaluation fields: errors naming the field, before any job exists.
TEST(EvaluationTest, BadEvaluationFieldsGetClearErrors) {
  const std::string dir = TempDir("evaluation-bad");
  const std::string root = dir + "/models", outside = dir + "/elsewhere";
  std::filesystem::create_directories(root);
  std::filesystem::create_directories(outside);
  std::filesystem::copy_file(kStories, root + "/stories.bin");
  // Not beside the checkpoint under a name the llama2.c reader picks up (tok512.model is one): no vocabulary.
  std::filesystem::copy_file(kTok512, root + "/spm.model");
  std::filesystem::copy_file(kEvalText, root + "/eval.txt");
  std::filesystem::copy_file(kEvalText, outside + "/eval.txt");
  Cluster cluster(dir + "/cluster", {.allowed_roots = {root}});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());

  struct Case {
    std::string what;
    v1::SubmitJobRequest req;
    grpc::StatusCode code;
    std::string message_has;
  };
  auto good = [&] {
    v1::SubmitJobRequest req = EvalRequest("q8_0", "stories", {});
    req.set_source_uri(root + "/stories.bin");
    req.set_tokenizer_uri(root + "/spm.model");
    req.mutable_recipe()->set_evaluation_text_uri(root + "/eval.txt");
    return req;
  };
  std::vector<Case> cases;
  cases.push_back({"missing text", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_text_uri"});
  cases.back().req.mutable_recipe()->set_evaluation_text_uri(root + "/missing.txt");
  cases.push_back({"outside the roots", good(), grpc::StatusCode::PERMISSION_DENIED, "recipe.evaluation_text_uri"});
  cases.back().req.mutable_recipe()->set_evaluation_text_uri(outside + "/eval.txt");
  cases.push_back({"a directory", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_text_uri"});
  cases.back().req.mutable_recipe()->set_evaluation_text_uri(root);
  cases.push_back({"a URI", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_text_uri"});
  cases.back().req.mutable_recipe()->set_evaluation_text_uri("s3://bucket/eval.txt");
  cases.push_back({"no vocabulary", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "stories.bin carries no vocabulary to tokenize the text with; give the job a tokenizer_uri"});
  cases.back().req.clear_tokenizer_uri();
  cases.push_back({"window past the context", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.evaluation_window: 513 is more than the model's context length 512"});
  cases.back().req.mutable_recipe()->set_evaluation_window(513);
  cases.push_back({"window 1", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_window: must be 2.."});
  cases.back().req.mutable_recipe()->set_evaluation_window(1);
  cases.push_back({"no chunks", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_chunks"});
  cases.back().req.mutable_recipe()->set_evaluation_chunks(0);
  cases.push_back({"too many tasks", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_tasks: must be 1..1024"});
  cases.back().req.mutable_recipe()->set_evaluation_tasks(1025);
  cases.push_back({"window without text", good(), grpc::StatusCode::INVALID_ARGUMENT, "without evaluation_text_uri"});
  cases.back().req.mutable_recipe()->clear_evaluation_text_uri();
  cases.back().req.mutable_recipe()->set_evaluation_window(64);
  cases.push_back({"streams and a text", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.eval_streams"});
  cases.back().req.mutable_recipe()->set_eval_streams(8);
  cases.push_back({"negative streams", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.eval_streams"});
  cases.back().req.mutable_recipe()->clear_evaluation_text_uri();
  cases.back().req.mutable_recipe()->set_eval_streams(-1);
  cases.push_back({"streams past the context", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.eval_stream_length"});
  cases.back().req.mutable_recipe()->clear_evaluation_text_uri();
  cases.back().req.mutable_recipe()->set_eval_streams(2);
  cases.back().req.mutable_recipe()->set_eval_stream_length(100000);
  cases.push_back({"stream length without streams", good(), grpc::StatusCode::INVALID_ARGUMENT,
                   "recipe.eval_stream_length"});
  cases.back().req.mutable_recipe()->set_eval_stream_length(64);
  cases.push_back({"chunks of streams", good(), grpc::StatusCode::INVALID_ARGUMENT, "recipe.evaluation_chunks"});
  cases.back().req.mutable_recipe()->clear_evaluation_text_uri();
  cases.back().req.mutable_recipe()->set_eval_streams(2);
  cases.back().req.mutable_recipe()->set_evaluation_chunks(4);
  for (const Case& c : cases) {
    std::string id;
    const grpc::Status s = cluster.Submit(c.req, &id);
    EXPECT_EQ(s.error_code(), c.code) << c.what << ": " << s.error_message();
    EXPECT_NE(s.error_message().find(c.message_has), std::string::npos) << c.what << ": " << s.error_message();
  }
  grpc::ClientContext ctx;
  v1::ListJobsResponse jobs;
  ASSERT_TRUE(cluster.jobs().ListJobs(&ctx, {}, &jobs).ok());
  EXPECT_EQ(jobs.jobs_size(), 0);
  // And the good request is accepted.
  std::string id;
  EXPECT_TRUE(cluster.Submit(good(), &id).ok());
}

}  // namespace
}  // namespace qforge
