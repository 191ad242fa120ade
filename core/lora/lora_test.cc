// LoRA adapters: PEFT and GGUF parsing (round trips, the q/k row permutation, errors that name the field or
// tensor), and the runtime's unmerged application: equal to the merged fp32 model, and batch-invariant across
// adapters.
#include "core/lora/lora.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <tuple>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/kernels/kernels.h"
#include "core/kernels/lora_delta.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::lora {
namespace {

using ::testing::HasSubstr;

const std::vector<LoraTarget> kAll = {LoraTarget::kAttnQ,    LoraTarget::kAttnK,  LoraTarget::kAttnV,
                                      LoraTarget::kAttnOutput, LoraTarget::kFfnGate, LoraTarget::kFfnUp,
                                      LoraTarget::kFfnDown};

std::vector<int> Tokens(int n, int vocab, uint64_t seed) {
  std::vector<int> t(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 7;
  for (int i = 0; i < n; ++i) {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    t[i] = static_cast<int>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  t[0] = 1;
  return t;
}

LoraAdapter Random(const ModelConfig& c, uint64_t seed, int rank = 4, float alpha = 8,
                   const std::vector<LoraTarget>& targets = kAll) {
  auto a = MakeRandomAdapter(c, targets, rank, alpha, seed);
  EXPECT_TRUE(a.ok()) << a.status();
  return *std::move(a);
}

void ExpectSameMatrices(const LoraAdapter& x, const LoraAdapter& y) {
  ASSERT_EQ(x.matrices.size(), y.matrices.size());
  for (size_t i = 0; i < x.matrices.size(); ++i) {
    const LoraMatrix &a = x.matrices[i], &b = y.matrices[i];
    EXPECT_EQ(a.layer, b.layer);
    EXPECT_EQ(a.target, b.target);
    EXPECT_EQ(a.rank, b.rank);
    EXPECT_FLOAT_EQ(a.scale, b.scale);
    EXPECT_EQ(a.a, b.a) << i;
    EXPECT_EQ(a.b, b.b) << i;
  }
}


// --- PEFT ---------------------------------------------------------------------------------------------------------

TEST(PeftTest, RoundTripsEveryTarget) {
  const ModelConfig c = TinyTestConfig();
  const LoraAdapter a = Random(c, 1);
  auto files = SerializePeftAdapter(a, c);
  ASSERT_TRUE(files.ok()) << files.status();
  auto back = ParsePeftAdapter(files->safetensors, files->config_json, c);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->format, "peft");
  EXPECT_FLOAT_EQ(back->matrices[0].scale, 8.0f / 4);
  ExpectSameMatrices(a, *back);
}

// The file holds q/k B rows in HF's rotate-half order: interleaved row 2i+j of head h is HF row h*hd + j*hd/2 + i.
// Checked against the formula directly, not through the permutation function the parser uses.
TEST(PeftTest, QkLoraBRowsArePermutedFromHfOrder) {
  const ModelConfig c = TinyTestConfig();  // 4 heads, 2 kv heads, head_dim 16
  const LoraAdapter a = Random(c, 2);
  auto files = SerializePeftAdapter(a, c);
  ASSERT_TRUE(files.ok());
  auto st = formats::ParseSafetensorsFile(files->safetensors);
  ASSERT_TRUE(st.ok());
  const int hd = c.head_dim();
  int checked = 0;
  for (const auto& [module, target, heads] :
       {std::tuple{"q_proj", LoraTarget::kAttnQ, c.n_heads}, std::tuple{"k_proj", LoraTarget::kAttnK, c.n_kv_heads},
        std::tuple{"v_proj", LoraTarget::kAttnV, c.n_kv_heads}}) {
    const std::string name = absl::StrCat("base_model.model.model.layers.1.self_attn.", module, ".lora_B.weight");
    const formats::SafetensorsEntry* e = nullptr;
    for (const auto& t : st->tensors) e = t.name == name ? &t : e;
    ASSERT_NE(e, nullptr) << name;
    const LoraMatrix* m = a.Find(1, target);
    const int r = m->rank;
    std::vector<float> file(m->b.size());
    std::memcpy(file.data(), e->data, e->nbytes);
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < hd / 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          const int canonical = h * hd + 2 * i + j;
          // v is not rotated: its rows stay where they are.
          const int hf = target == LoraTarget::kAttnV ? canonical : h * hd + j * hd / 2 + i;
          for (int k = 0; k < r; ++k) ASSERT_EQ(file[hf * r + k], m->b[canonical * r + k]) << module << " row " << canonical;
          ++checked;
        }
      }
    }
  }
  EXPECT_EQ(checked, c.dim + 2 * c.kv_dim());
}

Model ToF32(const Model& m) {
  Model out = m;
  for (auto& [name, t] : out.tensors) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    EXPECT_TRUE(kernels::DequantizeRows(t, 0, t.rows(), v.data()).ok());
    t = Tensor::FromFloats(name, t.shape, v);
  }
  return out;
}

std::vector<float> Logits(std::shared_ptr<const Model> m, const std::vector<int>& tokens, const LoraAdapter* adapter,
                          kernels::ActivationMode act = kernels::ActivationMode::kFloat) {
  auto rt = Transformer::Create(std::move(m), RuntimeOptions{.threads = 2, .activations = act});
  EXPECT_TRUE(rt.ok()) << rt.status();
  auto cache = (*rt)->NewCache();
  EXPECT_TRUE(cache.ok());
  std::vector<BatchToken> batch;
  for (size_t i = 0; i < tokens.size(); ++i) {
    batch.push_back(BatchToken{&*cache, tokens[i], static_cast<int>(i), true, adapter});
  }
  std::vector<float> logits(tokens.size() * (*rt)->vocab_size());
  const absl::Status s = (*rt)->ForwardBatch(batch, logits.data());
  EXPECT_TRUE(s.ok()) << s;
  return logits;
}

double MaxAbsDiff(const std::vector<float>& x, const std::vector<float>& y) {
  double d = 0;
  for (size_t i = 0; i < x.size(); ++i) d = std::max(d, std::fabs(static_cast<double>(x[i]) - y[i]));
  return d;
}

// End to end through HF's order: a PEFT trainer adds s·B_hf·A to the HF-ordered weight. Merging there and
// loading the result through the safetensors reader (which un-permutes q/k) must give what the runtime gives with
// the base and the adapter read from the PEFT file (whose B rows the parser permuted).
TEST(PeftTest, AdapterOnHfOrderedWeightsMatchesMergingInHfSpace) {
  const ModelConfig c = TinyTestConfig();
  const Model base = MakeSyntheticModel(c, 11);
  const LoraAdapter canonical = Random(c, 12, 4, 8, {LoraTarget::kAttnQ, LoraTarget::kAttnK});
  auto files = SerializePeftAdapter(canonical, c);
  ASSERT_TRUE(files.ok());
  auto st = formats::ParseSafetensorsFile(files->safetensors);
  ASSERT_TRUE(st.ok());
  Model merged = base;
  for (int l = 0; l < c.n_layers; ++l) {
    for (const auto& [module, name, heads] :
         {std::tuple{"q_proj", names::AttnQ(l), c.n_heads}, std::tuple{"k_proj", names::AttnK(l), c.n_kv_heads}}) {
      auto hf = formats::PermuteQkToHf(base.tensors.at(name), heads);
      ASSERT_TRUE(hf.ok());
      std::vector<float> w(static_cast<size_t>(hf->numel()));
      std::memcpy(w.data(), hf->data, hf->nbytes);
      std::vector<float> A, B;
      for (const auto& t : st->tensors) {
        const std::string prefix = absl::StrCat("base_model.model.model.layers.", l, ".self_attn.", module);
        std::vector<float>* dst = t.name == prefix + ".lora_A.weight" ? &A : t.name == prefix + ".lora_B.weight" ? &B : nullptr;
        if (dst == nullptr) continue;
        dst->resize(t.nbytes / 4);
        std::memcpy(dst->data(), t.data, t.nbytes);
      }
      const int64_t out = hf->rows(), in = hf->cols(), r = 4;
      ASSERT_EQ(A.size(), static_cast<size_t>(r * in));
      ASSERT_EQ(B.size(), static_cast<size_t>(out * r));
      for (int64_t o = 0; o < out; ++o) {
        for (int64_t i = 0; i < in; ++i) {
          double d = 0;
          for (int k = 0; k < r; ++k) d += static_cast<double>(B[o * r + k]) * A[k * in + i];
          w[o * in + i] = static_cast<float>(w[o * in + i] + 2.0 * d);
        }
      }
      auto back = formats::PermuteQkFromHf(Tensor::FromFloats(name, hf->shape, w), heads);
      ASSERT_TRUE(back.ok());
      merged.tensors[name] = *back;
    }
  }
  auto parsed = ParsePeftAdapter(files->safetensors, files->config_json, c);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const std::vector<int> tokens = Tokens(12, c.vocab_size, 3);
  const auto base_ptr = std::make_shared<const Model>(base);
  const std::vector<float> unmerged = Logits(base_ptr, tokens, &*parsed);
  const std::vector<float> reference = Logits(std::make_shared<const Model>(merged), tokens, nullptr);
  EXPECT_LT(MaxAbsDiff(unmerged, reference), 1e-4);
  // And the adapter matters: the base alone is far from it.
  EXPECT_GT(MaxAbsDiff(Logits(base_ptr, tokens, nullptr), reference), 1e-2);
}

std::string Config(const std::string& extra) {
  return absl::StrCat(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])",
                      extra, "}");
}

TEST(PeftTest, ConfigErrorsNameTheField) {
  const ModelConfig c = TinyTestConfig();
  auto files = SerializePeftAdapter(Random(c, 3), c);
  ASSERT_TRUE(files.ok());
  struct Case {
    std::string config;
    absl::StatusCode code;
    std::string message;
  };
  const std::vector<Case> cases = {
      {R"({"lora_alpha": 8, "target_modules": ["q_proj"]})", absl::StatusCode::kInvalidArgument, "r: must be"},
      {R"({"r": 4, "target_modules": ["q_proj"]})", absl::StatusCode::kInvalidArgument, "lora_alpha"},
      {R"({"r": 4, "lora_alpha": 8})", absl::StatusCode::kInvalidArgument, "target_modules"},
      {Config(R"(, "use_dora": true)"), absl::StatusCode::kUnimplemented, "use_dora"},
      {Config(R"(, "bias": "all")"), absl::StatusCode::kUnimplemented, "bias"},
      {Config(R"(, "rank_pattern": {"q_proj": 8})"), absl::StatusCode::kUnimplemented, "rank_pattern"},
      {R"({"peft_type": "IA3", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})",
       absl::StatusCode::kUnimplemented, "peft_type"},
      {R"({"r": 8, "lora_alpha": 8, "target_modules": "all-linear"})", absl::StatusCode::kInvalidArgument,
       "adapter_config.json r is 8"},
      {R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})", absl::StatusCode::kInvalidArgument,
       "k_proj is not in target_modules"},
      {"{not json", absl::StatusCode::kInvalidArgument, "adapter_config.json"},
  };
  for (const Case& k : cases) {
    auto a = ParsePeftAdapter(files->safetensors, k.config, c);
    ASSERT_FALSE(a.ok()) << k.config;
    EXPECT_EQ(a.status().code(), k.code) << k.config << ": " << a.status();
    EXPECT_THAT(a.status().message(), HasSubstr(k.message)) << k.config;
  }
  // A regex target_modules string is accepted: the tensors say what is adapted.
  EXPECT_TRUE(ParsePeftAdapter(files->safetensors, R"({"r": 4, "lora_alpha": 8, "target_modules": ".*proj"})", c).ok());
}

// A safetensors file with the given tensors (F32, each filled with 0.01).
std::vector<uint8_t> Safetensors(const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors,
                                 const std::string& dtype = "F32") {
  std::string header = "{";
  uint64_t offset = 0;
  const int elem = dtype == "F32" ? 4 : 8;
  for (size_t i = 0; i < tensors.size(); ++i) {
    uint64_t n = 1;
    for (int64_t d : tensors[i].second) n *= d;
    absl::StrAppend(&header, i ? "," : "", "\"", tensors[i].first, "\":{\"dtype\":\"", dtype, "\",\"shape\":[",
                    absl::StrJoin(tensors[i].second, ","), "],\"data_offsets\":[", offset, ",", offset + n * elem, "]}");
    offset += n * elem;
  }
  header += "}";
  while (header.size() % 8) header += ' ';
  const uint64_t len = header.size();
  std::string blob(reinterpret_cast<const char*>(&len), 8);
  blob += header;
  const float v = 0.01f;
  for (uint64_t i = 0; i < offset / 4; ++i) blob.append(reinterpret_cast<const char*>(&v), 4);
  return std::vector<uint8_t>(blob.begin(), blob.end());
}

TEST(PeftTest, TensorErrorsNameTheTensor) {
  const ModelConfig c = TinyTestConfig();  // dim 64, kv_dim 32, hidden 160, 2 layers
  const std::string cfg = Config("");
  const std::string q = "base_model.model.model.layers.0.self_attn.q_proj";
  struct Case {
    std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
    std::string message;
    std::string dtype = "F32";
  };
  const std::vector<Case> cases = {
      {{{q + ".lora_A.weight", {4, 64}}}, q + ".lora_A.weight: no matching B"},
      {{{q + ".lora_B.weight", {64, 4}}}, q + ".lora_B.weight: no matching A"},
      {{{q + ".lora_A.weight", {4, 63}}, {q + ".lora_B.weight", {64, 4}}}, "lora_A.weight: shape [4, 63], expected [r, 64]"},
      {{{q + ".lora_A.weight", {4, 64}}, {q + ".lora_B.weight", {64, 3}}}, "lora_B.weight: shape [64, 3], expected [64, 4]"},
      {{{q + ".lora_A.weight", {4, 64}}, {q + ".lora_B.weight", {32, 4}}}, "lora_B.weight: shape [32, 4]"},
      {{{"base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight", {4, 64}},
        {"base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight", {64, 4}}},
       "layer 2 but the base model has 2"},
      {{{"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", {4, 64}}}, "module self_attn.qkv_proj"},
      {{{"model.layers.0.self_attn.q_proj.lora_A.weight", {4, 64}}}, "expected the PEFT prefix"},
      {{{q + ".weight", {64, 64}}}, "not a lora_A / lora_B weight"},
      {{{"base_model.model.model.layers.x.self_attn.q_proj.lora_A.weight", {4, 64}}}, "bad layer number"},
      {{{q + ".lora_A.weight", {4, 64, 1}}}, "3-D, expected 2-D"},
      {{{q + ".lora_A.weight", {2, 64}}, {q + ".lora_B.weight", {64, 2}}}, "rank 2 but adapter_config.json r is 4"},
      {{{q + ".lora_A.weight", {4, 64}}, {q + ".lora_B.weight", {64, 4}}}, "dtype 'F64'", "F64"},
      {{}, "no LoRA tensors"},
  };
  for (const Case& k : cases) {
    auto a = ParsePeftAdapter(Safetensors(k.tensors, k.dtype), cfg, c);
    ASSERT_FALSE(a.ok()) << k.message;
    EXPECT_THAT(std::string(a.status().message()), HasSubstr(k.message));
  }
  // The unimplemented kinds say so.
  auto emb = ParsePeftAdapter(Safetensors({{"base_model.model.model.embed_tokens.lora_embedding_A", {4, 320}}}), cfg, c);
  EXPECT_EQ(emb.status().code(), absl::StatusCode::kUnimplemented) << emb.status();
  // And the well-formed pair parses.
  EXPECT_TRUE(ParsePeftAdapter(Safetensors({{q + ".lora_A.weight", {4, 64}}, {q + ".lora_B.weight", {64, 4}}}), cfg, c).ok());
}

TEST(PeftTest, RefusesAdapterForAnotherModel) {
  const ModelConfig c = TinyTestConfig();
  auto files = SerializePeftAdapter(Random(c, 3), c);
  ASSERT_TRUE(files.ok());
  ModelConfig wider = c;
  wider.hidden_dim = 192;
  auto a = ParsePeftAdapter(files->safetensors, files->config_json, wider);
  ASSERT_FALSE(a.ok());
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("mlp.gate_proj.lora_B.weight: shape [160, 4], expected [192, 4]"));
}

// --- GGUF ---------------------------------------------------------------------------------------------------------

TEST(GgufLoraTest, RoundTrips) {
  const ModelConfig c = TinyTestConfig();
  const LoraAdapter a = Random(c, 4, 8, 16);
  auto bytes = SerializeGgufAdapter(a);
  ASSERT_TRUE(bytes.ok());
  auto back = ParseGgufAdapter(*bytes, c);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->format, "gguf");
  EXPECT_FLOAT_EQ(back->alpha, 16);
  ExpectSameMatrices(a, *back);
}

// A minimal GGUF LoRA built here byte by byte, with llama.cpp's layout: lora_a ne = [in, r], lora_b ne = [r, out],
// ne[0] contiguous. Element (row j, col i) of A is at j * in + i.
struct GgufBuilder {
  std::vector<uint8_t> head, data;
  int n_tensors = 0, n_kv = 0;
  std::vector<uint8_t> kv;
  void U32(std::vector<uint8_t>& o, uint32_t v) { o.insert(o.end(), (uint8_t*)&v, (uint8_t*)&v + 4); }
  void U64(std::vector<uint8_t>& o, uint64_t v) { o.insert(o.end(), (uint8_t*)&v, (uint8_t*)&v + 8); }
  void Str(std::vector<uint8_t>& o, const std::string& s) { U64(o, s.size()); o.insert(o.end(), s.begin(), s.end()); }
  void KvString(const std::string& k, const std::string& v) { Str(kv, k); U32(kv, 8); Str(kv, v); ++n_kv; }
  void KvF32(const std::string& k, float v) { Str(kv, k); U32(kv, 6); kv.insert(kv.end(), (uint8_t*)&v, (uint8_t*)&v + 4); ++n_kv; }
  std::vector<uint8_t> infos;
  void Tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type, const std::vector<float>& values) {
    Str(infos, name);
    U32(infos, static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) U64(infos, d);
    U32(infos, type);
    U64(infos, data.size());
    for (float v : values) data.insert(data.end(), (uint8_t*)&v, (uint8_t*)&v + 4);
    data.resize((data.size() + 31) / 32 * 32);
    ++n_tensors;
  }
  std::vector<uint8_t> Build() {
    std::vector<uint8_t> o;
    U32(o, 0x46554747u);
    U32(o, 3);
    U64(o, n_tensors);
    U64(o, n_kv);
    o.insert(o.end(), kv.begin(), kv.end());
    o.insert(o.end(), infos.begin(), infos.end());
    o.resize((o.size() + 31) / 32 * 32);
    o.insert(o.end(), data.begin(), data.end());
    return o;
  }
  void Header(float alpha = 16) {
    KvString("general.architecture", "llama");
    KvString("general.type", "adapter");
    KvString("adapter.type", "lora");
    KvF32("adapter.lora.alpha", alpha);
  }
};

TEST(GgufLoraTest, ReadsLlamaCppLayout) {
  const ModelConfig c = TinyTestConfig();
  const int r = 2, in = c.dim, out = c.kv_dim();
  std::vector<float> a(r * in), b(out * r);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.001f * i;
  for (size_t i = 0; i < b.size(); ++i) b[i] = -0.002f * i;
  GgufBuilder g;
  g.Header(4);
  g.Tensor("blk.1.attn_v.weight.lora_a", {static_cast<uint64_t>(in), r}, 0, a);
  g.Tensor("blk.1.attn_v.weight.lora_b", {r, static_cast<uint64_t>(out)}, 0, b);
  auto parsed = ParseGgufAdapter(g.Build(), c);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const LoraMatrix* m = parsed->Find(1, LoraTarget::kAttnV);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(parsed->Find(0, LoraTarget::kAttnV), nullptr);
  EXPECT_EQ(m->rank, r);
  EXPECT_EQ(m->in, in);
  EXPECT_EQ(m->out, out);
  EXPECT_FLOAT_EQ(m->scale, 4.0f / r);
  EXPECT_EQ(m->a[1 * in + 5], a[1 * in + 5]);  // A[1][5]
  EXPECT_EQ(m->b[7 * r + 1], b[7 * r + 1]);    // B[7][1]
  // The old finetune layout (A stored transposed, ne = [r, in]) is refused naming the tensor.
  GgufBuilder t;
  t.Header();
  t.Tensor("blk.1.attn_v.weight.lora_a", {r, static_cast<uint64_t>(in)}, 0, a);
  t.Tensor("blk.1.attn_v.weight.lora_b", {r, static_cast<uint64_t>(out)}, 0, b);
  auto bad = ParseGgufAdapter(t.Build(), c);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr("blk.1.attn_v.weight.lora_a: shape [64, 2]"));
}

// llama.cpp's converter can write q8_0 halves: blocks of an f16 scale and 32 int8 codes, value = scale * code.
TEST(GgufLoraTest, DecodesQ8_0Halves) {
  const ModelConfig c = TinyTestConfig();
  const int r = 2, in = c.dim;  // A [2, 64]: 2 rows of 2 blocks
  std::vector<uint8_t> q8;
  std::vector<float> want;
  for (int row = 0; row < r; ++row) {
    for (int blk = 0; blk < in / 32; ++blk) {
      const uint16_t half_scale = 0x3800;  // 0.5
      q8.push_back(half_scale & 0xff);
      q8.push_back(half_scale >> 8);
      for (int i = 0; i < 32; ++i) {
        const int8_t code = static_cast<int8_t>((row * 64 + blk * 32 + i) % 7 - 3);
        q8.push_back(static_cast<uint8_t>(code));
        want.push_back(0.5f * code);
      }
    }
  }
  GgufBuilder g;
  g.Header(4);
  // The builder writes floats: pass the q8_0 bytes through a float vector of the same size (136 bytes = 34 floats).
  std::vector<float> raw(q8.size() / 4);
  std::memcpy(raw.data(), q8.data(), q8.size());
  g.Tensor("blk.0.attn_output.weight.lora_a", {static_cast<uint64_t>(in), r}, 8, raw);
  g.Tensor("blk.0.attn_output.weight.lora_b", {r, static_cast<uint64_t>(c.dim)}, 0, std::vector<float>(r * c.dim, 0.25f));
  auto parsed = ParseGgufAdapter(g.Build(), c);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  const LoraMatrix* m = parsed->Find(0, LoraTarget::kAttnOutput);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->a, want);
}

TEST(GgufLoraTest, NoAlphaMeansScaleOne) {
  const ModelConfig c = TinyTestConfig();
  GgufBuilder g;
  g.KvString("general.type", "adapter");
  g.KvString("adapter.type", "lora");
  g.Tensor("blk.0.ffn_down.weight.lora_a", {static_cast<uint64_t>(c.hidden_dim), 2}, 0, std::vector<float>(2 * c.hidden_dim));
  g.Tensor("blk.0.ffn_down.weight.lora_b", {2, static_cast<uint64_t>(c.dim)}, 0, std::vector<float>(2 * c.dim));
  auto parsed = ParseGgufAdapter(g.Build(), c);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_FLOAT_EQ(parsed->matrices[0].scale, 1.0f);
}

TEST(GgufLoraTest, ErrorsNameTheKeyOrTensor) {
  const ModelConfig c = TinyTestConfig();
  const std::vector<float> a(4 * 64), b(64 * 4);
  auto with = [&](const std::function<void(GgufBuilder&)>& fill) {
    GgufBuilder g;
    fill(g);
    return ParseGgufAdapter(g.Build(), c);
  };
  auto pair = [&](GgufBuilder& g) {
    g.Tensor("blk.0.attn_q.weight.lora_a", {64, 4}, 0, a);
    g.Tensor("blk.0.attn_q.weight.lora_b", {4, 64}, 0, b);
  };
  struct Case {
    std::function<void(GgufBuilder&)> fill;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[&](GgufBuilder& g) { g.KvString("adapter.type", "lora"); pair(g); }, "general.type"},
      {[&](GgufBuilder& g) { g.KvString("general.type", "model"); g.KvString("adapter.type", "lora"); pair(g); },
       "general.type"},
      {[&](GgufBuilder& g) { g.KvString("general.type", "adapter"); g.KvString("adapter.type", "control_vector"); pair(g); },
       "adapter.type"},
      {[&](GgufBuilder& g) { g.Header(); g.KvString("general.architecture", "gpt2"); pair(g); }, "appears twice"},
      {[&](GgufBuilder& g) { g.Header(); g.Tensor("blk.0.attn_q.weight.lora_a", {64, 4}, 0, a); },
       "blk.0.attn_q.weight.lora_a: no matching B"},
      {[&](GgufBuilder& g) { g.Header(); g.Tensor("blk.0.attn_qkv.weight.lora_a", {64, 4}, 0, a); }, "attn_qkv"},
      {[&](GgufBuilder& g) { g.Header(); g.Tensor("blk.0.attn_q.weight", {64, 64}, 0, std::vector<float>(64 * 64)); },
       "blk.0.attn_q.weight: not a"},
      {[&](GgufBuilder& g) { g.Header(); g.Tensor("blk.0.attn_q.weight.lora_a", {64, 4}, 99, a); },
       "ggml type 99 is not one qforge decodes"},
      {[&](GgufBuilder& g) { g.Header(); g.Tensor("blk.0.attn_q.weight.lora_b", {4, 64}, 8, b); },
       "rows of 4 elements are not whole q8_0 blocks of 32"},
      {[&](GgufBuilder& g) {
         g.Header();
         g.Tensor("blk.0.attn_q.weight.lora_a", {64, 4}, 0, a);
         g.Tensor("blk.0.attn_q.weight.lora_b", {4, 32}, 0, std::vector<float>(128));
       },
       "blk.0.attn_q.weight.lora_b: shape [32, 4], expected [64, 4]"},
      {[&](GgufBuilder& g) { g.Header(); }, "no LoRA tensors"},
  };
  for (const Case& k : cases) {
    auto r = with(k.fill);
    ASSERT_FALSE(r.ok()) << k.message;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr(k.message));
  }
  // Truncation anywhere is an error, never a crash.
  GgufBuilder g;
  g.Header();
  pair(g);
  const std::vector<uint8_t> good = g.Build();
  ASSERT_TRUE(ParseGgufAdapter(good, c).ok());
  for (size_t n = 0; n < good.size(); n += 7) {
    EXPECT_FALSE(ParseGgufAdapter(std::span(good.data(), n), c).ok()) << n;
  }
}

TEST(LoadAdapterTest, ReadsDirectoriesAndFiles) {
  const ModelConfig c = TinyTestConfig();
  const LoraAdapter a = Random(c, 5);
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "qforge-lora-test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir / "peft");
  auto peft = SerializePeftAdapter(a, c);
  auto gguf = SerializeGgufAdapter(a);
  ASSERT_TRUE(peft.ok() && gguf.ok());
  auto write = [](const std::filesystem::path& p, const void* d, size_t n) {
    std::ofstream(p, std::ios::binary).write(static_cast<const char*>(d), static_cast<std::streamsize>(n));
  };
  write(dir / "peft" / "adapter_model.safetensors", peft->safetensors.data(), peft->safetensors.size());
  write(dir / "peft" / "adapter_config.json", peft->config_json.data(), peft->config_json.size());
  write(dir / "a.gguf", gguf->data(), gguf->size());
  for (const std::filesystem::path& p : {dir / "peft", dir / "peft" / "adapter_model.safetensors", dir / "a.gguf"}) {
    auto loaded = LoadAdapter(p.string(), c);
    ASSERT_TRUE(loaded.ok()) << p << ": " << loaded.status();
    ExpectSameMatrices(a, *loaded);
  }
  EXPECT_EQ(LoadAdapter((dir / "missing").string(), c).status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

// --- The delta kernel ------------------------------------------------------------------------------------------

// The documented order, written out plainly: A·x in eight lanes over the columns, combined pairwise, the tail in
// order; B·u one output at a time, j in order.
float ReferenceDot(const float* a, const float* x, int64_t n) {
  float lane[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lane[k] = lane[k] + a[i + k] * x[i + k];
  }
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s = s + a[i] * x[i];
  return s;
}

TEST(LoraDeltaTest, FollowsTheDocumentedOrder) {
  for (const auto& [rank, in, out] : {std::tuple{3, 37, 19}, std::tuple{8, 64, 160}, std::tuple{16, 1024, 5}}) {
    std::vector<float> a(rank * in), b(out * rank), x(in), y(out), u(rank);
    uint64_t s = 99;
    auto next = [&] {
      s = s * 6364136223846793005ULL + 1442695040888963407ULL;
      return static_cast<float>(static_cast<int64_t>(s >> 40) - (1 << 23)) / (1 << 23);
    };
    for (auto* v : {&a, &b, &x, &y}) {
      for (float& f : *v) f = next();
    }
    std::vector<float> want = y;
    std::vector<float> uref(rank), b_t(out * rank);
    for (int j = 0; j < rank; ++j) uref[j] = ReferenceDot(&a[j * in], x.data(), in);
    for (int o = 0; o < out; ++o) {
      float d = 0;
      for (int j = 0; j < rank; ++j) d = d + b[o * rank + j] * uref[j];  // B·u: j in order
      want[o] = want[o] + 1.5f * d;
      for (int j = 0; j < rank; ++j) b_t[j * out + o] = b[o * rank + j];
    }
    // Alone, and as the third of five tokens (the others random): the same bits.
    const float* xr[1] = {x.data()};
    float* yr[1] = {y.data()};
    std::vector<float> y_group = y;
    kernels::AddLoraDelta(a.data(), b_t.data(), rank, in, out, 1.5f, xr, yr, 1, u.data());
    ASSERT_EQ(std::memcmp(y.data(), want.data(), out * sizeof(float)), 0) << rank << "x" << in << "x" << out;
    std::vector<std::vector<float>> xs(5, std::vector<float>(in)), ys(5, std::vector<float>(out));
    for (int t = 0; t < 5; ++t) {
      for (float& f : xs[t]) f = next();
    }
    xs[2] = x;
    ys[2] = y_group;
    const float* xg[5];
    float* yg[5];
    for (int t = 0; t < 5; ++t) {
      xg[t] = xs[t].data();
      yg[t] = ys[t].data();
    }
    std::vector<float> ug(5 * rank);
    kernels::AddLoraDelta(a.data(), b_t.data(), rank, in, out, 1.5f, xg, yg, 5, ug.data());
    ASSERT_EQ(std::memcmp(ys[2].data(), want.data(), out * sizeof(float)), 0) << "in a group of five";
  }
}

// --- Runtime: unmerged equals merged, batch invariance -------------------------------------------------------------

std::shared_ptr<const Model> QuantizedBase(const ModelConfig& c, const std::string& method) {
  const Model m = MakeSyntheticModel(c, 21);
  if (method == "f32") return std::make_shared<const Model>(m);
  quant::QuantRecipe recipe;
  recipe.method = method;
  auto q = quant::QuantizeModel(m, recipe, nullptr);
  EXPECT_TRUE(q.ok()) << q.status();
  return std::make_shared<const Model>(std::move(q->model));
}

class UnmergedTest : public ::testing::TestWithParam<std::string> {};

// y = W_q x + s B (A x) against the fp32 model holding dequant(W_q) + s B A: fp32 activations on both sides so the
// only difference is where the update is added.
TEST_P(UnmergedTest, EqualsMergedFp32Model) {
  const ModelConfig c = TinyTestConfig();
  const auto base = QuantizedBase(c, GetParam());
  const LoraAdapter adapter = Random(c, 31, 8, 16);
  auto merged = MergeAdapter(ToF32(*base), adapter);
  ASSERT_TRUE(merged.ok()) << merged.status();
  const std::vector<int> tokens = Tokens(20, c.vocab_size, 5);
  const std::vector<float> unmerged = Logits(base, tokens, &adapter);
  const std::vector<float> reference = Logits(std::make_shared<const Model>(*std::move(merged)), tokens, nullptr);
  EXPECT_LT(MaxAbsDiff(unmerged, reference), 1e-4);
  EXPECT_GT(MaxAbsDiff(Logits(base, tokens, nullptr), reference), 1e-2);
}

INSTANTIATE_TEST_SUITE_P(Bases, UnmergedTest, ::testing::Values("f32", "q8_0", "q4_0", "q4_k"));

TEST(UnmergedTest, Stories260KEqualsMergedModel) {
  const std::string path = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path;
  auto m = formats::LoadModel(path);
  ASSERT_TRUE(m.ok()) << m.status();
  const auto base = std::make_shared<const Model>(*std::move(m));
  const LoraAdapter adapter = Random(base->config, 41, 8, 16);
  auto merged = MergeAdapter(*base, adapter);
  ASSERT_TRUE(merged.ok());
  const std::vector<int> tokens = Tokens(32, base->config.vocab_size, 6);
  const std::vector<float> reference = Logits(std::make_shared<const Model>(*std::move(merged)), tokens, nullptr);
  EXPECT_LT(MaxAbsDiff(Logits(base, tokens, &adapter), reference), 1e-4);
  EXPECT_GT(MaxAbsDiff(Logits(base, tokens, nullptr), reference), 1e-2);
}

// Three sequences (adapter A, adapter B, none) in one ForwardBatch, prompts interleaved token by token: each gets
// bit for bit the logits it gets alone. Int8 activations (the serving default) and a quantized base.
TEST(BatchedAdaptersTest, EachRowGetsItsOwnAdapterBitExactly) {
  const ModelConfig c = TinyTestConfig();
  const auto base = QuantizedBase(c, "q8_0");
  const LoraAdapter first = Random(c, 51, 4, 8);
  const LoraAdapter second = Random(c, 52, 8, 32, {LoraTarget::kAttnQ, LoraTarget::kAttnV, LoraTarget::kFfnDown});
  const std::vector<const LoraAdapter*> adapters = {&first, &second, nullptr};
  const int n = 9;
  std::vector<std::vector<int>> prompts;
  std::vector<std::vector<float>> alone;
  for (int s = 0; s < 3; ++s) {
    prompts.push_back(Tokens(n, c.vocab_size, 60 + s));
    alone.push_back(Logits(base, prompts[s], adapters[s], kernels::ActivationMode::kInt8));
  }
  auto rt = Transformer::Create(base, RuntimeOptions{.threads = 2, .max_batch = 7});  // chunks cut across sequences
  ASSERT_TRUE(rt.ok());
  std::vector<KvCache> caches;
  for (int s = 0; s < 3; ++s) caches.push_back(*(*rt)->NewCache());
  std::vector<BatchToken> batch;
  for (int i = 0; i < n; ++i) {
    for (int s = 0; s < 3; ++s) batch.push_back(BatchToken{&caches[s], prompts[s][i], i, true, adapters[s]});
  }
  const int vocab = c.vocab_size;
  std::vector<float> logits(batch.size() * vocab);
  ASSERT_TRUE((*rt)->ForwardBatch(batch, logits.data()).ok());
  for (int i = 0; i < n; ++i) {
    for (int s = 0; s < 3; ++s) {
      ASSERT_EQ(std::memcmp(&logits[(i * 3 + s) * vocab], &alone[s][i * vocab], vocab * sizeof(float)), 0)
          << "sequence " << s << " position " << i;
    }
  }
  // The three results really differ (otherwise equality above would prove nothing).
  EXPECT_GT(MaxAbsDiff(alone[0], Logits(base, prompts[0], nullptr, kernels::ActivationMode::kInt8)), 1e-3);
  EXPECT_GT(MaxAbsDiff(alone[1], Logits(base, prompts[1], nullptr, kernels::ActivationMode::kInt8)), 1e-3);
}

TEST(BatchedAdaptersTest, RefusesAdapterOfAnotherShape) {
  const ModelConfig c = TinyTestConfig();
  ModelConfig other = c;
  other.hidden_dim = 96;
  const LoraAdapter wrong = Random(other, 1);
  auto rt = Transformer::Create(std::make_shared<const Model>(MakeSyntheticModel(c, 1)));
  ASSERT_TRUE(rt.ok());
  auto cache = (*rt)->NewCache();
  const BatchToken t{&*cache, 1, 0, false, &wrong};
  const absl::Status s = (*rt)->ForwardBatch(std::span(&t, 1), nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("adapter built for"));
  EXPECT_EQ(cache->positions(), 0);
  // MoE: attention adapters apply, FFN adapters are refused.
  const ModelConfig moe = TinyMoeTestConfig();
  EXPECT_TRUE(MakeRandomAdapter(moe, {LoraTarget::kAttnQ, LoraTarget::kAttnOutput}, 4, 8, 1).ok());
  EXPECT_EQ(MakeRandomAdapter(moe, {LoraTarget::kFfnUp}, 4, 8, 1).status().code(), absl::StatusCode::kUnimplemented);
}

}  // namespace
}  // namespace qforge::lora
