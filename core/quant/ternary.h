// Ternary weights {-s, 0, +s}, written as ggml's TQ2_0 (2 bits per weight) or TQ1_0 (five trits per byte), so
// that llama.cpp runs what these methods produce:
//   - "ternary": QMoE's data-dependent ternary (Frantar & Alistarh, "QMoE: Practical Sub-1-Bit Compression of
//     Trillion-Parameter Models", 2023): GPTQ's error feedback from the layer's own (for an expert: its routed
//     tokens') Hessian onto a ternary grid whose scale is chosen per group from the current weights;
//   - "qmoe": the same error feedback onto a sparse ternary grid per row, stored in the kQMoE codec below one bit
//     per weight (core/kernels/qmoe.h);
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

// The Hessian the error feedback runs through, after checking the statistics fit the matrix (FAILED_PRECONDITION
// without any, INVALID_ARGUMENT for another width). An expert no calibration token reached has an all-zero
// Hessian, which GPTQ reads as "every input dead" and would zero the expert: with no data every input counts the
// same, H = I (kept in *identity), nearest rounding on the method's grid. Shared by ternary, qmoe and billm.
absl::StatusOr<const double*> CalibrationHessian(const char* method, int64_t cols, const calib::LayerStats* calib,
                                                 std::vector<double>* identity);

// Weights per TQ1_0 / TQ2_0 block (one f16 scale each).
inline constexpr int64_t kTernaryBlock = 256;

// The symmetric ternary grid with the least squared error on x[0, n): codes 0, 1, 2 decode to -s, 0, +s
// (QIntGrid zero 1, max_code 2), s rounded to f16. With the k largest |x| non-zero the best scale is their mean
// magnitude and the error sum(x²) - (sum of the k largest |x|)² / k, so the best k maximises that square over k;
// rounding to the nearest level at the resulting s is never worse. `bits` and `symmetric` are ignored (the
// signature is ChooseQIntGrid's).
QIntGrid ChooseTernaryGrid(const float* x, int64_t n, int bits, bool symmetric);

// The fraction of each row the qmoe grid codes zero after the error feedback. QMoE's experts are ~90 % zeros
// because min-max ternary grids on rows thousands wide put the threshold far out; on 256-wide rows a min-max
// grid leaves ~72 % zeros, 1.15 bits of entropy, so qmoe sets a dead zone instead, and searches its width per
// matrix (the feedback pushes weights out of any dead zone chosen on the original row) until this fraction of
// the final codes is zero: about 0.62 bits of entropy, ~0.75 bits per weight stored.
inline constexpr double kQmoeSparsity = 0.88;

// The sparse ternary grid of one row that drops the fraction `drop` of it: the ceil((1 - drop) n) largest |x|
// code to +-s, s their mean magnitude (the least-squares scale for that support, rounded to f16), everything at
// or below the dead zone (halfway between the smallest kept and the largest dropped |x|) to 0.
QIntGrid ChooseSparseTernaryGrid(const float* x, int64_t n, double drop);

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
// "qmoe": NeedsCalibration; group 0 (one scale per row) only; damp. Any row length up to kQmoeMaxCols; falls back
// to q8_0 past it.
std::unique_ptr<QuantMethod> MakeQmoeMethod();

}  // namespace qforge::quant
