// BiLLM (Huang et al., "BiLLM: Pushing the Limit of Post-Training Quantization for LLMs", ICML 2024): binary
// weights after training, in BiLLM's two parts:
//   - salient columns, those with the largest Hessian salience sum_r w_rc² / [H⁻¹]_cc² (the OBS cost of losing
//     column c), get residual binarisation: w ≈ a1 sign(w) + a2 sign(w - a1 sign(w)), four values ±a1 ± a2;
//   - every other weight is binarised in two groups split at a break point of |w| (BiLLM's bell-shaped split):
//     values {-a_s, -a_c, a_c, a_s}, the break point minimising the squared error.
// GPTQ-style error feedback (OBC, as BiLLM does) carries each column's binarisation error into the columns not
// yet quantized, the number of salient columns is searched per matrix ({1/64, 1/32, 1/16, 1/8} of the columns,
// the least layer-output error wins), and each row's eight values are refitted to its codes by least squares in
// the Hessian norm. Stored as kBiLLM (tensor.h): 2-bit codes and eight f16 values per row, which is what the
// representation costs: 2 + 128 / cols bits per weight (BiLLM's "1.08 bits" leaves out the bit that tells a
// weight's group).
#pragma once

#include <cstdint>
#include <memory>

#include "core/quant/quant_method.h"

namespace qforge::quant {

// Residual binarisation of x[0, n): the four values ±a1 ± a2 in ascending order, a1 = mean |x|, a2 = the mean
// magnitude of x - a1 sign(x).
void ResidualBinaryValues(const double* x, int64_t n, float values[4]);

// Split binarisation of x[0, n): {-a_s, -a_c, a_c, a_s}, |x| cut at the break point (searched over every split
// of the sorted magnitudes) whose two group means give the least squared error.
void SplitBinaryValues(const double* x, int64_t n, float values[4]);

// "billm": NeedsCalibration; group 0 only; damp. Any matrix shape.
std::unique_ptr<QuantMethod> MakeBillmMethod();

}  // namespace qforge::quant
