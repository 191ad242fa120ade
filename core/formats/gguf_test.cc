#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"
#include "core/formats/test_util.h"
#include "core/model/ggml_types.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using namespace ::qforge::formats::testing;

// Hand-assembles GGUF files for the hostile-input tests.
class Builder {
 public:
  template <typename T>
  Builder& Put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    body_.insert(body_.end(), p, p + sizeof(T));
    return *this;
  }
  Builder& Str(const std::string& s) {
    Put<uint64_t>(s.size());
    body_.insert(body_.end(), s.begin(), s.end());
    return *this;
  }
  Builder& KvU32(const std::string& k, uint32_t v) { Str(k).Put<uint32_t>(4).Put(v); ++kv_; return *this; }
  Builder& KvStr(const std::string& k, const std::string& v) { Str(k).Put<uint32_t>(8).Str(v); ++kv_; return *this; }
  Builder& Kv() { ++kv_; return *this; }  // after hand-writing a KV with Put/Str
  Builder& Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, uint64_t offset) {
    Str(name).Put<uint32_t>(static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) Put(d);
    Put(type).Put(offset);
    ++tensors_;
    return *this;
  }
  // A minimal llama header for a 1-layer dim-64 model (the tensors are not all there).
  Builder& Llama() {
    KvStr("general.architecture", "llama");
    for (auto [k, v] : std::vector<std::pair<std::string, uint32_t>>{{"llama.embedding_length", 64},
                                                                      {"llama.feed_forward_length", 160},
                                                                      {"llama.block_count", 1},
                                                                      {"llama.attention.head_count", 4},
                                                                      {"llama.context_length", 128},
                                                                      {"llama.vocab_size", 320}}) {
      KvU32(k, v);
    }
    return *this;
  }
  std::vector<uint8_t> Build(uint32_t version = 3, size_t data_bytes = 0) const {
    std::vector<uint8_t> out = {'G', 'G', 'U', 'F'};
    auto put = [&](auto v) {
      const auto* p = reinterpret_cast<const uint8_t*>(&v);
      out.insert(out.end(), p, p + sizeof(v));
    };
    put(version);
    put(tensors_);
    put(kv_);
    out.insert(out.end(), body_.begin(), body_.end());
    out.resize((out.size() + 31) / 32 * 32 + data_bytes, 0);
    return out;
  }

 private:
  std::vector<uint8_t> body_;
  uint64_t kv_ = 0, tensors_ = 0;
};

std::string ParseError(const std::vector<uint8_t>& bytes) {
  auto r = ParseGguf(bytes, nullptr);
  return r.ok() ? "OK" : std::string(r.status().message());
}

class GgufRoundTrip : public ::testing::TestWithParam<bool> {};

TEST_P(GgufRoundTrip, SyntheticModelWithVocab) {
  ModelConfig c = TinyTestConfig();
  c.tied_embeddings = GetParam();
  ASSERT_LT(c.n_kv_heads, c.n_heads);  // exercises GQA shapes
  c.rope_theta = 500000.0f;
  c.norm_eps = 1e-6f;
  Model m = MakeSyntheticModel(c, 11, /*with_vocab=*/true);
  m.metadata["general.name"] = "tiny";
  // Non-default normaliser flags (tok512's) travel as tokenizer.ggml.add_space_prefix / remove_extra_whitespaces.
  m.vocab->normalizer.remove_extra_whitespaces = GetParam();
  m.vocab->normalizer.add_dummy_prefix = !GetParam();
  const std::string dir = TempDir(absl::StrCat("gguf_rt", GetParam()));
  const std::string path = dir + "/m.gguf";
  ASSERT_TRUE(WriteGguf(m, path).ok());
  auto r = ReadGguf(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m.config);
  ExpectSameTensors(m, *r);
  ASSERT_TRUE(r->vocab.has_value());
  ExpectSameVocab(*m.vocab, *r->vocab);
  EXPECT_EQ(r->metadata.at("general.name"), "tiny");
  EXPECT_EQ(r->metadata.at("general.file_type"), "0");
  EXPECT_EQ(r->Find(names::kOutput) == nullptr, GetParam());
  // Zero-copy reads, every tensor 32-byte aligned in the file (mmap base is page aligned).
  for (const auto& [n, t] : r->tensors) EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data) % 32, 0u) << n;
  auto detected = DetectFormat(path);
  ASSERT_TRUE(detected.ok());
  EXPECT_EQ(*detected, FileFormat::kGguf);
  auto loaded = LoadModel(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameTensors(m, *loaded);
}
INSTANTIATE_TEST_SUITE_P(TiedAndUntied, GgufRoundTrip, ::testing::Bool());

// tokenizer.chat_template (what llama.cpp and qforge-server read a model's chat template from) survives a round trip.
TEST(GgufTest, ChatTemplateTravelsAsTokenizerChatTemplate) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 5, /*with_vocab=*/true);
  const std::string chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m.content }}\n{% endfor %}";
  m.metadata[kChatTemplateKey] = chat_template;
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const std::string text(bytes->begin(), bytes->end());
  EXPECT_NE(text.find("tokenizer.chat_template"), std::string::npos);
  auto r = ParseGguf(*bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->metadata.at(kChatTemplateKey), chat_template);
  m.metadata.erase(kChatTemplateKey);
  auto without = ParseGguf(*SerializeGguf(m), nullptr);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_EQ(without->metadata.count(kChatTemplateKey), 0u);
}

// Experts travel stacked as llama.cpp stores them (blk.N.ffn_*_exps.weight, [E, rows, cols], with
// llama.expert_count / expert_used_count) and come back as one matrix per expert, byte for byte.
TEST(GgufTest, MoeExpertsAreStackedAndSplitBack) {
  const ModelConfig c = TinyMoeTestConfig();
  Model m = MakeSyntheticModel(c, 13, /*with_vocab=*/true);
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto r = ParseGguf(*bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m.config);
  ExpectSameTensors(m, *r);
  const std::string text(bytes->begin(), bytes->end());
  EXPECT_NE(text.find("blk.1.ffn_down_exps.weight"), std::string::npos);
  EXPECT_NE(text.find("llama.expert_used_count"), std::string::npos);
  EXPECT_EQ(text.find("blk.1.ffn_down.3.weight"), std::string::npos);

  // A layer's experts must share one encoding to be one tensor.
  Model mixed = WithEncoding(m, WeightFormat::Of(WeightType::kQ8_0), 3);
  mixed.tensors.at(names::FfnUpExpert(0, 5)) = m.tensors.at(names::FfnUpExpert(0, 5));
  EXPECT_THAT(SerializeGguf(mixed).status().message(), HasSubstr("stored as one tensor"));
}

// Norms stored in bf16 (as a bf16 checkpoint has them) are written as f32, the only type llama.cpp multiplies
// activations by; the values are the same.
TEST(GgufTest, HalfPrecisionNormsAreWrittenAsF32) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 3, /*with_vocab=*/true);
  const Tensor& norm = m.tensors.at(names::AttnNorm(0));
  std::vector<uint8_t> bf(2 * static_cast<size_t>(norm.numel()));
  std::vector<float> want(static_cast<size_t>(norm.numel()));
  for (int64_t i = 0; i < norm.numel(); ++i) {
    float v;
    std::memcpy(&v, norm.data + 4 * i, 4);
    const uint16_t b = FloatToBf16(v);
    std::memcpy(&bf[2 * i], &b, 2);
    want[i] = Bf16ToFloat(b);
  }
  m.tensors[names::AttnNorm(0)] = Tensor::FromBytes(norm.name, norm.shape, WeightFormat::BF16(), bf);
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto r = ParseGguf(*bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  const Tensor& back = r->tensors.at(names::AttnNorm(0));
  EXPECT_EQ(back.format.type, WeightType::kF32);
  ASSERT_EQ(back.nbytes, 4 * want.size());
  EXPECT_EQ(0, std::memcmp(back.data, want.data(), back.nbytes));
}

TEST(GgufTest, WithoutVocabHasNoVocab) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 3);
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok());
  auto r = ParseGguf(*bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->vocab.has_value());
  EXPECT_EQ(r->config, m.config);
}

struct EncodingCase {
  WeightFormat format;
  const char* file_type;
};

class GgufEncodings : public ::testing::TestWithParam<EncodingCase> {};

TEST_P(GgufEncodings, RoundTripsByteIdentical) {
  Model m = WithEncoding(MakeSyntheticModel(Q4kTestConfig(), 5, true), GetParam().format, 99);
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto r = ParseGguf(*bytes, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectSameTensors(m, *r);
  EXPECT_EQ(r->metadata.at("general.file_type"), GetParam().file_type);
}
INSTANTIATE_TEST_SUITE_P(All, GgufEncodings,
                         ::testing::Values(EncodingCase{WeightFormat::F16(), "1"}, EncodingCase{WeightFormat::BF16(), "32"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ8_0), "7"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ4_0), "2"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ4_K), "15"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ4_1), "3"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ5_0), "8"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ5_1), "9"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ2_K), "10"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ3_K), "12"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ5_K), "17"},
                                           EncodingCase{WeightFormat::Of(WeightType::kQ6_K), "18"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ4_NL), "25"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ4_XS), "30"},
                                           EncodingCase{WeightFormat::Of(WeightType::kTQ1_0), "36"},
                                           EncodingCase{WeightFormat::Of(WeightType::kTQ2_0), "37"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ2_XXS), "19"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ2_XS), "20"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ2_S), "28"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ3_XXS), "23"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ3_S), "26"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ1_S), "24"},
                                           EncodingCase{WeightFormat::Of(WeightType::kIQ1_M), "31"},
                                           EncodingCase{WeightFormat::Of(WeightType::kMXFP4), "38"}));

// Every ggml type of the table is read from the id ggml.h gives it (a hand-built file, one tensor per type, as
// llama.cpp writes them: ne[0] the row length), and a row length that is not a multiple of its block is refused.
TEST(GgufTest, ReadsEveryGgmlTypeById) {
  for (const GgmlTypeTraits& g : GgmlTypes()) {
    SCOPED_TRACE(g.name);
    const uint64_t cols = 512, rows = 3;
    const size_t nbytes = rows * cols / g.block * g.block_bytes;
    Builder b;
    b.Llama().Tensor("t", {cols, rows}, g.ggml_id, 0);
    const std::vector<uint8_t> file = b.Build(3, (nbytes + 31) / 32 * 32);
    // The minimal header has no model tensors, so the parse fails at validation, past the tensor infos and the
    // data bounds: a type or size error would come first.
    EXPECT_THAT(ParseError(file), HasSubstr("no tensor 'token_embd.weight'"));
    if (g.block > 1) {
      Builder bad;
      bad.Llama().Tensor("t", {static_cast<uint64_t>(g.block) + 16}, g.ggml_id, 0);
      EXPECT_THAT(ParseError(bad.Build(3, 4096)), HasSubstr(absl::StrCat("multiple of ", g.block)));
    }
  }
}

TEST(GgufTest, WriterRefusesQforgeOnlyEncodings) {
  for (const WeightFormat& f : {WeightFormat::QInt(4, 64, true), WeightFormat::NF4(64, false)}) {
    Model m = WithEncoding(MakeSyntheticModel(Q4kTestConfig(), 5), f, 1);
    auto bytes = SerializeGguf(m);
    ASSERT_FALSE(bytes.ok());
    EXPECT_THAT(bytes.status().message(), HasSubstr("GGUF has no type"));
    EXPECT_THAT(bytes.status().message(), HasSubstr(FormatName(f)));
  }
}

TEST(GgufTest, Stories260KRoundTrip) {
  if (!Exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = ReadLlama2c(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::string path = TempDir("gguf_stories") + "/stories260K.gguf";
  ASSERT_TRUE(WriteGguf(*m, path).ok());
  auto r = ReadGguf(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m->config);
  EXPECT_TRUE(r->config.tied_embeddings);
  ExpectSameTensors(*m, *r);
}

TEST(GgufTest, AcceptsVersion2) {
  auto bytes = SerializeGguf(MakeSyntheticModel(TinyTestConfig(), 2));
  ASSERT_TRUE(bytes.ok());
  (*bytes)[4] = 2;
  EXPECT_EQ(ParseError(*bytes), "OK");
}

TEST(GgufTest, RejectsEveryTruncation) {
  auto bytes = SerializeGguf(MakeSyntheticModel(TinyTestConfig(), 2, true));
  ASSERT_TRUE(bytes.ok());
  const std::vector<uint8_t>& b = *bytes;
  for (size_t len = 0; len < b.size(); len += (len < 4096 ? 1 : 509)) {
    const std::string err = ParseError(std::vector<uint8_t>(b.begin(), b.begin() + len));
    ASSERT_NE(err, "OK") << len;
    EXPECT_THAT(err, AnyOf(HasSubstr("truncated"), HasSubstr("past the end"), HasSubstr("cannot fit"),
                           HasSubstr("exceeds the remaining")))
        << len;
  }
}

TEST(GgufTest, RejectsBadMagicAndVersion) {
  auto bytes = SerializeGguf(MakeSyntheticModel(TinyTestConfig(), 2));
  ASSERT_TRUE(bytes.ok());
  std::vector<uint8_t> b = *bytes;
  b[0] = 'X';
  EXPECT_THAT(ParseError(b), HasSubstr("bad magic"));
  b = *bytes;
  b[4] = 1;
  EXPECT_THAT(ParseError(b), HasSubstr("unsupported version 1"));
  b[4] = 4;
  EXPECT_THAT(ParseError(b), HasSubstr("unsupported version 4"));
}

TEST(GgufTest, RejectsLyingCounts) {
  auto bytes = SerializeGguf(MakeSyntheticModel(TinyTestConfig(), 2, true));
  ASSERT_TRUE(bytes.ok());
  auto with_u64 = [&](size_t off, uint64_t v) {
    std::vector<uint8_t> b = *bytes;
    std::memcpy(b.data() + off, &v, 8);
    return b;
  };
  EXPECT_THAT(ParseError(with_u64(8, uint64_t{1} << 62)), HasSubstr("tensor_count 4611686018427387904 cannot fit"));
  EXPECT_THAT(ParseError(with_u64(16, ~uint64_t{0})), HasSubstr("kv_count 18446744073709551615 cannot fit"));
  // The first key's length.
  EXPECT_THAT(ParseError(with_u64(24, uint64_t{1} << 63)), HasSubstr("key length 9223372036854775808 exceeds"));
  EXPECT_THAT(ParseError(with_u64(24, 70000)), HasSubstr("key length 70000 exceeds the limit of 65536"));
  {
    Builder b;
    b.KvStr("general.architecture", "llama");
    std::vector<uint8_t> cut = b.Build();
    cut.resize(24 + 8 + 5);  // a quarter of the key
    EXPECT_THAT(ParseError(cut), HasSubstr("truncated reading key at offset 32"));
  }

  // Arrays and strings whose lengths lie.
  Builder huge_array;
  huge_array.Llama().Str("tokenizer.ggml.scores").Put<uint32_t>(9).Put<uint32_t>(6).Put<uint64_t>(uint64_t{1} << 62).Kv();
  EXPECT_THAT(ParseError(huge_array.Build()), HasSubstr("array of 4611686018427387904 x f32 exceeds"));
  Builder overflow_array;
  overflow_array.Llama().Str("a").Put<uint32_t>(9).Put<uint32_t>(12).Put<uint64_t>(uint64_t{1} << 61).Kv();
  EXPECT_THAT(ParseError(overflow_array.Build()), HasSubstr("exceeds the remaining"));
  Builder huge_strings;
  huge_strings.Llama().Str("tokenizer.ggml.tokens").Put<uint32_t>(9).Put<uint32_t>(8).Put<uint64_t>(1000000).Kv();
  EXPECT_THAT(ParseError(huge_strings.Build()), HasSubstr("array length 1000000 exceeds"));
  Builder long_string;
  long_string.Llama().Str("general.name").Put<uint32_t>(8).Put<uint64_t>(~uint64_t{0} - 3).Kv();
  EXPECT_THAT(ParseError(long_string.Build()), HasSubstr("string value length"));
  Builder nested;
  nested.Llama().Str("x").Put<uint32_t>(9).Put<uint32_t>(9).Put<uint64_t>(1).Kv();
  EXPECT_THAT(ParseError(nested.Build()), HasSubstr("nested arrays"));
  Builder bad_type;
  bad_type.Llama().Str("x").Put<uint32_t>(13).Put<uint32_t>(0).Kv();
  EXPECT_THAT(ParseError(bad_type.Build()), HasSubstr("unknown value type 13"));
  Builder dup;
  dup.Llama().KvU32("llama.block_count", 2);
  EXPECT_THAT(ParseError(dup.Build()), HasSubstr("duplicate key 'llama.block_count'"));
}

TEST(GgufTest, RejectsBadTensorInfos) {
  {
    Builder b;
    b.Llama().Tensor("t", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("tensor 't' shape overflows"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {~uint64_t{0}}, 0, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("shape overflows"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {1, 1, 1, 1, 1}, 0, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("has 5 dimensions"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {64}, 99, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("unknown ggml type 99"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {256}, 15, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("ggml type 15 (q8_k)"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {256}, 40, 0);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("ggml type 40 (nvfp4)"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {100}, 8, 0);  // q8_0 needs multiples of 32
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("multiple of 32"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {64}, 0, 0).Tensor("t", {64}, 0, 256);
    EXPECT_THAT(ParseError(b.Build(3, 512)), HasSubstr("duplicate tensor name 't'"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {64}, 0, 33);
    EXPECT_THAT(ParseError(b.Build(3, 512)), HasSubstr("offset 33 is not a multiple of the alignment 32"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {64}, 0, 4096);
    EXPECT_THAT(ParseError(b.Build(3, 512)), HasSubstr("tensor 't' offset 4096 + 256 bytes is past the end"));
  }
  {
    Builder b;
    b.Llama().Tensor("t", {64}, 0, ~uint64_t{0} - 31);
    EXPECT_THAT(ParseError(b.Build(3, 512)), HasSubstr("past the end"));
  }
  {
    Builder b;
    b.Llama().Tensor("a", {64}, 0, 0).Tensor("b", {64}, 0, 128);
    EXPECT_THAT(ParseError(b.Build(3, 512)), HasSubstr("overlap"));
  }
  {
    Builder b;
    b.Llama().KvU32("general.alignment", 48);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("general.alignment 48 is not a power of two"));
  }
}

TEST(GgufTest, RejectsBadMetadata) {
  {
    Builder b;
    b.KvU32("llama.block_count", 1);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("missing required key 'general.architecture'"));
  }
  {
    Builder b;
    b.KvStr("general.architecture", "gpt2");
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("'gpt2' is not supported"));
  }
  {
    Builder b;
    b.KvStr("general.architecture", "llama");
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("missing required key 'llama.embedding_length'"));
  }
  {
    // A complete header whose tensors are missing: ValidateModel names the first absent tensor.
    Builder b;
    b.Llama();
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("no tensor 'token_embd.weight'"));
  }
  {
    Builder b;
    b.Llama().KvU32("llama.rope.dimension_count", 8);
    EXPECT_THAT(ParseError(b.Build()), HasSubstr("rope.dimension_count 8 differs"));
  }
  // Vocabulary arrays that disagree with each other.
  Model m = MakeSyntheticModel(TinyTestConfig(), 2, true);
  m.vocab->bos_id = 100000;
  auto bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok());
  EXPECT_THAT(ParseError(*bytes), HasSubstr("bos_token_id 100000 is not a token id"));
  m = MakeSyntheticModel(TinyTestConfig(), 2, true);
  m.vocab->types[5] = static_cast<TokenType>(9);
  bytes = SerializeGguf(m);
  ASSERT_TRUE(bytes.ok());
  EXPECT_THAT(ParseError(*bytes), HasSubstr("token 5 has unknown token type 9"));
}

// llama-imatrix's file: what SerializeImatrixGguf writes parses back to the same entries and bytes (one plain
// weight, and a stacked expert tensor with an expert that saw no token), and llama.cpp's layout holds: n_dims 1
// where there is one matrix. Anything else is refused, naming what is wrong.
ImportanceMatrix TestImatrix() {
  ImportanceMatrix m;
  m.datasets = {"calib.txt"};
  m.chunk_count = 4;
  m.chunk_size = 128;
  ImportanceMatrix::Entry q{.cols = 64, .experts = 1, .sum_squares = {}, .tokens = {512}};
  for (int c = 0; c < 64; ++c) q.sum_squares.push_back(0.25f * static_cast<float>(c * c + 1));
  ImportanceMatrix::Entry up{.cols = 32, .experts = 3, .sum_squares = {}, .tokens = {16, 0, 8}};
  for (int k = 0; k < 96; ++k) up.sum_squares.push_back(k % 32 == 5 || k / 32 == 1 ? 0.0f : 1.5f * k);
  m.entries.emplace("blk.0.attn_q.weight", std::move(q));
  m.entries.emplace("blk.0.ffn_up_exps.weight", std::move(up));
  return m;
}

TEST(GgufTest, ImatrixRoundTripsInLlamaCppsLayout) {
  const ImportanceMatrix m = TestImatrix();
  auto bytes = SerializeImatrixGguf(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto r = ParseImatrixGguf(*bytes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->datasets, m.datasets);
  EXPECT_EQ(r->chunk_count, 4);
  EXPECT_EQ(r->chunk_size, 128);
  ASSERT_EQ(r->entries.size(), 2u);
  for (const auto& [name, e] : m.entries) {
    const ImportanceMatrix::Entry& g = r->entries.at(name);
    EXPECT_EQ(g.cols, e.cols) << name;
    EXPECT_EQ(g.experts, e.experts) << name;
    EXPECT_EQ(g.sum_squares, e.sum_squares) << name;
    EXPECT_EQ(g.tokens, e.tokens) << name;
  }
  const ImportanceMatrix::Entry& q = r->entries.at("blk.0.attn_q.weight");
  EXPECT_EQ(q.MeanSquare(0, 3), 0.25f * 10 / 512);
  EXPECT_EQ(r->entries.at("blk.0.ffn_up_exps.weight").MeanSquare(1, 7), 0.0f) << "an expert with no token";
  // llama-quantize's weights: the mean squares, and for an expert with no token uniform ones.
  const ImportanceMatrix::Entry& up = r->entries.at("blk.0.ffn_up_exps.weight");
  EXPECT_EQ(up.Importance(1), std::vector<float>(static_cast<size_t>(up.cols), 1.0f));
  EXPECT_EQ(q.Importance(0)[3], q.MeanSquare(0, 3));
  auto again = SerializeImatrixGguf(*r);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, *bytes);
  // The plain weight's in_sum2 info: name, n_dims 1, ne0 = 64, type f32.
  const std::string info = "blk.0.attn_q.weight.in_sum2";
  const auto at = std::search(bytes->begin(), bytes->end(), info.begin(), info.end());
  ASSERT_NE(at, bytes->end());
  uint32_t n_dims = 0;
  uint64_t ne0 = 0;
  std::memcpy(&n_dims, &*(at + info.size()), 4);
  std::memcpy(&ne0, &*(at + info.size() + 4), 8);
  EXPECT_EQ(n_dims, 1u);
  EXPECT_EQ(ne0, 64u);
}

TEST(GgufTest, ImatrixRefusesWhatIsNotOne) {
  auto expect_error = [](std::vector<uint8_t> bytes, const std::string& what) {
    auto r = ParseImatrixGguf(bytes);
    ASSERT_FALSE(r.ok()) << what;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(r.status().message(), what)) << r.status();
  };
  auto model = SerializeGguf(MakeSyntheticModel(TinyTestConfig(), 3));
  ASSERT_TRUE(model.ok());
  expect_error(*model, "general.type");
  auto good = SerializeImatrixGguf(TestImatrix());
  ASSERT_TRUE(good.ok());
  auto replace = [&](const std::string& from, const std::string& to) {
    std::vector<uint8_t> b = *good;
    const auto at = std::search(b.begin(), b.end(), from.begin(), from.end());
    EXPECT_NE(at, b.end()) << from;
    if (at != b.end()) std::copy(to.begin(), to.end(), at);
    return b;
  };
  expect_error(replace("imatrix", "imatrax"), "general.type");
  expect_error(replace("attn_q.weight.counts", "attn_q.weight.countz"), "countz' is neither a W.in_sum2 nor a W.counts");
  ImportanceMatrix negative = TestImatrix();
  negative.entries.at("blk.0.attn_q.weight").sum_squares[9] = -1;
  expect_error(*SerializeImatrixGguf(negative), "sum of squares -1 at column 9");
  ImportanceMatrix no_count = TestImatrix();
  no_count.entries.at("blk.0.attn_q.weight").tokens[0] = std::nanf("");
  expect_error(*SerializeImatrixGguf(no_count), "is not a count");
  ImportanceMatrix short_sums = TestImatrix();
  short_sums.entries.at("blk.0.attn_q.weight").sum_squares.pop_back();
  EXPECT_FALSE(SerializeImatrixGguf(short_sums).ok());
  for (size_t cut : {size_t{0}, size_t{10}, good->size() / 2, good->size() - 24}) {  // the last 20 bytes: padding
    EXPECT_FALSE(ParseImatrixGguf(std::span<const uint8_t>(good->data(), cut)).ok()) << cut;
  }
}

}  // namespace
}  // namespace qforge::formats
