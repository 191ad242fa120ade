// llama-quantize's presets as recipes: per-tensor types against the rules of llama.cpp's llama_tensor_get_type,
// written out by hand here (docs/quantizers.md has the same table), on synthetic models.
#include "core/quant/ggml_presets.h"

#include <map>
#include <set>
#include <string>

#include "core/model/ggml_types.h"
#include "core/model/synthetic.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

// The type name each quantized tensor of `preset` ends up with.
std::map<std::string, std::string> TypesAfter(const char* preset, const Model& m) {
  const GgmlPreset* p = FindGgmlPreset(preset);
  EXPECT_NE(p, nullptr) << preset;
  std::map<std::string, std::string> types;
  if (p == nullptr) return types;
  auto recipe = GgmlPresetRecipe(*p, m);
  EXPECT_TRUE(recipe.ok()) << recipe.status();
  if (!recipe.ok()) return types;
  auto q = QuantizeModel(m, *recipe, nullptr);
  EXPECT_TRUE(q.ok()) << q.status();
  if (!q.ok()) return types;
  for (const auto& [name, t] : q->model.tensors) {
    if (t.rows() > 1) types[name] = FindGgmlType(t.format.type) ? FindGgmlType(t.format.type)->name : "?";
  }
  return types;
}

ModelConfig Layers(int n) {
  ModelConfig c = Q4kTestConfig();  // every row length a multiple of 256
  c.n_layers = n;
  return c;
}

TEST(GgmlPresetsTest, Q4_K_MOnEightLayers) {
  const Model m = MakeSyntheticModel(Layers(8), 3);
  const auto types = TypesAfter("q4_k_m", m);
  // use_more_bits(i, 8): i < 1, i >= 7, (i - 1) % 3 == 2  ->  layers 0, 3, 6, 7.
  const std::set<int> more_bits = {0, 3, 6, 7};
  for (int l = 0; l < 8; ++l) {
    const std::string blk = "blk." + std::to_string(l) + ".";
    const std::string raised = more_bits.count(l) ? "q6_k" : "q4_k";
    EXPECT_EQ(types.at(blk + "attn_v.weight"), raised) << l;
    EXPECT_EQ(types.at(blk + "ffn_down.weight"), raised) << l;
    for (const char* t : {"attn_q.weight", "attn_k.weight", "attn_output.weight", "ffn_gate.weight", "ffn_up.weight"}) {
      EXPECT_EQ(types.at(blk + t), "q4_k") << blk << t;
    }
  }
  EXPECT_EQ(types.at("output.weight"), "q6_k");
  EXPECT_EQ(types.at("token_embd.weight"), "q4_k");
}

// The rules of each preset at chosen layers of a 32-layer model (use_more_bits(i, 32): i < 4, i >= 28, i = 6, 9,
// ..., 27; n/16 = 2; n/8 = 4), straight from llama_tensor_get_type.
TEST(GgmlPresetsTest, RulesOnThirtyTwoLayers) {
  ModelConfig c = Layers(32);
  struct Expect {
    const char* preset;
    const char* tensor;
    const char* type;
  };
  const Expect kExpect[] = {
      {"q4_k_m", "blk.3.attn_v.weight", "q6_k"},      {"q4_k_m", "blk.4.attn_v.weight", "q4_k"},
      {"q4_k_m", "blk.6.ffn_down.weight", "q6_k"},    {"q4_k_m", "blk.7.ffn_down.weight", "q4_k"},
      {"q4_k_m", "blk.27.ffn_down.weight", "q6_k"},   {"q4_k_m", "blk.28.attn_v.weight", "q6_k"},
      {"q4_k_m", "blk.5.attn_output.weight", "q4_k"}, {"q4_k_m", "output.weight", "q6_k"},
      {"q4_k_s", "blk.3.attn_v.weight", "q5_k"},      {"q4_k_s", "blk.4.attn_v.weight", "q4_k"},
      {"q4_k_s", "blk.3.ffn_down.weight", "q5_k"},    {"q4_k_s", "blk.4.ffn_down.weight", "q4_k"},
      {"q4_k_s", "blk.0.ffn_gate.weight", "q4_k"},    {"q4_k_s", "output.weight", "q6_k"},
      {"q5_k_m", "blk.9.attn_v.weight", "q6_k"},      {"q5_k_m", "blk.10.ffn_down.weight", "q5_k"},
      {"q5_k_m", "blk.31.ffn_down.weight", "q6_k"},   {"q5_k_m", "blk.1.attn_q.weight", "q5_k"},
      {"q5_k_s", "blk.0.attn_v.weight", "q5_k"},      {"q5_k_s", "blk.0.ffn_down.weight", "q5_k"},
      {"q5_k_s", "output.weight", "q6_k"},            {"q5_k_s", "token_embd.weight", "q5_k"},
      {"q3_k_m", "blk.1.attn_v.weight", "q5_k"},      {"q3_k_m", "blk.2.attn_v.weight", "q4_k"},
      {"q3_k_m", "blk.1.ffn_down.weight", "q5_k"},    {"q3_k_m", "blk.2.ffn_down.weight", "q4_k"},
      {"q3_k_m", "blk.9.attn_output.weight", "q4_k"}, {"q3_k_m", "blk.9.ffn_up.weight", "q3_k"},
      {"q3_k_s", "blk.0.attn_v.weight", "q3_k"},      {"q3_k_s", "blk.0.ffn_down.weight", "q3_k"},
      {"q3_k_s", "output.weight", "q6_k"},            {"q3_k_l", "blk.20.attn_v.weight", "q5_k"},
      {"q3_k_l", "blk.20.ffn_down.weight", "q5_k"},   {"q3_k_l", "blk.20.attn_output.weight", "q5_k"},
      {"q3_k_l", "blk.20.attn_k.weight", "q3_k"},     {"q2_k", "blk.0.attn_v.weight", "q3_k"},  // n_gqa = 2
      {"q2_k", "blk.0.ffn_down.weight", "q3_k"},      {"q2_k", "blk.0.attn_output.weight", "q3_k"},
      {"q2_k", "blk.0.ffn_gate.weight", "q2_k"},      {"q2_k", "token_embd.weight", "q2_k"},
      {"q2_k", "output.weight", "q6_k"},              {"q6_k", "blk.0.attn_v.weight", "q6_k"},
      {"q6_k", "token_embd.weight", "q6_k"},          {"q6_k", "output.weight", "q6_k"},
      {"q4_0", "blk.0.ffn_down.weight", "q4_0"},      {"q4_0", "blk.0.attn_v.weight", "q4_0"},
      {"q4_0", "token_embd.weight", "q4_0"},          {"q4_0", "output.weight", "q6_k"},
      {"q4_1", "blk.0.ffn_down.weight", "q4_1"},      {"q5_1", "output.weight", "q6_k"},
      {"q5_0", "blk.0.ffn_down.weight", "q5_0"},      {"q8_0", "output.weight", "q8_0"},
      {"q8_0", "token_embd.weight", "q8_0"},          {"q8_0", "blk.0.ffn_down.weight", "q8_0"},
      {"iq4_xs", "blk.3.ffn_down.weight", "q5_k"},    {"iq4_xs", "blk.4.ffn_down.weight", "iq4_xs"},
      {"iq4_xs", "blk.0.attn_v.weight", "iq4_xs"},    {"iq4_xs", "output.weight", "q6_k"},
      {"iq4_nl", "blk.0.ffn_down.weight", "q5_k"},    {"iq4_nl", "token_embd.weight", "iq4_nl"},
  };
  for (const Expect& e : kExpect) {
    const GgmlPreset* p = FindGgmlPreset(e.preset);
    ASSERT_NE(p, nullptr) << e.preset;
    EXPECT_EQ(GgmlPresetTensorMethod(*p, c, e.tensor, 256, true), e.type) << e.preset << " " << e.tensor;
  }
  // With an importance matrix, the first eighth of ffn_down: Q4_0 / Q5_0 raised to q4_1 / q5_1 (llama.cpp's guard),
  // IQ4_NL / IQ4_XS no longer raised to q5_k; the K-quant presets do not change.
  struct ImatrixExpect {
    const char* preset;
    int layer;
    const char* type;
  };
  const ImatrixExpect kWithImatrix[] = {{"q4_0", 3, "q4_1"},   {"q4_0", 4, "q4_0"},     {"q5_0", 0, "q5_1"},
                                        {"q5_0", 4, "q5_0"},   {"iq4_xs", 3, "iq4_xs"}, {"iq4_nl", 0, "iq4_nl"},
                                        {"q4_1", 0, "q4_1"},   {"q4_k_m", 3, "q6_k"},   {"q4_k_s", 3, "q5_k"}};
  for (const ImatrixExpect& e : kWithImatrix) {
    const std::string tensor = "blk." + std::to_string(e.layer) + ".ffn_down.weight";
    EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset(e.preset), c, tensor, 256, true, /*has_imatrix=*/true), e.type)
        << e.preset << " " << tensor;
  }
  // Q2_K's attn_v takes q4_k with at least four query heads per kv head, IQ4_NL's and IQ4_XS's q5_k.
  c.n_kv_heads = 1;
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q2_k"), c, "blk.0.attn_v.weight", 256, true), "q4_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("iq4_xs"), c, "blk.9.attn_v.weight", 256, true), "q5_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("iq4_nl"), c, "blk.9.attn_v.weight", 256, true), "q5_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_0"), c, "blk.9.attn_v.weight", 256, true), "q4_0");
  // Eight experts: attn_v and attn_k q8_0, attn_output q5_k for the presets llama.cpp lists.
  c.n_experts = 8;
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_k_m"), c, "blk.5.attn_v.weight", 256, true), "q8_0");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_k_m"), c, "blk.5.attn_k.weight", 256, true), "q8_0");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_k_m"), c, "blk.5.attn_output.weight", 256, true), "q5_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q5_k_m"), c, "blk.5.attn_output.weight", 256, true), "q5_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("iq4_xs"), c, "blk.5.attn_output.weight", 256, true), "q5_k");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_0"), c, "blk.5.attn_output.weight", 256, true), "q4_0");
  EXPECT_EQ(GgmlPresetTensorMethod(*FindGgmlPreset("q4_0"), c, "blk.5.attn_k.weight", 256, true), "q8_0");
}

// GgmlPresetRecipe passes "an importance matrix is given" to the rules: Q4_0's first eighth of ffn_down (layer 0
// of 8) gets a q4_1 rule with one and none without; the files QuantizeModel writes then hold that type.
TEST(GgmlPresetsTest, ImatrixChangesTheQ4_0Recipe) {
  const Model m = MakeSyntheticModel(Layers(8), 3);
  const GgmlPreset& p = *FindGgmlPreset("q4_0");
  auto rule_for = [](const QuantRecipe& r, const std::string& name) -> std::string {
    for (const LayerRule& rule : r.layers) {
      if (rule.pattern == name) return rule.method;
    }
    return "";
  };
  auto plain = GgmlPresetRecipe(p, m);
  auto weighted = GgmlPresetRecipe(p, m, /*has_imatrix=*/true);
  ASSERT_TRUE(plain.ok() && weighted.ok());
  EXPECT_EQ(rule_for(*plain, "blk.0.ffn_down.weight"), "");
  EXPECT_EQ(rule_for(*weighted, "blk.0.ffn_down.weight"), "q4_1");
  EXPECT_EQ(rule_for(*weighted, "blk.1.ffn_down.weight"), "");
  EXPECT_EQ(rule_for(*plain, "output.weight"), "q6_k");
  const auto types = TypesAfter("q4_0", m);
  EXPECT_EQ(types.at("output.weight"), "q6_k");
  EXPECT_EQ(types.at("token_embd.weight"), "q4_0");
  EXPECT_EQ(types.at("blk.0.ffn_down.weight"), "q4_0");
}

TEST(GgmlPresetsTest, TiedEmbeddingIsTheOutput) {
  const GgmlPreset& p = *FindGgmlPreset("q4_k_m");
  EXPECT_EQ(GgmlPresetTensorMethod(p, Layers(2), "token_embd.weight", 256, /*has_output=*/false), "q6_k");
  // An output whose rows do not fit the base type's 256-blocks goes to q8_0, not through the fallback chain.
  EXPECT_EQ(GgmlPresetTensorMethod(p, Layers(2), "output.weight", 288, true), "q8_0");
}

// Rows of 64 fit no K-quant: each tensor takes its type's llama.cpp fallback (q4_k -> q5_0, q6_k -> q8_0,
// q3_k -> q4_0, q5_k -> q5_1), and output goes to q8_0.
TEST(GgmlPresetsTest, FallbacksOnRowsOf64) {
  const Model m = MakeSyntheticModel(TinyTestConfig(), 5);
  ASSERT_EQ(m.config.n_layers, 2);
  const auto q4 = TypesAfter("q4_k_m", m);
  EXPECT_EQ(q4.at("blk.0.attn_q.weight"), "q5_0");
  EXPECT_EQ(q4.at("blk.1.attn_v.weight"), "q8_0");  // use_more_bits(1, 2): q6_k, which falls back to q8_0
  EXPECT_EQ(q4.at("token_embd.weight"), "q5_0");
  const auto q3 = TypesAfter("q3_k_m", m);
  EXPECT_EQ(q3.at("blk.0.attn_q.weight"), "q4_0");
  EXPECT_EQ(q4.at("output.weight"), "q8_0");
  EXPECT_EQ(q3.at("blk.0.attn_v.weight"), "q5_1");  // q5_k (first two layers) -> q5_1
}

// GptqOfGgmlRecipe: every method with a gptq_ variant becomes it, with that variant's bits and group and the given
// damping; q8_0 and the untied token embeddings stay plain; a tied token_embd (it is the classifier, which
// calibration sees) gets GPTQ too.
TEST(GgmlPresetsTest, GptqOfGgmlRecipe) {
  QuantParams gptq = FindMethod("gptq")->DefaultParams();
  gptq.damp = 0.05f;
  const Model untied = MakeSyntheticModel(Layers(2), 3);
  ASSERT_NE(untied.Find("output.weight"), nullptr);
  auto plain = GgmlPresetRecipe(*FindGgmlPreset("q4_k_m"), untied);
  ASSERT_TRUE(plain.ok()) << plain.status();
  plain->layers.push_back(LayerRule{"blk.1.attn_k.weight", "q8_0", std::nullopt});
  const QuantRecipe r = GptqOfGgmlRecipe(*plain, untied, gptq);
  EXPECT_EQ(r.method, "gptq_q4_k");
  ASSERT_TRUE(r.params.has_value());
  EXPECT_EQ(r.params->group, 256);
  EXPECT_EQ(r.params->damp, 0.05f);
  std::map<std::string, std::string> rule;
  for (const LayerRule& l : r.layers) rule.emplace(l.pattern, l.method);  // the first rule per name applies
  EXPECT_EQ(rule.at("token_embd.weight"), "q4_k");
  EXPECT_EQ(rule.at("output.weight"), "gptq_q6_k");
  EXPECT_EQ(rule.at("blk.1.attn_v.weight"), "gptq_q6_k");
  EXPECT_EQ(rule.at("blk.1.attn_k.weight"), "q8_0");
  for (const LayerRule& l : r.layers) {
    if (l.method.rfind("gptq_", 0) == 0) {
      ASSERT_TRUE(l.params.has_value()) << l.pattern;
      EXPECT_EQ(l.params->damp, 0.05f) << l.pattern;
    }
  }
  ModelConfig tied_config = Layers(2);
  tied_config.tied_embeddings = true;
  const Model tied = MakeSyntheticModel(tied_config, 3);
  ASSERT_EQ(tied.Find("output.weight"), nullptr);
  auto tied_plain = GgmlPresetRecipe(*FindGgmlPreset("q4_k_m"), tied);
  ASSERT_TRUE(tied_plain.ok()) << tied_plain.status();
  const QuantRecipe t = GptqOfGgmlRecipe(*tied_plain, tied, gptq);
  int embd_rules = 0;
  for (const LayerRule& l : t.layers) {
    if (l.pattern != "token_embd.weight") continue;
    ++embd_rules;
    EXPECT_EQ(l.method, "gptq_q6_k");
  }
  EXPECT_EQ(embd_rules, 1);
}

TEST(GgmlPresetsTest, EveryPresetHasAWritableBase) {
  for (const GgmlPreset& p : GgmlPresets()) {
    EXPECT_NE(FindMethod(p.base_method), nullptr) << p.name;
    EXPECT_NE(FindGgmlTypeByName(p.base_method), nullptr) << p.name;
  }
  EXPECT_EQ(FindGgmlPreset("q4_k"), nullptr);
}

}  // namespace
}  // namespace qforge::quant
