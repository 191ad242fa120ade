// Hot encoders: turn fp32 rows into the byte layouts of core/model/tensor.h. Pure functions over
// caller-provided buffers; the registry (quant_method.h) and model plumbing live elsewhere.
#pragma once

#include <cstdint>

#include "core/model/tensor.h"

namespace qforge::quant {

// ggml reference encoders for one row of n elements (n a multiple of 32, or 256 for Q4_K), bit-exact
// with ggml's quantize_row_*_ref. `out` receives n/32*34, n/32*18 or n/256*144 bytes.
void QuantizeRowQ8_0(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ4_0(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ4_K(const float* x, int64_t n, uint8_t* out);

// Round-to-nearest into the kQInt planar layout: writes row r's codes, f16 scales and (asymmetric) zeros
// at their offsets inside `tensor_bytes`. The codes of row r must be zero on entry (bits are OR-ed in).
//   symmetric : scale = absmax / (2^(bits-1) - 1), code = clamp(round(w/scale), -2^(bits-1), 2^(bits-1)-1) + 2^(bits-1)
//   asymmetric: range [min(w, 0), max(w, 0)], scale = range / (2^bits - 1), zero = clamp(round(-min/scale)),
//               code = clamp(round(w/scale) + zero, 0, 2^bits - 1)
// Codes are computed against the f16-rounded scale so dequantization reproduces them exactly.
void QuantizeRowQInt(const float* x, int64_t r, int64_t cols, const WeightFormat& f, const QIntLayout& l,
                     uint8_t* tensor_bytes);

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
