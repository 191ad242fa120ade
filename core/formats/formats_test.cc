#include "core/formats/formats.h"

#include <string>

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

TEST(FormatsTest, LoadsStories260K) {
  if (!Exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = LoadModel(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->config.vocab_size, 512);
  EXPECT_EQ(m->metadata.at("source.format"), "llama2.c");
}

}  // namespace
}  // namespace qforge::formats
