// SpQR (Dettmers et al. 2023, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
// Compression"), Algorithm 1: a GPTQ column pass with small first-level groups (β1 input columns per row) whose
// scales and zeros are themselves quantized to 3 bits in groups of 16 rows, and unstructured outliers — weights
// whose Hessian-weighted rounding error is too large — kept in fp16 in a CSR matrix instead of pushing their error
// onward. Output: the kSpQR layout of core/model/tensor.h. Hot numeric code only: the method class is in
// methods.cc, the formulas the kernels decode with in core/kernels/spqr.h.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/model/tensor.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {

struct SpqrOptions {
  int bits = 3;    // dense codes, 2..4
  int group = 16;  // β1: input columns per first-level (scale, zero); must divide cols
  // τ: a weight is an outlier when its sensitivity ((w - q(w)) / U_jj)² exceeds τ · mean_j(Var_i(W_ij) / U_jj²),
  // the reference implementation's relative rule (W the weights after dead-input zeroing, Var over the output
  // rows, unbiased; U the upper Cholesky factor of the damped inverse Hessian). +inf: no outliers.
  double outlier_threshold = 0.2;
  double percdamp = 0.01;  // λ = percdamp · mean(diag H)
  int block_size = 128;    // lazy-batch width (rounded to a multiple of the group)
  // Splits the per-group statistics fit and the column pass over rows; the bytes never depend on the split.
  ThreadPool* pool = nullptr;
};

struct SpqrResult {
  std::vector<uint8_t> codes;        // [rows, cols], one code per byte
  std::vector<uint8_t> scale_codes;  // [rows, groups] 3-bit first-level scale codes
  std::vector<uint8_t> zero_codes;   // [rows, groups]
  std::vector<uint16_t> second;      // [row_blocks, groups, 4] f16: scale_s, zero_s, scale_z, zero_z
  std::vector<uint32_t> row_ptr;     // [rows + 1]
  std::vector<uint32_t> col_index;   // [nnz], ascending within a row
  std::vector<uint16_t> values;      // [nnz] f16: what the kernels add to the dense decode
  double outlier_scale = 0;          // mean_j(Var_i(W_ij) / U_jj²)
  double threshold = 0;              // τ · outlier_scale, on the sensitivity
};

// w: [rows, cols] row-major; hessian: [cols, cols] symmetric (only read). Dead inputs (H_ii == 0) get zero weights.
// FAILED_PRECONDITION when H + λI is not positive definite; INVALID_ARGUMENT for bad shapes or options.
absl::StatusOr<SpqrResult> SpqrQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                        const SpqrOptions& options);

// The kSpQR bytes of `r` (format: SpQR(bits, group, r.values.size())).
absl::StatusOr<std::vector<uint8_t>> PackSpqr(const SpqrResult& r, int64_t rows, int64_t cols, int bits, int group);

// The outlier count stored in kSpQR bytes of a [rows, cols] matrix (row_ptr[rows]); the dense part's size, hence
// where row_ptr sits, depends only on (bits, group, shape).
absl::StatusOr<int64_t> SpqrStoredOutliers(const uint8_t* bytes, size_t nbytes, int64_t rows, int64_t cols, int bits,
                                           int group);

// The "spqr" method (registered in methods.cc): NeedsCalibration; params bits (2..4, default 3), group (β1,
// default 16), outlier_threshold (τ), damp; always asymmetric; act_order / static_groups are refused. Falls back
// to gptq per-channel at the same bits when the group does not divide a row.
std::unique_ptr<QuantMethod> MakeSpqrMethod();

}  // namespace qforge::quant
