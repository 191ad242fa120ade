#include "serving/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "core/eval/metrics.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/generate.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "gtest/gtest.h"

namespace qforge::serving {
namespace {

using std::chrono::steady_clock;

// What one request's callback saw. `hook(event, index)` runs first on the engine thread for non-done
// events; it may block (to hold the engine at a known point) or return false.
class Stream {
 public:
  using Hook = std::function<bool(const StreamEvent&, int index)>;

  EventCallback Callback(Hook hook = nullptr) {
    return [this, hook](const StreamEvent& e) {
      int index;
      {
        std::lock_guard<std::mutex> lock(mu_);
        events_.push_back(e);
        index = static_cast<int>(events_.size()) - 1;
        if (e.done) ++done_;
        // Under the lock: once WaitDone returns, the engine thread no longer touches this Stream.
        cv_.notify_all();
      }
      if (!e.done && hook) return hook(e, index);
      return true;
    };
  }

  void WaitDone() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_ > 0; });
  }

  std::vector<int> tokens() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int> t;
    for (const StreamEvent& e : events_) t.insert(t.end(), e.tokens.begin(), e.tokens.end());
    return t;
  }
  std::vector<TokenLogprob> logprobs() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<TokenLogprob> l;
    for (const StreamEvent& e : events_) l.insert(l.end(), e.logprobs.begin(), e.logprobs.end());
    return l;
  }
  std::string text() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::string t;
    for (const StreamEvent& e : events_) t += e.text;
    return t;
  }
  int done_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return done_;
  }
  // The done event, which must be the last one.
  StreamEvent last() const {
    std::lock_guard<std::mutex> lock(mu_);
    return events_.empty() ? StreamEvent{} : events_.back();
  }
  bool done_is_last() const {
    std::lock_guard<std::mutex> lock(mu_);
    return !events_.empty() && events_.back().done;
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<StreamEvent> events_;
  int done_ = 0;
};

// A one-shot signal between the engine thread and the test.
class Latch {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

struct TestModel {
  std::shared_ptr<const Model> model;
  std::shared_ptr<const Tokenizer> tokenizer;
};

TestModel TinyWithVocab(uint64_t seed = 51, const std::string& method = "") {
  Model m = MakeSyntheticModel(TinyTestConfig(), seed, /*with_vocab=*/true);
  auto tok = TokenizerFromVocab(*m.vocab);
  EXPECT_TRUE(tok.ok()) << tok.status();
  if (!method.empty()) {
    quant::QuantRecipe recipe;
    recipe.method = method;
    recipe.quantize_embeddings = true;
    auto q = quant::QuantizeModel(m, recipe, nullptr);
    EXPECT_TRUE(q.ok()) << q.status();
    m = std::move(q->model);
  }
  return {std::make_shared<const Model>(std::move(m)), std::shared_ptr<const Tokenizer>(std::move(*tok))};
}

std::unique_ptr<Engine> MakeEngine(const TestModel& tm, EngineOptions o) {
  auto e = Engine::Create(tm.model, tm.tokenizer, std::move(o));
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

// BOS, then len - 1 ids drawn from the non-control part of the vocabulary.
std::vector<int> Prompt(int len, uint64_t seed, int vocab) {
  std::vector<int> p = {1};
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 3;
  for (int i = 1; i < len; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    p.push_back(3 + static_cast<int>((s >> 33) % static_cast<uint64_t>(vocab - 3)));
  }
  return p;
}

// The request run alone through core/runtime's Generate, on a Transformer of the engine's context.
GenerateResult Alone(const TestModel& tm, const GenerationRequest& r, int context) {
  auto rt = Transformer::Create(tm.model, {.threads = 1, .max_seq_len = context});
  EXPECT_TRUE(rt.ok()) << rt.status();
  const int eos = tm.tokenizer ? tm.tokenizer->eos_id() : -1;
  GenerateOptions o{.max_new_tokens = r.max_tokens, .sampler = r.sampler, .eos_id = r.stop_at_eos ? eos : -1};
  auto g = Generate(**rt, r.prompt, o);
  EXPECT_TRUE(g.ok()) << g.status();
  return *g;
}

FinishReason Expected(StopReason s) {
  switch (s) {
    case StopReason::kMaxTokens: return FinishReason::kLength;
    case StopReason::kEos: return FinishReason::kEos;
    case StopReason::kContextFull: return FinishReason::kContextFull;
    case StopReason::kCallback: return FinishReason::kCancelled;
  }
  return FinishReason::kError;
}

void ExpectMatchesAlone(const TestModel& tm, const GenerationRequest& r, const Stream& s, int context) {
  const GenerateResult want = Alone(tm, r, context);
  EXPECT_EQ(s.done_count(), 1);
  EXPECT_TRUE(s.done_is_last());
  const StreamEvent last = s.last();
  EXPECT_EQ(s.tokens(), want.tokens);
  EXPECT_EQ(FinishReasonName(last.finish), std::string(FinishReasonName(Expected(want.stop))));
  EXPECT_EQ(last.completion_tokens, static_cast<int>(want.tokens.size()));
  EXPECT_EQ(last.prompt_tokens, static_cast<int>(r.prompt.size()));
  EXPECT_TRUE(last.error.ok()) << last.error;
}

TEST(Engine, GreedyAndSeededRequestsEqualGenerateAlone) {
  const TestModel tm = TinyWithVocab();
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  const int vocab = tm.model->config.vocab_size;
  const std::vector<SamplerOptions> samplers = {
      {.temperature = 0.0f}, {.temperature = 0.9f, .top_p = 0.95f, .seed = 123}, {.temperature = 1.3f, .seed = 7}};
  for (const SamplerOptions& sampler : samplers) {
    for (int prompt_len : {1, 6}) {
      SCOPED_TRACE(testing::Message() << "temperature " << sampler.temperature << " prompt " << prompt_len);
      GenerationRequest r{.prompt = Prompt(prompt_len, 5, vocab), .max_tokens = 40, .sampler = sampler};
      Stream s;
      ASSERT_TRUE(engine->Submit(r, s.Callback()).ok());
      s.WaitDone();
      ExpectMatchesAlone(tm, r, s, tm.model->config.seq_len);
      if (prompt_len == 1) {
        // After BOS alone the stream is the decoded completion, malformed bytes rendered as Decode does.
        EXPECT_EQ(s.text(), *tm.tokenizer->Decode(s.tokens()));
      }
    }
  }
}

struct ConcurrencyCase {
  const char* name;
  const char* method;  // "" = f32
  int max_running;
};

void PrintTo(const ConcurrencyCase& c, std::ostream* os) { *os << c.name; }

class EngineConcurrencyTest : public ::testing::TestWithParam<ConcurrencyCase> {};

// Eight requests of different lengths and samplers at once: each gets exactly its lone tokens. Prompts are
// prefilled in pieces (16 tokens per step) beside the others' decode steps; with max_running 3 most of
// them wait and join the batch as others leave.
TEST_P(EngineConcurrencyTest, EachOfEightRequestsEqualsGenerateAlone) {
  const TestModel tm = TinyWithVocab(52, GetParam().method);
  const int vocab = tm.model->config.vocab_size;
  std::atomic<int> max_sequences{0}, max_tokens_in_step{0}, steps{0};
  EngineOptions o{.threads = 2, .max_running = GetParam().max_running, .max_prefill_tokens_per_step = 16};
  o.on_step = [&](int sequences, int tokens, double seconds) {
    EXPECT_GE(tokens, sequences);
    EXPECT_GE(seconds, 0.0);
    max_sequences = std::max(max_sequences.load(), sequences);
    max_tokens_in_step = std::max(max_tokens_in_step.load(), tokens);
    ++steps;
  };
  auto engine = MakeEngine(tm, o);
  ASSERT_NE(engine, nullptr);

  const int prompt_lens[8] = {1, 4, 9, 17, 30, 45, 2, 100};
  const int max_tokens[8] = {30, 25, 40, 12, 20, 35, 50, 40};  // the last one runs into the context (128)
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 8; ++i) {
    SamplerOptions sampler = i % 2 == 0 ? SamplerOptions{.temperature = 0.0f}
                                        : SamplerOptions{.temperature = 0.8f + 0.1f * i, .top_p = i == 3 ? 0.9f : 1.0f,
                                                         .seed = 1000u + i};
    requests.push_back({.prompt = Prompt(prompt_lens[i], 10 + i, vocab), .max_tokens = max_tokens[i],
                        .sampler = sampler, .stop_at_eos = i != 7});
  }
  // The first request holds the engine at its first token until every other request is queued, so they
  // are all in flight together.
  Latch all_submitted;
  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < 8; ++i) streams.push_back(std::make_unique<Stream>());
  ASSERT_TRUE(engine->Submit(requests[0], streams[0]->Callback([&](const StreamEvent&, int index) {
                                if (index == 0) all_submitted.Wait();
                                return true;
                              })).ok());
  for (int i = 1; i < 8; ++i) ASSERT_TRUE(engine->Submit(requests[i], streams[i]->Callback()).ok());
  all_submitted.Open();
  for (int i = 0; i < 8; ++i) {
    streams[i]->WaitDone();
    SCOPED_TRACE(testing::Message() << "request " << i);
    ExpectMatchesAlone(tm, requests[i], *streams[i], tm.model->config.seq_len);
  }
  EXPECT_EQ(streams[7]->last().finish, FinishReason::kContextFull);
  engine->Shutdown();
  EXPECT_GT(max_sequences.load(), 1);
  EXPECT_LE(max_sequences.load(), GetParam().max_running);
  EXPECT_LE(max_tokens_in_step.load(), GetParam().max_running + 16);

  // Stats agree with what the streams saw.
  const EngineStats stats = engine->Stats();
  uint64_t sampled = 0;
  for (const auto& s : streams) sampled += s->last().completion_tokens + (s->last().finish == FinishReason::kEos);
  EXPECT_EQ(stats.tokens_generated, sampled);
  EXPECT_EQ(stats.steps, static_cast<uint64_t>(steps.load()));
  EXPECT_EQ(stats.queued, 0);
  EXPECT_EQ(stats.running, 0);
  EXPECT_GT(stats.busy_seconds, 0.0);
  const size_t cache_bytes = KvCache::Create(tm.model->config, tm.model->config.seq_len)->bytes();
  EXPECT_GT(stats.kv_bytes, 0u);
  EXPECT_EQ(stats.kv_bytes % cache_bytes, 0u);
  EXPECT_LE(stats.kv_bytes / cache_bytes, static_cast<size_t>(GetParam().max_running));
}

INSTANTIATE_TEST_SUITE_P(Batches, EngineConcurrencyTest,
                         ::testing::Values(ConcurrencyCase{"F32AllTogether", "", 8},
                                           ConcurrencyCase{"F32ThreeAtATime", "", 3},
                                           ConcurrencyCase{"Q8_0AllTogether", "q8_0", 8}),
                         [](const auto& info) { return std::string(info.param.name); });

// Requests on two LoRA adapters and on none, all in flight together (prompts prefilled beside the others' decode
// steps): each gets exactly the tokens it gets alone, and the adapters change what is generated.
TEST(Engine, RequestsOnDifferentAdaptersShareTheBatchAndEqualThemselvesAlone) {
  const TestModel tm = TinyWithVocab(53, "q8_0");
  const ModelConfig& c = tm.model->config;
  const int vocab = c.vocab_size;
  using lora::LoraTarget;
  auto first = lora::MakeRandomAdapter(c, {LoraTarget::kAttnQ, LoraTarget::kAttnV, LoraTarget::kFfnUp}, 4, 8, 1, 0.1f);
  auto second = lora::MakeRandomAdapter(c, {LoraTarget::kAttnK, LoraTarget::kAttnOutput, LoraTarget::kFfnDown}, 8,
                                        16, 2, 0.1f);
  ASSERT_TRUE(first.ok() && second.ok());
  const std::vector<std::shared_ptr<const lora::LoraAdapter>> adapters = {
      std::make_shared<const lora::LoraAdapter>(*std::move(first)),
      std::make_shared<const lora::LoraAdapter>(*std::move(second)), nullptr};
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 9; ++i) {
    SamplerOptions sampler = i % 2 == 0 ? SamplerOptions{.temperature = 0.0f}
                                        : SamplerOptions{.temperature = 0.9f, .seed = 500u + i};
    // Requests 0..2 share a prompt and sampler, differing only in the adapter.
    requests.push_back({.prompt = Prompt(i < 3 ? 5 : 3 + 2 * i, i < 3 ? 77 : 20 + i, vocab), .max_tokens = 24,
                        .sampler = i < 3 ? SamplerOptions{.temperature = 0.0f} : sampler, .stop_at_eos = false,
                        .adapter = adapters[i % 3]});
  }
  auto engine = MakeEngine(tm, {.threads = 2, .max_running = 9, .max_prefill_tokens_per_step = 8});
  ASSERT_NE(engine, nullptr);
  std::vector<std::vector<int>> alone;
  for (const GenerationRequest& r : requests) {
    Stream s;
    ASSERT_TRUE(engine->Submit(r, s.Callback()).ok());
    s.WaitDone();
    alone.push_back(s.tokens());
  }
  EXPECT_NE(alone[0], alone[2]);
  EXPECT_NE(alone[1], alone[2]);
  EXPECT_NE(alone[0], alone[1]);
  std::atomic<int> max_sequences{0};
  EngineOptions o{.threads = 2, .max_running = 9, .max_prefill_tokens_per_step = 8};
  o.on_step = [&](int sequences, int, double) { max_sequences = std::max(max_sequences.load(), sequences); };
  auto batched = MakeEngine(tm, o);
  Latch all_submitted;
  std::vector<std::unique_ptr<Stream>> streams;
  for (size_t i = 0; i < requests.size(); ++i) streams.push_back(std::make_unique<Stream>());
  ASSERT_TRUE(batched->Submit(requests[0], streams[0]->Callback([&](const StreamEvent&, int index) {
                                if (index == 0) all_submitted.Wait();
                                return true;
                              })).ok());
  for (size_t i = 1; i < requests.size(); ++i) ASSERT_TRUE(batched->Submit(requests[i], streams[i]->Callback()).ok());
  all_submitted.Open();
  for (size_t i = 0; i < requests.size(); ++i) {
    streams[i]->WaitDone();
    EXPECT_EQ(streams[i]->tokens(), alone[i]) << "request " << i;
  }
  EXPECT_GT(max_sequences.load(), 3);
}

// Prefix caching: requests sharing a 40-token prefix, then a second turn that extends the first request's prompt
// by its answer, reuse the pooled KV caches — cached_prompt_tokens and the stats say how many positions — and
// still give exactly the tokens and log-probabilities an engine without the cache gives (and Generate alone). A
// request on an adapter never reuses the base model's positions.
TEST(Engine, PrefixCacheReusesSharedPromptsExactly) {
  const TestModel tm = TinyWithVocab(54, "q8_0");
  const ModelConfig& c = tm.model->config;
  const int vocab = c.vocab_size;
  const std::vector<int> prefix = Prompt(40, 9, vocab);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 4; ++i) {
    std::vector<int> prompt = prefix;
    const std::vector<int> suffix = Prompt(7, 100 + i, vocab);
    prompt.insert(prompt.end(), suffix.begin() + 1, suffix.end());
    requests.push_back({.prompt = prompt, .max_tokens = 12,
                        .sampler = SamplerOptions{.temperature = 0.8f, .seed = 40u + i}, .stop_at_eos = false,
                        .logprobs = 3});
  }
  auto adapter = lora::MakeRandomAdapter(c, {lora::LoraTarget::kAttnK, lora::LoraTarget::kAttnV}, 4, 8, 3, 0.1f);
  ASSERT_TRUE(adapter.ok());
  GenerationRequest on_adapter = requests[1];
  on_adapter.adapter = std::make_shared<const lora::LoraAdapter>(*std::move(adapter));

  auto run = [](Engine& engine, const GenerationRequest& r) {
    auto s = std::make_unique<Stream>();
    EXPECT_TRUE(engine.Submit(r, s->Callback()).ok());
    s->WaitDone();
    return s;
  };
  auto expect_same = [](const Stream& got, const Stream& want, const std::string& what) {
    EXPECT_EQ(got.tokens(), want.tokens()) << what;
    const std::vector<TokenLogprob> a = got.logprobs(), b = want.logprobs();
    ASSERT_EQ(a.size(), b.size()) << what;
    for (size_t k = 0; k < a.size(); ++k) {
      EXPECT_EQ(a[k].logprob, b[k].logprob) << what << " token " << k;  // bit for bit
      ASSERT_EQ(a[k].top.size(), b[k].top.size());
      for (size_t j = 0; j < a[k].top.size(); ++j) EXPECT_EQ(a[k].top[j].logprob, b[k].top[j].logprob);
    }
  };
  auto plain = MakeEngine(tm, {.threads = 2, .max_prefill_tokens_per_step = 16, .prefix_cache = false});
  auto cached = MakeEngine(tm, {.threads = 2, .max_prefill_tokens_per_step = 16});
  ASSERT_TRUE(plain != nullptr && cached != nullptr);

  for (size_t i = 0; i < requests.size(); ++i) {
    const auto want = run(*plain, requests[i]);
    const auto got = run(*cached, requests[i]);
    EXPECT_EQ(want->last().cached_prompt_tokens, 0);
    if (i == 0) {
      EXPECT_EQ(got->last().cached_prompt_tokens, 0);
      ExpectMatchesAlone(tm, requests[i], *got, c.seq_len);
    } else {
      EXPECT_GE(got->last().cached_prompt_tokens, 40) << "the shared prefix, request " << i;
    }
    expect_same(*got, *want, "request " + std::to_string(i));
  }
  // A second turn: request 3's prompt, its answer, three more tokens. The cache holds the prompt and every
  // generated token but the last (sampled, never fed).
  const auto first_turn = run(*cached, requests[3]);
  GenerationRequest second_turn = requests[3];
  const std::vector<int> answer = first_turn->tokens();
  second_turn.prompt.insert(second_turn.prompt.end(), answer.begin(), answer.end());
  for (int t : {5, 6, 7}) second_turn.prompt.push_back(t);
  second_turn.sampler.seed = 99;
  const auto got = run(*cached, second_turn);
  EXPECT_EQ(got->last().cached_prompt_tokens, static_cast<int>(requests[3].prompt.size() + answer.size()) - 1);
  expect_same(*got, *run(*plain, second_turn), "second turn");

  const auto adapted = run(*cached, on_adapter);
  EXPECT_EQ(adapted->last().cached_prompt_tokens, 0) << "no cached positions were computed with the adapter";
  expect_same(*adapted, *run(*plain, on_adapter), "adapter");
  EXPECT_GE(run(*cached, on_adapter)->last().cached_prompt_tokens, 40) << "now they are";

  const EngineStats st = cached->Stats();
  EXPECT_EQ(st.prefix_hits, 6u);  // requests 1..3, the repeat of request 3, the second turn, the adapter's repeat
  EXPECT_GE(st.prefix_reused_tokens, 6u * 40u);
  EXPECT_EQ(plain->Stats().prefix_hits, 0u);
}

TEST(Engine, RejectsAdapterOfAnotherModel) {
  const TestModel tm = TinyWithVocab();
  ModelConfig other = tm.model->config;
  other.dim *= 2;
  auto wrong = lora::MakeRandomAdapter(other, {lora::LoraTarget::kAttnQ}, 4, 8, 1);
  ASSERT_TRUE(wrong.ok());
  auto engine = MakeEngine(tm, {.threads = 1});
  GenerationRequest r{.prompt = Prompt(3, 1, tm.model->config.vocab_size), .max_tokens = 4,
                      .adapter = std::make_shared<const lora::LoraAdapter>(*std::move(wrong))};
  auto h = engine->Submit(r, [](const StreamEvent&) { return true; });
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
}

// Byte offset of the UTF-8 character boundary at or after i.
size_t Boundary(const std::string& s, size_t i) {
  while (i < s.size() && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) ++i;
  return i;
}

TEST(Engine, StopStringEndsTheStreamBeforeIt) {
  const TestModel tm = TinyWithVocab(53);
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = {1}, .max_tokens = 60, .sampler = {.temperature = 0.0f}, .stop_at_eos = false};
  Stream full;
  ASSERT_TRUE(engine->Submit(r, full.Callback()).ok());
  full.WaitDone();
  const std::string text = full.text();
  ASSERT_GE(text.size(), 12u) << "the synthetic model produced too little text to pick a stop string";

  // Two stop strings taken from the middle of the text (two characters each); the earlier one wins.
  auto pick = [&](size_t at) {
    const size_t b = Boundary(text, at), e = Boundary(text, Boundary(text, b + 1) + 1);
    return text.substr(b, e - b);
  };
  const std::string stop_a = pick(text.size() / 3), stop_b = pick(text.size() / 2);
  const size_t cut = std::min(text.find(stop_a), text.find(stop_b));
  r.stop = {stop_b, stop_a};
  Stream stopped;
  ASSERT_TRUE(engine->Submit(r, stopped.Callback()).ok());
  stopped.WaitDone();
  EXPECT_EQ(stopped.last().finish, FinishReason::kStop);
  EXPECT_EQ(stopped.text(), text.substr(0, cut));
  EXPECT_EQ(stopped.done_count(), 1);
  // The tokens are the start of the unstopped run, up to the one that completed the stop string.
  const std::vector<int> all = full.tokens(), part = stopped.tokens();
  ASSERT_LT(part.size(), all.size());
  EXPECT_EQ(part, std::vector<int>(all.begin(), all.begin() + part.size()));

  // A stop string that never appears changes nothing.
  r.stop = {"\x01never\x01"};
  Stream unaffected;
  ASSERT_TRUE(engine->Submit(r, unaffected.Callback()).ok());
  unaffected.WaitDone();
  EXPECT_EQ(unaffected.text(), text);
  EXPECT_EQ(unaffected.last().finish, FinishReason::kLength);
}

TEST(Engine, CancelMidStreamAndWhileQueued) {
  const TestModel tm = TinyWithVocab(54);
  auto engine = MakeEngine(tm, {.threads = 2, .max_running = 1});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = Prompt(5, 1, tm.model->config.vocab_size), .max_tokens = 100,
                      .sampler = {.temperature = 0.7f, .seed = 9}, .stop_at_eos = false};
  Latch third_token, cancelled;
  Stream running, queued;
  auto handle = engine->Submit(r, running.Callback([&](const StreamEvent&, int index) {
    if (index == 2) {
      third_token.Open();
      cancelled.Wait();
    }
    return true;
  }));
  ASSERT_TRUE(handle.ok());
  third_token.Wait();
  // The engine is held inside its third step: the second request can only queue (max_running 1).
  auto queued_handle = engine->Submit(r, queued.Callback());
  ASSERT_TRUE(queued_handle.ok());
  EXPECT_EQ(engine->Stats().queued, 1);
  (*handle)->Cancel();
  (*queued_handle)->Cancel();
  cancelled.Open();
  running.WaitDone();
  queued.WaitDone();

  EXPECT_EQ(running.last().finish, FinishReason::kCancelled);
  EXPECT_EQ(running.tokens().size(), 3u);
  const std::vector<int> alone = Alone(tm, r, tm.model->config.seq_len).tokens;
  EXPECT_EQ(running.tokens(), std::vector<int>(alone.begin(), alone.begin() + 3));
  EXPECT_EQ(queued.last().finish, FinishReason::kCancelled);
  EXPECT_TRUE(queued.tokens().empty());
  EXPECT_EQ(running.done_count(), 1);
  EXPECT_EQ(queued.done_count(), 1);
}

TEST(Engine, CallbackReturningFalseCancelsAndTheEngineGoesOn) {
  const TestModel tm = TinyWithVocab(55);
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = Prompt(3, 2, tm.model->config.vocab_size), .max_tokens = 50,
                      .sampler = {.temperature = 0.0f}, .stop_at_eos = false};
  Stream gone;
  ASSERT_TRUE(engine->Submit(r, gone.Callback([](const StreamEvent&, int index) { return index < 1; })).ok());
  gone.WaitDone();
  EXPECT_EQ(gone.last().finish, FinishReason::kCancelled);
  EXPECT_EQ(gone.tokens().size(), 2u);
  EXPECT_EQ(gone.done_count(), 1);
  EXPECT_TRUE(gone.done_is_last());

  Stream next;
  ASSERT_TRUE(engine->Submit(r, next.Callback()).ok());
  next.WaitDone();
  ExpectMatchesAlone(tm, r, next, tm.model->config.seq_len);
}

TEST(Engine, DeadlineEndsTheStream) {
  const TestModel tm = TinyWithVocab(56);
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = Prompt(4, 3, tm.model->config.vocab_size), .max_tokens = 100,
                      .sampler = {.temperature = 0.0f}, .stop_at_eos = false};
  r.deadline = steady_clock::now() - std::chrono::seconds(1);
  Stream expired;
  ASSERT_TRUE(engine->Submit(r, expired.Callback()).ok());
  expired.WaitDone();
  EXPECT_EQ(expired.last().finish, FinishReason::kDeadline);
  EXPECT_TRUE(expired.tokens().empty());

  // A deadline that passes mid-stream: the callback waits it out at the third token, so the stream ends at
  // the next step.
  r.deadline = steady_clock::now() + std::chrono::milliseconds(300);
  Stream late;
  ASSERT_TRUE(engine->Submit(r, late.Callback([&](const StreamEvent&, int index) {
    if (index == 2) std::this_thread::sleep_until(r.deadline + std::chrono::milliseconds(1));
    return true;
  })).ok());
  late.WaitDone();
  EXPECT_EQ(late.last().finish, FinishReason::kDeadline);
  EXPECT_LE(late.tokens().size(), 3u);
  const std::vector<int> alone = Alone(tm, r, tm.model->config.seq_len).tokens;
  EXPECT_EQ(late.tokens(), std::vector<int>(alone.begin(), alone.begin() + late.tokens().size()));
}

TEST(Engine, FullQueueIsResourceExhausted) {
  const TestModel tm = TinyWithVocab(57);
  auto engine = MakeEngine(tm, {.threads = 1, .max_running = 1, .max_queue = 2});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = {1, 40}, .max_tokens = 8, .sampler = {.temperature = 0.0f}};
  Latch busy, release;
  Stream a, b, c, d;
  ASSERT_TRUE(engine->Submit(r, a.Callback([&](const StreamEvent&, int index) {
                           if (index == 0) {
                             busy.Open();
                             release.Wait();
                           }
                           return true;
                         })).ok());
  busy.Wait();  // a runs (and holds the engine); the next two fill the queue
  ASSERT_TRUE(engine->Submit(r, b.Callback()).ok());
  ASSERT_TRUE(engine->Submit(r, c.Callback()).ok());
  auto refused = engine->Submit(r, d.Callback());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  const EngineStats stats = engine->Stats();
  EXPECT_EQ(stats.queued, 2);
  EXPECT_EQ(stats.running, 1);
  release.Open();
  a.WaitDone();
  b.WaitDone();
  c.WaitDone();
  for (const Stream* s : {&a, &b, &c}) ExpectMatchesAlone(tm, r, *s, tm.model->config.seq_len);
  EXPECT_EQ(d.done_count(), 0);  // a refused request never streams
  ASSERT_TRUE(engine->Submit(r, d.Callback()).ok());
  d.WaitDone();
}

TEST(Engine, ScoreEqualsLogSoftmaxOfForwardAndLeavesTheBatchAlone) {
  const TestModel tm = TinyWithVocab(58);
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  const int vocab = tm.model->config.vocab_size;
  const std::vector<int> tokens = Prompt(100, 4, vocab);  // more than one internal chunk of positions

  // A generation runs while Score is called from this thread.
  GenerationRequest r{.prompt = Prompt(8, 5, vocab), .max_tokens = 90, .sampler = {.temperature = 1.0f, .seed = 3},
                      .stop_at_eos = false};
  Stream s;
  ASSERT_TRUE(engine->Submit(r, s.Callback()).ok());
  absl::StatusOr<ScoreResult> score;
  for (int i = 0; i < 3; ++i) {
    score = engine->Score(tokens);
    ASSERT_TRUE(score.ok()) << score.status();
  }
  s.WaitDone();
  ExpectMatchesAlone(tm, r, s, tm.model->config.seq_len);

  auto rt = Transformer::Create(tm.model, {.threads = 1});
  ASSERT_TRUE(rt.ok());
  std::vector<float> logits(tokens.size() * vocab);
  ASSERT_TRUE((*rt)->Forward(tokens, 0, logits.data(), /*all_logits=*/true).ok());
  ASSERT_EQ(score->tokens, 99);
  ASSERT_EQ(score->token_logprobs.size(), 99u);
  std::vector<double> lp;
  double sum = 0;
  for (int i = 1; i < 100; ++i) {
    eval::LogSoftmax(std::span<const float>(&logits[(i - 1) * vocab], vocab), lp);
    EXPECT_EQ(score->token_logprobs[i - 1], static_cast<float>(lp[tokens[i]])) << i;
    sum += lp[tokens[i]];
  }
  EXPECT_NEAR(score->perplexity, std::exp(-sum / 99), 1e-9 * score->perplexity);

  EXPECT_EQ(engine->Score({1}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Score({}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Score(std::vector<int>(129, 5)).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine->Score({1, vocab}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(engine->Score(std::vector<int>(128, 5)).ok());
}

// Log-probabilities come from the model's distribution (temperature 1) whatever the sampler does, so they equal
// what Score computes for the prompt followed by the generated tokens; the alternatives are the most likely ids.
TEST(Engine, LogprobsEqualScoreOfTheGeneratedTokens) {
  const TestModel tm = TinyWithVocab(59);
  auto engine = MakeEngine(tm, {.threads = 2});
  ASSERT_NE(engine, nullptr);
  const int vocab = tm.model->config.vocab_size;
  GenerationRequest with{.prompt = Prompt(6, 9, vocab), .max_tokens = 12, .sampler = {.temperature = 0.7f, .seed = 4},
                         .stop_at_eos = false, .logprobs = 5};
  GenerationRequest without = with;
  without.logprobs = -1;
  Stream a, b;
  ASSERT_TRUE(engine->Submit(with, a.Callback()).ok());
  ASSERT_TRUE(engine->Submit(without, b.Callback()).ok());
  a.WaitDone();
  b.WaitDone();
  EXPECT_TRUE(b.logprobs().empty());
  EXPECT_EQ(a.tokens(), b.tokens());  // asking for logprobs does not change what is sampled
  const std::vector<int> generated = a.tokens();
  const std::vector<TokenLogprob> lps = a.logprobs();
  ASSERT_EQ(lps.size(), generated.size());
  std::vector<int> all = with.prompt;
  all.insert(all.end(), generated.begin(), generated.end());
  auto score = engine->Score(all);
  ASSERT_TRUE(score.ok()) << score.status();
  int prev = with.prompt.back();
  for (size_t i = 0; i < lps.size(); ++i) {
    // Raw bytes, as the tokenizer spells the token after its predecessor (the text stream repairs UTF-8 later).
    EXPECT_EQ(lps[i].piece, *tm.tokenizer->DecodePiece(prev, generated[i]));
    prev = generated[i];
    EXPECT_EQ(lps[i].token, generated[i]);
    EXPECT_EQ(lps[i].logprob, score->token_logprobs[with.prompt.size() - 1 + i]) << i;
    ASSERT_EQ(lps[i].top.size(), 5u);
    EXPECT_LE(lps[i].logprob, lps[i].top[0].logprob);
    for (size_t k = 1; k < 5; ++k) {
      EXPECT_GE(lps[i].top[k - 1].logprob, lps[i].top[k].logprob);
    }
  }
  GenerationRequest bad = with;
  bad.logprobs = kMaxTopLogprobs + 1;
  EXPECT_EQ(engine->Submit(bad, a.Callback()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Engine, ShutdownEndsEveryStreamExactlyOnce) {
  const TestModel tm = TinyWithVocab(59);
  const int vocab = tm.model->config.vocab_size;
  for (bool by_destructor : {false, true}) {
    SCOPED_TRACE(by_destructor ? "destructor" : "Shutdown");
    auto engine = MakeEngine(tm, {.threads = 2, .max_running = 2});
    ASSERT_NE(engine, nullptr);
    std::vector<std::unique_ptr<Stream>> streams;
    std::vector<GenerationRequest> requests;
    for (int i = 0; i < 10; ++i) {
      requests.push_back({.prompt = Prompt(1 + 3 * i, 20 + i, vocab), .max_tokens = 5 + i,
                          .sampler = {.temperature = 0.9f, .seed = static_cast<uint64_t>(i)}});
      streams.push_back(std::make_unique<Stream>());
      ASSERT_TRUE(engine->Submit(requests.back(), streams.back()->Callback()).ok());
    }
    if (by_destructor) {
      engine.reset();
    } else {
      engine->Shutdown();
      GenerationRequest late{.prompt = {1}, .max_tokens = 3};
      Stream never;
      EXPECT_EQ(engine->Submit(late, never.Callback()).status().code(), absl::StatusCode::kUnavailable);
      EXPECT_EQ(engine->Stats().running, 0);
      EXPECT_EQ(engine->Stats().queued, 0);
      engine->Shutdown();  // idempotent
    }
    for (int i = 0; i < 10; ++i) {
      EXPECT_EQ(streams[i]->done_count(), 1) << i;
      EXPECT_TRUE(streams[i]->done_is_last()) << i;
      // Drained, not cut off: every request ran to its own end.
      ExpectMatchesAlone(tm, requests[i], *streams[i], tm.model->config.seq_len);
    }
  }
}

TEST(Engine, ShutdownFromACallbackDoesNotDeadlock) {
  const TestModel tm = TinyWithVocab(60);
  auto engine = MakeEngine(tm, {.threads = 1});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = {1, 50, 60}, .max_tokens = 10, .sampler = {.temperature = 0.0f}};
  Stream s;
  Engine* e = engine.get();
  ASSERT_TRUE(engine->Submit(r, s.Callback([e](const StreamEvent&, int index) {
                           if (index == 0) e->Shutdown();
                           return true;
                         })).ok());
  s.WaitDone();
  ExpectMatchesAlone(tm, r, s, tm.model->config.seq_len);
  Stream refused;
  EXPECT_EQ(engine->Submit(r, refused.Callback()).status().code(), absl::StatusCode::kUnavailable);
  engine.reset();
}

TEST(Engine, WithoutTokenizerStreamsTokensOnly) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 61);  // no vocabulary: no EOS known either
  const TestModel tm{std::make_shared<const Model>(std::move(m)), nullptr};
  auto engine = MakeEngine(tm, {.threads = 2, .context = 64});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = Prompt(10, 6, 320), .max_tokens = 64, .sampler = {.temperature = 0.0f}};
  Stream s;
  ASSERT_TRUE(engine->Submit(r, s.Callback()).ok());
  s.WaitDone();
  ExpectMatchesAlone(tm, r, s, 64);
  EXPECT_EQ(s.last().finish, FinishReason::kContextFull);  // the 64 positions fill after 55 tokens
  EXPECT_EQ(s.text(), "");
  r.stop = {"x"};
  EXPECT_EQ(engine->Submit(r, s.Callback()).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Engine, PromptFillingTheContextYieldsOneToken) {
  const TestModel tm = TinyWithVocab(62);
  auto engine = MakeEngine(tm, {.threads = 2, .max_prefill_tokens_per_step = 7, .context = 32});
  ASSERT_NE(engine, nullptr);
  GenerationRequest r{.prompt = Prompt(32, 7, tm.model->config.vocab_size), .max_tokens = 10,
                      .sampler = {.temperature = 0.0f}, .stop_at_eos = false};
  Stream s;
  ASSERT_TRUE(engine->Submit(r, s.Callback()).ok());
  s.WaitDone();
  ExpectMatchesAlone(tm, r, s, 32);
  EXPECT_EQ(s.last().finish, FinishReason::kContextFull);
  EXPECT_EQ(s.tokens().size(), 1u);
}

TEST(Engine, RejectsBadOptionsAndRequests) {
  const TestModel tm = TinyWithVocab(63);
  using absl::StatusCode;
  EXPECT_EQ(Engine::Create(nullptr, tm.tokenizer, {}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(tm.model, tm.tokenizer, {.max_running = 0}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(tm.model, tm.tokenizer, {.max_queue = 0}).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(tm.model, tm.tokenizer, {.max_prefill_tokens_per_step = 0}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(tm.model, tm.tokenizer, {.context = -1}).status().code(), StatusCode::kInvalidArgument);
  // A context past the model's seq_len (128) is clamped to it.
  auto clamped = Engine::Create(tm.model, tm.tokenizer, {.threads = 1, .context = 1000});
  ASSERT_TRUE(clamped.ok()) << clamped.status();
  Stream unused;
  EXPECT_EQ((*clamped)->Submit({.prompt = std::vector<int>(129, 5), .max_tokens = 1}, unused.Callback()).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ((*clamped)->Score(std::vector<int>(129, 5)).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE((*clamped)->Score(std::vector<int>(128, 5)).ok());

  auto engine = MakeEngine(tm, {.threads = 1, .context = 32});
  ASSERT_NE(engine, nullptr);
  Stream s;
  auto submit = [&](GenerationRequest r) { return engine->Submit(std::move(r), s.Callback()).status(); };
  auto expect_invalid = [&](GenerationRequest r, const std::string& mentions) {
    const absl::Status st = submit(std::move(r));
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
    EXPECT_NE(st.message().find(mentions), std::string::npos) << st;
  };
  const std::vector<int> ok = {1, 30, 31};
  expect_invalid({.prompt = {}}, "empty");
  expect_invalid({.prompt = std::vector<int>(33, 5), .max_tokens = 1}, "context");
  expect_invalid({.prompt = ok, .max_tokens = 0}, "max_tokens");
  expect_invalid({.prompt = ok, .max_tokens = 33}, "max_tokens");
  expect_invalid({.prompt = {1, -1}, .max_tokens = 4}, "token id -1");
  expect_invalid({.prompt = {1, 320}, .max_tokens = 4}, "token id 320");
  expect_invalid({.prompt = ok, .max_tokens = 4, .sampler = {.temperature = std::nanf("")}}, "finite");
  expect_invalid({.prompt = ok, .max_tokens = 4, .stop = {""}}, "empty");
  expect_invalid({.prompt = ok, .max_tokens = 4, .stop = std::vector<std::string>(kMaxStopStrings + 1, "a")},
                 "stop strings");
  expect_invalid({.prompt = ok, .max_tokens = 4, .stop = {std::string(kMaxStopStringBytes + 1, 'a')}}, "bytes");
  EXPECT_EQ(engine->Submit({.prompt = ok, .max_tokens = 4}, nullptr).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(s.done_count(), 0);
  // The largest valid request is accepted.
  ASSERT_TRUE(submit({.prompt = std::vector<int>(32, 5), .max_tokens = 32, .stop_at_eos = false}).ok());
  s.WaitDone();
  EXPECT_EQ(s.last().finish, FinishReason::kContextFull);
}

TEST(Engine, FinishReasonNames) {
  EXPECT_STREQ(FinishReasonName(FinishReason::kLength), "length");
  EXPECT_STREQ(FinishReasonName(FinishReason::kStop), "stop");
  EXPECT_STREQ(FinishReasonName(FinishReason::kEos), "eos");
  EXPECT_STREQ(FinishReasonName(FinishReason::kContextFull), "context");
  EXPECT_STREQ(FinishReasonName(FinishReason::kCancelled), "cancelled");
  EXPECT_STREQ(FinishReasonName(FinishReason::kDeadline), "deadline");
  EXPECT_STREQ(FinishReasonName(FinishReason::kError), "error");
}

}  // namespace
}  // namespace qforge::serving
