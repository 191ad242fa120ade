// Internal plumbing between the dispatcher (kernels.cc) and the per-ISA kernel files. Not a public API.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "core/kernels/blocks.h"
#include "core/kernels/ggml_kernels.h"
#include "core/model/tensor.h"

namespace qforge::kernels::internal {

// A validated 2-D view of an encoded weight matrix with its layout resolved once per call.
struct WeightView {
  WeightFormat format;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;  // float and ggml types: bytes of one encoded row
  // The ggml types (floats included): the type's kernels and block shape, from the two tables
  // (ggml_kernels.h, core/model/ggml_types.h); nullptr / 0 for qforge's own encodings.
  const GgmlKernelTraits* ggml = nullptr;
  int block = 0;        // elements per block
  int block_bytes = 0;  // bytes per block
  QIntLayout qint{};
  Nf4Layout nf4{};
  SpqrLayout spqr{};
  W8A8Layout w8a8{};
};

absl::StatusOr<WeightView> MakeView(const Tensor& w);

// The block holding column c0 of row r of a ggml-type view (c0 a multiple of the block).
inline const uint8_t* GgmlBlocksAt(const WeightView& v, int64_t r, int64_t c0) {
  return v.data + static_cast<size_t>(r) * v.row_bytes + static_cast<size_t>(c0 / v.block) * v.block_bytes;
}

// Columns decoded per step of a matmul: a multiple of every block size (32, 256) and of the SIMD
// widths, small enough that the decoded chunk stays in L1 while all tokens consume it.
inline constexpr int64_t kChunk = 256;

// NF4 per-block scale (absmax), resolving double quantization.
inline float Nf4BlockScale(const WeightView& v, int64_t block) {
  const uint8_t* base = v.data;
  if (!v.format.double_quant) return LoadF32(base + v.nf4.absmax_offset + 4 * block);
  const int8_t q = static_cast<int8_t>(base[v.nf4.absmax_offset + block]);
  const float scale = LoadF32(base + v.nf4.dq_scale_offset + 4 * (block / kNf4DoubleQuantGroup));
  const float offset = LoadF32(base + v.nf4.dq_offset_offset);
  return scale * static_cast<float>(q) + offset;
}

// Scalar reference: decodes elements [c0, c0 + len) of row r into out. For the ggml block types c0 and len are
// multiples of the block (32 or 256); other formats take any range.
void DecodeScalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);

// kSpQR scalar reference (kernels_spqr.cc), any range: the dense part plus the row's outliers in [c0, c0 + len).
// Every ISA decodes spqr with it; the SIMD dot products consume its chunks.
void DecodeSpqrScalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);
// DATA_LOSS unless the CSR row pointers and column indices of rows [r0, r1) are in bounds.
absl::Status CheckSpqrRows(const WeightView& v, int64_t r0, int64_t r1);

// Reference matmul (the kScalar path): decodes each row once, accumulates every token in double.
void MatMulScalar(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                  int64_t y_stride);

// SIMD paths. Decoders produce exactly the scalar reference's floats (same operations, no FMA), so only
// the dot products' summation order differs between ISAs.
// The ggml types decode through their row of the table: its ISA slot where filled, else the next one down
// (AVX-512 -> AVX2 -> scalar), the same floats on every path.
void DecodeAvx2(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);
void MatMulAvx2(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                int64_t y_stride);
void DecodeAvx512(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);
void MatMulAvx512(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                  int64_t y_stride);

// The SIMD block decoders that fill the ISA slots of the ggml table (ggml_kernels.cc); defined in
// kernels_avx2.cc / kernels_avx512.cc, only called once CPUID allows.
void DequantizeF16Avx2(const uint8_t* b, int64_t n, float* out);
void DequantizeBF16Avx2(const uint8_t* b, int64_t n, float* out);
void DequantizeQ8_0Avx2(const uint8_t* b, int64_t nblocks, float* out);
// RowErrorSums's eight lanes in two vectors of four doubles: the scalar reference's operations lane by lane, so its
// lane sums; the tail and the final combination are left to the caller.
void RowErrorLanesAvx2(const float* ref, const float* row, int64_t blocks, double* e, double* n);
void DequantizeQ4_0Avx2(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ4_KAvx2(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ8_0Avx512(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ4_0Avx512(const uint8_t* b, int64_t nblocks, float* out);
void DequantizeQ4_KAvx512(const uint8_t* b, int64_t nblocks, float* out);

// W8A8 (kernels_w8a8.cc). The matmuls quantize each token's x to int8 (per token, symmetric) and sum in int32,
// so they do not compute sum W·x in floats like the paths above; MatMulRows routes kW8A8 here on every ISA,
// AVX-512 CPUs taking the AVX2 code. Decoders give w = scale_r * code, the same floats on both paths.
void DecodeW8A8Scalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);
void DecodeW8A8Avx2(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out);
void MatMulW8A8Scalar(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                      int64_t y_stride);
void MatMulW8A8Avx2(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                    int64_t y_stride);

}  // namespace qforge::kernels::internal
