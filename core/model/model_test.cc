#include "core/model/model.h"

#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "core/model/ggml_types.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

TEST(WeightFormat, NamesRoundTrip) {
  for (const WeightFormat& f :
       {WeightFormat::F32(), WeightFormat::F16(), WeightFormat::BF16(), WeightFormat::Of(WeightType::kQ8_0),
        WeightFormat::Of(WeightType::kQ4_0), WeightFormat::Of(WeightType::kQ4_K), WeightFormat::QInt(4, 128, true),
        WeightFormat::QInt(3, 0, false), WeightFormat::NF4(64, true), WeightFormat::NF4(64, false)}) {
    auto parsed = ParseFormatName(FormatName(f));
    ASSERT_TRUE(parsed.ok()) << FormatName(f) << ": " << parsed.status();
    EXPECT_EQ(*parsed, f) << FormatName(f);
  }
  EXPECT_FALSE(ParseFormatName("q7_k").ok());
  EXPECT_FALSE(ParseFormatName("q4_K").ok());  // qforge's names are lower case
  EXPECT_FALSE(ParseFormatName("q8_k").ok());  // ggml's activation type: never a stored weight here
  EXPECT_FALSE(ParseFormatName("qint9_g32_sym").ok());
  EXPECT_FALSE(ParseFormatName("qint4_g0_sym").ok());
  EXPECT_FALSE(ParseFormatName("nf4_bx").ok());
}

TEST(WeightFormat, GgmlBlockSizes) {
  EXPECT_EQ(*EncodedBytes(WeightFormat::Of(WeightType::kQ8_0), 2, 64), 2u * 2 * 34);
  EXPECT_EQ(*EncodedBytes(WeightFormat::Of(WeightType::kQ4_0), 3, 32), 3u * 18);
  EXPECT_EQ(*EncodedBytes(WeightFormat::Of(WeightType::kQ4_K), 4, 512), 4u * 2 * 144);
  EXPECT_FALSE(EncodedBytes(WeightFormat::Of(WeightType::kQ4_K), 4, 64).ok());
  EXPECT_FALSE(EncodedBytes(WeightFormat::Of(WeightType::kQ8_0), 1, 33).ok());
}

// The ggml type table: every row's name round-trips and sizes a matrix as rows * cols / block blocks; ids,
// names and types are unique; a few rows checked against ggml-common.h's structs and ggml.h's ids by hand.
TEST(WeightFormat, GgmlTypeTable) {
  std::set<uint32_t> ids;
  std::set<std::string> names;
  std::set<WeightType> types;
  for (const GgmlTypeTraits& g : GgmlTypes()) {
    SCOPED_TRACE(g.name);
    EXPECT_TRUE(ids.insert(g.ggml_id).second);
    EXPECT_TRUE(names.insert(g.name).second);
    EXPECT_TRUE(types.insert(g.type).second);
    const WeightFormat f = WeightFormat::Of(g.type);
    EXPECT_EQ(FormatName(f), g.name);
    ASSERT_TRUE(ParseFormatName(g.name).ok());
    EXPECT_EQ(*ParseFormatName(g.name), f);
    EXPECT_EQ(FindGgmlType(g.type), &g);
    EXPECT_EQ(FindGgmlTypeById(g.ggml_id), &g);
    EXPECT_EQ(FindGgmlTypeByName(g.name), &g);
    EXPECT_EQ(*EncodedBytes(f, 3, 2 * 256), 3u * 2 * 256 / g.block * g.block_bytes);
    EXPECT_EQ(f.is_float(), g.block == 1);
    if (g.block > 1) {
      EXPECT_FALSE(EncodedBytes(f, 1, g.block + 16).ok());
      EXPECT_EQ(PlaneSizes(f, 3, 512).value(), std::vector<size_t>{3u * 512 / g.block * g.block_bytes});
    }
  }
  EXPECT_EQ(GgmlTypes().size(), 25u);
  const struct {
    WeightType type;
    uint32_t id;
    int block, bytes;
  } kByHand[] = {
      {WeightType::kBF16, 30, 1, 2},      {WeightType::kQ4_1, 3, 32, 20},     {WeightType::kQ5_0, 6, 32, 22},
      {WeightType::kQ5_1, 7, 32, 24},     {WeightType::kQ2_K, 10, 256, 84},   {WeightType::kQ3_K, 11, 256, 110},
      {WeightType::kQ5_K, 13, 256, 176},  {WeightType::kQ6_K, 14, 256, 210},  {WeightType::kIQ4_NL, 20, 32, 18},
      {WeightType::kIQ4_XS, 23, 256, 136}, {WeightType::kTQ1_0, 34, 256, 54}, {WeightType::kTQ2_0, 35, 256, 66},
      {WeightType::kIQ2_XXS, 16, 256, 66}, {WeightType::kIQ2_XS, 17, 256, 74}, {WeightType::kIQ2_S, 22, 256, 82},
      {WeightType::kIQ3_XXS, 18, 256, 98}, {WeightType::kIQ3_S, 21, 256, 110}, {WeightType::kIQ1_S, 19, 256, 50},
      {WeightType::kIQ1_M, 29, 256, 56},  {WeightType::kMXFP4, 39, 32, 17},
  };
  for (const auto& h : kByHand) {
    const GgmlTypeTraits* g = FindGgmlType(h.type);
    ASSERT_NE(g, nullptr);
    EXPECT_EQ(g->ggml_id, h.id) << g->name;
    EXPECT_EQ(g->block, h.block) << g->name;
    EXPECT_EQ(g->block_bytes, h.bytes) << g->name;
  }
  // qforge's own encodings and ggml types it does not read have no row.
  EXPECT_EQ(FindGgmlType(WeightType::kQInt), nullptr);
  EXPECT_EQ(FindGgmlType(WeightType::kW8A8), nullptr);
  EXPECT_EQ(FindGgmlTypeById(15), nullptr);  // q8_k
  EXPECT_EQ(FindGgmlTypeById(9), nullptr);   // q8_1
}

TEST(WeightFormat, QIntLayoutCountsScalesAndZeros) {
  auto l = GetQIntLayout(WeightFormat::QInt(3, 64, false), 10, 128);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->groups_per_row, 2);
  EXPECT_EQ(l->row_code_bytes, 48u);
  EXPECT_EQ(l->scales_offset, 480u);
  EXPECT_EQ(l->zeros_offset, 480u + 40u);
  EXPECT_EQ(l->total_bytes, 480u + 40u + 20u);
  auto pc = GetQIntLayout(WeightFormat::QInt(4, 0, true), 10, 128);
  ASSERT_TRUE(pc.ok());
  EXPECT_EQ(pc->group, 128);
  EXPECT_EQ(pc->total_bytes, 640u + 20u);
  EXPECT_FALSE(GetQIntLayout(WeightFormat::QInt(4, 48, true), 1, 128).ok());
  // A row whose bits are no whole number of bytes is padded to the next byte: 172 x 3 bits = 64.5 -> 65 bytes.
  auto padded = GetQIntLayout(WeightFormat::QInt(3, 0, true), 5, 172);
  ASSERT_TRUE(padded.ok()) << padded.status();
  EXPECT_EQ(padded->row_code_bytes, 65u);
  EXPECT_EQ(padded->scales_offset, 5u * 65u);
  EXPECT_EQ(padded->total_bytes, 5u * 65u + 5u * 2u);
  auto twelve_bits = GetQIntLayout(WeightFormat::QInt(3, 0, true), 1, 4);  // 12 bits: padded to 2 bytes
  ASSERT_TRUE(twelve_bits.ok()) << twelve_bits.status();
  EXPECT_EQ(twelve_bits->row_code_bytes, 2u);
}

TEST(WeightFormat, Nf4DoubleQuantIsQloraBitsPerWeight) {
  const int64_t rows = 256, cols = 4096;
  auto l = GetNf4Layout(WeightFormat::NF4(64, true), rows, cols);
  ASSERT_TRUE(l.ok());
  const double bpw = 8.0 * l->total_bytes / (rows * cols);
  // QLoRA: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.
  EXPECT_NEAR(bpw, 4.127, 0.001);
  auto plain = GetNf4Layout(WeightFormat::NF4(64, false), rows, cols);
  EXPECT_NEAR(8.0 * plain->total_bytes / (rows * cols), 4.5, 1e-9);
}

TEST(Tensor, ValidateCatchesSizeMismatch) {
  std::vector<float> v(6, 1.0f);
  Tensor t = Tensor::FromFloats("w", {2, 3}, v);
  EXPECT_TRUE(ValidateTensor(t).ok());
  t.shape = {2, 4};
  EXPECT_FALSE(ValidateTensor(t).ok());
  t.shape = {int64_t{1} << 40, int64_t{1} << 40};
  EXPECT_FALSE(ValidateTensor(t).ok());
  t.shape = {-2, -3};
  EXPECT_FALSE(ValidateTensor(t).ok());
}

TEST(ModelConfig, RejectsInconsistentHeads) {
  ModelConfig c{.dim = 64, .hidden_dim = 172, .n_layers = 5, .n_heads = 8, .n_kv_heads = 4, .vocab_size = 512,
                .seq_len = 512};
  EXPECT_TRUE(ValidateConfig(c).ok());
  c.n_kv_heads = 3;
  EXPECT_FALSE(ValidateConfig(c).ok());
  c.n_kv_heads = 4;
  c.n_heads = 7;
  EXPECT_FALSE(ValidateConfig(c).ok());
}

}  // namespace
}  // namespace qforge

#include "core/model/synthetic.h"

namespace qforge {
namespace {
TEST(Synthetic, ModelsAreValidAndDeterministic) {
  for (bool tied : {false, true}) {
    ModelConfig c = TinyTestConfig();
    c.tied_embeddings = tied;
    Model a = MakeSyntheticModel(c, 5, true);
    ASSERT_TRUE(ValidateModel(a).ok()) << ValidateModel(a);
    Model b = MakeSyntheticModel(c, 5, true);
    const Tensor& ta = a.tensors.at(names::AttnQ(1));
    const Tensor& tb = b.tensors.at(names::AttnQ(1));
    ASSERT_EQ(ta.nbytes, tb.nbytes);
    EXPECT_EQ(0, std::memcmp(ta.data, tb.data, ta.nbytes));
  }
  EXPECT_TRUE(ValidateModel(MakeSyntheticModel(Q4kTestConfig(), 1)).ok());
}
}  // namespace
}  // namespace qforge

#include <set>

namespace qforge {
namespace {
// A Llama 2-sized synthetic vocabulary has no repeated piece (llama.cpp aborts loading a GGUF that has one).
TEST(Synthetic, VocabularyPiecesAreDistinct) {
  ModelConfig c = TinyTestConfig();
  c.vocab_size = 32000;
  c.dim = 8;
  c.hidden_dim = 8;
  c.n_heads = 2;
  c.n_kv_heads = 2;
  c.n_layers = 1;
  Model m = MakeSyntheticModel(c, 1, /*with_vocab=*/true);
  ASSERT_TRUE(m.vocab.has_value());
  ASSERT_EQ(m.vocab->tokens.size(), 32000u);
  const std::set<std::string> distinct(m.vocab->tokens.begin(), m.vocab->tokens.end());
  EXPECT_EQ(distinct.size(), 32000u);
}
}  // namespace
}  // namespace qforge
