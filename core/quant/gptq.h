// GPTQ / OPTQ (Frantar et al., "OPTQ: Accurate Quantization for Generative Pre-trained Transformers",
// ICLR 2023): quantizes a linear layer's weight columns one at a time, each time spreading the rounding
// error over the not-yet-quantized columns through the inverse Hessian of the layer-output loss
// ||WX - ŴX||², H = 2XᵀX/n. Hot numeric code only: the method class is in methods.cc.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/quant/packing.h"

namespace qforge::quant {

struct GptqOptions {
  int bits = 4;
  int group = 128;         // columns per (scale, zero); 0 = one per row
  bool symmetric = true;
  bool act_order = false;  // quantize columns in order of descending H_ii ("desc_act")
  // Group grids computed on the unpermuted, not yet error-updated weights before the pass ("static_groups").
  // Forced on by act_order with group > 0: only then do the groups stay the contiguous column ranges the kQInt
  // layout stores.
  bool static_groups = false;
  double percdamp = 0.01;  // λ = percdamp * mean(diag H) added to the diagonal
  int block_size = 128;    // lazy-batch width: columns whose updates to the rest are deferred into one GEMM
  // Splits each block's column pass over rows (rows are independent given H); the bytes never depend on the
  // split. The Cholesky factorisations and the lazy-batch GEMM are OpenBLAS's, threaded by OpenBLAS itself.
  ThreadPool* pool = nullptr;
  // The grid of one group (or row) from its current weights; nullptr: ChooseQIntGrid, the kQInt grid of `bits`
  // and `symmetric`. The ternary method passes its {-s, 0, +s} grid (ternary.h).
  std::function<QIntGrid(const float* x, int64_t n)> choose_grid;
  // Grids finer than the group, fit together (ggml's K-quants: a group is a 256-column super-block whose one
  // header stores a grid per 16 or 32 columns). When set it replaces choose_grid: called with the row, the group's
  // index, its current weights x[n] and each of its columns' importance, it fills grids[n / subgroup], the grid of
  // column c being grids[c / subgroup]. The importance of column j is 1 / [H_F⁻¹]_jj over the columns F not yet
  // quantized when the group comes up, the weight of that column's squared rounding error in the layer-output loss
  // once the feedback has spread it (with static groups, before any feedback: H_jj). Calls for distinct rows may
  // run at once on several threads.
  int subgroup = 0;
  std::function<void(int64_t row, int64_t group, const float* x, const float* importance, int64_t n, QIntGrid* grids)>
      choose_subgroup_grids;
};

// The result in kQInt terms, columns in their original order.
struct GptqResult {
  std::vector<uint8_t> codes;    // [rows, cols], one code per byte
  std::vector<uint16_t> scales;  // [rows, groups] f16 (0 with choose_subgroup_grids: the caller keeps its headers)
  std::vector<uint8_t> zeros;    // [rows, groups]
};

// w: [rows, cols] row-major; hessian: [cols, cols] row-major symmetric (only read). Dead inputs (H_ii == 0)
// get H_ii = 1 and zero weights. FAILED_PRECONDITION when H + λI is not positive definite (e.g. percdamp 0
// with a singular H); INVALID_ARGUMENT for bad shapes or options.
absl::StatusOr<GptqResult> GptqQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                        const GptqOptions& options);

// Replaces the symmetric positive definite h [n, n] (row-major) by the upper Cholesky factor U of h⁻¹
// (h⁻¹ = UᵀU), lower triangle zeroed: row j of U over U_jj is the column-j update of GPTQ-style error feedback
// (also SpQR's and QuIP's). FAILED_PRECONDITION, prefixed by `method`, when h is not positive definite.
absl::Status UpperCholeskyOfInverse(std::vector<double>& h, int64_t n, const char* method);

// The column order act-order uses: by descending H_ii, ties by ascending index.
std::vector<int64_t> ActOrderPermutation(const double* hessian, int64_t cols);

// Layer-output error terms for inputs with second moment H = 2XᵀX/n: *err = tr((W - Ŵ) H (W - Ŵ)ᵀ) and
// *ref = tr(W H Wᵀ) (both 2/n times a squared Frobenius norm of a product with X).
void LayerOutputError(const float* w, const float* w_hat, int64_t rows, int64_t cols, const double* hessian,
                      double* err, double* ref);

}  // namespace qforge::quant
