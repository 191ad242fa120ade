// Hot encoders: turn fp32 rows into qforge's own byte layouts of core/model/tensor.h (qint, nf4). Pure functions over
// caller-provided buffers; the registry (quant_method.h) and model plumbing live elsewhere.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/kernels/ggml_kernels.h"
#include "core/model/tensor.h"

namespace qforge::quant {

// The ggml encoders live beside the decoders in core/kernels (ggml_kernels.h: the type table's quantize column);
// the names are kept here for core/quant's callers.
using kernels::PackScaleMinK4;
using kernels::QuantizeRowIQ4_NL;
using kernels::QuantizeRowIQ4_XS;
using kernels::QuantizeRowQ2_K;
using kernels::QuantizeRowQ3_K;
using kernels::QuantizeRowQ4_0;
using kernels::QuantizeRowQ4_1;
using kernels::QuantizeRowQ4_K;
using kernels::QuantizeRowQ5_0;
using kernels::QuantizeRowQ5_1;
using kernels::QuantizeRowQ5_K;
using kernels::QuantizeRowQ6_K;
using kernels::QuantizeRowQ8_0;
using kernels::QuantizeRowQ8_0Scalar;

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
  // Subtracted from every level (ggml's K-quants with a min, d * sc * q - dmin * m); 0 for the kQInt grids.
  float offset = 0;
};
QIntGrid ChooseQIntGrid(const float* x, int64_t n, int bits, bool symmetric);
// The code nearest to w on the grid (round half to even), clamped to [0, max_code]; `zero` when the scale is 0.
// A negative scale is a mirrored grid (ggml's Q4_0 stores d = signed max / -8).
inline int QIntCode(double w, const QIntGrid& g) {
  if (!(std::fabs(g.scale) > 0)) return g.zero;
  if (g.deadzone > 0) return std::fabs(w) <= g.deadzone ? 1 : (w > 0 ? 2 : 0);
  const double q = std::nearbyint((w + static_cast<double>(g.offset)) / static_cast<double>(g.scale)) + g.zero;
  return static_cast<int>(std::clamp(q, 0.0, static_cast<double>(g.max_code)));
}
// What the kernels decode for `code`: scale * (code - zero) - offset.
inline float QIntValue(int code, const QIntGrid& g) {
  return g.scale * static_cast<float>(code - g.zero) - g.offset;
}

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
