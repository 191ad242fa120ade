// A model written as GGUF and as safetensors and read back gives bit-identical logits: the formats,
// including the HF q/k permutation and quantized encodings, lose nothing.
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

const std::string kStories = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";

// Logits at every position of a fixed token sequence.
std::vector<float> AllLogits(Model m, const std::vector<int>& tokens) {
  auto t = Transformer::Create(std::make_shared<const Model>(std::move(m)), RuntimeOptions{.threads = 2});
  EXPECT_TRUE(t.ok()) << t.status();
  if (!t.ok()) return {};
  std::vector<float> logits(tokens.size() * (*t)->vocab_size());
  EXPECT_TRUE((*t)->Forward(tokens, 0, logits.data(), /*all_logits=*/true).ok());
  return logits;
}

std::vector<int> Tokens(int vocab, int n) {
  std::vector<int> t = {1};
  for (int i = 1; i < n; ++i) t.push_back((i * 37 + 11) % vocab);
  return t;
}

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_FALSE(a.empty()) << what;
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << what << ": logits differ";
}

void CheckRoundTrips(const Model& original, const std::string& stem) {
  const std::vector<int> tokens = Tokens(original.config.vocab_size, 40);
  const std::vector<float> base = AllLogits(original, tokens);

  const std::string gguf = ::testing::TempDir() + "/" + stem + ".gguf";
  ASSERT_TRUE(formats::WriteGguf(original, gguf).ok());
  auto from_gguf = formats::ReadGguf(gguf);
  ASSERT_TRUE(from_gguf.ok()) << from_gguf.status();
  ExpectBitIdentical(base, AllLogits(std::move(*from_gguf), tokens), stem + " via GGUF");

  const std::string st_dir = ::testing::TempDir() + "/" + stem + "-st";
  std::filesystem::create_directories(st_dir);
  const std::string st = st_dir + "/model.safetensors";
  ASSERT_TRUE(formats::WriteSafetensors(original, st).ok());
  auto from_st = formats::ReadSafetensors(st);
  ASSERT_TRUE(from_st.ok()) << from_st.status();
  ExpectBitIdentical(base, AllLogits(std::move(*from_st), tokens), stem + " via safetensors");
}

TEST(RoundTripLogits, Stories260KThroughGgufAndSafetensors) {
  if (!std::filesystem::exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = formats::ReadLlama2c(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  CheckRoundTrips(*m, "stories260K");
}

TEST(RoundTripLogits, SyntheticGqaUntied) {
  ModelConfig c = TinyTestConfig();
  c.tied_embeddings = false;
  CheckRoundTrips(MakeSyntheticModel(c, 11, /*with_vocab=*/true), "synthetic-untied");
}

TEST(RoundTripLogits, QuantizedModelsThroughGguf) {
  Model base = MakeSyntheticModel(Q4kTestConfig(), 3, /*with_vocab=*/true);
  for (const char* method : {"q8_0", "q4_0", "q4_k"}) {
    quant::QuantRecipe recipe;
    recipe.method = method;
    auto q = quant::QuantizeModel(base, recipe, nullptr);
    ASSERT_TRUE(q.ok()) << method << ": " << q.status();
    CheckRoundTrips(q->model, std::string("synthetic-") + method);
  }
}

}  // namespace
}  // namespace qforge
