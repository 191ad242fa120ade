// The kernels of the ggml tensor types: one row per row of core/model/ggml_types.h (the layout facts: ggml id,
// name, block size and bytes), holding the functions that decode and encode a run of blocks. The
// scalar dequantizer of each type is the definition of what its bytes mean (bit-exact with ggml's
// dequantize_row_*); the ISA slots hold SIMD decoders that give the same floats, and are empty (nullptr) where
// none exists yet: DecodeAvx2 then runs the scalar one, DecodeAvx512 the AVX2 one or else the scalar one.
//
// DecodeScalar / DecodeAvx2 / DecodeAvx512 (kernels_internal.h) decode every ggml type through this table, so
// a new type needs no case in them: one row in ggml_types.cc, one here (ggml_kernels.cc), and its dequantize
// function (ggml_dequant.cc); to write it too, its encoder (ggml_quantize.cc) in the row's quantize slot and one
// registry line in core/quant/methods.cc. Its matmul is then the float path (decode a span, fp32 dot products) on every
// ISA; integer dot kernels are per type (int_dot.h).
#pragma once

#include <cstdint>
#include <span>

#include "core/model/tensor.h"

namespace qforge::kernels {

// Decodes `nblocks` consecutive blocks at `blocks` into nblocks * block floats.
using DequantizeBlocksFn = void (*)(const uint8_t* blocks, int64_t nblocks, float* out);
// Encodes n floats (a multiple of the block) into n / block blocks.
using QuantizeBlocksFn = void (*)(const float* x, int64_t n, uint8_t* out);

// One sub-block's grid as a K-quant super-block header stores it: weight = scale * (code - zero) - offset, codes
// 0..max_code (Q4_K: d * sc * q - dmin * m; Q3_K: d * (sc - 32) * (q - 4)).
struct SubBlockGrid {
  float scale = 0;
  float offset = 0;
  int zero = 0;
  int max_code = 0;
};
// The importance-weighted encoding of one 256-weight K-quant super-block, in two halves so that error feedback
// (GPTQ) can choose the codes between them. FitHeaderFn fits the header (d, dmin, sub-block scales) to x[256] with
// a non-negative importance per weight (llama.cpp's imatrix idea: how much that weight's squared error costs, e.g.
// its input column's mean square over calibration tokens), writes it into `block` and returns the grids it stores,
// grids[256 / sub_block]. SetCodesFn writes 256 codes (0..max_code, element order) into the block's code bytes.
using FitHeaderFn = void (*)(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
// The importance-weighted encoding of a whole row of n weights (a multiple of the block), for the types whose fit
// looks at the row (Q4_0: the weights' sigma² is the row's mean square).
using QuantizeRowWeightedFn = void (*)(const float* x, const float* importance, int64_t n, uint8_t* out);
using SetCodesFn = void (*)(const uint8_t* codes, uint8_t* block);

struct GgmlKernelTraits {
  WeightType type;
  DequantizeBlocksFn dequantize;         // scalar reference, never null
  DequantizeBlocksFn dequantize_avx2;    // the same floats with AVX2 + F16C; nullptr: none yet
  DequantizeBlocksFn dequantize_avx512;  // the same floats with AVX-512; nullptr: none yet
  // The encoder into this type (ggml_quantize.cc), bit-exact with ggml's reference quantizer: what llama-quantize
  // writes without an importance matrix. nullptr where qforge writes the type some other way (tq1_0 / tq2_0: the
  // ternary methods' own grids) or not at all. core/quant's GgmlBlockMethod takes it from here.
  QuantizeBlocksFn quantize;
  // Importance-weighted encoding (the K-quants; 0 / nullptr elsewhere): weights per sub-block grid and the two
  // halves above. QuantizeRowWeighted is llama-quantize --imatrix's job; core/quant's gptq_<type> methods put
  // GPTQ's error feedback between fit_header and set_codes.
  int sub_block = 0;
  FitHeaderFn fit_header = nullptr;
  SetCodesFn set_codes = nullptr;
  // Importance-weighted encoding of the other types, as llama-quantize --imatrix writes them (q4_0, q4_1, q5_0,
  // q5_1, q8_0, iq4_nl, iq4_xs; nullptr: no encoder).
  QuantizeRowWeightedFn quantize_weighted = nullptr;
};

// Every row, in the order of GgmlTypes().
std::span<const GgmlKernelTraits> GgmlKernelTable();
// The row of `t`; nullptr for qforge's own encodings.
const GgmlKernelTraits* FindGgmlKernels(WeightType t);

// The encoders (ggml_quantize.cc) for one row of n elements, n a multiple of the block (32, or 256 for the K-quants
// and IQ4_XS), into n / block blocks at `out`; each follows ggml's quantize_row_*_ref (IQ4_NL / IQ4_XS:
// quantize_iq4_nl / _xs with no importance weights) in ggml's float order, and the library is built without FMA
// contraction, so the bytes equal ggml's (scripts/check-ggml-reference.sh compares them).
void QuantizeRowQ8_0(const float* x, int64_t n, uint8_t* out);        // AVX2 where the CPU has it
void QuantizeRowQ8_0Scalar(const float* x, int64_t n, uint8_t* out);  // the reference it equals
void QuantizeRowQ4_0(const float* x, int64_t n, uint8_t* out);
// Q4_0 / Q5_0 with importance[n] (ggml's quantize_row_q4_0_impl / q5_0_impl): each block's symmetric 16- / 32-level
// fit weighted by importance * sqrt(sigma² + x²), sigma² the row's mean square.
void QuantizeRowWeightedQ4_0(const float* x, const float* importance, int64_t n, uint8_t* out);
void QuantizeRowWeightedQ5_0(const float* x, const float* importance, int64_t n, uint8_t* out);
// Q8_0: the plain bytes (ggml's Q8_0 encoder takes no importance, so llama-quantize --imatrix writes those too).
void QuantizeRowWeightedQ8_0(const float* x, const float* importance, int64_t n, uint8_t* out);
// Q4_1 / Q5_1 (quantize_row_q4_1_impl / q5_1_impl): each block's min-and-scale fit with the same weights.
void QuantizeRowWeightedQ4_1(const float* x, const float* importance, int64_t n, uint8_t* out);
void QuantizeRowWeightedQ5_1(const float* x, const float* importance, int64_t n, uint8_t* out);
// IQ4_NL / IQ4_XS (quantize_iq4_nl / _xs with quant_weights): QuantizeRowIQ4_NL / _XS's fit weighted by
// importance * sqrt(sigma² + x²), sigma² twice the (super-)block's mean square.
void QuantizeRowWeightedIQ4_NL(const float* x, const float* importance, int64_t n, uint8_t* out);
void QuantizeRowWeightedIQ4_XS(const float* x, const float* importance, int64_t n, uint8_t* out);
void QuantizeRowQ4_1(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_0(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_1(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ2_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ3_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ4_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ5_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowQ6_K(const float* x, int64_t n, uint8_t* out);
void QuantizeRowIQ4_NL(const float* x, int64_t n, uint8_t* out);
void QuantizeRowIQ4_XS(const float* x, int64_t n, uint8_t* out);
// The importance-weighted halves of the K-quants (GgmlKernelTraits::fit_header / set_codes), ggml_quantize.cc.
// The fits follow llama.cpp's quantize_row_*_impl with quant_weights in its float order (not checked bit-exact).
void FitHeaderQ2_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
void FitHeaderQ3_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
void FitHeaderQ4_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
void FitHeaderQ5_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
void FitHeaderQ6_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids);
void SetCodesQ2_K(const uint8_t* codes, uint8_t* block);
void SetCodesQ3_K(const uint8_t* codes, uint8_t* block);
void SetCodesQ4_K(const uint8_t* codes, uint8_t* block);
void SetCodesQ5_K(const uint8_t* codes, uint8_t* block);
void SetCodesQ6_K(const uint8_t* codes, uint8_t* block);
// The code of x nearest its grid, clamp(round_half_even((x + offset) / scale) + zero, 0, max_code); zero when the
// grid's scale is 0 (every code decodes to -offset then).
int SubBlockGridCode(float x, const SubBlockGrid& g);
// Whether k's type has an importance-weighted encoding (a quantize_weighted row, or the K-quants' header fit).
inline bool HasWeightedEncoding(const GgmlKernelTraits& k) {
  return k.quantize_weighted != nullptr || k.fit_header != nullptr;
}
// One row of n weights with importance[n] into k's blocks (HasWeightedEncoding(k)): k.quantize_weighted where the
// type has one; else, the K-quants (n a multiple of 256), each super-block's header fit, then every weight's nearest
// code on its sub-block's grid.
void QuantizeRowWeighted(const GgmlKernelTraits& k, const float* x, const float* importance, int64_t n, uint8_t* out);
// The signed value of largest magnitude among n (the first one on ties); 0 when all are 0. Q4_0's d is it / -8.
float SignedAbsMax(const float* x, int n);
// The 6-bit scale / min packing of Q4_K and Q5_K (12 bytes for 8 sub-blocks), the inverse of GetScaleMinK4
// (blocks.h). Sub-blocks must be packed in order j = 0..7 (4..7 OR into bytes 0..7 that 0..3 wrote).
void PackScaleMinK4(int j, uint8_t ls, uint8_t lm, uint8_t* scales);

// The scalar dequantizers (ggml_dequant.cc): the reference for each type's bytes.
void DequantizeF32(const uint8_t* b, int64_t n, float* out);
void DequantizeF16(const uint8_t* b, int64_t n, float* out);
void DequantizeBF16(const uint8_t* b, int64_t n, float* out);
void DequantizeQ4_0(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ4_1(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ5_0(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ5_1(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ8_0(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ2_K(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ3_K(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ4_K(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ5_K(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ6_K(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ4_NL(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ4_XS(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeTQ1_0(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeTQ2_0(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ2_XXS(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ2_XS(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ2_S(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ3_XXS(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ3_S(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ1_S(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeIQ1_M(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeMXFP4(const uint8_t* b, int64_t nblocks, float* out);

}  // namespace qforge::kernels
