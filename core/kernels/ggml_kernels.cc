#include "core/kernels/ggml_kernels.h"

#include <array>

#include "core/kernels/kernels_internal.h"

namespace qforge::kernels {
namespace {

using internal::DequantizeBF16Avx2;
using internal::DequantizeF16Avx2;
using internal::DequantizeQ4_0Avx2;
using internal::DequantizeQ4_0Avx512;
using internal::DequantizeQ4_KAvx2;
using internal::DequantizeQ4_KAvx512;
using internal::DequantizeQ8_0Avx2;
using internal::DequantizeQ8_0Avx512;

// The rows of core/model/ggml_types.cc, in its order (kernels_test checks that the two tables match).
constexpr std::array<GgmlKernelTraits, 25> kKernels = {{
    // type               scalar               avx2                 avx512                quantize
    //   (K-quants:) sub_block, fit_header, set_codes
    {WeightType::kF32,     &DequantizeF32,     nullptr,             nullptr,              nullptr},
    {WeightType::kF16,     &DequantizeF16,     &DequantizeF16Avx2,  nullptr,              nullptr},
    {WeightType::kQ4_0,    &DequantizeQ4_0,    &DequantizeQ4_0Avx2, &DequantizeQ4_0Avx512, &QuantizeRowQ4_0, 0, nullptr,
     nullptr, &QuantizeRowWeightedQ4_0},
    {WeightType::kQ4_1,    &DequantizeQ4_1,    nullptr,             nullptr,              &QuantizeRowQ4_1, 0, nullptr,
     nullptr, &QuantizeRowWeightedQ4_1},
    {WeightType::kQ5_0,    &DequantizeQ5_0,    nullptr,             nullptr,              &QuantizeRowQ5_0, 0, nullptr,
     nullptr, &QuantizeRowWeightedQ5_0},
    {WeightType::kQ5_1,    &DequantizeQ5_1,    nullptr,             nullptr,              &QuantizeRowQ5_1, 0, nullptr,
     nullptr, &QuantizeRowWeightedQ5_1},
    {WeightType::kQ8_0,    &DequantizeQ8_0,    &DequantizeQ8_0Avx2, &DequantizeQ8_0Avx512, &QuantizeRowQ8_0, 0, nullptr,
     nullptr, &QuantizeRowWeightedQ8_0},
    {WeightType::kQ2_K,    &DequantizeQ2_K,    nullptr,             nullptr,              &QuantizeRowQ2_K,
     16, &FitHeaderQ2_K, &SetCodesQ2_K},
    {WeightType::kQ3_K,    &DequantizeQ3_K,    nullptr,             nullptr,              &QuantizeRowQ3_K,
     16, &FitHeaderQ3_K, &SetCodesQ3_K},
    {WeightType::kQ4_K,    &DequantizeQ4_K,    &DequantizeQ4_KAvx2, &DequantizeQ4_KAvx512, &QuantizeRowQ4_K,
     32, &FitHeaderQ4_K, &SetCodesQ4_K},
    {WeightType::kQ5_K,    &DequantizeQ5_K,    nullptr,             nullptr,              &QuantizeRowQ5_K,
     32, &FitHeaderQ5_K, &SetCodesQ5_K},
    {WeightType::kQ6_K,    &DequantizeQ6_K,    nullptr,             nullptr,              &QuantizeRowQ6_K,
     16, &FitHeaderQ6_K, &SetCodesQ6_K},
    {WeightType::kIQ2_XXS, &DequantizeIQ2_XXS, nullptr,             nullptr,              nullptr},
    {WeightType::kIQ2_XS,  &DequantizeIQ2_XS,  nullptr,             nullptr,              nullptr},
    {WeightType::kIQ3_XXS, &DequantizeIQ3_XXS, nullptr,             nullptr,              nullptr},
    {WeightType::kIQ1_S,   &DequantizeIQ1_S,   nullptr,             nullptr,              nullptr},
    {WeightType::kIQ4_NL,  &DequantizeIQ4_NL,  nullptr,             nullptr,              &QuantizeRowIQ4_NL, 0, nullptr,
     nullptr, &QuantizeRowWeightedIQ4_NL},
    {WeightType::kIQ3_S,   &DequantizeIQ3_S,   nullptr,             nullptr,              nullptr},
    {WeightType::kIQ2_S,   &DequantizeIQ2_S,   nullptr,             nullptr,              nullptr},
    {WeightType::kIQ4_XS,  &DequantizeIQ4_XS,  nullptr,             nullptr,              &QuantizeRowIQ4_XS, 0, nullptr,
     nullptr, &QuantizeRowWeightedIQ4_XS},
    {WeightType::kIQ1_M,   &DequantizeIQ1_M,   nullptr,             nullptr,              nullptr},
    {WeightType::kBF16,    &DequantizeBF16,    &DequantizeBF16Avx2, nullptr,              nullptr},
    {WeightType::kTQ1_0,   &DequantizeTQ1_0,   nullptr,             nullptr,              nullptr},
    {WeightType::kTQ2_0,   &DequantizeTQ2_0,   nullptr,             nullptr,              nullptr},
    {WeightType::kMXFP4,   &DequantizeMXFP4,   nullptr,             nullptr,              nullptr},
}};

}  // namespace

std::span<const GgmlKernelTraits> GgmlKernelTable() { return kKernels; }

const GgmlKernelTraits* FindGgmlKernels(WeightType t) {
  for (const GgmlKernelTraits& k : kKernels) {
    if (k.type == t) return &k;
  }
  return nullptr;
}

}  // namespace qforge::kernels
