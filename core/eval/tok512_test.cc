// The original stories260K with its tok512 tokenizer reproduces its model card exactly; see docs/tok512.md.
// These tests skip when the shared files are absent.
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

const std::string kDir = std::string(QFORGE_SHARED_DIR) + "/models/stories260K";
const std::string kModel = kDir + "/stories260K.bin";
const std::string kTokBin = kDir + "/tok512.bin";
const std::string kTok = kDir + "/candidate-tok512/tok512.model";
// llama2.c's model card: greedy decoding (temperature 0) from BOS prints this, then a new line and "Lily".
const std::string kCard =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.";

class Tok512 : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const std::string& f : {kModel, kTokBin, kTok}) {
      if (!std::filesystem::exists(f)) GTEST_SKIP() << f << " absent";
    }
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

// Greedy from BOS, 70 tokens: the card's 61 ids exactly, then "\n" and "Lily", whichever tokenizer reads them:
// the vocabulary ReadLlama2c found beside the checkpoint (tok512.bin), qforge's reader of the .model file,
// or libsentencepiece itself.
TEST_F(Tok512, GreedyOutputIsTheModelCardText) {
  GenerateOptions o{.max_new_tokens = 70, .sampler = {.temperature = 0.0f}, .eos_id = -1};
  auto r = Generate(*rt_, std::vector<int>{1}, o);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int> ids = {1};
  ids.insert(ids.end(), r->tokens.begin(), r->tokens.end());

  ASSERT_TRUE(model_->vocab.has_value()) << "tok512.bin beside the checkpoint was not attached";
  auto sibling = TokenizerFromVocab(*model_->vocab);
  auto from_model = LoadTokenizer(kTok);
  auto from_bin = LoadTokenizer(kTokBin, 512);
  ASSERT_TRUE(sibling.ok() && from_model.ok() && from_bin.ok());
  const std::vector<const Tokenizer*> tokenizers = {sibling->get(), from_model->get(), from_bin->get(), tok_.get()};
  for (const Tokenizer* t : tokenizers) {
    auto card = t->Encode(kCard, /*add_bos=*/true);
    ASSERT_TRUE(card.ok());
    ASSERT_GE(card->size(), 61u);
    EXPECT_EQ(std::vector<int>(ids.begin(), ids.begin() + card->size()), *card);
    auto text = t->Decode(ids);
    ASSERT_TRUE(text.ok());
    EXPECT_EQ(text->substr(0, kCard.size() + 5), kCard + "\nLily") << "decoded: [" << *text << "]";
  }
}

// The card text is what the model expects: about 0.39 nats/token (the card's validation loss is ~1.3 on
// TinyStories at large), against ln 512 = 6.24 for guessing, and P(▁Once | <s>) is high.
TEST_F(Tok512, CardTextIsLikely) {
  auto card = tok_->Encode(kCard, true);
  ASSERT_TRUE(card.ok());
  // Whole-word pieces: ▁Once ▁upon ▁a ▁time ,
  EXPECT_EQ(std::vector<int>(card->begin(), card->begin() + 6),
            (std::vector<int>{1, Id("\xe2\x96\x81Once"), Id("\xe2\x96\x81upon"), Id("\xe2\x96\x81" "a"),
                              Id("\xe2\x96\x81time"), Id(",")}));
  auto ppl = eval::Perplexity(*rt_, *card);
  ASSERT_TRUE(ppl.ok()) << ppl.status();
  std::cout << "card text: " << ppl->tokens << " predicted tokens, mean NLL " << ppl->mean_nll << ", perplexity "
            << ppl->perplexity << "\n";
  EXPECT_LT(ppl->mean_nll, 0.6);

  std::vector<float> logits(512);
  rt_->Reset();
  ASSERT_TRUE(rt_->Forward(std::vector<int>{1}, 0, logits.data(), false).ok());
  std::vector<double> lp;
  eval::LogSoftmax(logits, lp);
  std::cout << "P(\xe2\x96\x81Once | <s>) = " << std::exp(lp[Id("\xe2\x96\x81Once")]) << "\n";
  EXPECT_GT(std::exp(lp[Id("\xe2\x96\x81Once")]), 0.5);
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
