#include "core/eval/eval.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <random>

#include "core/eval/metrics.h"
#include "core/model/synthetic.h"
#include "gtest/gtest.h"

namespace qforge::eval {
namespace {

std::unique_ptr<Transformer> Runtime(std::shared_ptr<const Model> m) {
  auto t = Transformer::Create(std::move(m), {.threads = 2, .max_batch = 16});
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

std::vector<int> Stream(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int> t(n);
  for (int& x : t) x = static_cast<int>(rng() % vocab);
  t[0] = 1;
  return t;
}

// A model whose classifier is all zeros: every position's logits are 0, so P is uniform.
std::shared_ptr<Model> UniformModel() {
  ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<Model>(MakeSyntheticModel(c, 3));
  std::vector<float> zeros(static_cast<size_t>(c.vocab_size) * c.dim, 0.0f);
  m->tensors[names::kOutput] = Tensor::FromFloats(names::kOutput, {c.vocab_size, c.dim}, zeros);
  return m;
}

TEST(Metrics, HandComputedExample) {
  // P = softmax(0, 0) = (1/2, 1/2); Q = softmax(ln 3, 0) = (3/4, 1/4).
  std::vector<double> lp, lq;
  LogSoftmax(std::vector<float>{0.0f, 0.0f}, lp);
  LogSoftmax(std::vector<float>{static_cast<float>(std::log(3.0)), 0.0f}, lq);
  EXPECT_NEAR(std::exp(lq[0]), 0.75, 1e-7);
  // KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
  EXPECT_NEAR(KlDivergence(lp, lq), 0.5 * std::log(4.0 / 3.0), 1e-7);
  // Reverse direction: 3/4 ln(3/2) + 1/4 ln(1/2).
  EXPECT_NEAR(KlDivergence(lq, lp), 0.75 * std::log(1.5) + 0.25 * std::log(0.5), 1e-7);
  EXPECT_NEAR(NegLogLikelihood(lq, 1), std::log(4.0), 1e-7);
  EXPECT_EQ(KlDivergence(lp, lp), 0.0);
  EXPECT_EQ(ArgMax(std::vector<float>{1.0f, 3.0f, 3.0f, -1.0f}), 1);
  // Large logits do not overflow: softmax(1000, 1000 - ln 3) = (3/4, 1/4).
  LogSoftmax(std::vector<float>{1000.0f, 1000.0f - static_cast<float>(std::log(3.0))}, lq);
  EXPECT_NEAR(std::exp(lq[0]), 0.75, 1e-4);
}

TEST(Perplexity, UniformModelEqualsVocabSize) {
  auto m = UniformModel();
  auto rt = Runtime(m);
  auto r = Perplexity(*rt, Stream(50, m->config.vocab_size, 1), 16);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_NEAR(r->perplexity, m->config.vocab_size, 1e-6 * m->config.vocab_size);
  EXPECT_NEAR(r->mean_nll, std::log(m->config.vocab_size), 1e-9);
  // 50 tokens in windows of 16: 16 + 16 + 16 + 2 -> 15 + 15 + 15 + 1 predictions.
  EXPECT_EQ(r->tokens, 46);
  EXPECT_EQ(r->windows, 4);
}

TEST(Perplexity, MatchesManualWindowedComputation) {
  ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<Model>(MakeSyntheticModel(c, 12));
  auto rt = Runtime(m);
  const auto tokens = Stream(150, c.vocab_size, 2);  // windows: 70 + 70 + 10
  auto r = Perplexity(*rt, tokens, 70);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, 69 + 69 + 9);
  EXPECT_EQ(r->windows, 3);

  // By hand: a fresh runtime per window, one token at a time, log-softmax in double.
  double nll = 0.0;
  int count = 0;
  std::vector<float> logits(c.vocab_size);
  for (int begin = 0; begin < 150; begin += 70) {
    auto fresh = Runtime(m);
    const int end = std::min(150, begin + 70);
    for (int p = begin; p + 1 < end; ++p) {
      ASSERT_TRUE(fresh->Forward(std::span<const int>(&tokens[p], 1), p - begin, logits.data(), false).ok());
      double mx = -1e30, z = 0.0;
      for (float v : logits) mx = std::max<double>(mx, v);
      for (float v : logits) z += std::exp(v - mx);
      nll += mx + std::log(z) - logits[tokens[p + 1]];
      ++count;
    }
  }
  EXPECT_EQ(count, r->tokens);
  EXPECT_NEAR(r->mean_nll, nll / count, 1e-5);
  EXPECT_NEAR(r->perplexity, std::exp(nll / count), 1e-4 * r->perplexity);

  // Default window = context length (128): 128 + 22 tokens.
  auto whole = Perplexity(*rt, tokens);
  ASSERT_TRUE(whole.ok());
  EXPECT_EQ(whole->tokens, 127 + 21);
}

TEST(Perplexity, RejectsDegenerateInput) {
  auto m = UniformModel();
  auto rt = Runtime(m);
  EXPECT_FALSE(Perplexity(*rt, std::vector<int>{1}, 8).ok());
  EXPECT_FALSE(Perplexity(*rt, Stream(10, 320, 3), 1).ok());
  EXPECT_FALSE(Perplexity(*rt, Stream(10, 320, 3), 1000).ok());  // beyond the context
  EXPECT_EQ(Perplexity(*rt, std::vector<int>{1, 2, 999}, 8).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(Compare, ModelAgainstItselfIsIdentical) {
  ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<Model>(MakeSyntheticModel(c, 13));
  auto a = Runtime(m);
  auto b = Runtime(m);
  auto r = CompareModels(*a, *b, Stream(90, c.vocab_size, 4), 40);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->mean_kl, 0.0);
  EXPECT_EQ(r->max_kl, 0.0);
  EXPECT_EQ(r->top1_agreement, 1.0);
  EXPECT_EQ(r->positions, 39 + 39 + 9);
  EXPECT_EQ(r->base.mean_nll, r->quant.mean_nll);
}

// The synthetic model of `seed` with N(0, 0.05) noise (from `noise_seed`) added to every linear weight: a stand-in
// for a quantized copy.
std::shared_ptr<Model> NoisyCopy(const ModelConfig& c, uint32_t seed, uint32_t noise_seed) {
  auto noisy = std::make_shared<Model>(MakeSyntheticModel(c, seed));
  std::mt19937 rng(noise_seed);
  std::normal_distribution<float> noise(0.0f, 0.05f);
  for (const std::string& name : LinearWeightNames(c)) {
    Tensor& t = noisy->tensors.at(name);
    std::vector<float> v(reinterpret_cast<const float*>(t.data), reinterpret_cast<const float*>(t.data) + t.numel());
    for (float& x : v) x += noise(rng);
    t = Tensor::FromFloats(name, t.shape, v);
  }
  return noisy;
}

TEST(Compare, PerturbedWeightsDiverge) {
  ModelConfig c = TinyTestConfig();
  auto base_model = std::make_shared<Model>(MakeSyntheticModel(c, 14));
  auto a = Runtime(base_model);
  auto b = Runtime(NoisyCopy(c, 14, 5));
  const auto tokens = Stream(100, c.vocab_size, 6);
  auto r = CompareModels(*a, *b, tokens, 50);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GT(r->mean_kl, 1e-4);
  EXPECT_GE(r->max_kl, r->mean_kl);
  EXPECT_LT(r->top1_agreement, 1.0);
  EXPECT_GT(r->top1_agreement, 0.0);
  EXPECT_NE(r->base.mean_nll, r->quant.mean_nll);
  // The base perplexity from the comparison equals a standalone run.
  auto solo = Perplexity(*a, tokens, 50);
  ASSERT_TRUE(solo.ok());
  EXPECT_NEAR(r->base.mean_nll, solo->mean_nll, 1e-12);

  ModelConfig other = c;
  other.vocab_size = 300;
  auto c2 = Runtime(std::make_shared<Model>(MakeSyntheticModel(other, 1)));
  EXPECT_FALSE(CompareModels(*a, *c2, tokens, 50).ok());
}

// The service's evaluate tasks each compute a share of the windows in their own process (fresh runtimes, other
// thread counts); merging the shares' per-window sums in window order gives CompareModels' doubles exactly.
TEST(Compare, SharesOfTheWindowsMergeToTheWholeExactly) {
  ModelConfig c = TinyTestConfig();
  auto base_model = std::make_shared<Model>(MakeSyntheticModel(c, 21));
  std::shared_ptr<const Model> quant_model = NoisyCopy(c, 21, 8);
  std::vector<int> tokens = Stream(700, c.vocab_size, 9);
  KeepFirstWindows(tokens, 9, 70, 128);
  ASSERT_EQ(tokens.size(), 630u);
  auto a = Runtime(base_model);
  auto b = Runtime(quant_model);
  auto whole = CompareModels(*a, *b, tokens, 70);
  ASSERT_TRUE(whole.ok()) << whole.status();
  ASSERT_EQ(whole->base.windows, 9);

  for (int parts : {1, 2, 4, 9, 12}) {
    SCOPED_TRACE(parts);
    std::vector<WindowSums> merged;
    for (int part = 0; part < parts; ++part) {
      auto x = Transformer::Create(base_model, {.threads = 1 + part % 3});
      auto y = Transformer::Create(quant_model, {.threads = 1 + part % 2});
      ASSERT_TRUE(x.ok() && y.ok());
      auto windows = CompareWindowsOf(**x, **y, tokens, 70);
      ASSERT_TRUE(windows.ok()) << windows.status();
      const size_t n = windows->size(), begin = part * n / parts, end = (part + 1) * n / parts;
      auto sums = CompareWindows(**x, **y, std::span(*windows).subspan(begin, end - begin));
      ASSERT_TRUE(sums.ok()) << sums.status();
      merged.insert(merged.end(), sums->begin(), sums->end());
    }
    const CompareResult r = MergeWindows(merged);
    EXPECT_EQ(r.positions, whole->positions);
    EXPECT_EQ(r.mean_kl, whole->mean_kl);
    EXPECT_EQ(r.max_kl, whole->max_kl);
    EXPECT_EQ(r.top1_agreement, whole->top1_agreement);
    EXPECT_EQ(r.base.mean_nll, whole->base.mean_nll);
    EXPECT_EQ(r.quant.mean_nll, whole->quant.mean_nll);
    EXPECT_EQ(r.quant.perplexity, whole->quant.perplexity);
    EXPECT_EQ(r.base.windows, 9);
  }
  EXPECT_GT(whole->mean_kl, 0.0);
}

TEST(SampleStreams, SeededAndIndependentPerStream) {
  ModelConfig c = TinyTestConfig();
  auto m = std::make_shared<Model>(MakeSyntheticModel(c, 15));
  auto rt = Runtime(m);
  auto s1 = SampleStreams(*rt, 3, 40, 99);
  auto s2 = SampleStreams(*rt, 3, 40, 99);
  auto s3 = SampleStreams(*rt, 3, 40, 100);
  ASSERT_TRUE(s1.ok() && s2.ok() && s3.ok());
  EXPECT_EQ(*s1, *s2);
  EXPECT_NE(*s1, *s3);
  ASSERT_EQ(s1->size(), 3u);
  for (const auto& s : *s1) {
    EXPECT_EQ(s.size(), 40u);
    EXPECT_EQ(s[0], 1);
  }
  EXPECT_NE((*s1)[0], (*s1)[1]);
  // A stream does not depend on how many others were drawn with it.
  auto one = SampleStreams(*rt, 1, 40, 99);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ((*one)[0], (*s1)[0]);
  // Streams 1 and 2 drawn on their own (an evaluate task's share) are those of the whole draw.
  auto tail = SampleStreams(*rt, 2, 40, 99, 1.0f, 1, /*first_stream=*/1);
  ASSERT_TRUE(tail.ok());
  EXPECT_EQ(*tail, std::vector<std::vector<int>>(s1->begin() + 1, s1->end()));
  EXPECT_FALSE(SampleStreams(*rt, 1, 40, 99, 1.0f, 1, -1).ok());
  // Greedy streams (temperature 0) are the argmax continuation, identical for every stream.
  auto greedy = SampleStreams(*rt, 2, 20, 1, 0.0f);
  ASSERT_TRUE(greedy.ok());
  EXPECT_EQ((*greedy)[0], (*greedy)[1]);
  EXPECT_FALSE(SampleStreams(*rt, 1, c.seq_len + 1, 1).ok());
  // Streams feed straight into the multi-stream perplexity; a model scores its own samples well.
  auto ppl = Perplexity(*rt, *s1);
  ASSERT_TRUE(ppl.ok());
  EXPECT_EQ(ppl->tokens, 3 * 39);
  EXPECT_EQ(ppl->windows, 3);
}

TEST(EvalText, TokenizesFileAndScores) {
  ModelConfig c = TinyTestConfig();
  Model model = MakeSyntheticModel(c, 16, /*with_vocab=*/true);
  auto tok = TokenizerFromVocab(*model.vocab);
  ASSERT_TRUE(tok.ok());
  auto rt = Runtime(std::make_shared<Model>(std::move(model)));
  const std::string path = ::testing::TempDir() + "/qforge_eval_text.txt";
  const std::string text = "the rain in spain stays mainly in the plain\nhello world";
  {
    std::ofstream out(path, std::ios::binary);
    out << text;
  }
  auto r = EvalText(*rt, **tok, path, 32);
  ASSERT_TRUE(r.ok()) << r.status();
  auto ids = (*tok)->Encode(text, true);
  ASSERT_TRUE(ids.ok());
  auto direct = Perplexity(*rt, *ids, 32);
  ASSERT_TRUE(direct.ok());
  EXPECT_EQ(r->tokens, direct->tokens);
  EXPECT_DOUBLE_EQ(r->mean_nll, direct->mean_nll);
  EXPECT_GT(r->tokens, 10);
  EXPECT_EQ(EvalText(*rt, **tok, path + ".missing").status().code(), absl::StatusCode::kNotFound);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace qforge::eval
