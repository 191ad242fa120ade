#include "core/formats/formats.h"

#include <cstring>
#include <string>

#include "core/base/half.h"
#include "core/formats/parsers.h"
#include "core/formats/test_util.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::HasSubstr;
using namespace ::qforge::formats::testing;

TEST(FormatsTest, Names) {
  EXPECT_STREQ(FileFormatName(FileFormat::kGguf), "gguf");
  EXPECT_STREQ(FileFormatName(FileFormat::kSafetensors), "safetensors");
  EXPECT_STREQ(FileFormatName(FileFormat::kLlama2c), "llama2.c");
  EXPECT_STREQ(FileFormatName(FileFormat::kUnknown), "unknown");
}

TEST(FormatsTest, DetectsByContentNotJustName) {
  const std::string dir = TempDir("detect");
  Model m = MakeSyntheticModel(TinyTestConfig(), 1);
  auto gguf = SerializeGguf(m);
  auto st = SerializeSafetensors(m);
  ASSERT_TRUE(gguf.ok() && st.ok());
  WriteBytes(dir + "/a.weights", *gguf);
  WriteBytes(dir + "/b.weights", *st);
  WriteBytes(dir + "/c.bin", {1, 2, 3});
  WriteBytes(dir + "/d.txt", {'h', 'i'});
  EXPECT_EQ(*DetectFormat(dir + "/a.weights"), FileFormat::kGguf);
  EXPECT_EQ(*DetectFormat(dir + "/b.weights"), FileFormat::kSafetensors);
  EXPECT_EQ(*DetectFormat(dir + "/c.bin"), FileFormat::kLlama2c);
  EXPECT_EQ(*DetectFormat(dir), FileFormat::kSafetensors);
  EXPECT_EQ(*DetectFormat(dir + "/x.safetensors.index.json"), FileFormat::kSafetensors);
  auto unknown = DetectFormat(dir + "/d.txt");
  ASSERT_FALSE(unknown.ok());
  EXPECT_THAT(unknown.status().message(), HasSubstr("cannot tell the format"));
  EXPECT_EQ(DetectFormat(dir + "/missing.gguf").status().code(), absl::StatusCode::kNotFound);

  // LoadModel dispatches on content and reports the reader's error with the path.
  auto loaded = LoadModel(dir + "/a.weights");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameTensors(m, *loaded);
  auto bad = LoadModel(dir + "/c.bin");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("c.bin: llama2.c: file truncated"));
}

// Float tensors change type as llama.cpp's converter --outtype does; everything else is left alone.
TEST(FormatsTest, CastFloatTensors) {
  auto floats_of = [](const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    for (size_t i = 0; i < v.size(); ++i) {
      uint16_t h;
      if (t.format.type == WeightType::kF32) {
        std::memcpy(&v[i], t.data + 4 * i, 4);
        continue;
      }
      std::memcpy(&h, t.data + 2 * i, 2);
      v[i] = t.format.type == WeightType::kF16 ? HalfToFloat(h) : Bf16ToFloat(h);
    }
    return v;
  };
  Model m;
  // 1/3 is exact in none of the half types; bf16 keeps 8 bits of mantissa, f16 11.
  const std::vector<float> values = {1.0f / 3, -2.5f, 1e-3f, 65504.0f, -0.0f, 3.0f};
  m.tensors["matrix"] = Tensor::FromFloats("matrix", {2, 3}, values);
  m.tensors["norm"] = Tensor::FromFloats("norm", {6}, values);
  std::vector<uint8_t> q8(34, 0);
  q8[2] = 7;
  m.tensors["quantized"] = Tensor::FromBytes("quantized", {1, 32}, WeightFormat::Of(WeightType::kQ8_0), q8);

  ASSERT_TRUE(CastFloatTensors(m, WeightType::kBF16).ok());
  EXPECT_EQ(m.tensors.at("matrix").format.type, WeightType::kBF16);
  EXPECT_EQ(m.tensors.at("norm").format.type, WeightType::kF32);  // vectors stay f32, as llama.cpp keeps norms
  EXPECT_EQ(m.tensors.at("quantized").format.type, WeightType::kQ8_0);
  EXPECT_EQ(std::vector<uint8_t>(m.tensors.at("quantized").data, m.tensors.at("quantized").data + 34), q8);
  const std::vector<float> bf16 = floats_of(m.tensors.at("matrix"));
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(bf16[i], Bf16ToFloat(FloatToBf16(values[i]))) << i;
  EXPECT_NE(bf16[0], values[0]);
  EXPECT_EQ(floats_of(m.tensors.at("norm")), values);

  // Back to f32 is exact: the bf16 values come back as they are.
  ASSERT_TRUE(CastFloatTensors(m, WeightType::kF32).ok());
  EXPECT_EQ(m.tensors.at("matrix").format.type, WeightType::kF32);
  EXPECT_EQ(m.tensors.at("matrix").nbytes, 4 * values.size());
  EXPECT_EQ(floats_of(m.tensors.at("matrix")), bf16);

  ASSERT_TRUE(CastFloatTensors(m, WeightType::kF16).ok());
  const std::vector<float> f16 = floats_of(m.tensors.at("matrix"));
  for (size_t i = 0; i < values.size(); ++i) EXPECT_EQ(f16[i], HalfToFloat(FloatToHalf(bf16[i]))) << i;

  const absl::Status bad = CastFloatTensors(m, WeightType::kQ4_0);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("f32, f16 or bf16"));
}

TEST(FormatsTest, LoadsStories260K) {
  if (!Exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = LoadModel(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.vocab_size, 512);
  EXPECT_EQ(m->metadata.at("source.format"), "llama2.c");
}

}  // namespace
}  // namespace qforge::formats
