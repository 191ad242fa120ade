// Hot encoders: turn fp32 rows into the byte layouts of core/model/tensor.h. Pure functions over
// caller-provided buffers; the registry (quant_method.h) and model plumbing live elsewhere.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/model/tensor.h"

namespace qforge::quant {

// ggml reference encoders for one row of n elements (n a multiple of 32, or 256 for Q4_K), bit-exact
// with ggml's quantize_row_*_ref. `out` receives n/32*34, n/32*18 or n/256*144 bytes.
void QuantizeRowQ8_0(const float* x, int64_t n, uint8_t* out);  // AVX2 where the CPU has it
void QuantizeRowQ8_0Scalar(const float* x, int64_t n, uint8_t* out);  // the reference it equals
void QuantizeRowQ4_0(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ4_K(const float* x, int64_t n, uint8_t* out);
// The rest of the writable ggml types, each bit-exact in intent with ggml's quantize_row_*_ref (what
// llama-quantize writes without an importance matrix; IQ4_NL / IQ4_XS: quantize_iq4_nl / _xs with no weights).
// n is a multiple of 32 (Q4_1, Q5_0, Q5_1, IQ4_NL) or 256 (the K-quants, IQ4_XS). docs/quantizers.md has each
// algorithm and what is verified.
void QuantizeRowQ4_1(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_0(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_1(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ2_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ3_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ6_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowIQ4_NL(const float* x, int64_t n, uint8_t* out);
void QuantizeRowIQ4_XS(const float* x, int64_t n, uint8_t* out);

// The 6-bit scale / min packing of Q4_K and Q5_K (12 bytes for 8 sub-blocks), the inverse of
// kernels::GetScaleMinK4. Sub-blocks must be packed in order j = 0..7 (4..7 OR into bytes 0..7 that 0..3 wrote).
void PackScaleMinK4(int j, uint8_t ls, uint8_t lm, uint8_t* scales);

// Round-to-nearest into the kQInt planar layout: writes row r's codes, f16 scales and (asymmetric) zeros
// at their offsets inside `tensor_bytes`. The codes of row r must be zero on entry (bits are OR-ed in).
//   symmetric : scale = absmax / (2^(bits-1) - 1), code = clamp(round(w/scale), -2^(bits-1), 2^(bits-1)-1) + 2^(bits-1)
//   asymmetric: range [min(w, 0), max(w, 0)], scale = range / (2^bits - 1), zero = clamp(round(-min/scale)),
//               code = clamp(round(w/scale) + zero, 0, 2^bits - 1)
// Codes are computed against the f16-rounded scale so dequantization reproduces them exactly.
void QuantizeRowQInt(const float* x, int64_t r, int64_t cols, const WeightFormat& f, const QIntLayout& l,
                     uint8_t* tensor_bytes);

// The grid of one kQInt group, as QuantizeRowQInt chooses it (RTN's rule above) from n values: the stored
// f16 scale, its float value, and the zero point (2^(bits-1) when symmetric). Methods that pick codes some
// other way (GPTQ) reuse it so that their grid is the one the kernels decode.
struct QIntGrid {
  uint16_t scale_half = 0;
  float scale = 0;
  int zero = 0;
  int max_code = 0;  // 2^bits - 1
  // Ternary grids only (max_code 2, zero 1): when positive, |w| <= deadzone codes to 0 and anything larger to
  // +-scale, a dead zone wider than nearest rounding's scale / 2 (the qmoe method's sparse grid, ternary.h).
  float deadzone = 0;
};
QIntGrid ChooseQIntGrid(const float* x, int64_t n, int bits, bool symmetric);
// The code nearest to w on the grid (round half to even), clamped to [0, max_code].
inline int QIntCode(double w, const QIntGrid& g) {
  if (!(g.scale > 0)) return g.zero;
  if (g.deadzone > 0) return std::fabs(w) <= g.deadzone ? 1 : (w > 0 ? 2 : 0);
  const double q = std::nearbyint(w / static_cast<double>(g.scale)) + g.zero;
  return static_cast<int>(std::clamp(q, 0.0, static_cast<double>(g.max_code)));
}
// What the kernels decode for `code`: scale * (code - zero).
inline float QIntValue(int code, const QIntGrid& g) { return g.scale * static_cast<float>(code - g.zero); }

// Writes a whole kQInt tensor from unpacked codes [rows, cols] (one per byte), f16 scales and zeros
// [rows, groups_per_row] (zeros ignored when symmetric). `tensor_bytes` must be zero-filled, l.total_bytes long.
void PackQInt(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t rows, int64_t cols,
              const WeightFormat& f, const QIntLayout& l, uint8_t* tensor_bytes);

// The NF4 code whose level is nearest to v (v is w / absmax, nominally in [-1, 1]).
int Nf4NearestCode(float v);
// Encodes n elements (n even) of one NF4 block whose first element is at an even index: codes for
// w / scale into n/2 bytes at `codes` (low nibble first). scale == 0 encodes every element as level 0.
void EncodeNf4Block(const float* x, int64_t n, float scale, uint8_t* codes);
// Double quantization of the per-block absmax (QLoRA): offset = mean(absmax); per group of
// kNf4DoubleQuantGroup blocks dq_scale = max|absmax - offset| / 127 and q = round((absmax - offset) / dq_scale).
// Writes q[blocks], dq_scale[ceil(blocks/256)], *dq_offset.
void DoubleQuantizeAbsmax(const float* absmax, int64_t blocks, int8_t* q, float* dq_scale, float* dq_offset);

}  // namespace qforge::quant
