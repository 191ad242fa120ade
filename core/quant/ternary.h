// Ternary weights {-s, 0, +s}, written as ggml's TQ2_0 (2 bits per weight) or TQ1_0 (five trits per byte), so
// that llama.cpp runs what these methods produce:
//   - "ternary": QMoE's data-dependent ternary (Frantar & Alistarh, "QMoE: Practical Sub-1-Bit Compression of
//     Trillion-Parameter Models", 2023): GPTQ's error feedback from the layer's own (for an expert: its routed
//     tokens') Hessian onto a ternary grid whose scale is chosen per group from the current weights;
//   - "bitnet": BitNet b1.58's absmean rule (Ma et al., "The Era of 1-bit LLMs", 2024): one scale γ = mean|W| per
//     matrix, w -> RoundClip(w / γ, -1, 1). Calibration-free; a model not trained for it loses a lot, which is what
//     the comparison shows.
// Hot numeric code only; the two QuantMethod classes are at the bottom of ternary.cc and registered in methods.cc.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/tensor.h"
#include "core/quant/packing.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {

// Weights per TQ1_0 / TQ2_0 block (one f16 scale each).
inline constexpr int64_t kTernaryBlock = 256;

// The symmetric ternary grid with the least squared error on x[0, n): codes 0, 1, 2 decode to -s, 0, +s
// (QIntGrid zero 1, max_code 2), s rounded to f16. With the k largest |x| non-zero the best scale is their mean
// magnitude and the error sum(x²) - (sum of the k largest |x|)² / k, so the best k maximises that square over k;
// rounding to the nearest level at the resulting s is never worse. `bits` and `symmetric` are ignored (the
// signature is GptqOptions::choose_grid's).
QIntGrid ChooseTernaryGrid(const float* x, int64_t n, int bits, bool symmetric);

// Writes rows of ternary codes (0, 1, 2 for -1, 0, +1; [rows, cols], cols a multiple of 256) with one f16 scale
// per 256-weight block ([rows, cols / 256]) as TQ2_0 or TQ1_0 blocks, bit-exact with ggml's layouts
// (core/kernels/blocks.h). `out` holds rows * cols / 256 blocks.
void PackTernaryBlocks(const uint8_t* codes, const uint16_t* block_scales, int64_t rows, int64_t cols,
                       WeightType type, uint8_t* out);

// The two registry entries (methods.cc). params.bits picks the file type: 2 -> TQ2_0 (2.0625 bits/weight),
// 1 -> TQ1_0 (1.6875 bits/weight, the same values base-3 packed). "ternary": NeedsCalibration, group 256 (a
// scale per block) or 0 (one per row, QMoE's choice), damp; "bitnet": group is ignored (one scale per matrix).
// Both fall back to q8_0 when a row is not a multiple of 256.
std::unique_ptr<QuantMethod> MakeTernaryMethod();
std::unique_ptr<QuantMethod> MakeBitnetMethod();

}  // namespace qforge::quant
