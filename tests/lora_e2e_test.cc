// End-to-end LoRA serving: a real qforge-server on stories260K with --adapter-root; a GGUF and a PEFT adapter
// (written by core/lora's writers) loaded, listed, used per request over HTTP and gRPC, batched with each other and
// with the base model, and unloaded at run time; then 64 concurrent gRPC streams over mixed adapters; then adapters
// stored in the artifact store as versions of a quantized base (qforge put-adapter, ArtifactService.PutAdapter) and
// loaded from there by a server that reads the store.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/lora/lora.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/cluster.h"
#include "tests/http_client.h"
#include "tests/server_process.h"

namespace qforge {
namespace {

using formats::Json;
using testing::HttpRequest;
using testing::ServerProcess;
using ::testing::HasSubstr;

const std::string kStories = testing::Stories260KPath();
const std::string kTok512 = testing::Tok512Path();

Json Parse(const std::string& text) {
  auto j = formats::ParseJson(text);
  EXPECT_TRUE(j.ok()) << j.status() << ": " << text;
  return j.ok() ? *j : Json();
}

void WriteFile(const std::filesystem::path& p, const void* data, size_t n) {
  std::ofstream(p, std::ios::binary).write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
}

class LoraServingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
    dir_ = testing::TempDir("lora-e2e");
    auto base = formats::LoadModel(kStories);
    ASSERT_TRUE(base.ok()) << base.status();
    using lora::LoraTarget;
    auto gguf_adapter = lora::MakeRandomAdapter(
        base->config,
        {LoraTarget::kAttnQ, LoraTarget::kAttnK, LoraTarget::kAttnV, LoraTarget::kAttnOutput, LoraTarget::kFfnGate,
         LoraTarget::kFfnUp, LoraTarget::kFfnDown},
        8, 16, 1, 0.1f);
    auto peft_adapter = lora::MakeRandomAdapter(
        base->config, {LoraTarget::kAttnQ, LoraTarget::kAttnV, LoraTarget::kAttnOutput, LoraTarget::kFfnDown}, 4, 8,
        2, 0.2f);
    ASSERT_TRUE(gguf_adapter.ok() && peft_adapter.ok());
    auto gguf = lora::SerializeGgufAdapter(*gguf_adapter);
    auto peft = lora::SerializePeftAdapter(*peft_adapter, base->config);
    ASSERT_TRUE(gguf.ok() && peft.ok());
    const std::filesystem::path root = std::filesystem::path(dir_) / "adapters";
    std::filesystem::create_directories(root / "story-peft");
    WriteFile(root / "story.gguf", gguf->data(), gguf->size());
    WriteFile(root / "story-peft" / "adapter_model.safetensors", peft->safetensors.data(), peft->safetensors.size());
    WriteFile(root / "story-peft" / "adapter_config.json", peft->config_json.data(), peft->config_json.size());
    const std::string bad = "GGUF\x03\0\0\0garbage";
    WriteFile(root / "bad.gguf", bad.data(), bad.size());
    server_ = std::make_unique<ServerProcess>(
        dir_, std::vector<std::string>{"--model", "s260k=" + kStories, "--tokenizer", kTok512, "--adapter-root",
                                       root.string(), "--max-running", "64"});
    port_ = server_->http_port();
    ASSERT_GT(port_, 0);
  }

  testing::HttpResponse Post(const std::string& path, const std::string& body) {
    return HttpRequest(port_, "POST", path, body);
  }
  void LoadBoth() {
    const auto g = Post("/v1/adapters", R"({"name": "story", "path": "story.gguf"})");
    ASSERT_EQ(g.status, 200) << g.body;
    const auto p = Post("/v1/adapters", R"({"name": "story-peft", "path": "story-peft", "model": "s260k@file"})");
    ASSERT_EQ(p.status, 200) << p.body;
  }
  // Greedy /v1/completions text, with `adapter` ("" = none).
  std::string Complete(const std::string& adapter, int* status = nullptr, std::string* body = nullptr) {
    std::string req = R"({"model": "s260k@file", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0)";
    if (!adapter.empty()) req += ", \"adapter\": " + Json::String(adapter).Dump();
    req += "}";
    const auto r = Post("/v1/completions", req);
    if (status) *status = r.status;
    if (body) *body = r.body;
    if (r.status != 200) return "";
    return Parse(r.body).Find("choices")->array()[0].Find("text")->string_value();
  }

  std::string dir_;
  std::unique_ptr<ServerProcess> server_;
  int port_ = 0;
};

TEST_F(LoraServingTest, LoadListServeBatchAndUnload) {
  const auto g = Post("/v1/adapters", R"({"name": "story", "path": "story.gguf"})");
  ASSERT_EQ(g.status, 200) << g.body;
  const Json gj = Parse(g.body);
  EXPECT_EQ(gj.Find("format")->string_value(), "gguf");
  EXPECT_EQ(gj.Find("rank")->int_value(), 8);
  EXPECT_EQ(gj.Find("model")->string_value(), "s260k@file");
  EXPECT_EQ(gj.Find("matrices")->int_value(), 7 * 5);  // every linear of stories260K's 5 layers
  const auto p = Post("/v1/adapters", R"({"name": "story-peft", "path": "story-peft", "model": "s260k@file"})");
  ASSERT_EQ(p.status, 200) << p.body;
  EXPECT_EQ(Parse(p.body).Find("format")->string_value(), "peft");

  // Load errors, each naming what is wrong.
  struct Bad {
    std::string body;
    int status;
    std::string message;
  };
  for (const Bad& b : std::vector<Bad>{
           {R"({"name": "story", "path": "story.gguf"})", 409, "already loaded"},
           {R"({"name": "x", "path": "/etc/passwd"})", 403, "outside the adapter root"},
           {R"({"name": "x", "path": "../../etc/passwd"})", 403, "outside the adapter root"},
           {R"({"name": "x", "path": "missing.gguf"})", 404, "path: missing.gguf"},
           {R"({"name": "x", "path": "bad.gguf"})", 400, "path: bad.gguf"},
           {R"({"name": "a b", "path": "story.gguf"})", 400, "name: 1 to 64"},
           {R"({"path": "story.gguf"})", 400, "name: required"},
           {R"({"name": "x"})", 400, "path, artifact: give exactly one"},
           {R"({"name": "x", "path": "story.gguf", "model": "nope@file"})", 404, "nope"},
       }) {
    const auto r = Post("/v1/adapters", b.body);
    EXPECT_EQ(r.status, b.status) << b.body << " -> " << r.body;
    EXPECT_THAT(r.body, HasSubstr(b.message)) << b.body;
  }
  const auto list = HttpRequest(port_, "GET", "/v1/adapters");
  ASSERT_EQ(list.status, 200);
  ASSERT_EQ(Parse(list.body).Find("data")->array().size(), 2u) << list.body;

  // Alone, one after another.
  const std::vector<std::string> adapters = {"", "story", "story-peft"};
  std::vector<std::string> alone;
  for (const std::string& a : adapters) {
    int status = 0;
    std::string body;
    alone.push_back(Complete(a, &status, &body));
    ASSERT_EQ(status, 200) << body;
  }
  EXPECT_NE(alone[1], alone[0]);
  EXPECT_NE(alone[2], alone[0]);
  EXPECT_NE(alone[1], alone[2]);
  // All at once: four requests per adapter (and the base) in flight together give the same texts.
  std::vector<std::string> batched(12);
  std::vector<std::thread> threads;
  for (int i = 0; i < 12; ++i) threads.emplace_back([&, i] { batched[i] = Complete(adapters[i % 3]); });
  for (auto& t : threads) t.join();
  for (int i = 0; i < 12; ++i) EXPECT_EQ(batched[i], alone[i % 3]) << "request " << i;

  // gRPC names the adapter in GenerateRequest.adapter: the same greedy text.
  v1::GenerateRequest req;
  req.mutable_model()->set_name("s260k@file");
  req.set_prompt("Once upon a time");
  req.set_max_tokens(24);
  req.set_temperature(0);
  req.set_adapter("story");
  const auto stream = server_->Generate(req);
  ASSERT_TRUE(stream.status.ok()) << stream.status.error_message();
  EXPECT_EQ(stream.text, alone[1]);
  req.set_adapter("nope");
  EXPECT_EQ(server_->Generate(req).status.error_code(), grpc::StatusCode::NOT_FOUND);

  // Chat takes the same member.
  const auto chat = Post("/v1/chat/completions", R"({"model": "s260k@file", "adapter": "story-peft", "max_tokens": 8,
      "messages": [{"role": "user", "content": "Hi"}]})");
  EXPECT_EQ(chat.status, 200) << chat.body;

  int status = 0;
  std::string body;
  Complete("nope", &status, &body);
  EXPECT_EQ(status, 404);
  EXPECT_THAT(body, HasSubstr("adapter: nope is not loaded for s260k@file"));
  const auto wrong_type = Post("/v1/completions", R"({"model": "s260k@file", "prompt": "x", "adapter": 3})");
  EXPECT_EQ(wrong_type.status, 400);
  EXPECT_THAT(wrong_type.body, HasSubstr("adapter: must be a string"));

  // Unload: the adapter is gone for new requests, the others stay.
  const auto del = HttpRequest(port_, "DELETE", "/v1/adapters?name=story&model=s260k%40file");
  EXPECT_EQ(del.status, 200) << del.body;
  Complete("story", &status);
  EXPECT_EQ(status, 404);
  EXPECT_EQ(Complete("story-peft"), alone[2]);
  EXPECT_EQ(HttpRequest(port_, "DELETE", "/v1/adapters?name=story").status, 404);
  EXPECT_EQ(HttpRequest(port_, "DELETE", "/v1/adapters").status, 400);
  EXPECT_EQ(Parse(HttpRequest(port_, "GET", "/v1/adapters").body).Find("data")->array().size(), 1u);
  // Loading it again under the same name works.
  EXPECT_EQ(Post("/v1/adapters", R"({"name": "story", "path": "story.gguf"})").status, 200);
  EXPECT_EQ(Complete("story"), alone[1]);
}

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5))];
}

// 64 gRPC streams at once, round-robin over the base model and the two adapters, each 32 sampled tokens: no
// failure, and the batch really held many sequences (what one step saw is in /metrics' qforge_batch_sequences).
TEST_F(LoraServingTest, SixtyFourConcurrentStreamsOverMixedAdapters) {
  LoadBoth();
  const std::vector<std::string> adapters = {"", "story", "story-peft"};
  constexpr int kStreams = 64;
  std::vector<double> ttft(kStreams, -1);
  std::vector<int> tokens(kStreams, 0);
  std::atomic<int> failures{0};
  std::mutex mu;
  std::string first_error;
  std::vector<std::thread> threads;
  const auto start = std::chrono::steady_clock::now();
  for (int s = 0; s < kStreams; ++s) {
    threads.emplace_back([&, s] {
      v1::GenerateRequest req;
      req.mutable_model()->set_name("s260k@file");
      req.set_prompt("Once upon a time");
      req.set_max_tokens(32);
      req.set_temperature(1.0f);
      req.set_seed(static_cast<uint64_t>(s));
      req.set_adapter(adapters[s % 3]);
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
      const auto sent = std::chrono::steady_clock::now();
      auto reader = server_->stub().Generate(&ctx, req);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) {
        if (msg.token_ids_size() > 0 && ttft[s] < 0) {
          ttft[s] = std::chrono::duration<double>(std::chrono::steady_clock::now() - sent).count();
        }
        tokens[s] += msg.token_ids_size();
      }
      const grpc::Status st = reader->Finish();
      if (!st.ok() || tokens[s] == 0) {
        ++failures;
        std::lock_guard<std::mutex> l(mu);
        if (first_error.empty()) first_error = st.error_message();
      }
    });
  }
  for (auto& t : threads) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(failures.load(), 0) << first_error;
  int64_t total = 0;
  for (int n : tokens) total += n;
  std::printf("lora load: %d streams over {base, gguf r8, peft r4}: %lld tokens in %.2f s (%.1f tokens/s), "
              "TTFT p50 %.1f ms, p99 %.1f ms\n",
              kStreams, static_cast<long long>(total), seconds, static_cast<double>(total) / seconds,
              1e3 * Percentile(ttft, 0.5), 1e3 * Percentile(ttft, 0.99));
  RecordProperty("ttft_p50_ms", std::to_string(1e3 * Percentile(ttft, 0.5)));
  RecordProperty("ttft_p99_ms", std::to_string(1e3 * Percentile(ttft, 0.99)));
  // Steps batched more than a few sequences: the batch-sequences histogram has mass above 8.
  const auto metrics = HttpRequest(port_, "GET", "/metrics");
  const auto samples = testing::ParseSamples(metrics.body);
  double over_eight = -1, all = -1;
  for (const auto& [name, value] : samples) {
    if (name.find("qforge_batch_sequences_bucket") == 0 && name.find("le=\"8\"") != std::string::npos) over_eight = value;
    if (name.find("qforge_batch_sequences_count") == 0) all = value;
  }
  EXPECT_GT(all, 0) << metrics.body.substr(0, 2000);
  EXPECT_LT(over_eight, all) << "no step batched more than 8 sequences";
}

// Adapters as versions of their base in the store: stories260K quantized (q8_0) by a scheduler and a worker, a GGUF
// adapter stored by `qforge put-adapter` and a PEFT one over gRPC; a server reading the store loads them by
// name@version and generates exactly what it generates with the same files loaded from its adapter root; stored
// adapters go only onto the version they adapt, and bad requests are refused naming the field.
TEST(StoredLoraTest, StoredAdaptersServeExactlyAsTheirFilesOnTheirBaseVersionOnly) {
  if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
  const std::string dir = testing::TempDir("lora-stored");
  const std::filesystem::path root = std::filesystem::path(dir) / "adapters";
  std::filesystem::create_directories(root / "story-peft");
  {
    auto base = formats::LoadModel(kStories);
    ASSERT_TRUE(base.ok()) << base.status();
    using lora::LoraTarget;
    auto gguf_adapter = lora::MakeRandomAdapter(base->config, {LoraTarget::kAttnQ, LoraTarget::kAttnV,
                                                               LoraTarget::kFfnUp, LoraTarget::kFfnDown},
                                                8, 16, 3, 0.1f);
    auto peft_adapter =
        lora::MakeRandomAdapter(base->config, {LoraTarget::kAttnK, LoraTarget::kAttnOutput}, 4, 8, 4, 0.2f);
    ASSERT_TRUE(gguf_adapter.ok() && peft_adapter.ok());
    auto gguf = lora::SerializeGgufAdapter(*gguf_adapter);
    auto peft = lora::SerializePeftAdapter(*peft_adapter, base->config);
    ASSERT_TRUE(gguf.ok() && peft.ok());
    WriteFile(root / "story.gguf", gguf->data(), gguf->size());
    WriteFile(root / "story-peft" / "adapter_model.safetensors", peft->safetensors.data(), peft->safetensors.size());
    WriteFile(root / "story-peft" / "adapter_config.json", peft->config_json.data(), peft->config_json.size());
    const std::string bad = "GGUF\x03\0\0\0garbage";
    WriteFile(root / "bad.gguf", bad.data(), bad.size());
  }
  testing::Cluster cluster(dir + "/cluster", {.allowed_roots = {dir, std::filesystem::path(kStories).parent_path()}});
  ASSERT_NO_FATAL_FAILURE(cluster.StartScheduler());
  cluster.StartWorker("w1");
  ASSERT_EQ(cluster.QuantizeAndWait(kStories, "stories", "q8_0").progress().state(), v1::JOB_STATE_SUCCEEDED);

  // The CLI stores the GGUF adapter against `latest`, which it resolves to version 1.
  int exit_code = -1;
  const std::string printed = testing::RunToCompletion(
      {QFORGE_CLI_PATH, "put-adapter", "story-lora", (root / "story.gguf").string(), "--base", "stories",
       "--scheduler", cluster.address()},
      dir + "/put-adapter.log", &exit_code);
  ASSERT_EQ(exit_code, 0) << printed;
  EXPECT_THAT(printed, HasSubstr("stored story-lora@1: LoRA adapter of stories@1 (gguf, 20 matrices, rank 8)"));
  auto put = [&](const std::string& name, const std::string& base, const std::string& path, v1::PutAdapterResponse* r) {
    grpc::ClientContext ctx;
    v1::PutAdapterRequest req;
    req.set_name(name);
    req.mutable_base()->set_name(base);
    req.set_source_uri(path);
    return cluster.artifacts().PutAdapter(&ctx, req, r);
  };
  v1::PutAdapterResponse peft_put;
  const grpc::Status peft_status = put("story-peft", "stories@1", (root / "story-peft").string(), &peft_put);
  ASSERT_TRUE(peft_status.ok()) << peft_status.error_message();
  EXPECT_EQ(peft_put.adapter().version(), "1");
  EXPECT_EQ(peft_put.format(), "peft");
  EXPECT_EQ(peft_put.rank(), 4u);
  struct BadPut {
    std::string name, base, path;
    grpc::StatusCode code;
    std::string message;
  };
  for (const BadPut& b : std::vector<BadPut>{
           {"", "stories", (root / "story.gguf").string(), grpc::StatusCode::INVALID_ARGUMENT, "name"},
           {"x", "", (root / "story.gguf").string(), grpc::StatusCode::INVALID_ARGUMENT, "base.name: required"},
           {"x", "stories@0", (root / "story.gguf").string(), grpc::StatusCode::INVALID_ARGUMENT, "base:"},
           {"x", "stories@9", (root / "story.gguf").string(), grpc::StatusCode::NOT_FOUND, "stories@9"},
           {"x", "story-lora@1", (root / "story.gguf").string(), grpc::StatusCode::FAILED_PRECONDITION,
            "itself a LoRA adapter"},
           {"x", "stories", "/etc/passwd", grpc::StatusCode::PERMISSION_DENIED, "source_uri"},
           {"x", "stories", (root / "missing.gguf").string(), grpc::StatusCode::NOT_FOUND, "source_uri"},
           {"x", "stories", (root / "bad.gguf").string(), grpc::StatusCode::INVALID_ARGUMENT, "not an adapter of stories@1"},
           {"stories", "stories", (root / "story.gguf").string(), grpc::StatusCode::INVALID_ARGUMENT, "name: must differ"},
       }) {
    v1::PutAdapterResponse r;
    const grpc::Status st = put(b.name, b.base, b.path, &r);
    EXPECT_EQ(st.error_code(), b.code) << b.name << " " << b.base << " " << b.path << ": " << st.error_message();
    EXPECT_THAT(st.error_message(), HasSubstr(b.message));
  }
  {
    const std::string models = testing::RunToCompletion(
        {QFORGE_CLI_PATH, "models", "--scheduler", cluster.address()}, dir + "/models.log", &exit_code);
    EXPECT_EQ(exit_code, 0) << models;
    EXPECT_THAT(models, HasSubstr("story-lora: versions 1 (LoRA adapter; latest adapts stories@1)"));
    EXPECT_THAT(models, HasSubstr("stories: versions 1\n"));
  }

  // One server reads the store and has the same files under its adapter root, plus a model from a file.
  ServerProcess server(dir, {"--scheduler", cluster.address(), "--adapter-root", root.string(), "--model",
                             "s260k=" + kStories, "--tokenizer", kTok512});
  {
    v1::LoadModelResponse loaded;
    const grpc::Status st = server.LoadStored("stories", "1", kTok512, &loaded);
    ASSERT_TRUE(st.ok()) << st.error_message() << "\n" << server.log();
  }
  const int port = server.http_port();
  auto post = [&](const std::string& body) { return HttpRequest(port, "POST", "/v1/adapters", body); };
  const auto stored = post(R"({"name": "stored", "artifact": "story-lora@1", "model": "stories@1"})");
  ASSERT_EQ(stored.status, 200) << stored.body;
  EXPECT_EQ(Parse(stored.body).Find("artifact")->string_value(), "story-lora@1");
  EXPECT_EQ(Parse(stored.body).Find("format")->string_value(), "gguf");
  ASSERT_EQ(post(R"({"name": "file", "path": "story.gguf", "model": "stories@1"})").status, 200);
  // `latest` resolves in the store.
  ASSERT_EQ(post(R"({"name": "stored-peft", "artifact": "story-peft", "model": "stories@1"})").status, 200);
  ASSERT_EQ(post(R"({"name": "file-peft", "path": "story-peft", "model": "stories@1"})").status, 200);
  struct Bad {
    std::string body;
    int status;
    std::string message;
  };
  for (const Bad& b : std::vector<Bad>{
           {R"({"name": "x", "artifact": "stories@1", "model": "stories@1"})", 400,
            "artifact: stories@1 is a model, not a LoRA adapter"},
           {R"({"name": "x", "artifact": "story-lora@1", "model": "s260k@file"})", 400,
            "artifact: story-lora@1 is an adapter of stories@1, not of s260k@file"},
           {R"({"name": "x", "artifact": "nope@1", "model": "stories@1"})", 404, "artifact: "},
           {R"({"name": "x", "artifact": "bad@@1", "model": "stories@1"})", 400, "artifact: "},
           {R"({"name": "x", "artifact": "story-lora@1", "path": "story.gguf", "model": "stories@1"})", 400,
            "path, artifact: give exactly one"},
           {R"({"name": "stored", "artifact": "story-lora@1", "model": "stories@1"})", 409, "already loaded"},
       }) {
    const auto r = post(b.body);
    EXPECT_EQ(r.status, b.status) << b.body << " -> " << r.body;
    EXPECT_THAT(r.body, HasSubstr(b.message)) << b.body;
  }
  auto complete = [&](const std::string& adapter) {
    std::string req = R"({"model": "stories@1", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0)";
    if (!adapter.empty()) req += ", \"adapter\": " + Json::String(adapter).Dump();
    const auto r = HttpRequest(port, "POST", "/v1/completions", req + "}");
    EXPECT_EQ(r.status, 200) << r.body;
    return r.status == 200 ? Parse(r.body).Find("choices")->array()[0].Find("text")->string_value() : "";
  };
  const std::string plain = complete("");
  const std::string from_store = complete("stored"), from_file = complete("file");
  EXPECT_EQ(from_store, from_file);
  EXPECT_NE(from_store, plain);
  const std::string peft_store = complete("stored-peft"), peft_file = complete("file-peft");
  EXPECT_EQ(peft_store, peft_file);
  EXPECT_NE(peft_store, plain);
  EXPECT_EQ(server.Stop(), 0);
}

}  // namespace
}  // namespace qforge
