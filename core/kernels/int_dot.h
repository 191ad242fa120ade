// Integer dot products: activations quantized once per matmul into 8-bit blocks, weights kept in their ggml
// block layouts, each (row, token) product summed in integers per block. Internal to core/kernels.
//
// Numerics (every ISA computes exactly these bits, so SIMD paths equal the scalar reference):
//   Activations of one token: 8-bit codes a[c], a scale per activation block (32 columns for kQ8_0, 256 for
//   kQ8_K) and the exact integer sum of the codes of every 32 columns (sum32).
//     kQ8_0 (ggml's x86 quantize_row_q8_0): m = max|x| over the block; d = fp16(m / 127) read back as fp32;
//           a = round-half-even(x * (m ? 127 / m : 0)).
//     kQ8_K (ggml's quantize_row_q8_K): v = the x of largest |x| (the first on ties); s = -127 / v;
//           a = min(127, round-half-even(s * x)); d = 1 / s; all zero for an all-zero block.
//   Weights of row r are read in their blocks; for each weight block b (32 columns for Q8_0 / Q4_0, a
//   256-column super-block for Q4_K) the kernel forms exact integers and adds them to one fp32 accumulator per
//   (row, token), in block order, starting from 0:
//     Q8_0: acc = fma(dw * dx, float(sum_c q[c] a[c]), acc)                          (dw = fp16 block scale)
//     Q4_0: acc = fma(dw * dx, float(sum_c q[c] a[c] - 8 * sum32), acc)               (q = the 4-bit code)
//     Q4_K: with sc_j, m_j the 6-bit scale and min of sub-block j (32 columns) and D = d * dx, M = -(dmin * dx),
//           T1 = sum_j sc_j * sum_{c in j} q[c] a[c], T2 = sum_j m_j * sum32_j:
//           acc = fma(M, float(T2), fma(D, float(T1), acc))
//   The integers are exact in int32 for every valid input; their conversions to float round to nearest.
//   Each (row, token) result depends on nothing else in the call: batching and tiling change no bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/kernels/blocks.h"
#include "core/kernels/kernels.h"

namespace qforge::kernels::internal {

enum class ActType : uint8_t { kNone = 0, kQ8_0 = 1, kQ8_K = 2 };
// Columns per activation scale.
inline constexpr int ActBlock(ActType t) { return t == ActType::kQ8_K ? kQK_K : kQK8_0; }

// One token's quantized activations: cols int8 codes, then cols / ActBlock float scales, then cols / 32 int32
// sums, each part 32-byte aligned within the row (rows are ActRowBytes apart).
struct ActRowLayout {
  size_t codes, scales, sums, bytes;
};
ActRowLayout GetActRowLayout(ActType t, int64_t cols);

// Quantizes one token row x[0, cols) (cols a multiple of ActBlock(t)) into `row` (ActRowLayout's bytes).
void QuantizeActScalar(ActType t, const float* x, int64_t cols, uint8_t* row);
void QuantizeActAvx2(ActType t, const float* x, int64_t cols, uint8_t* row);

// rows [r0, r1) of the weight view times n token rows of quantized activations (act, act_row_bytes apart):
// y[t * y_stride + r]. The weight's type must have an integer kernel (HasIntDot).
struct ActView {
  ActType type = ActType::kNone;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
  ActRowLayout layout{};
};
struct WeightView;
void IntMatMulScalar(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                     int64_t y_stride);
void IntMatMulAvx2(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                   int64_t y_stride);
// AVX-512 VL + VNNI (vpdpbusd) on 256-bit vectors: the same integers in fewer instructions.
void IntMatMulAvx512(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                     int64_t y_stride);
// Whether this CPU has AVX512-VNNI (IntMatMulAvx512 needs it on top of the AVX-512 set kernels.cc checks).
bool HasAvx512Vnni();

}  // namespace qforge::kernels::internal
