// Hot numeric kernels over encoded weight matrices: dequantization and matrix products that
// dequantize inside the dot product. Every SIMD path (AVX2, AVX-512) has the scalar reference beside
// it and a test that they agree; the ISA is picked once at run time by CPUID (never -march).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "core/model/tensor.h"

namespace qforge::kernels {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU supports (AVX2 requires FMA and F16C too).
Isa DetectIsa();
// The ISA the kernels use now: DetectIsa() unless overridden. Tests force each ISA to compare paths.
Isa ActiveIsa();
// Forces an ISA (clamped to what the CPU supports); returns the ISA now active.
Isa SetIsa(Isa isa);
const char* IsaName(Isa isa);

// Decodes rows [row_begin, row_end) of the 2-D tensor `w` (shape [rows, cols], any WeightFormat)
// into out[(r - row_begin) * cols + c] as fp32.
absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out);

// For rows r in [row_begin, row_end) of w and tokens t in [0, n):
//   y[t * y_stride + r] = sum_c W[r, c] * x[t * cols + c]
// W is decoded block by block inside the dot product (no full-row fp32 copy for quantized types).
// kW8A8 is the exception: each token's x is quantized to int8 (per token, s_x = max|x|/127, round half to
// even) and y = s_x * scale_r * (integer dot), so y carries activation quantization error (tensor.h).
// Single-threaded: the caller splits rows across threads.
absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n,
                        float* y, int64_t y_stride);

}  // namespace qforge::kernels
