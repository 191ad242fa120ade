// Writes small valid inputs for every fuzzer into OUT_DIR/{gguf,safetensors,llama2c,tokenizer,json}/.
// Usage: qforge_fuzz_seeds OUT_DIR
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/formats/parsers.h"
#include "core/model/synthetic.h"
#include "core/lora/lora.h"
#include "fuzz/seed_config.h"

namespace {

using namespace qforge;

void Write(const std::filesystem::path& p, const std::vector<uint8_t>& b) {
  std::filesystem::create_directories(p.parent_path());
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}
void WriteText(const std::filesystem::path& p, const std::string& s) { Write(p, std::vector<uint8_t>(s.begin(), s.end())); }

template <typename T>
void Append(std::vector<uint8_t>& out, T v) {
  const auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

Vocab SmallVocab(int n) {
  Vocab v;
  for (int i = 0; i < n; ++i) {
    v.tokens.push_back(i == 0 ? "<unk>" : i == 1 ? "<s>" : i == 2 ? "</s>" : "tok" + std::to_string(i));
    v.scores.push_back(-static_cast<float>(i));
    v.types.push_back(i == 0 ? TokenType::kUnknown : i < 3 ? TokenType::kControl : TokenType::kNormal);
  }
  return v;
}

// Arbitrary bytes of the right size for every linear weight in `f`.
Model Encoded(Model m, const WeightFormat& f) {
  uint32_t x = 12345;
  std::vector<std::string> linear = LinearWeightNames(m.config);
  linear.push_back(names::kTokenEmbd);
  for (const std::string& n : linear) {
    Tensor& t = m.tensors.at(n);
    std::vector<uint8_t> bytes(*EncodedBytes(f, t.rows(), t.cols()));
    for (auto& b : bytes) b = static_cast<uint8_t>((x = x * 1664525u + 1013904223u) >> 24);
    t = Tensor::FromBytes(n, t.shape, f, std::move(bytes));
  }
  return m;
}

std::vector<uint8_t> Llama2c(const Model& m) {
  const ModelConfig& c = m.config;
  std::vector<uint8_t> out;
  for (int32_t v : {c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
                    c.tied_embeddings ? c.vocab_size : -c.vocab_size, c.seq_len}) {
    Append(out, v);
  }
  auto put = [&](const std::string& n) {
    const Tensor& t = m.tensors.at(n);
    out.insert(out.end(), t.data, t.data + t.nbytes);
  };
  put(names::kTokenEmbd);
  for (auto fn : {names::AttnNorm, names::AttnQ, names::AttnK, names::AttnV, names::AttnOutput, names::FfnNorm,
                  names::FfnGate, names::FfnDown, names::FfnUp}) {
    for (int l = 0; l < c.n_layers; ++l) put(fn(l));
  }
  put(names::kOutputNorm);
  out.resize(out.size() + static_cast<size_t>(c.seq_len) * c.head_dim() * 4, 0);
  if (!c.tied_embeddings) put(names::kOutput);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path out = argv[1];
  int fails = 0;
  auto check = [&](const auto& r, const char* what) {
    if (!r.ok()) {
      std::fprintf(stderr, "%s: %s\n", what, std::string(r.status().message()).c_str());
      ++fails;
    }
    return r.ok();
  };
  for (bool tied : {true, false}) {
    ModelConfig c = fuzz::SeedConfig();
    c.tied_embeddings = tied;
    Model m = MakeSyntheticModel(c, tied ? 1 : 2);
    const std::string t = tied ? "tied" : "untied";
    Write(out / "llama2c" / (t + ".bin"), Llama2c(m));
    Model with_vocab = m;
    with_vocab.vocab = SmallVocab(c.vocab_size);
    if (auto g = formats::SerializeGguf(with_vocab); check(g, "gguf")) Write(out / "gguf" / (t + ".gguf"), *g);
    if (auto s = formats::SerializeSafetensors(m); check(s, "safetensors")) {
      Write(out / "safetensors" / (t + ".safetensors"), *s);
      uint64_t n = 0;
      std::memcpy(&n, s->data(), 8);
      WriteText(out / "json" / (t + "_header.json"), std::string(s->begin() + 8, s->begin() + 8 + n));
    }
    WriteText(out / "json" / (t + "_config.json"), formats::HfConfigJson(c));
  }
  {
    // An importance matrix as llama-imatrix writes it: a plain weight and a stacked expert tensor.
    formats::ImportanceMatrix imatrix;
    imatrix.datasets = {"calib.txt"};
    imatrix.chunk_count = 2;
    imatrix.chunk_size = 64;
    imatrix.entries["blk.0.attn_q.weight"] = {.cols = 32, .experts = 1, .sum_squares = std::vector<float>(32, 2.0f),
                                              .tokens = {128}};
    imatrix.entries["blk.0.ffn_up_exps.weight"] = {.cols = 32, .experts = 2,
                                                   .sum_squares = std::vector<float>(64, 0.5f), .tokens = {64, 0}};
    if (auto g = formats::SerializeImatrixGguf(imatrix); check(g, "imatrix")) Write(out / "gguf" / "imatrix.gguf", *g);
  }
  Model base = MakeSyntheticModel(fuzz::SeedConfig(), 3);
  // The 32-element ggml blocks fit the seed's 32-wide rows (the 256-element types would need 256).
  for (const WeightFormat& f : {WeightFormat::F16(), WeightFormat::BF16(), WeightFormat::Of(WeightType::kQ8_0),
                                WeightFormat::Of(WeightType::kQ4_0), WeightFormat::Of(WeightType::kQ4_1),
                                WeightFormat::Of(WeightType::kQ5_0), WeightFormat::Of(WeightType::kQ5_1),
                                WeightFormat::Of(WeightType::kIQ4_NL)}) {
    if (auto g = formats::SerializeGguf(Encoded(base, f)); check(g, "gguf enc")) {
      Write(out / "gguf" / (FormatName(f) + ".gguf"), *g);
    }
  }
  for (const WeightFormat& f : {WeightFormat::F16(), WeightFormat::Of(WeightType::kQ8_0), WeightFormat::QInt(4, 16, false),
                                WeightFormat::QInt(3, 0, true), WeightFormat::NF4(16, false), WeightFormat::NF4(16, true)}) {
    if (auto s = formats::SerializeSafetensors(Encoded(base, f)); check(s, "safetensors enc")) {
      Write(out / "safetensors" / (FormatName(f) + ".safetensors"), *s);
    }
  }
  WriteText(out / "json" / "index.json",
            R"({"metadata":{"total_size":123},"weight_map":{"model.norm.weight":"model-00001-of-00002.safetensors",)"
            R"("lm_head.weight":"model-00002-of-00002.safetensors"}})");
  WriteText(out / "json" / "escapes.json", R"(["\u00e9\ud83d\ude00\n\t\"", -0.5e-3, 12345678901234567890, {"a":[[]]}])");
  // tokenizer: two bytes of vocab_size + 1, then the tokenizer.bin bytes.
  Vocab v = SmallVocab(16);
  std::vector<uint8_t> tok = {17, 0};
  Append<int32_t>(tok, 5);
  for (size_t i = 0; i < v.tokens.size(); ++i) {
    Append<float>(tok, v.scores[i]);
    Append<int32_t>(tok, static_cast<int32_t>(v.tokens[i].size()));
    tok.insert(tok.end(), v.tokens[i].begin(), v.tokens[i].end());
  }
  Write(out / "tokenizer" / "small.bin", tok);
  // lora: byte 0 even + a GGUF LoRA; byte 0 odd + 2 bytes of config length + adapter_config.json + safetensors.
  const ModelConfig lora_base = fuzz::SeedConfig();
  for (int rank : {1, 4}) {
    auto a = lora::MakeRandomAdapter(lora_base, {lora::LoraTarget::kAttnQ, lora::LoraTarget::kAttnK, lora::LoraTarget::kAttnV,
                                         lora::LoraTarget::kAttnOutput, lora::LoraTarget::kFfnGate,
                                         lora::LoraTarget::kFfnUp, lora::LoraTarget::kFfnDown},
                                     rank, 2.0f * rank, 7);
    if (!check(a, "lora")) continue;
    if (auto g = lora::SerializeGgufAdapter(*a); check(g, "lora gguf")) {
      std::vector<uint8_t> seed = {0};
      seed.insert(seed.end(), g->begin(), g->end());
      Write(out / "lora" / ("r" + std::to_string(rank) + ".gguf"), seed);
    }
    if (auto p = lora::SerializePeftAdapter(*a, lora_base); check(p, "lora peft")) {
      std::vector<uint8_t> seed = {1, static_cast<uint8_t>(p->config_json.size() & 0xff),
                                   static_cast<uint8_t>(p->config_json.size() >> 8)};
      seed.insert(seed.end(), p->config_json.begin(), p->config_json.end());
      seed.insert(seed.end(), p->safetensors.begin(), p->safetensors.end());
      Write(out / "lora" / ("r" + std::to_string(rank) + ".peft"), seed);
    }
  }
  return fails == 0 ? 0 : 1;
}
