#include "services/server/model_registry.h"

#include <filesystem>
#include <fstream>

#include "core/formats/formats.h"
#include "core/lora/lora.h"
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

TEST_F(ModelRegistryTest, AdaptersLoadOnlyUnderTheRootAndGoWithTheirModel) {
  const std::filesystem::path root = std::filesystem::path(dir_) / "adapters";
  std::filesystem::create_directories(root);
  auto adapter = lora::MakeRandomAdapter(TinyTestConfig(), {lora::LoraTarget::kAttnQ}, 4, 8, 1);
  ASSERT_TRUE(adapter.ok());
  auto bytes = lora::SerializeGgufAdapter(*adapter);
  ASSERT_TRUE(bytes.ok());
  std::ofstream(root / "q.gguf", std::ios::binary).write(reinterpret_cast<const char*>(bytes->data()), bytes->size());
  std::ofstream(std::filesystem::path(dir_) / "outside.gguf", std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes->data()), bytes->size());
  std::filesystem::create_symlink(std::filesystem::path(dir_) / "outside.gguf", root / "link.gguf");

  ModelRegistry no_root(RegistryOptions{}, nullptr);
  ASSERT_TRUE(no_root.Load("a", "file", Path("a"), "").ok());
  EXPECT_EQ(no_root.LoadAdapter("a@file", "q", (root / "q.gguf").string()).status().code(),
            absl::StatusCode::kFailedPrecondition);

  RegistryOptions options;
  options.adapter_root = root.string() + "/";  // a trailing separator names the same root
  ModelRegistry registry(options, nullptr);
  ASSERT_TRUE(registry.Load("a", "file", Path("a"), "").ok());
  ASSERT_TRUE(registry.Load("b", "file", Path("b"), "").ok());
  auto loaded = registry.LoadAdapter("a@file", "q", "q.gguf");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->adapter->matrices.size(), 2u);  // q of both layers
  EXPECT_TRUE(registry.LoadAdapter("b@file", "q", (root / "q.gguf").string()).ok());  // absolute, inside
  EXPECT_EQ(registry.LoadAdapter("a@file", "q", "q.gguf").status().code(), absl::StatusCode::kAlreadyExists);
  // A symlink out of the root, a path climbing out, a file elsewhere: all refused before anything is read.
  for (const std::string& path : {std::string("link.gguf"), std::string("../outside.gguf"), dir_ + "/outside.gguf"}) {
    EXPECT_EQ(registry.LoadAdapter("a@file", "x", path).status().code(), absl::StatusCode::kPermissionDenied) << path;
  }
  auto a = registry.Get("a", "file");
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(ModelRegistry::FindAdapter(**a, "q").ok());
  EXPECT_EQ(ModelRegistry::FindAdapter(**a, "x").status().code(), absl::StatusCode::kNotFound);
  // Two models have "q": unloading needs the model.
  EXPECT_EQ(registry.UnloadAdapter("", "q").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(registry.UnloadAdapter("b@file", "q").ok());
  EXPECT_TRUE(registry.UnloadAdapter("", "q").ok());  // now only a has it
  EXPECT_EQ(registry.UnloadAdapter("", "q").code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(ModelRegistry::FindAdapter(**a, "q").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace qforge::server
