// Hot numeric kernels over encoded weight matrices: dequantization and matrix products that
// dequantize inside the dot product. Every SIMD path (AVX2, AVX-512) has the scalar reference beside
// it and a test that they agree; the ISA is picked once at run time by CPUID (never -march).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "core/model/tensor.h"

namespace qforge::kernels {

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The best ISA this CPU supports (AVX2 requires FMA and F16C too).
Isa DetectIsa();
// The ISA the kernels use now: DetectIsa() unless overridden. Tests force each ISA to compare paths.
Isa ActiveIsa();
// Forces an ISA (clamped to what the CPU supports) for every kernel family; returns the ISA now active.
Isa SetIsa(Isa isa);

// The ISA a kernel family runs on: ActiveIsa(), except that on an AVX-512 CPU whose ISA nobody pinned (SetIsa,
// QFORGE_ISA) the integer kernels, which give identical bits on both, run the faster of their AVX-512 and AVX2
// code, measured at first use, for decode and prompts separately. The float family (dequantize-in-the-dot
// formats) is not measured: its bits differ between the ISAs, and a measured choice could differ between two
// processes (a worker and the job run in one process) on one machine.
enum class KernelFamily { kFloatDot, kIntDecode, kIntPrompt };
Isa IsaFor(KernelFamily family);
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

// How a matmul treats its activations. kInt8 (llama.cpp's way, the default) quantizes each token's x once per
// matmul into 8-bit blocks for the weight formats with an integer kernel (HasIntegerKernel: Q8_0, Q4_0 with
// 32-column Q8_0 blocks; Q4_K, and qmoe rows of a multiple of 256 columns, with 256-column Q8_K blocks, qmoe.h) and
// sums the products in integers (int_dot.h has the exact numerics); every other format, and kFloat for all of them,
// multiplies fp32 activations (the reference mode: no activation error).
enum class ActivationMode { kFloat, kInt8 };

// Whether `t` has an integer dot kernel (and so takes quantized activations in ActivationMode::kInt8).
bool HasIntegerKernel(WeightType t);

// The activations of one matmul (n token rows of cols floats), prepared once by PrepareInput and then shared by
// every row range of the product, on any thread. Holds a pointer to x: x must outlive it. Reusable: a second
// PrepareInput keeps the buffer's memory.
class MatMulInput {
 public:
  const float* x() const { return x_; }
  int64_t n() const { return n_; }
  int64_t cols() const { return cols_; }
  bool quantized() const { return act_type_ != 0; }

 private:
  friend absl::Status PrepareInput(const Tensor&, const float*, int64_t, ActivationMode, MatMulInput*, bool);
  friend absl::Status MatMulRows(const Tensor&, int64_t, int64_t, const MatMulInput&, float*, int64_t);
  const float* x_ = nullptr;
  int64_t n_ = 0, cols_ = 0;
  uint8_t act_type_ = 0;  // internal::ActType
  size_t row_bytes_ = 0;
  std::vector<uint8_t> buffer_;
};

// Prepares x (n rows of w.cols() floats) for products with `w` in `mode` (quantizing it when w has an integer
// kernel and mode is kInt8). With x_unchanged (the caller's promise that x holds what `in` was last prepared
// from), an input already prepared from x for the same columns and activation type is kept as it is: q, k and v
// (gate and up) read one input.
absl::Status PrepareInput(const Tensor& w, const float* x, int64_t n, ActivationMode mode, MatMulInput* in,
                          bool x_unchanged = false);

// MatMulRows over a prepared input: y[t * y_stride + r] for rows [row_begin, row_end) and its n tokens.
absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const MatMulInput& in, float* y,
                        int64_t y_stride);

// The quantize report's reconstruction error of one row: *err = sum (ref - row)², *norm = sum ref², in double with
// eight partial sums (column c into lane c % 8) combined in one fixed order, so the result is the same on every
// ISA (AVX2 where the kernels run it) and for any split of the rows between threads.
void RowErrorSums(const float* ref, const float* row, int64_t cols, double* err, double* norm);
void RowErrorSumsScalar(const float* ref, const float* row, int64_t cols, double* err, double* norm);

}  // namespace qforge::kernels
