#include "core/model/model.h"

#include <cstring>

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
  EXPECT_FALSE(ParseFormatName("q5_k").ok());
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
