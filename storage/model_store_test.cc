#include "storage/model_store.h"

#include <cstring>
#include <filesystem>

#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "gtest/gtest.h"
#include "storage/test_util.h"

namespace qforge::storage {
namespace {

using testing::RandomBytes;
using testing::RawDb;
using testing::StoreTest;

using ModelStoreTest = StoreTest;

// The tiny synthetic model with a vocabulary, metadata and one Q8_0 tensor made of raw bytes.
Model TestModel() {
  Model m = MakeSyntheticModel(TinyTestConfig(), 17, /*with_vocab=*/true);
  const std::string name = names::AttnQ(1);
  const Tensor& f32 = m.tensors.at(name);
  const auto nbytes = EncodedBytes(WeightFormat::Of(WeightType::kQ8_0), f32.rows(), f32.cols());
  EXPECT_TRUE(nbytes.ok());
  std::vector<uint8_t> raw = RandomBytes(*nbytes, 99);
  // Keep the f16 block scales finite so every reader (and GGUF) accepts the tensor.
  for (size_t b = 0; b + 34 <= raw.size(); b += 34) raw[b + 1] = 0x3c;
  std::vector<int64_t> shape = f32.shape;
  m.tensors.insert_or_assign(name, Tensor::FromBytes(name, shape, WeightFormat::Of(WeightType::kQ8_0), std::move(raw)));
  m.metadata["source"] = "synthetic seed 17";
  m.metadata["note"] = "h\xc3\xa9llo";  // UTF-8
  return m;
}

void ExpectSameTensors(const Model& want, const Model& got) {
  ASSERT_EQ(want.tensors.size(), got.tensors.size());
  for (const auto& [name, t] : want.tensors) {
    SCOPED_TRACE(name);
    auto it = got.tensors.find(name);
    ASSERT_NE(it, got.tensors.end());
    EXPECT_EQ(it->second.shape, t.shape);
    EXPECT_EQ(it->second.format, t.format);
    ASSERT_EQ(it->second.nbytes, t.nbytes);
    EXPECT_EQ(std::memcmp(it->second.data, t.data, t.nbytes), 0);
  }
}

TEST_F(ModelStoreTest, PutThenLoadIsByteIdentical) {
  StoreOptions options;
  options.chunk_bytes = 4096;  // several chunks per matrix
  auto store = OpenStore(options);
  ASSERT_NE(store, nullptr);
  const Model m = TestModel();
  PutModelOptions put;
  put.recipe.mutable_defaults()->set_method("q8_0");
  put.source_uri = "synthetic://tiny";
  auto v = PutModel(*store, m, "tiny", put);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, 1u);

  auto manifest = store->GetManifest("tiny@1");
  ASSERT_TRUE(manifest.ok());
  EXPECT_EQ(manifest->recipe().defaults().method(), "q8_0");
  EXPECT_EQ(manifest->source_uri(), "synthetic://tiny");
  bool saw_multi_chunk = false, saw_q8 = false;
  for (const auto& t : manifest->tensors()) {
    saw_multi_chunk |= t.chunk_ids_size() > 1;
    saw_q8 |= t.format() == "q8_0";
  }
  EXPECT_TRUE(saw_multi_chunk);
  EXPECT_TRUE(saw_q8);

  auto back = LoadModel(*store, "tiny");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->config, m.config);
  EXPECT_EQ(back->metadata, m.metadata);
  ASSERT_TRUE(back->vocab.has_value());
  EXPECT_EQ(back->vocab->tokens, m.vocab->tokens);
  EXPECT_EQ(back->vocab->scores, m.vocab->scores);
  EXPECT_EQ(back->vocab->types, m.vocab->types);
  EXPECT_EQ(back->vocab->model, m.vocab->model);
  EXPECT_EQ(back->vocab->bos_id, m.vocab->bos_id);
  ExpectSameTensors(m, *back);
}

TEST_F(ModelStoreTest, VersionsShareChunksAndSurviveDeletingEachOther) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const Model m = TestModel();
  ASSERT_EQ(*PutModel(*store, m, "tiny"), 1u);
  ASSERT_EQ(*PutModel(*store, m, "tiny"), 2u);
  // PutModel's upload pins are gone once it returns: each chunk counts exactly its manifests.
  auto manifest = store->GetManifest("tiny@1");
  ASSERT_TRUE(manifest.ok());
  EXPECT_EQ(*store->ChunkRefCount(manifest->tensors(0).chunk_ids(0)), 2u);
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->chunks_deleted, 0u);
  EXPECT_EQ(stats->refcounts_repaired, 0u);
  auto collected = store->DeleteVersion("tiny", 1);
  ASSERT_TRUE(collected.ok());
  EXPECT_EQ(*collected, 0u);  // every chunk is still named by version 2
  auto back = LoadModel(*store, "tiny@2");
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSameTensors(m, *back);
  EXPECT_EQ(LoadModel(*store, "tiny@1").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ModelStoreTest, ExportedGgufReadsBackWithTheSameTensors) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const Model m = TestModel();
  ASSERT_TRUE(PutModel(*store, m, "tiny").ok());
  const std::string path = dir_ + "_export.gguf";
  ASSERT_TRUE(ExportModel(*store, ModelRef{"tiny", 1}, path, ExportFormat::kGguf).ok());
  auto read = formats::ReadGguf(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->config, m.config);
  ExpectSameTensors(m, *read);
  ASSERT_TRUE(read->vocab.has_value());
  EXPECT_EQ(read->vocab->tokens, m.vocab->tokens);
  std::filesystem::remove(path);
}

TEST_F(ModelStoreTest, ExportedSafetensorsReadBackWithTheSameTensors) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const Model m = TestModel();
  ASSERT_TRUE(PutModel(*store, m, "tiny").ok());
  const std::string out_dir = dir_ + "_st";
  std::filesystem::create_directories(out_dir);
  const std::string path = out_dir + "/model.safetensors";
  ASSERT_TRUE(ExportModel(*store, ModelRef{"tiny", std::nullopt}, path, ExportFormat::kSafetensors).ok());
  auto read = formats::ReadSafetensors(path);
  ASSERT_TRUE(read.ok()) << read.status();
  ExpectSameTensors(m, *read);
  std::filesystem::remove_all(out_dir);
}

TEST_F(ModelStoreTest, RejectsBadNamesInvalidModelsAndUnstorableMetadata) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  Model m = TestModel();
  EXPECT_EQ(PutModel(*store, m, "Bad Name").status().code(), absl::StatusCode::kInvalidArgument);
  Model missing = m;
  missing.tensors.erase(names::FfnUp(0));
  EXPECT_EQ(PutModel(*store, missing, "tiny").status().code(), absl::StatusCode::kInvalidArgument);
  Model binary_meta = m;
  binary_meta.metadata["blob"] = std::string("\xff\xfe", 2);
  auto s = PutModel(*store, binary_meta, "tiny");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("blob"), std::string::npos) << s.status();
  EXPECT_TRUE(store->ListModels()->empty());
  auto unknown = LoadModel(*store, "tiny@3");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("tiny@3"), std::string::npos);
}

TEST_F(ModelStoreTest, LoadingACorruptChunkFailsNamingTensorAndChunk) {
  std::string id;
  const std::string tensor = names::FfnDown(0);
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(PutModel(*store, TestModel(), "tiny").ok());
    auto manifest = store->GetManifest("tiny@1");
    ASSERT_TRUE(manifest.ok());
    for (const auto& t : manifest->tensors()) {
      if (t.name() == tensor) id = t.chunk_ids(0);
    }
  }
  ASSERT_FALSE(id.empty());
  {
    RawDb raw(dir_);
    std::string v = raw.Get(cf::kChunks, id);
    v[v.size() / 2] ^= 0x01;
    raw.Put(cf::kChunks, id, v);
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto loaded = LoadModel(*store, "tiny");
  ASSERT_FALSE(loaded.ok());
  EXPECT_EQ(loaded.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(loaded.status().message().find(id), std::string::npos) << loaded.status();
  EXPECT_NE(loaded.status().message().find(tensor), std::string::npos) << loaded.status();
}

}  // namespace
}  // namespace qforge::storage
