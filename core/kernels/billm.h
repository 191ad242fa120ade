// The kBiLLM encoding at run time (tensor.h BillmLayout): 2-bit codes into eight values per row, four for the
// ordinary columns and four for the salient ones. Rows are decoded kTileRows at a time into fp32 and multiplied
// by the fp32 kernels (scalar, AVX2, AVX-512 as kernels.h picks), so the numerics are those of an f32 matrix
// holding the decoded values: batch-invariant like them. The decoder is scalar: every byte pattern decodes.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/tensor.h"

namespace qforge::kernels::billm {

inline constexpr int64_t kTileRows = 16;

// Packs codes [rows, cols] (0..3), codebooks [rows, 8] f16 and salient [cols] (0 / 1) into a kBiLLM tensor's
// bytes. INVALID_ARGUMENT for a code above 3.
absl::StatusOr<std::vector<uint8_t>> Encode(const uint8_t* codes, const uint16_t* codebooks,
                                            const uint8_t* salient, int64_t rows, int64_t cols);

// kernels::DequantizeRows / MatMulRows for kBiLLM.
absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out);
absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride);

}  // namespace qforge::kernels::billm
