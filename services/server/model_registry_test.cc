#include "services/server/model_registry.h"

#include <filesystem>

#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "gtest/gtest.h"

namespace qforge::server {
namespace {

class ModelRegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (std::filesystem::temp_directory_path() / ("qforge-registry-" + std::to_string(getpid()))).string();
    std::filesystem::create_directories(dir_);
    for (const char* name : {"a", "b"}) {
      ASSERT_TRUE(formats::WriteGguf(MakeSyntheticModel(TinyTestConfig(), 3, /*with_vocab=*/true), Path(name)).ok());
    }
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name + ".gguf"; }
  std::string dir_;
};

TEST_F(ModelRegistryTest, LoadsFilesAndUnloadsTheLeastRecentlyUsedToStayInBudget) {
  ModelRegistry probe(RegistryOptions{}, nullptr);
  auto a = probe.Load("a", "file", Path("a"), "");
  ASSERT_TRUE(a.ok()) << a.status();
  const uint64_t one = (*a)->weight_bytes;
  EXPECT_EQ((*a)->fp16_bytes * 2, one);  // f32 weights: twice their fp16 size
  EXPECT_EQ((*a)->encoding, "f32");
  ASSERT_NE((*a)->tokenizer, nullptr);  // the GGUF carries a vocabulary

  RegistryOptions options;
  options.memory_budget_bytes = one + one / 2;  // room for one model, not two
  ModelRegistry registry(options, nullptr);
  auto first = registry.Load("a", "file", Path("a"), "");
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = registry.Load("b", "", Path("b"), "");
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(registry.List().size(), 1u);
  EXPECT_EQ(registry.List()[0]->ref(), "b@file");
  EXPECT_LE(registry.ResidentBytes(), options.memory_budget_bytes);
  EXPECT_EQ(registry.Get("a@file", "").status().code(), absl::StatusCode::kNotFound);
  // The unloaded model stays usable by whoever still holds it (a request in flight).
  auto score = (*first)->engine->Score({1, 5, 7, 9});
  EXPECT_TRUE(score.ok()) << score.status();
  // Name forms, and what is refused.
  EXPECT_TRUE(registry.Get("b", "file").ok());
  EXPECT_TRUE(registry.Get("b@file", "").ok());
  EXPECT_EQ(registry.Get("b@file", "file").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Get("b@x1", "").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(registry.Get("stored", "3").status().code(), absl::StatusCode::kNotFound);  // no store
  RegistryOptions small;
  small.memory_budget_bytes = one / 2;
  ModelRegistry tiny(small, nullptr);
  EXPECT_EQ(tiny.Load("a", "file", Path("a"), "").status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(registry.Unload("b", "file").ok());
  EXPECT_TRUE(registry.List().empty());
  EXPECT_EQ(registry.Unload("b", "file").code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace qforge::server
