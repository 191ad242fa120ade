// End-to-end tests of the serving tier: a real qforge-server process (and, for the store path, a scheduler and
// a worker), driven over gRPC and HTTP on 127.0.0.1, scraped by promtool and by a real Prometheus.
#include <signal.h>
#include <sys/wait.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/runtime/generate.h"
#include "core/tokenizer/tokenizer.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "qforge/v1/inference.grpc.pb.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "tests/cluster.h"
#include "tests/http_client.h"
#include "tests/server_process.h"

namespace qforge {
namespace {

namespace v1 = qforge::v1;
using formats::Json;
using testing::Cluster;

using testing::TempDir;
const std::string kStories = testing::Stories260KPath();
const std::string kTok512 = testing::Tok512Path();

using testing::ServerProcess;
using testing::SseData;

v1::GenerateRequest GenerateRequest(const std::string& model, const std::string& prompt, int max_tokens,
                                    float temperature = 0, uint64_t seed = 0) {
  v1::GenerateRequest req;
  req.mutable_model()->set_name(model);
  req.set_prompt(prompt);
  req.set_max_tokens(max_tokens);
  req.set_temperature(temperature);
  req.set_seed(seed);
  return req;
}

// What core/runtime Generate makes of `model` alone: the reference for the server's streamed ids.
std::vector<int> GenerateInProcess(const Model& model, const std::string& prompt, int max_tokens) {
  auto tokenizer = LoadTokenizer(kTok512, model.config.vocab_size);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto ids = (*tokenizer)->Encode(prompt, true);
  auto t = Transformer::Create(std::make_shared<const Model>(model), RuntimeOptions{.threads = 1});
  EXPECT_TRUE(t.ok()) << t.status();
  GenerateOptions o;
  o.max_new_tokens = max_tokens;
  o.sampler.temperature = 0;
  o.eos_id = (*tokenizer)->eos_id();
  auto r = qforge::Generate(**t, *ids, o);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int>();
}

std::string CompletionBody(const std::string& model, const std::string& prompt, int max_tokens, bool stream) {
  return "{\"model\": \"" + model + "\", \"prompt\": \"" + prompt + "\", \"max_tokens\": " + std::to_string(max_tokens) +
         ", \"temperature\": 0, \"stream\": " + (stream ? "true" : "false") + "}";
}

// ---------------------------------------------------------------------------------------------------------------

TEST(ServingTest, QuantizedThroughTheSchedulerThenServedAndScraped) {
  const std::string dir = TempDir("e2e");
  Cluster cluster(dir + "/cluster", {});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  ASSERT_EQ(cluster.QuantizeAndWait(kStories, "stories", "q8_0").progress().state(), v1::JOB_STATE_SUCCEEDED);

  ServerProcess server(dir, {"--scheduler", cluster.address()});
  {
    v1::LoadModelResponse loaded;
    const grpc::Status s = server.LoadStored("stories", "1", kTok512, &loaded);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\n" << server.log();
    EXPECT_GT(loaded.resident_bytes(), 0u);
  }
  // gRPC: streamed piece by piece, ending with one done message; the ids are what the runtime generates alone
  // from the stored version.
  const std::string prompt = "Once upon a time";
  const auto stream = server.Generate(GenerateRequest("stories@1", prompt, 40));
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  ASSERT_GT(stream.messages.size(), 2u);
  EXPECT_TRUE(stream.messages.back().done());
  EXPECT_EQ(stream.messages.back().completion_tokens(), static_cast<int>(stream.tokens.size()));
  auto stored = rpc::FetchModel(cluster.artifacts(), storage::ModelRef{"stories", 1});
  ASSERT_TRUE(stored.ok()) << stored.status();
  EXPECT_EQ(stream.tokens, GenerateInProcess(*stored, prompt, 40));

  // HTTP, whole and streamed (server-sent events): the same text.
  const auto whole = testing::HttpRequest(server.http_port(), "POST", "/v1/completions",
                                          CompletionBody("stories@1", prompt, 40, false));
  ASSERT_EQ(whole.status, 200) << whole.body;
  auto json = formats::ParseJson(whole.body);
  ASSERT_TRUE(json.ok()) << whole.body;
  EXPECT_EQ(json->Find("choices")->array()[0].Find("text")->string_value(), stream.text);
  EXPECT_EQ(json->Find("usage")->Find("completion_tokens")->int_value(), static_cast<int64_t>(stream.tokens.size()));
  // The gRPC stream's cache went back to the pool holding this prompt: all of it but the last token (whose logits
  // give the first new token) was reused, and the text is still the same.
  const int64_t prompt_tokens = json->Find("usage")->Find("prompt_tokens")->int_value();
  EXPECT_EQ(prompt_tokens, stream.messages.back().prompt_tokens());
  EXPECT_EQ(stream.messages.back().cached_prompt_tokens(), 0);  // the first request
  EXPECT_EQ(json->Find("usage")->Find("prompt_tokens_details")->Find("cached_tokens")->int_value(), prompt_tokens - 1);
  const auto sse = testing::HttpRequest(server.http_port(), "POST", "/v1/completions",
                                        CompletionBody("stories@1", prompt, 40, true));
  ASSERT_EQ(sse.status, 200);
  EXPECT_NE(sse.headers.find("text/event-stream"), std::string::npos);
  const std::vector<std::string> events = SseData(sse.body);
  ASSERT_GT(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string streamed;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    auto e = formats::ParseJson(events[i]);
    ASSERT_TRUE(e.ok()) << events[i];
    streamed += e->Find("choices")->array()[0].Find("text")->string_value();
  }
  EXPECT_EQ(streamed, stream.text);

  // Score: one log-prob per token after the first, perplexity their exp-mean.
  {
    grpc::ClientContext ctx;
    v1::ScoreRequest req;
    req.mutable_model()->set_name("stories@1");
    req.set_text("Once upon a time, there was a little girl.");
    v1::ScoreResponse resp;
    ASSERT_TRUE(server.stub().Score(&ctx, req, &resp).ok());
    ASSERT_EQ(resp.token_logprobs_size(), resp.tokens());  // every token after BOS is scored
    ASSERT_GT(resp.tokens(), 5);
    double nll = 0;
    for (float lp : resp.token_logprobs()) nll -= lp;
    EXPECT_NEAR(resp.perplexity(), std::exp(nll / resp.token_logprobs_size()), 1e-3 * resp.perplexity());
  }

  // /metrics passes promtool, and a real Prometheus scrapes it.
  const auto scrape = testing::HttpRequest(server.http_port(), "GET", "/metrics");
  ASSERT_EQ(scrape.status, 200);
  for (const char* name : {"qforge_requests_total", "qforge_time_to_first_token_seconds_bucket",
                           "qforge_time_per_output_token_seconds_bucket", "qforge_model_weight_bytes",
                           "qforge_model_fp16_bytes", "qforge_kv_cache_bytes", "qforge_process_resident_bytes",
                           "qforge_energy_joules_total", "qforge_cost_per_million_tokens_dollars"}) {
    EXPECT_NE(scrape.body.find(name), std::string::npos) << name << " missing from\n" << scrape.body;
  }
  {
    // The cost model prices memory held over time: served and fp16 per-token costs stand in the ratio of the bytes.
    std::map<std::string, double> samples = testing::ParseSamples(scrape.body);
    const double served = samples["qforge_cost_per_million_tokens_dollars{model=\"stories@1\",weights=\"served\"}"];
    const double fp16 = samples["qforge_cost_per_million_tokens_dollars{model=\"stories@1\",weights=\"fp16\"}"];
    const double bytes = samples["qforge_model_weight_bytes{model=\"stories@1\"}"];
    const double fp16_bytes = samples["qforge_model_fp16_bytes{model=\"stories@1\"}"];
    ASSERT_GT(served, 0);
    ASSERT_GT(bytes, 0);
    EXPECT_NEAR(served / fp16, bytes / fp16_bytes, 1e-9);
    EXPECT_GT(samples["qforge_tokens_total{kind=\"completion\",model=\"stories@1\"}"], 100);
    // The HTTP requests after the first gRPC stream reused its prompt (the streamed one and the scored text may too).
    EXPECT_GE(samples["qforge_prefix_cache_hits_total{model=\"stories@1\"}"], 2);
    EXPECT_GE(samples["qforge_prefix_cache_tokens_total{model=\"stories@1\"}"], 2 * (prompt_tokens - 1));
  }
  EXPECT_TRUE(testing::PromtoolAccepts(scrape.body, dir)) << testing::ReadFile(dir + "/promtool-input.txt.out");
  const int prom_port = testing::PickFreePort();
  std::ofstream(dir + "/prometheus.yml") << "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: qforge\n"
                                         << "    static_configs:\n      - targets: ['127.0.0.1:" << server.http_port()
                                         << "']\n";
  const pid_t prom = testing::Spawn({"/usr/bin/prometheus", "--config.file=" + dir + "/prometheus.yml",
                                     "--storage.tsdb.path=" + dir + "/tsdb",
                                     "--web.listen-address=127.0.0.1:" + std::to_string(prom_port)},
                                    dir + "/prometheus.log");
  bool scraped = false;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!scraped && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    const auto q = testing::HttpRequest(prom_port, "GET",
                                        "/api/v1/query?query=qforge_tokens_total%7Bkind%3D%22completion%22%7D");
    scraped = q.status == 200 && q.body.find("\"model\":\"stories@1\"") != std::string::npos;
  }
  kill(prom, SIGTERM);
  waitpid(prom, nullptr, 0);
  EXPECT_TRUE(scraped) << "Prometheus never saw qforge_tokens_total: " << testing::ReadFile(dir + "/prometheus.log");
  EXPECT_EQ(server.Stop(), 0);
}

TEST(ServingTest, MalformedRequestsGetCleanErrorsAndTheServerKeepsServing) {
  const std::string dir = TempDir("malformed");
  ServerProcess server(dir, {"--model", "s260k=" + kStories, "--tokenizer", kTok512});
  auto expect_code = [&](const v1::GenerateRequest& req, grpc::StatusCode code, const std::string& what) {
    const auto s = server.Generate(req);
    EXPECT_EQ(s.status.error_code(), code) << what << ": " << s.status.error_message();
    EXPECT_FALSE(s.status.error_message().empty()) << what;
  };
  expect_code(GenerateRequest("s260k@file", "", 10), grpc::StatusCode::INVALID_ARGUMENT, "empty prompt");
  expect_code(GenerateRequest("s260k@file", "Once", 1000000), grpc::StatusCode::INVALID_ARGUMENT, "absurd max_tokens");
  expect_code(GenerateRequest("s260k@file", "Once", -5), grpc::StatusCode::INVALID_ARGUMENT, "negative max_tokens");
  expect_code(GenerateRequest("nosuchmodel", "Once", 10), grpc::StatusCode::NOT_FOUND, "unknown model");
  expect_code(GenerateRequest("s260k@v1.0", "Once", 10), grpc::StatusCode::INVALID_ARGUMENT, "bad version string");
  expect_code(GenerateRequest("s260k@file", "Once", 10, -1.0f), grpc::StatusCode::INVALID_ARGUMENT, "negative temperature");
  // A client that disconnects mid-stream.
  const auto cut = server.Generate(GenerateRequest("s260k@file", "Once upon a time", 400, 1.0f, 7), 2);
  EXPECT_EQ(cut.status.error_code(), grpc::StatusCode::CANCELLED);
  // HTTP: malformed bodies, unknown paths, and a client that leaves mid-stream.
  EXPECT_EQ(testing::HttpRequest(server.http_port(), "POST", "/v1/completions", "{not json").status, 400);
  EXPECT_EQ(testing::HttpRequest(server.http_port(), "POST", "/v1/completions", "{\"model\": \"s260k@file\"}").status, 400);
  EXPECT_EQ(testing::HttpRequest(server.http_port(), "POST", "/v1/completions",
                                 CompletionBody("nosuchmodel", "Once", 5, false)).status, 404);
  EXPECT_EQ(testing::HttpRequest(server.http_port(), "GET", "/v1/nothing").status, 404);
  int pieces = 0;
  testing::HttpRequest(server.http_port(), "POST", "/v1/completions", CompletionBody("s260k@file", "Once", 400, true),
                       [&](const std::string&) { return ++pieces < 3; });
  // Still healthy and serving.
  EXPECT_EQ(server.Health(), grpc::health::v1::HealthCheckResponse::SERVING);
  const auto ok = server.Generate(GenerateRequest("s260k@file", "Once upon a time", 20));
  EXPECT_TRUE(ok.status.ok()) << ok.status.error_message();
  EXPECT_EQ(ok.tokens.size(), 20u);
  EXPECT_EQ(testing::HttpRequest(server.http_port(), "GET", "/healthz").status, 200);
  // Graceful shutdown: a stream in flight when SIGTERM arrives still finishes, then the process exits 0.
  ServerProcess::Stream last;
  std::atomic<bool> started{false};
  std::thread client([&] {
    v1::GenerateRequest req = GenerateRequest("s260k@file", "Once upon a time", 300, 1.0f, 3);
    grpc::ClientContext ctx;
    auto reader = server.stub().Generate(&ctx, req);
    v1::GenerateResponse r;
    while (reader->Read(&r)) {
      started = true;
      last.messages.push_back(r);
    }
    last.status = reader->Finish();
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(server.Stop(), 0) << server.log();
  client.join();
  EXPECT_TRUE(last.status.ok()) << last.status.error_message();
  ASSERT_FALSE(last.messages.empty());
  EXPECT_TRUE(last.messages.back().done());
}

TEST(ServingTest, ThirtyTwoConcurrentStreamsAllSucceedAndShareBatches) {
  const std::string dir = TempDir("load");
  ServerProcess server(dir, {"--model", "s260k=" + kStories, "--tokenizer", kTok512, "--max-running", "32"});
  constexpr int kStreams = 32, kRequestsEach = 2, kMaxTokens = 64;
  std::atomic<int> failures{0}, tokens{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < kStreams; ++i) {
    clients.emplace_back([&, i] {
      for (int r = 0; r < kRequestsEach; ++r) {
        const auto s = server.Generate(GenerateRequest("s260k@file", "Once upon a time", kMaxTokens, 1.0f, i * 100 + r));
        if (!s.status.ok() || !s.messages.back().done()) ++failures;
        tokens += static_cast<int>(s.tokens.size());
      }
    });
  }
  for (std::thread& t : clients) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(tokens.load(), kStreams * kRequestsEach * 4);
  // Continuous batching: some steps decoded more than one sequence.
  const std::string metrics = testing::HttpRequest(server.http_port(), "GET", "/metrics").body;
  double count = 0, single = 0;
  std::istringstream in(metrics);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("qforge_batch_sequences_count", 0) == 0) count = std::stod(line.substr(line.rfind(' ') + 1));
    if (line.rfind("qforge_batch_sequences_bucket", 0) == 0 && line.find("le=\"1\"") != std::string::npos) {
      single = std::stod(line.substr(line.rfind(' ') + 1));
    }
  }
  EXPECT_GT(count, 0);
  EXPECT_LT(single, count) << "no step batched more than one sequence";
  EXPECT_EQ(server.Stop(), 0);
}

}  // namespace
}  // namespace qforge
