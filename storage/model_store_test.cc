#include "storage/model_store.h"

#include <cstring>
#include <filesystem>

#include "core/formats/formats.h"
#include "core/lora/lora.h"
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

// A random adapter of `config`'s shape, as the files `format` ("gguf" or "peft") would hold it.
lora::AdapterFiles AdapterFilesFor(const ModelConfig& config, const std::string& format, uint64_t seed) {
  auto adapter = lora::MakeRandomAdapter(config, {lora::LoraTarget::kAttnQ, lora::LoraTarget::kFfnDown}, 4, 8, seed);
  EXPECT_TRUE(adapter.ok()) << adapter.status();
  lora::AdapterFiles files;
  files.format = format;
  if (format == "gguf") {
    auto bytes = lora::SerializeGgufAdapter(*adapter);
    EXPECT_TRUE(bytes.ok());
    files.weights = *bytes;
  } else {
    auto peft = lora::SerializePeftAdapter(*adapter, config);
    EXPECT_TRUE(peft.ok());
    files.weights = peft->safetensors;
    files.config_json = peft->config_json;
  }
  return files;
}

TEST_F(ModelStoreTest, AdaptersAreVersionsOfTheirBaseHoldingTheFilesByteForByte) {
  StoreOptions options;
  options.chunk_bytes = 1024;  // several chunks per adapter
  auto store = OpenStore(options);
  ASSERT_NE(store, nullptr);
  const Model base = TestModel();
  ASSERT_EQ(*PutModel(*store, base, "tiny"), 1u);
  ASSERT_EQ(*PutModel(*store, base, "tiny"), 2u);
  for (const char* format : {"gguf", "peft"}) {
    SCOPED_TRACE(format);
    const std::string name = std::string("tiny-lora-") + format;
    const lora::AdapterFiles files = AdapterFilesFor(base.config, format, 5);
    // `latest` is resolved when the adapter is stored: the adapter names the concrete version it was checked on.
    auto stored = PutAdapter(*store, name, ModelRef{"tiny", std::nullopt}, files, "/adapters/x");
    ASSERT_TRUE(stored.ok()) << stored.status();
    EXPECT_EQ(stored->version, 1u);
    EXPECT_EQ(stored->base.name(), "tiny");
    EXPECT_EQ(stored->base.version(), "2");
    EXPECT_EQ(stored->adapter.matrices.size(), 2u * base.config.n_layers);
    auto again = PutAdapter(*store, name, ModelRef{"tiny", 1}, AdapterFilesFor(base.config, format, 6), "");
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->version, 2u);
    EXPECT_EQ(again->base.version(), "1");

    auto manifest = store->GetManifest(name + "@1");
    ASSERT_TRUE(manifest.ok()) << manifest.status();
    EXPECT_EQ(manifest->adapter_of().name(), "tiny");
    EXPECT_EQ(manifest->adapter_of().version(), "2");
    EXPECT_EQ(manifest->source_uri(), "/adapters/x");
    ASSERT_EQ(manifest->tensors_size(), 1);
    EXPECT_GT(manifest->tensors(0).chunk_ids_size(), 1);
    auto back = AdapterFilesFromManifest(*manifest, [&](const std::string& id) { return store->GetChunk(id); });
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->format, format);
    EXPECT_EQ(back->weights, files.weights);
    EXPECT_EQ(back->config_json, files.config_json);
    EXPECT_EQ(back->where, name + "@1");
    // What the store gives back parses to the adapter that was stored.
    auto parsed = lora::ParseAdapterFiles(*back, base.config);
    ASSERT_TRUE(parsed.ok()) << parsed.status();
    ASSERT_EQ(parsed->matrices.size(), stored->adapter.matrices.size());
    for (size_t i = 0; i < parsed->matrices.size(); ++i) {
      EXPECT_EQ(parsed->matrices[i].a, stored->adapter.matrices[i].a);
      EXPECT_EQ(parsed->matrices[i].b, stored->adapter.matrices[i].b);
      EXPECT_EQ(parsed->matrices[i].scale, stored->adapter.matrices[i].scale);
    }
    // An adapter is not a model.
    auto as_model = LoadModel(*store, name + "@1");
    EXPECT_EQ(as_model.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_NE(as_model.status().message().find("LoRA adapter of tiny@2"), std::string::npos) << as_model.status();
    // Deleting a version drops its chunks and leaves the other.
    ASSERT_TRUE(store->DeleteVersion(name, 2).ok());
    EXPECT_TRUE(LoadModel(*store, "tiny@1").ok());
  }
  auto gc = store->CollectGarbage();
  ASSERT_TRUE(gc.ok());
  EXPECT_EQ(gc->chunks_deleted, 0u);  // every upload pin was released with its commit
  EXPECT_EQ(gc->refcounts_repaired, 0u);
}

TEST_F(ModelStoreTest, PutAdapterRefusesWhatIsNotAnAdapterOfTheBase) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const Model base = TestModel();
  ASSERT_EQ(*PutModel(*store, base, "tiny"), 1u);
  const lora::AdapterFiles good = AdapterFilesFor(base.config, "gguf", 1);
  ASSERT_TRUE(PutAdapter(*store, "lora", ModelRef{"tiny", 1}, good, "").ok());
  struct Case {
    std::string name;
    ModelRef base;
    lora::AdapterFiles files;
    absl::StatusCode code;
    std::string message;
  };
  ModelConfig other = base.config;
  other.dim *= 2;
  lora::AdapterFiles wrong_shape = AdapterFilesFor(other, "gguf", 1);
  lora::AdapterFiles truncated = good;
  truncated.weights.resize(truncated.weights.size() / 2);
  lora::AdapterFiles unknown_format = good;
  unknown_format.format = "onnx";
  for (const Case& c : std::vector<Case>{
           {"bad name!", {"tiny", 1}, good, absl::StatusCode::kInvalidArgument, "name"},
           {"tiny", {"tiny", 1}, good, absl::StatusCode::kInvalidArgument, "name: must differ"},
           {"lora2", {"tiny", 7}, good, absl::StatusCode::kNotFound, "tiny@7"},
           {"lora2", {"lora", 1}, good, absl::StatusCode::kFailedPrecondition, "base: lora@1 is itself a LoRA adapter"},
           {"tiny2", {"tiny", 1}, wrong_shape, absl::StatusCode::kInvalidArgument, "not an adapter of tiny@1"},
           {"tiny2", {"tiny", 1}, truncated, absl::StatusCode::kInvalidArgument, "not an adapter of tiny@1"},
           {"tiny2", {"tiny", 1}, unknown_format, absl::StatusCode::kInvalidArgument, "onnx"},
       }) {
    auto s = PutAdapter(*store, c.name, c.base, c.files, "");
    EXPECT_EQ(s.status().code(), c.code) << c.name << ": " << s.status();
    EXPECT_NE(s.status().message().find(c.message), std::string::npos) << s.status();
  }
  // A name holds one kind of artifact.
  ASSERT_EQ(*PutModel(*store, base, "model2"), 1u);
  auto onto_model = PutAdapter(*store, "model2", ModelRef{"tiny", 1}, good, "");
  EXPECT_EQ(onto_model.status().code(), absl::StatusCode::kFailedPrecondition) << onto_model.status();
  EXPECT_NE(onto_model.status().message().find("holds models"), std::string::npos);
  // Nothing refused left a version or an unreferenced chunk behind.
  auto models = store->ListModels();
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(models->size(), 3u);  // tiny, lora, model2
  auto gc = store->CollectGarbage();
  ASSERT_TRUE(gc.ok());
  EXPECT_EQ(gc->chunks_deleted, 0u);
}

}  // namespace
}  // namespace qforge::storage
