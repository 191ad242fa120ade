// The kQuip encoding at run time (tensor.h QuipLayout): the header parsed and checked, the incoherence
// factors regenerated from the stored seed, and the products y = P Uᵀ (W' (V (c ⊙ x))) with W' a kQInt
// payload. U mixes all output rows, so unlike every other encoding a row range of W cannot be computed
// from that range of the payload: QuipMatMul takes the whole matrix and splits the inner kQInt product
// over rows itself.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/kernels/orthogonal.h"
#include "core/model/tensor.h"

namespace qforge::kernels {

// The largest Kronecker factor accepted (an n x n Householder QR is O(n^3) at load time). A side whose
// KroneckerSplit leaves a larger factor (e.g. a large prime) cannot be kQuip; the quantizer falls back.
inline constexpr int64_t kQuipMaxFactor = 2048;

struct QuipHeader {
  uint64_t seed = 0;
  int64_t a_out = 1, b_out = 1, a_in = 1, b_in = 1;
  int64_t qk_heads = 0;
};

// Serialises the header into the first QuipLayout::kHeaderBytes of a kQuip tensor's bytes.
void WriteQuipHeader(const QuipHeader& h, uint8_t* bytes);

// A kQuip tensor ready to multiply: checked header, regenerated U and V, the column scales, and the payload
// as a kQInt tensor view (aliasing the tensor's bytes: the tensor must outlive this object).
class QuipTransform {
 public:
  // INVALID_ARGUMENT naming the tensor when the header does not describe its shape, a factor is larger than
  // kQuipMaxFactor, qk_heads does not divide the rows into even heads, or a column scale is not finite.
  static absl::StatusOr<std::shared_ptr<const QuipTransform>> Create(const Tensor& w);

  const QuipHeader& header() const { return header_; }
  const KroneckerOrthogonal& u() const { return u_; }
  const KroneckerOrthogonal& v() const { return v_; }
  const std::vector<float>& col_scales() const { return col_scales_; }
  const Tensor& payload() const { return payload_; }
  int64_t rows() const { return u_.n(); }
  int64_t cols() const { return v_.n(); }

  // xr = V (c ⊙ x), in fp64, rounded to fp32 once. `scratch` holds 3 * cols() doubles.
  void RotateInput(const float* x, float* xr, double* scratch) const;
  // y = P Uᵀ yr. `scratch` holds 3 * rows() doubles.
  void UnrotateOutput(const float* yr, float* y, double* scratch) const;
  // All of W = P Uᵀ W' V diag(c), row-major [rows, cols].
  absl::StatusOr<std::vector<float>> Dequantize() const;

 private:
  QuipHeader header_;
  KroneckerOrthogonal u_, v_;
  std::vector<float> col_scales_;
  std::vector<int64_t> out_src_;  // empty: P = I; else output row r is row out_src_[r] of Uᵀ W' V diag(c)
  Tensor payload_;
};

// y[t * y_stride + r] = (W x_t)[r] for every row r and token t < n: x_t rotated per token (so a token's
// result never depends on the others in the call), the kQInt product split over `pool` (may be null) by rows,
// the output unrotated per token.
absl::Status QuipMatMul(const QuipTransform& q, const float* x, int64_t n, float* y, int64_t y_stride,
                        ThreadPool* pool);

// kernels::DequantizeRows / MatMulRows for kQuip: they rebuild the transform and compute every row, then
// keep [row_begin, row_end). Correct for any caller, but O(whole matrix) per call; hot paths (the runtime)
// keep a QuipTransform and call QuipMatMul.
absl::Status QuipDequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out);
absl::Status QuipMatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                            int64_t y_stride);

}  // namespace qforge::kernels
