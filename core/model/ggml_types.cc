#include "core/model/ggml_types.h"

#include <array>

namespace qforge {
namespace {

// Block sizes and bytes as ggml-common.h's block_* structs (core/kernels/blocks.h has qforge's, and
// kernels_test checks them against this table); ids as ggml.h's enum ggml_type; file types as llama.h's enum
// llama_ftype (for the K-quants the "_M" mixes, llama-quantize's usual presets).
constexpr std::array<GgmlTypeTraits, 25> kTypes = {{
    // type               id  name       block bytes ftype
    {WeightType::kF32,      0, "f32",        1,   4,  0},
    {WeightType::kF16,      1, "f16",        1,   2,  1},
    {WeightType::kQ4_0,     2, "q4_0",      32,  18,  2},
    {WeightType::kQ4_1,     3, "q4_1",      32,  20,  3},
    {WeightType::kQ5_0,     6, "q5_0",      32,  22,  8},
    {WeightType::kQ5_1,     7, "q5_1",      32,  24,  9},
    {WeightType::kQ8_0,     8, "q8_0",      32,  34,  7},
    {WeightType::kQ2_K,    10, "q2_k",     256,  84, 10},
    {WeightType::kQ3_K,    11, "q3_k",     256, 110, 12},
    {WeightType::kQ4_K,    12, "q4_k",     256, 144, 15},
    {WeightType::kQ5_K,    13, "q5_k",     256, 176, 17},
    {WeightType::kQ6_K,    14, "q6_k",     256, 210, 18},
    {WeightType::kIQ2_XXS, 16, "iq2_xxs",  256,  66, 19},
    {WeightType::kIQ2_XS,  17, "iq2_xs",   256,  74, 20},
    {WeightType::kIQ3_XXS, 18, "iq3_xxs",  256,  98, 23},
    {WeightType::kIQ1_S,   19, "iq1_s",    256,  50, 24},
    {WeightType::kIQ4_NL,  20, "iq4_nl",    32,  18, 25},
    {WeightType::kIQ3_S,   21, "iq3_s",    256, 110, 26},
    {WeightType::kIQ2_S,   22, "iq2_s",    256,  82, 28},
    {WeightType::kIQ4_XS,  23, "iq4_xs",   256, 136, 30},
    {WeightType::kIQ1_M,   29, "iq1_m",    256,  56, 31},
    {WeightType::kBF16,    30, "bf16",       1,   2, 32},
    {WeightType::kTQ1_0,   34, "tq1_0",    256,  54, 36},
    {WeightType::kTQ2_0,   35, "tq2_0",    256,  66, 37},
    {WeightType::kMXFP4,   39, "mxfp4",     32,  17, 38},
}};

}  // namespace

std::span<const GgmlTypeTraits> GgmlTypes() { return kTypes; }

const GgmlTypeTraits* FindGgmlType(WeightType t) {
  for (const GgmlTypeTraits& g : kTypes) {
    if (g.type == t) return &g;
  }
  return nullptr;
}

const GgmlTypeTraits* FindGgmlTypeById(uint32_t id) {
  for (const GgmlTypeTraits& g : kTypes) {
    if (g.ggml_id == id) return &g;
  }
  return nullptr;
}

const GgmlTypeTraits* FindGgmlTypeByName(std::string_view name) {
  for (const GgmlTypeTraits& g : kTypes) {
    if (name == g.name) return &g;
  }
  return nullptr;
}

}  // namespace qforge
