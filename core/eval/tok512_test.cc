// What the shared stories260K checkpoint does with the candidate tok512 tokenizer; see docs/tok512.md.
// These tests assert the observed facts (they skip when the files are absent).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <memory>
#include <set>

#include "core/eval/eval.h"
#include "core/eval/metrics.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/runtime/generate.h"
#include "core/tokenizer/sentencepiece_tokenizer.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

const std::string kModel = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
const std::string kTok = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/candidate-tok512/tok512.model";
const std::string kCard =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.";

class Tok512 : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(kModel) || !std::filesystem::exists(kTok)) GTEST_SKIP() << "stories260K files absent";
    auto m = formats::ReadLlama2c(kModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::make_shared<Model>(std::move(*m));
    auto rt = Transformer::Create(model_, {.threads = 2});
    ASSERT_TRUE(rt.ok()) << rt.status();
    rt_ = std::move(*rt);
    auto tok = SentencePieceTokenizer::Load(kTok);
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
  }

  int Id(const std::string& piece) const {
    for (int i = 0; i < tok_->vocab_size(); ++i)
      if (tok_->IdToPiece(i) == piece) return i;
    return -1;
  }

  std::shared_ptr<Model> model_;
  std::unique_ptr<Transformer> rt_;
  std::unique_ptr<SentencePieceTokenizer> tok_;
};

// True when `text` contains some non-empty substring repeated `k` times back to back.
bool HasTandemRepeat(const std::string& text, int k) {
  const size_t n = text.size();
  for (size_t period = 1; period * k <= n; ++period) {
    for (size_t start = 0; start + period * k <= n; ++start) {
      bool periodic = true;
      for (size_t i = start + period; i < start + period * k && periodic; ++i) periodic = text[i] == text[i - period];
      if (periodic) return true;
    }
  }
  return false;
}

TEST_F(Tok512, GreedyOutputIsNotTheCardTextUnderAnyTokenizer) {
  GenerateOptions o{.max_new_tokens = 60, .sampler = {.temperature = 0.0f}, .eos_id = -1};
  auto r = Generate(*rt_, std::vector<int>{1}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int> ids = {1};
  ids.insert(ids.end(), r->tokens.begin(), r->tokens.end());
  auto text = tok_->Decode(ids);
  ASSERT_TRUE(text.ok());
  std::cout << "greedy ids:";
  for (int t : r->tokens) std::cout << ' ' << t;
  std::cout << "\ndecoded with candidate tok512: [" << *text << "]\n";
  EXPECT_NE(text->rfind("Once upon a time", 0), 0u) << "the candidate reproduces the card: update docs/tok512.md";

  // The greedy ids contain a long run of one id. Any tokenizer decodes such a run to one non-empty piece
  // repeated; the card text has no such repetition, so no vocabulary (permutation, offset or other) maps
  // these ids to it: the mismatch is in the weights, not the tokenizer.
  int longest = 1, run = 1;
  for (size_t i = 1; i < r->tokens.size(); ++i) {
    run = r->tokens[i] == r->tokens[i - 1] ? run + 1 : 1;
    longest = std::max(longest, run);
  }
  std::cout << "longest run of one id: " << longest << "\n";
  EXPECT_GE(longest, 5);
  EXPECT_FALSE(HasTandemRepeat(kCard, longest));
  EXPECT_TRUE(HasTandemRepeat("ffffff", 5));  // the detector itself works
}

TEST_F(Tok512, CardTextScoresWorseThanUniform) {
  auto card = tok_->Encode(kCard, true);
  ASSERT_TRUE(card.ok());
  // The candidate's encoding of the card text uses whole-word pieces: ▁Once ▁upon ▁a ▁time ,
  EXPECT_EQ(std::vector<int>(card->begin(), card->begin() + 6),
            (std::vector<int>{1, Id("\xe2\x96\x81Once"), Id("\xe2\x96\x81upon"), Id("\xe2\x96\x81" "a"),
                              Id("\xe2\x96\x81time"), Id(",")}));
  auto ppl = eval::Perplexity(*rt_, *card);
  ASSERT_TRUE(ppl.ok()) << ppl.status();
  std::cout << "card text: " << ppl->tokens << " predicted tokens, mean NLL " << ppl->mean_nll << ", perplexity "
            << ppl->perplexity << "\n";
  // A model trained with this tokenizer reaches ~1.3 nats/token (the card's validation loss); uniform
  // guessing is ln 512 = 6.24. This checkpoint is far worse than guessing.
  EXPECT_GT(ppl->mean_nll, std::log(512.0));

  std::vector<float> logits(512);
  rt_->Reset();
  ASSERT_TRUE(rt_->Forward(std::vector<int>{1}, 0, logits.data(), false).ok());
  std::vector<double> lp;
  eval::LogSoftmax(logits, lp);
  std::cout << "P(\xe2\x96\x81Once | <s>) = " << std::exp(lp[Id("\xe2\x96\x81Once")]) << "\n";
  EXPECT_LT(std::exp(lp[Id("\xe2\x96\x81Once")]), 1e-3);
}

// The token embeddings do fit the candidate's id -> piece mapping: nearest neighbours are the pieces a
// TinyStories model would put together, and byte-token rows that such a vocabulary never uses are untouched.
TEST_F(Tok512, EmbeddingTableMatchesCandidateVocabulary) {
  const Tensor& e = model_->tensors.at(names::kTokenEmbd);
  const int vocab = static_cast<int>(e.rows()), dim = static_cast<int>(e.cols());
  std::vector<float> emb(static_cast<size_t>(vocab) * dim);
  ASSERT_TRUE(kernels::DequantizeRows(e, 0, vocab, emb.data()).ok());
  auto norm = [&](int a) {
    double s = 0;
    for (int j = 0; j < dim; ++j) s += double(emb[a * dim + j]) * emb[a * dim + j];
    return std::sqrt(s);
  };
  auto nearest = [&](int q) {
    int best = -1;
    double best_cos = -2;
    for (int b = 259; b < vocab; ++b) {  // normal pieces only
      if (b == q) continue;
      double d = 0;
      for (int j = 0; j < dim; ++j) d += double(emb[q * dim + j]) * emb[b * dim + j];
      const double c = d / (norm(q) * norm(b));
      if (c > best_cos) best_cos = c, best = b;
    }
    return tok_->IdToPiece(best);
  };
  const std::string sp = "\xe2\x96\x81";
  EXPECT_TRUE((std::set<std::string>{sp + "She", sp + "her", sp + "he", sp + "they"}).count(nearest(Id(sp + "she"))));
  EXPECT_TRUE((std::set<std::string>{"!", ",", "?"}).count(nearest(Id("."))));
  EXPECT_TRUE((std::set<std::string>{sp + "One", sp + "upon"}).count(nearest(Id(sp + "Once"))));
  EXPECT_TRUE((std::set<std::string>{sp + "Timmy", sp + "Tim", sp + "L", "L"}).count(nearest(Id(sp + "Lily"))));
  EXPECT_EQ(nearest(Id(sp + "time")), sp + "day");

  // Byte tokens <0x00>..<0xFF> are ids 3..258. Rows never used in training keep one common norm; the
  // newline byte (<0x0A>, id 13, how tok512 spells "\n") is used and differs clearly.
  std::vector<double> byte_norms;
  for (int id = 3; id < 259; ++id) byte_norms.push_back(norm(id));
  std::vector<double> sorted = byte_norms;
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  const double median = sorted[sorted.size() / 2];
  int untouched = 0;
  for (double n : byte_norms) untouched += std::abs(n - median) < 0.01 * median;
  EXPECT_GE(untouched, 150);
  EXPECT_GT(std::abs(norm(13) - median), 0.1 * median);
}

}  // namespace
}  // namespace qforge
