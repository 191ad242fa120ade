// The kernels of the ggml tensor types: one row per row of core/model/ggml_types.h (the layout facts: ggml id,
// name, block size and bytes), holding the functions that decode (and later encode) a run of blocks. The
// scalar dequantizer of each type is the definition of what its bytes mean (bit-exact with ggml's
// dequantize_row_*); the ISA slots hold SIMD decoders that give the same floats, and are empty (nullptr) where
// none exists yet: DecodeAvx2 then runs the scalar one, DecodeAvx512 the AVX2 one or else the scalar one.
//
// DecodeScalar / DecodeAvx2 / DecodeAvx512 (kernels_internal.h) decode every ggml type through this table, so
// a new type needs no case in them: one row in ggml_types.cc, one here (ggml_kernels.cc), and its dequantize
// function (ggml_dequant.cc). Its matmul is then the float path (decode a span, fp32 dot products) on every
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

struct GgmlKernelTraits {
  WeightType type;
  DequantizeBlocksFn dequantize;         // scalar reference, never null
  DequantizeBlocksFn dequantize_avx2;    // the same floats with AVX2 + F16C; nullptr: none yet
  DequantizeBlocksFn dequantize_avx512;  // the same floats with AVX-512; nullptr: none yet
  // An encoder for this type, for later work: nullptr for every type today (the Q8_0 / Q4_0 / Q4_K encoders
  // are core/quant's, packing.h).
  QuantizeBlocksFn quantize;
};

// Every row, in the order of GgmlTypes().
std::span<const GgmlKernelTraits> GgmlKernelTable();
// The row of `t`; nullptr for qforge's own encodings.
const GgmlKernelTraits* FindGgmlKernels(WeightType t);

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
