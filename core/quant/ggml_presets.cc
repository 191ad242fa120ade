#include "core/quant/ggml_presets.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <optional>

#include "absl/strings/str_cat.h"
#include "core/model/ggml_types.h"

namespace qforge::quant {
namespace {

using P = GgmlPresetId;

constexpr std::array<GgmlPreset, 16> kPresets = {{
    {P::kQ4_0, "q4_0", "q4_0", "llama-quantize Q4_0: q4_0, output q6_k; with --imatrix ffn_down of the first 1/8 of "
                               "layers q4_1"},
    {P::kQ4_1, "q4_1", "q4_1", "llama-quantize Q4_1: q4_1, output q6_k"},
    {P::kQ5_0, "q5_0", "q5_0", "llama-quantize Q5_0: q5_0, output q6_k; with --imatrix ffn_down of the first 1/8 of "
                               "layers q5_1"},
    {P::kQ5_1, "q5_1", "q5_1", "llama-quantize Q5_1: q5_1, output q6_k"},
    {P::kQ8_0, "q8_0", "q8_0", "llama-quantize Q8_0: q8_0 everywhere, embeddings included"},
    {P::kQ2_K, "q2_k", "q2_k", "llama-quantize Q2_K: q2_k; attn_v q3_k (q4_k with >= 4 query heads per kv head), "
                               "ffn_down and attn_output q3_k, output q6_k"},
    {P::kQ3_K_S, "q3_k_s", "q3_k", "llama-quantize Q3_K_S: q3_k, output q6_k"},
    {P::kQ3_K_M, "q3_k_m", "q3_k", "llama-quantize Q3_K_M: q3_k; attn_v q5_k (first two layers) else q4_k, "
                                   "attn_output q4_k, ffn_down q5_k (first 1/16 of layers) else q4_k, output q6_k"},
    {P::kQ3_K_L, "q3_k_l", "q3_k", "llama-quantize Q3_K_L: q3_k; attn_v, attn_output and ffn_down q5_k, output q6_k"},
    {P::kQ4_K_S, "q4_k_s", "q4_k", "llama-quantize Q4_K_S: q4_k; attn_v of the first 4 layers and ffn_down of the "
                                   "first 1/8 q5_k, output q6_k"},
    {P::kQ4_K_M, "q4_k_m", "q4_k", "llama-quantize Q4_K_M: q4_k; attn_v and ffn_down q6_k where use_more_bits "
                                   "(first and last 1/8 of layers, every third between), output q6_k"},
    {P::kQ5_K_S, "q5_k_s", "q5_k", "llama-quantize Q5_K_S: q5_k, output q6_k"},
    {P::kQ5_K_M, "q5_k_m", "q5_k", "llama-quantize Q5_K_M: q5_k; attn_v and ffn_down q6_k where use_more_bits, "
                                   "output q6_k"},
    {P::kQ6_K, "q6_k", "q6_k", "llama-quantize Q6_K: q6_k everywhere, embeddings included"},
    {P::kIQ4_NL, "iq4_nl", "iq4_nl", "llama-quantize IQ4_NL: iq4_nl; attn_v q5_k with >= 4 query heads per kv head, "
                                     "without --imatrix ffn_down of the first 1/8 of layers q5_k; output q6_k"},
    {P::kIQ4_XS, "iq4_xs", "iq4_xs", "llama-quantize IQ4_XS: iq4_xs; attn_v q5_k with >= 4 query heads per kv head, "
                                     "without --imatrix ffn_down of the first 1/8 of layers q5_k; output q6_k"},
}};

// llama.cpp's use_more_bits: the first and last eighth of the layers and every third layer between.
bool UseMoreBits(int layer, int n_layers) {
  return layer < n_layers / 8 || layer >= 7 * n_layers / 8 || (layer - n_layers / 8) % 3 == 2;
}

// The layer of "blk.N.…", or -1.
int LayerOf(std::string_view name) {
  int layer = -1;
  if (std::sscanf(std::string(name).c_str(), "blk.%d.", &layer) != 1) return -1;
  return layer;
}

bool Contains(std::string_view s, std::string_view part) { return s.find(part) != std::string_view::npos; }

}  // namespace

std::span<const GgmlPreset> GgmlPresets() { return kPresets; }

const GgmlPreset* FindGgmlPreset(std::string_view name) {
  for (const GgmlPreset& p : kPresets) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

std::string GgmlPresetTensorMethod(const GgmlPreset& preset, const ModelConfig& c, std::string_view name,
                                   int64_t cols, bool has_output, bool has_imatrix) {
  const P id = preset.id;
  const std::string base = preset.base_method;
  const int n_layers = c.n_layers;
  const int n_gqa = c.n_kv_heads > 0 ? c.n_heads / c.n_kv_heads : 1;
  const bool eight_experts = c.n_experts == 8;
  // llama.cpp's LLM_TYPE_70B for the llama architecture: 80 layers with grouped-query attention (65B has none).
  const bool is_70b = c.arch == "llama" && n_layers == 80 && c.n_heads != c.n_kv_heads;

  const bool iq4 = id == P::kIQ4_NL || id == P::kIQ4_XS;

  // The output matrix (or the token embedding that doubles as it): q6_k (Q8_0 keeps q8_0), q8_0 when its rows do
  // not fit the base type's block.
  if (name == names::kOutput || (!has_output && name == names::kTokenEmbd)) {
    if (cols % FindGgmlTypeByName(base)->block != 0 || id == P::kQ8_0) return "q8_0";
    return "q6_k";
  }
  if (name == names::kTokenEmbd) return base;  // none of these presets changes token_embd
  const int layer = LayerOf(name);
  if (Contains(name, "attn_v.weight")) {
    std::string m = base;
    if (id == P::kQ2_K) {
      m = n_gqa >= 4 ? "q4_k" : "q3_k";
    } else if (id == P::kQ3_K_M) {
      m = layer < 2 ? "q5_k" : "q4_k";
    } else if (id == P::kQ3_K_L) {
      m = "q5_k";
    } else if ((id == P::kQ4_K_M || id == P::kQ5_K_M) && UseMoreBits(layer, n_layers)) {
      m = "q6_k";
    } else if (id == P::kQ4_K_S && layer < 4) {
      m = "q5_k";
    } else if (iq4 && n_gqa >= 4) {
      m = "q5_k";
    }
    if (is_70b && (m == "q3_k" || m == "q4_k")) m = "q5_k";
    if (eight_experts) m = "q8_0";
    return m;
  }
  if (Contains(name, "attn_k.weight")) return eight_experts ? "q8_0" : base;
  if (Contains(name, "attn_q.weight")) return base;
  if (Contains(name, "ffn_down")) {
    switch (id) {
      case P::kQ2_K: return "q3_k";
      case P::kQ3_K_M: return layer < n_layers / 16 ? "q5_k" : "q4_k";
      case P::kQ3_K_L: return "q5_k";
      case P::kQ4_K_M: return UseMoreBits(layer, n_layers) ? "q6_k" : base;
      case P::kQ5_K_M: return UseMoreBits(layer, n_layers) ? "q6_k" : base;
      case P::kQ4_K_S: return layer < n_layers / 8 ? "q5_k" : base;
      case P::kIQ4_NL:
      case P::kIQ4_XS: return layer < n_layers / 8 && !has_imatrix ? "q5_k" : base;
      // llama.cpp guards the first ffn_down layers of Q4_0 / Q5_0 only when an imatrix is given, so that a file
      // made without one stays what it always was.
      case P::kQ4_0: return layer < n_layers / 8 && has_imatrix ? "q4_1" : base;
      case P::kQ5_0: return layer < n_layers / 8 && has_imatrix ? "q5_1" : base;
      default: return base;
    }
  }
  if (Contains(name, "attn_output.weight")) {
    if (eight_experts) {
      const bool raised = id == P::kQ2_K || id == P::kQ3_K_S || id == P::kQ3_K_M || id == P::kQ4_K_S ||
                          id == P::kQ4_K_M || iq4;
      return raised ? "q5_k" : base;
    }
    if (id == P::kQ2_K) return "q3_k";
    if (id == P::kQ3_K_M) return "q4_k";
    if (id == P::kQ3_K_L) return "q5_k";
    return base;
  }
  return base;  // attn_q, ffn_gate, ffn_up: the base type in every preset here
}

absl::StatusOr<QuantRecipe> GgmlPresetRecipe(const GgmlPreset& preset, const Model& model, bool has_imatrix) {
  QuantRecipe recipe;
  recipe.method = preset.base_method;
  recipe.quantize_embeddings = true;
  const bool has_output = model.Find(names::kOutput) != nullptr;
  std::vector<std::string> targets = LinearWeightNames(model.config);
  targets.push_back(names::kTokenEmbd);
  if (has_output) targets.push_back(names::kOutput);
  for (const std::string& name : targets) {
    const Tensor* t = model.Find(name);
    if (t == nullptr) return absl::NotFoundError(absl::StrCat(preset.name, ": the model has no tensor ", name));
    const std::string m = GgmlPresetTensorMethod(preset, model.config, name, t->cols(), has_output, has_imatrix);
    // Tensor names hold no glob characters, so each rule matches exactly its tensor.
    if (m != recipe.method) recipe.layers.push_back(LayerRule{name, m, std::nullopt});
  }
  return recipe;
}

QuantRecipe GptqOfGgmlRecipe(QuantRecipe recipe, const Model& model, const QuantParams& gptq) {
  auto variant = [&](const std::string& method) -> std::optional<std::pair<std::string, QuantParams>> {
    const QuantMethod* g = FindMethod("gptq_" + method);
    if (g == nullptr) return std::nullopt;
    QuantParams p = g->DefaultParams();
    p.damp = gptq.damp;
    p.act_order = gptq.act_order;
    p.static_groups = gptq.static_groups;
    return std::make_pair(g->name(), p);
  };
  const bool untied = model.Find(names::kOutput) != nullptr;
  for (LayerRule& r : recipe.layers) {
    if (untied && r.pattern == names::kTokenEmbd) continue;
    if (auto v = variant(r.method)) {
      r.method = v->first;
      r.params = v->second;
    }
  }
  if (auto v = variant(recipe.method)) {
    const bool embd_rule = std::any_of(recipe.layers.begin(), recipe.layers.end(),
                                       [](const LayerRule& r) { return r.pattern == names::kTokenEmbd; });
    if (untied && recipe.quantize_embeddings && !embd_rule) {
      recipe.layers.insert(recipe.layers.begin(), LayerRule{names::kTokenEmbd, recipe.method, recipe.params});
    }
    recipe.method = v->first;
    recipe.params = v->second;
  }
  return recipe;
}

}  // namespace qforge::quant
