#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/mapped_file.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"
#include "core/formats/test_util.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::HasSubstr;
using namespace ::qforge::formats::testing;

float FloatAt(const std::vector<uint8_t>& b, size_t off) {
  float f;
  std::memcpy(&f, b.data() + off, 4);
  return f;
}

void Append(std::vector<uint8_t>& out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
void AppendI32(std::vector<uint8_t>& out, int32_t v) { Append(out, &v, 4); }
void AppendF32(std::vector<uint8_t>& out, float v) { Append(out, &v, 4); }

// Serialises a float model in run.c's order, as llama2.c's export does (test-only writer).
std::vector<uint8_t> ToLlama2c(const Model& m) {
  const ModelConfig& c = m.config;
  std::vector<uint8_t> out;
  for (int32_t v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                    c.tied_embeddings ? c.vocab_size : -c.vocab_size, c.seq_len}) {
    AppendI32(out, v);
  }
  auto put = [&](const std::string& n) {
    const Tensor& t = m.tensors.at(n);
    Append(out, t.data, t.nbytes);
  };
  put(names::kTokenEmbd);
  for (auto fn : {names::AttnNorm, names::AttnQ, names::AttnK, names::AttnV, names::AttnOutput, names::FfnNorm,
                  names::FfnGate, names::FfnDown, names::FfnUp}) {
    for (int l = 0; l < c.n_layers; ++l) put(fn(l));
  }
  put(names::kOutputNorm);
  std::vector<float> freq(static_cast<size_t>(c.seq_len) * c.head_dim(), 0.5f);
  Append(out, freq.data(), freq.size() * 4);
  if (!c.tied_embeddings) put(names::kOutput);
  return out;
}

TEST(Llama2cTest, Stories260KLoads) {
  if (!Exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = ReadLlama2c(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  const ModelConfig& c = m->config;
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.hidden_dim, 172);
  EXPECT_EQ(c.n_layers, 5);
  EXPECT_EQ(c.n_heads, 8);
  EXPECT_EQ(c.n_kv_heads, 4);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.seq_len, 512);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_FLOAT_EQ(c.norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_EQ(m->tensors.size(), 2u + 9u * 5u);
  EXPECT_EQ(m->Find(names::kOutput), nullptr);
  EXPECT_TRUE(ValidateModel(*m).ok());
  // Its tokenizer, tok512.bin, sits beside it (as run.c expects) and comes along.
  if (Exists(kTok512Bin)) {
    ASSERT_TRUE(m->vocab.has_value());
    EXPECT_EQ(m->vocab->tokens.size(), 512u);
    EXPECT_EQ(m->metadata.at("tokenizer.path"), kTok512Bin);
    auto alone = ReadLlama2cTokenizer(kTok512Bin, 512);
    ASSERT_TRUE(alone.ok()) << alone.status();
    ExpectSameVocab(*alone, *m->vocab);
  }

  // Spot checks against the raw file bytes, computing offsets independently from the layout.
  const std::vector<uint8_t> raw = FileBytes(kStories);
  const size_t D = 64, H = 172, L = 5, V = 512, KV = 32;
  auto f32 = [](const Tensor& t, size_t i) {
    float f;
    std::memcpy(&f, t.data + 4 * i, 4);
    return f;
  };
  const size_t emb = 28;
  const size_t att_norm = emb + V * D * 4;
  const size_t wq = att_norm + L * D * 4;
  const size_t wk = wq + L * D * D * 4;
  const size_t wv = wk + L * KV * D * 4;
  const size_t wo = wv + L * KV * D * 4;
  const size_t ffn_norm = wo + L * D * D * 4;
  const size_t w1 = ffn_norm + L * D * 4;
  const size_t w2 = w1 + L * H * D * 4;
  const size_t w3 = w2 + L * D * H * 4;
  const size_t final_norm = w3 + L * H * D * 4;
  EXPECT_EQ(f32(m->tensors.at(names::kTokenEmbd), 0), FloatAt(raw, emb));
  EXPECT_EQ(f32(m->tensors.at(names::kTokenEmbd), 777), FloatAt(raw, emb + 777 * 4));
  EXPECT_EQ(f32(m->tensors.at(names::AttnNorm(4)), 3), FloatAt(raw, att_norm + (4 * D + 3) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::AttnQ(2)), 100), FloatAt(raw, wq + (2 * D * D + 100) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::AttnK(1)), 5), FloatAt(raw, wk + (1 * KV * D + 5) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::AttnV(3)), 9), FloatAt(raw, wv + (3 * KV * D + 9) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::AttnOutput(0)), 11), FloatAt(raw, wo + 11 * 4));
  EXPECT_EQ(f32(m->tensors.at(names::FfnNorm(2)), 1), FloatAt(raw, ffn_norm + (2 * D + 1) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::FfnGate(1)), 17), FloatAt(raw, w1 + (1 * H * D + 17) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::FfnDown(4)), 171), FloatAt(raw, w2 + (4 * D * H + 171) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::FfnUp(3)), 42), FloatAt(raw, w3 + (3 * H * D + 42) * 4));
  EXPECT_EQ(f32(m->tensors.at(names::kOutputNorm), 63), FloatAt(raw, final_norm + 63 * 4));
  // Every RMSNorm weight of this trained model lies in (0.4, 5); a misplaced offset would land in matrix
  // data (mostly |w| < 0.3, either sign) or in freq_cis.
  for (const std::string& n : {names::AttnNorm(0), names::AttnNorm(4), names::FfnNorm(2), std::string(names::kOutputNorm)}) {
    const Tensor& t = m->tensors.at(n);
    ASSERT_EQ(t.shape, std::vector<int64_t>({64})) << n;
    for (int i = 0; i < 64; ++i) {
      EXPECT_GT(f32(t, i), 0.4f) << n << "[" << i << "]";
      EXPECT_LT(f32(t, i), 5.0f) << n << "[" << i << "]";
    }
  }
  // Zero copy: consecutive sections are adjacent views of one mapping.
  EXPECT_EQ(m->tensors.at(names::kTokenEmbd).data + V * D * 4, m->tensors.at(names::AttnNorm(0)).data);
  EXPECT_EQ(m->tensors.at(names::AttnNorm(0)).owner, m->tensors.at(names::FfnUp(4)).owner);
}

class Llama2cRoundTrip : public ::testing::TestWithParam<bool> {};

TEST_P(Llama2cRoundTrip, SyntheticModelReadsBackExactly) {
  ModelConfig c = TinyTestConfig();
  c.n_kv_heads = c.n_heads / 2;  // GQA
  c.tied_embeddings = GetParam();
  Model m = MakeSyntheticModel(c, 7);
  const std::vector<uint8_t> bytes = ToLlama2c(m);
  auto r = ParseLlama2c(bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m.config);
  ExpectSameTensors(m, *r);
}
INSTANTIATE_TEST_SUITE_P(TiedAndUntied, Llama2cRoundTrip, ::testing::Bool());

// llama2.c's tokenizer.bin layout for `v`, spaces written plainly as its exporter does.
std::vector<uint8_t> ToLlama2cTokenizer(const Vocab& v) {
  std::vector<uint8_t> out;
  AppendI32(out, 16);
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    std::string text = v.tokens[i];
    for (size_t at; (at = text.find(kSentencePieceSpace)) != std::string::npos;) text.replace(at, 3, " ");
    AppendF32(out, v.scores[i]);
    AppendI32(out, static_cast<int32_t>(text.size()));
    out.insert(out.end(), text.begin(), text.end());
  }
  return out;
}

TEST(Llama2cTest, FindsTheTokenizerBesideTheCheckpoint) {
  ModelConfig c = TinyTestConfig();
  const Model m = MakeSyntheticModel(c, 7, /*with_vocab=*/true);
  const std::string dir = TempDir("l2c_sibling");
  const std::string path = dir + "/model.bin";
  WriteBytes(path, ToLlama2c(m));
  auto none = ReadLlama2c(path);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->vocab.has_value());

  // A tokenizer of another size is skipped (and reported), never a reason to refuse the weights.
  Vocab small = *m.vocab;
  small.tokens.resize(300), small.scores.resize(300), small.types.resize(300);
  WriteBytes(dir + "/tokenizer.bin", ToLlama2cTokenizer(small));
  auto skipped = ReadLlama2c(path);
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_FALSE(skipped->vocab.has_value());
  EXPECT_THAT(skipped->metadata.at("tokenizer.skipped"), HasSubstr("tokenizer.bin"));

  // tok{vocab}.bin comes first, as for stories260K's tok512.bin.
  const std::string tok = absl::StrCat(dir, "/tok", c.vocab_size, ".bin");
  WriteBytes(tok, ToLlama2cTokenizer(*m.vocab));
  auto found = ReadLlama2c(path);
  ASSERT_TRUE(found.ok()) << found.status();
  ASSERT_TRUE(found->vocab.has_value());
  EXPECT_EQ(found->metadata.at("tokenizer.path"), tok);
  EXPECT_EQ(found->vocab->tokens, m.vocab->tokens);
  EXPECT_EQ(found->vocab->types, m.vocab->types);
}

TEST(Llama2cTest, RejectsEveryTruncation) {
  ModelConfig c = TinyTestConfig();
  c.n_layers = 1;
  c.seq_len = 8;
  const std::vector<uint8_t> bytes = ToLlama2c(MakeSyntheticModel(c, 1));
  ASSERT_TRUE(ParseLlama2c(bytes, nullptr).ok());
  for (size_t len = 0; len < bytes.size(); len += (len < 64 ? 1 : 97)) {
    auto r = ParseLlama2c(std::span(bytes.data(), len), nullptr);
    ASSERT_FALSE(r.ok()) << len;
    if (len < 28) {
      EXPECT_THAT(r.status().message(), HasSubstr("truncated")) << len;
    } else {
      EXPECT_THAT(r.status().message(), HasSubstr("implies")) << len;
    }
  }
  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  auto r = ParseLlama2c(longer, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("implies"));
}

std::vector<uint8_t> Header(std::vector<int32_t> h) {
  std::vector<uint8_t> out;
  for (int32_t v : h) AppendI32(out, v);
  out.resize(out.size() + 4096, 0);
  return out;
}

TEST(Llama2cTest, RejectsHostileHeaders) {
  struct Case {
    std::vector<int32_t> h;
    const char* expect;
  } cases[] = {
      {{64, 172, 5, 8, 4, 512, 0}, "seq_len is 0"},
      {{-64, 172, 5, 8, 4, 512, 512}, "dim is -64"},
      {{64, 172, 5, 8, 4, 0, 512}, "vocab_size is 0"},
      {{64, 172, 5, 8, 4, INT32_MIN, 512}, "vocab_size is -2147483648"},
      {{64, 172, 5, 8, 3, 512, 512}, "n_kv_heads 3"},
      {{64, 172, 5, 7, 7, 512, 512}, "n_heads 7"},
      // Largest values the config check allows: the implied size is huge but must not overflow or allocate.
      {{1 << 20, 1 << 20, 4096, 2, 2, -(1 << 24), 1 << 24}, "implies"},
      {{INT32_MAX, INT32_MAX, INT32_MAX, 1, 1, INT32_MAX, INT32_MAX}, "out of range"},
  };
  for (const Case& k : cases) {
    auto r = ParseLlama2c(Header(k.h), nullptr);
    ASSERT_FALSE(r.ok()) << k.expect;
    EXPECT_THAT(r.status().message(), HasSubstr(k.expect));
    EXPECT_THAT(r.status().message(), HasSubstr("llama2.c"));
  }
}

TEST(Llama2cTest, MissingFileIsNotFound) {
  auto r = ReadLlama2c("/nonexistent/x.bin");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
}

TEST(Llama2cTokenizerTest, ReadsLlama2Vocabulary) {
  if (!Exists(kLlamaTok)) GTEST_SKIP() << kLlamaTok << " not present";
  auto v = ReadLlama2cTokenizer(kLlamaTok, 32000);
  ASSERT_TRUE(v.ok()) << v.status();
  ASSERT_EQ(v->tokens.size(), 32000u);
  ASSERT_EQ(v->scores.size(), 32000u);
  ASSERT_EQ(v->types.size(), 32000u);
  EXPECT_EQ(v->tokens[0], "<unk>");
  EXPECT_EQ(v->types[0], TokenType::kUnknown);
  EXPECT_EQ(v->tokens[1], "<s>");  // stored as "\n<s>\n" by llama2.c's export
  EXPECT_EQ(v->types[1], TokenType::kControl);
  EXPECT_EQ(v->tokens[2], "</s>");
  EXPECT_EQ(v->types[2], TokenType::kControl);
  EXPECT_EQ(v->tokens[3], "<0x00>");
  EXPECT_EQ(v->types[3], TokenType::kByte);
  EXPECT_EQ(v->tokens[258], "<0xFF>");
  EXPECT_EQ(v->types[258], TokenType::kByte);
  EXPECT_EQ(v->types[259], TokenType::kNormal);
  EXPECT_EQ(v->bos_id, 1);
  EXPECT_EQ(v->eos_id, 2);
  EXPECT_EQ(v->unk_id, 0);
  // Scores are the negated merge ranks: pieces after the byte tokens count down from -1.
  EXPECT_EQ(v->scores[260], -1.0f);
  EXPECT_EQ(v->tokens[260], "\xe2\x96\x81t");  // written " t" by the exporter, read back in SentencePiece spelling
  EXPECT_GT(v->scores[260], v->scores[31999]);

  auto wrong = ReadLlama2cTokenizer(kLlamaTok, 512);
  ASSERT_FALSE(wrong.ok());
  EXPECT_THAT(wrong.status().message(), HasSubstr("bytes left after 512 tokens"));
  auto too_many = ReadLlama2cTokenizer(kLlamaTok, 40000);
  ASSERT_FALSE(too_many.ok());
  EXPECT_THAT(too_many.status().message(), HasSubstr("truncated"));
}

std::vector<uint8_t> SmallTokenizer() {
  std::vector<uint8_t> out;
  AppendI32(out, 5);
  for (const std::string s : {"<unk>", "<s>", "</s>", "<0x41>", "hello"}) {
    float score = -1.5f;
    Append(out, &score, 4);
    AppendI32(out, static_cast<int32_t>(s.size()));
    Append(out, s.data(), s.size());
  }
  return out;
}

TEST(Llama2cTokenizerTest, RejectsTruncationsAndLies) {
  const std::vector<uint8_t> good = SmallTokenizer();
  auto ok = ParseLlama2cTokenizer(good, 5);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->tokens[4], "hello");
  EXPECT_EQ(ok->types[3], TokenType::kByte);
  for (size_t len = 0; len < good.size(); ++len) {
    auto r = ParseLlama2cTokenizer(std::span(good.data(), len), 5);
    ASSERT_FALSE(r.ok()) << len;
    EXPECT_THAT(r.status().message(), ::testing::AnyOf(HasSubstr("truncated"), HasSubstr("too small"))) << len;
  }
  std::vector<uint8_t> huge_len = good;
  const int32_t lie = 0x7fffffff;
  std::memcpy(huge_len.data() + 4 + 4, &lie, 4);  // first token's length
  auto r = ParseLlama2cTokenizer(huge_len, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("truncated reading token bytes"));
  std::vector<uint8_t> neg_len = good;
  const int32_t neg = -3;
  std::memcpy(neg_len.data() + 4 + 4, &neg, 4);
  r = ParseLlama2cTokenizer(neg_len, 5);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("negative length"));
  r = ParseLlama2cTokenizer(good, 1 << 30);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("out of range"));
  r = ParseLlama2cTokenizer(good, 1000);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("too small for 1000 tokens"));
}

}  // namespace
}  // namespace qforge::formats
