#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/base/half.h"
#include "core/formats/formats.h"
#include "core/formats/json.h"
#include "core/formats/parsers.h"
#include "core/formats/test_util.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::formats {
namespace {

using ::testing::AnyOf;
using ::testing::HasSubstr;
using namespace ::qforge::formats::testing;
namespace fs = std::filesystem;

// A safetensors file from a raw header text and data section.
std::vector<uint8_t> Raw(const std::string& header, const std::vector<uint8_t>& data = {}) {
  const uint64_t n = header.size();
  std::vector<uint8_t> out(8 + header.size());
  std::memcpy(out.data(), &n, 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string ParseError(const std::vector<uint8_t>& bytes) {
  auto r = ParseSafetensorsFile(bytes);
  return r.ok() ? "OK" : std::string(r.status().message());
}

void WriteText(const std::string& path, const std::string& text) {
  WriteBytes(path, std::vector<uint8_t>(text.begin(), text.end()));
}

class SafetensorsRoundTrip : public ::testing::TestWithParam<bool> {};

TEST_P(SafetensorsRoundTrip, SyntheticModel) {
  ModelConfig c = TinyTestConfig();
  c.tied_embeddings = GetParam();
  ASSERT_LT(c.n_kv_heads, c.n_heads);
  c.norm_eps = 1e-6f;
  c.rope_theta = 500000.0f;
  Model m = MakeSyntheticModel(c, 21, /*with_vocab=*/true);
  m.vocab->normalizer.remove_extra_whitespaces = true;
  const std::string dir = TempDir(absl::StrCat("st_rt", GetParam()));
  const std::string path = dir + "/model.safetensors";
  ASSERT_TRUE(WriteSafetensors(m, path).ok());
  ASSERT_TRUE(Exists(dir + "/config.json"));
  // The vocabulary goes beside the weights as Hugging Face keeps a SentencePiece tokenizer.
  ASSERT_TRUE(Exists(dir + "/tokenizer.model"));
  ASSERT_TRUE(Exists(dir + "/tokenizer_config.json"));
  for (const std::string& p : {path, dir}) {
    auto r = ReadSafetensors(p);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->config, m.config);
    ExpectSameTensors(m, *r);
    ASSERT_TRUE(r->vocab.has_value());
    ExpectSameVocab(*m.vocab, *r->vocab);
  }
  auto f = DetectFormat(dir);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(*f, FileFormat::kSafetensors);
  auto loaded = LoadModel(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectSameTensors(m, *loaded);

  // The file itself is HF-shaped: names, format metadata, data 8-aligned, q/k in rotate-half order.
  const std::vector<uint8_t> bytes = FileBytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  auto st = ParseSafetensorsFile(bytes);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->metadata.at("format"), "pt");
  const int hd = c.head_dim();
  for (const auto& [hf, canonical, heads] :
       {std::tuple{"model.layers.1.self_attn.q_proj.weight", names::AttnQ(1), c.n_heads},
        std::tuple{"model.layers.0.self_attn.k_proj.weight", names::AttnK(0), c.n_kv_heads}}) {
    const SafetensorsEntry* e = nullptr;
    for (const auto& x : st->tensors) {
      if (x.name == hf) e = &x;
    }
    ASSERT_NE(e, nullptr) << hf;
    const Tensor& t = m.tensors.at(canonical);
    const size_t row = static_cast<size_t>(c.dim) * 4;
    // Rotate-half pairs row i with row i + hd/2 of a head; interleaved pairs rows 2i and 2i+1.
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < hd / 2; ++i) {
        EXPECT_EQ(0, std::memcmp(e->data + (h * hd + i) * row, t.data + (h * hd + 2 * i) * row, row)) << hf;
        EXPECT_EQ(0, std::memcmp(e->data + (h * hd + hd / 2 + i) * row, t.data + (h * hd + 2 * i + 1) * row, row)) << hf;
      }
    }
  }
}
INSTANTIATE_TEST_SUITE_P(TiedAndUntied, SafetensorsRoundTrip, ::testing::Bool());

class SafetensorsEncodings : public ::testing::TestWithParam<WeightFormat> {};

TEST_P(SafetensorsEncodings, RoundTripsByteIdentical) {
  Model m = WithEncoding(MakeSyntheticModel(Q4kTestConfig(), 5), GetParam(), 77);
  auto bytes = SerializeSafetensors(m);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  auto st = ParseSafetensorsFile(*bytes);
  ASSERT_TRUE(st.ok()) << st.status();
  if (!GetParam().is_float()) {
    EXPECT_EQ(st->metadata.at("qforge.format.model.layers.0.mlp.up_proj.weight"), FormatName(GetParam()));
    EXPECT_EQ(st->metadata.at("qforge.shape.model.layers.0.mlp.up_proj.weight"), "768,256");
  }
  auto r = ModelFromSafetensors(m.config, {*st}, {nullptr});
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectSameTensors(m, *r);
}
INSTANTIATE_TEST_SUITE_P(All, SafetensorsEncodings,
                         ::testing::Values(WeightFormat::F16(), WeightFormat::BF16(), WeightFormat::Of(WeightType::kQ8_0),
                                           WeightFormat::Of(WeightType::kQ4_0), WeightFormat::Of(WeightType::kQ4_K),
                                           WeightFormat::QInt(4, 64, true), WeightFormat::QInt(3, 0, false),
                                           WeightFormat::QInt(8, 128, false), WeightFormat::NF4(64, false),
                                           WeightFormat::NF4(64, true), WeightFormat::Of(WeightType::kQ6_K),
                                           WeightFormat::Of(WeightType::kIQ2_XXS), WeightFormat::Of(WeightType::kQ5_1)));

// A Mixture of Experts is written and read as Hugging Face's Mixtral: block_sparse_moe.gate and
// experts.E.w1/w3/w2, with num_local_experts / num_experts_per_tok in config.json.
TEST(SafetensorsTest, MixtralRoundTrip) {
  const ModelConfig c = TinyMoeTestConfig();
  Model m = MakeSyntheticModel(c, 17, /*with_vocab=*/true);
  const std::string dir = TempDir("st_moe");
  ASSERT_TRUE(WriteSafetensors(m, dir + "/model.safetensors").ok());
  auto r = ReadSafetensors(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m.config);
  ExpectSameTensors(m, *r);
  const std::vector<uint8_t> raw = FileBytes(dir + "/model.safetensors");
  const std::string text(raw.begin(), raw.end());
  EXPECT_NE(text.find("model.layers.1.block_sparse_moe.experts.7.w2.weight"), std::string::npos);
  EXPECT_NE(text.find("model.layers.0.block_sparse_moe.gate.weight"), std::string::npos);
  const std::vector<uint8_t> cfg = FileBytes(dir + "/config.json");
  EXPECT_NE(std::string(cfg.begin(), cfg.end()).find("MixtralForCausalLM"), std::string::npos);
}

// Hugging Face models carry their chat template in tokenizer_config.json (a string, or a list of named templates
// of which "default" is used) or, in newer exports, in chat_template.jinja.
TEST(SafetensorsTest, ChatTemplateIsReadFromTokenizerConfigBesideTheWeights) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 3, /*with_vocab=*/false);
  const std::string dir = TempDir("st_chat_template");
  ASSERT_TRUE(WriteSafetensors(m, dir + "/model.safetensors").ok());
  auto read = [&]() {
    auto r = ReadSafetensors(dir);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *std::move(r) : Model();
  };
  EXPECT_EQ(read().metadata.count(kChatTemplateKey), 0u);
  auto write = [&](const std::string& name, const std::string& text) {
    WriteBytes(dir + "/" + name, std::vector<uint8_t>(text.begin(), text.end()));
  };
  write("chat_template.jinja", "{{ 'from the jinja file' }}");
  EXPECT_EQ(read().metadata.at(kChatTemplateKey), "{{ 'from the jinja file' }}");
  write("tokenizer_config.json", R"({"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}\n{% endfor %}"})");
  EXPECT_EQ(read().metadata.at(kChatTemplateKey), "{{ bos_token }}{% for m in messages %}\n{% endfor %}");
  write("tokenizer_config.json",
        R"({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})");
  EXPECT_EQ(read().metadata.at(kChatTemplateKey), "D");
  // A broken tokenizer_config.json does not stop the model from loading; it is noted and the .jinja file is used.
  write("tokenizer_config.json", "{not json");
  const Model broken = read();
  EXPECT_EQ(broken.metadata.at(kChatTemplateKey), "{{ 'from the jinja file' }}");
  EXPECT_NE(broken.metadata.at("tokenizer.chat_template.skipped").find("tokenizer_config.json"), std::string::npos);
}

TEST(SafetensorsTest, Nf4DoubleQuantAcrossScaleGroupsIsRefused) {
  // Q4k config: head 64 rows x 8 blocks of 32 = 512 blocks per head, so rotate-half moves blocks between
  // groups of 256 blocks that share a scale.
  Model m = WithEncoding(MakeSyntheticModel(Q4kTestConfig(), 5), WeightFormat::NF4(32, true), 1);
  auto bytes = SerializeSafetensors(m);
  ASSERT_FALSE(bytes.ok());
  EXPECT_EQ(bytes.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(bytes.status().message(), HasSubstr("double-quantization groups"));
}

TEST(SafetensorsTest, PermutationMovesEveryPlaneOfARow) {
  // A qint asymmetric [8, 64] tensor whose code, scale and zero bytes all hold their row number.
  const WeightFormat f = WeightFormat::QInt(4, 32, false);
  auto l = GetQIntLayout(f, 8, 64);
  ASSERT_TRUE(l.ok());
  std::vector<uint8_t> bytes(l->total_bytes);
  for (size_t r = 0; r < 8; ++r) {
    std::memset(bytes.data() + l->codes_offset + r * l->row_code_bytes, static_cast<int>(r), l->row_code_bytes);
    std::memset(bytes.data() + l->scales_offset + r * 4, static_cast<int>(r), 4);
    std::memset(bytes.data() + l->zeros_offset + r * 2, static_cast<int>(r), 2);
  }
  Tensor t = Tensor::FromBytes("q", {8, 64}, f, bytes);
  auto hf = PermuteQkToHf(t, 2);  // 2 heads of 4 rows: interleaved 0 1 2 3 -> rotate-half 0 2 1 3
  ASSERT_TRUE(hf.ok()) << hf.status();
  const int expect[8] = {0, 2, 1, 3, 4, 6, 5, 7};
  for (size_t r = 0; r < 8; ++r) {
    EXPECT_EQ(hf->data[l->codes_offset + r * l->row_code_bytes], expect[r]) << r;
    EXPECT_EQ(hf->data[l->scales_offset + r * 4 + 3], expect[r]) << r;
    EXPECT_EQ(hf->data[l->zeros_offset + r * 2 + 1], expect[r]) << r;
  }
  auto back = PermuteQkFromHf(*hf, 2);
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(0, std::memcmp(back->data, bytes.data(), bytes.size()));
  EXPECT_THAT(PermuteQkToHf(t, 3).status().message(), HasSubstr("not n_head 3"));
}

TEST(SafetensorsTest, ShardedWithIndex) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 8);
  const std::string one = TempDir("st_one");
  ASSERT_TRUE(WriteSafetensors(m, one + "/model.safetensors").ok());
  const std::vector<uint8_t> one_bytes = FileBytes(one + "/model.safetensors");
  auto st = ParseSafetensorsFile(one_bytes);
  ASSERT_TRUE(st.ok());
  // Split the tensors over two shards, re-serialised by hand.
  const std::string dir = TempDir("st_sharded");
  Json weight_map = Json::MakeObject();
  for (int shard = 0; shard < 2; ++shard) {
    Json header = Json::MakeObject();
    std::vector<uint8_t> data;
    const std::string file = absl::StrCat("model-0000", shard + 1, "-of-00002.safetensors");
    for (size_t k = shard; k < st->tensors.size(); k += 2) {
      const SafetensorsEntry& e = st->tensors[k];
      Json entry = Json::MakeObject();
      entry.Set("dtype", Json::String(e.dtype));
      Json shape = Json::MakeArray();
      for (int64_t d : e.shape) shape.mutable_array().push_back(Json::Int(d));
      entry.Set("shape", shape);
      entry.Set("data_offsets", Json::MakeArray({Json::Int(static_cast<int64_t>(data.size())),
                                                 Json::Int(static_cast<int64_t>(data.size() + e.nbytes))}));
      data.insert(data.end(), e.data, e.data + e.nbytes);
      header.Set(e.name, entry);
      weight_map.Set(e.name, Json::String(file));
    }
    WriteBytes(dir + "/" + file, Raw(header.Dump(), data));
  }
  Json index = Json::MakeObject();
  index.Set("metadata", Json::MakeObject());
  index.Set("weight_map", weight_map);
  WriteText(dir + "/model.safetensors.index.json", index.Dump());
  fs::copy_file(one + "/config.json", dir + "/config.json");
  for (const std::string& p : {dir, dir + "/model.safetensors.index.json"}) {
    auto r = ReadSafetensors(p);
    ASSERT_TRUE(r.ok()) << r.status();
    ExpectSameTensors(m, *r);
  }

  // An index that points outside the model directory, or at a shard lacking a tensor.
  Json bad = Json::MakeObject();
  Json bad_map = Json::MakeObject();
  bad_map.Set("model.norm.weight", Json::String("../elsewhere.safetensors"));
  bad.Set("weight_map", bad_map);
  WriteText(dir + "/model.safetensors.index.json", bad.Dump());
  auto r = ReadSafetensors(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("is not a plain file name"));
  weight_map.Set("model.layers.9.mlp.up_proj.weight", Json::String("model-00001-of-00002.safetensors"));
  Json index2 = Json::MakeObject();
  index2.Set("weight_map", weight_map);
  WriteText(dir + "/model.safetensors.index.json", index2.Dump());
  r = ReadSafetensors(dir);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("'model.layers.9.mlp.up_proj.weight' is in model-00001-of-00002"));
}

TEST(SafetensorsTest, Stories260KRoundTrip) {
  if (!Exists(kStories)) GTEST_SKIP() << kStories << " not present";
  auto m = ReadLlama2c(kStories);
  ASSERT_TRUE(m.ok()) << m.status();
  const std::string dir = TempDir("st_stories");
  ASSERT_TRUE(WriteSafetensors(*m, dir + "/model.safetensors").ok());
  auto r = LoadModel(dir);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config, m->config);
  ExpectSameTensors(*m, *r);
}

TEST(SafetensorsTest, RejectsEveryTruncation) {
  auto bytes = SerializeSafetensors(MakeSyntheticModel(TinyTestConfig(), 2));
  ASSERT_TRUE(bytes.ok());
  for (size_t len = 0; len < bytes->size(); len += (len < 3000 ? 1 : 997)) {
    const std::string err = ParseError(std::vector<uint8_t>(bytes->begin(), bytes->begin() + len));
    ASSERT_NE(err, "OK") << len;
    EXPECT_THAT(err, AnyOf(HasSubstr("truncated"), HasSubstr("past the end"))) << len;
  }
}

TEST(SafetensorsTest, RejectsHostileHeaders) {
  const std::vector<uint8_t> data(64, 0);
  std::vector<uint8_t> lying = Raw("{}", data);
  uint64_t n = 1000;
  std::memcpy(lying.data(), &n, 8);
  EXPECT_THAT(ParseError(lying), HasSubstr("header length 1000 is past the end of the file"));
  n = uint64_t{1} << 40;
  std::memcpy(lying.data(), &n, 8);
  EXPECT_THAT(ParseError(lying), HasSubstr("header length 1099511627776 exceeds the limit"));

  struct Case {
    std::string header;
    const char* expect;
  } cases[] = {
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", "OK"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[60,76]}})", "past the end of the data section (64 bytes)"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}})", "reversed"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}})", "has 12 bytes, its shape [4] in F32 needs 4 x 4"},
      {R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[8],"data_offsets":[8,24]}})",
       "overlap"},
      {R"({"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,4]}})", "unknown dtype 'Q9'"},
      {R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", "dtype 'I64', which is not supported"},
      {R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}})", "shape overflows"},
      {R"({"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,4]}})", "shape entry must be a non-negative integer"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0]}})", "no data_offsets"},
      {R"({"a":{"shape":[4],"data_offsets":[0,4]}})", "no string dtype"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"__metadata__":{"k":1}})", "value of 'k' is not a string"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},})", "json: expected a string key"},
      {R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
       "duplicate key \"a\""},
      {R"([1,2])", "header is not a JSON object"},
      {"{\"a\":", "json: unexpected end of input"},
  };
  for (const Case& k : cases) EXPECT_THAT(ParseError(Raw(k.header, data)), HasSubstr(k.expect)) << k.header;
  EXPECT_EQ(ParseSafetensorsFile(Raw(R"({"a":{"dtype":"I64","shape":[2],"data_offsets":[0,16]}})", data)).status().code(),
            absl::StatusCode::kUnimplemented);
}

TEST(SafetensorsTest, RejectsInconsistentModels) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 4);
  auto bytes = SerializeSafetensors(m);
  ASSERT_TRUE(bytes.ok());
  auto st = ParseSafetensorsFile(*bytes);
  ASSERT_TRUE(st.ok());
  ModelConfig fewer = m.config;
  fewer.n_layers = 1;
  auto r = ModelFromSafetensors(fewer, {*st}, {nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("is for layer 1 but the config has 1"));

  SafetensorsFile extra = *st;
  extra.tensors.push_back(extra.tensors[0]);
  extra.tensors.back().name = "model.vision_tower.weight";
  r = ModelFromSafetensors(m.config, {extra}, {nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("unexpected tensor 'model.vision_tower.weight'"));

  SafetensorsFile u8 = *st;
  for (auto& e : u8.tensors) {
    if (e.name == "model.layers.0.mlp.up_proj.weight") e.dtype = "U8", e.shape = {static_cast<int64_t>(e.nbytes)};
  }
  r = ModelFromSafetensors(m.config, {u8}, {nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("has no qforge.format."));

  u8.metadata["qforge.format.model.layers.0.mlp.up_proj.weight"] = "q8_0";
  u8.metadata["qforge.shape.model.layers.0.mlp.up_proj.weight"] = "160,64";
  r = ModelFromSafetensors(m.config, {u8}, {nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("in q8_0 needs 10880"));

  SafetensorsFile badq = *st;
  for (auto& e : badq.tensors) {
    if (e.name == "model.layers.1.self_attn.q_proj.weight") e.shape = {128, 32};
  }
  r = ModelFromSafetensors(m.config, {badq}, {nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("q_proj.weight' has shape [128, 32], expected [64, 64]"));

  r = ModelFromSafetensors(m.config, {*st, *st}, {nullptr, nullptr});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("appears twice"));
}

TEST(HfConfigTest, ParsesAndRoundTrips) {
  ModelConfig c = TinyTestConfig();
  c.norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.tied_embeddings = true;
  auto back = ParseHfConfig(HfConfigJson(c));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(*back, c);

  // A real-world shaped config: defaults for the optional fields, integral floats accepted.
  auto llama = ParseHfConfig(R"({"architectures":["LlamaForCausalLM"],"hidden_size":4096.0,
      "intermediate_size":11008,"num_attention_heads":32,"num_hidden_layers":32,"max_position_embeddings":4096,
      "model_type":"llama","vocab_size":32000,"torch_dtype":"float16","rope_scaling":null})");
  ASSERT_TRUE(llama.ok()) << llama.status();
  EXPECT_EQ(llama->n_kv_heads, 32);
  EXPECT_FLOAT_EQ(llama->norm_eps, 1e-6f);
  EXPECT_FLOAT_EQ(llama->rope_theta, 10000.0f);
  EXPECT_FALSE(llama->tied_embeddings);
}

TEST(HfConfigTest, RejectsBadConfigs) {
  const std::string base = R"("model_type":"llama","hidden_size":64,"intermediate_size":160,"num_attention_heads":4,)"
                           R"("num_hidden_layers":2,"max_position_embeddings":128)";
  struct Case {
    std::string json;
    const char* expect;
  } cases[] = {
      {"{" + base + "}", "missing required field 'vocab_size'"},
      {R"({"hidden_size":64})", "neither model_type nor architectures"},
      {R"({"model_type":"mistral"})", "\"mistral\" is not supported"},
      {R"({"architectures":["GPT2LMHeadModel"]})", "include neither LlamaForCausalLM nor MixtralForCausalLM"},
      {"{" + base + R"(,"vocab_size":"320"})", "field 'vocab_size' is not a number"},
      {"{" + base + R"(,"vocab_size":320.5})", "is not a non-negative 32-bit integer"},
      {"{" + base + R"(,"vocab_size":1e300})", "is not a non-negative 32-bit integer"},
      {"{" + base + R"(,"vocab_size":320,"num_key_value_heads":3})", "n_kv_heads 3 does not divide"},
      {"{" + base + R"(,"vocab_size":320,"tie_word_embeddings":1})", "not a boolean"},
      {"{" + base + R"(,"vocab_size":320,"rope_scaling":{"type":"linear","factor":2.0}})", "rope_scaling"},
      {"{" + base + R"(,"vocab_size":320,"head_dim":8})", "head_dim 8 differs"},
      {"{" + absl::StrReplaceAll(base, {{"\"llama\"", "\"mixtral\""}}) + R"(,"vocab_size":320})",
       "missing required field 'num_local_experts'"},
      {"{" + absl::StrReplaceAll(base, {{"\"llama\"", "\"mixtral\""}}) +
           R"(,"vocab_size":320,"num_local_experts":8,"num_experts_per_tok":9})",
       "n_experts_used 9 must be in [1, n_experts = 8]"},
      {"{" + base, "json: unexpected end of input"},
      {"", "json: unexpected end of input"},
  };
  for (const Case& k : cases) {
    auto r = ParseHfConfig(k.json);
    ASSERT_FALSE(r.ok()) << k.json;
    EXPECT_THAT(r.status().message(), HasSubstr(k.expect)) << k.json;
    EXPECT_THAT(r.status().message(), HasSubstr("config.json"));
  }
}

TEST(SafetensorsTest, MissingConfigIsReported) {
  const std::string dir = TempDir("st_noconfig");
  auto bytes = SerializeSafetensors(MakeSyntheticModel(TinyTestConfig(), 2));
  ASSERT_TRUE(bytes.ok());
  WriteBytes(dir + "/model.safetensors", *bytes);
  auto r = ReadSafetensors(dir + "/model.safetensors");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("no config.json beside"));
}

}  // namespace
}  // namespace qforge::formats
