#include "core/quant/gptq.h"

#include <cblas.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "core/quant/packing.h"

namespace qforge::quant {

std::vector<int64_t> ActOrderPermutation(const double* hessian, int64_t cols) {
  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(),
                   [&](int64_t a, int64_t b) { return hessian[a * cols + a] > hessian[b * cols + b]; });
  return perm;
}

// Row j of U, divided by U_jj, is row j of the inverse Hessian restricted to the columns >= j, divided by its
// diagonal: exactly what the column-j update needs, for every j at once.
absl::Status UpperCholeskyOfInverse(std::vector<double>& h, int64_t n, const char* method) {
  const int ni = static_cast<int>(n);
  int info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', ni, h.data(), ni);
  if (info != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(method, ": the damped Hessian is not positive definite (potrf info ", info,
                     "); raise the damping or use more calibration tokens"));
  }
  info = LAPACKE_dpotri(LAPACK_ROW_MAJOR, 'U', ni, h.data(), ni);
  if (info != 0) {
    return absl::FailedPreconditionError(absl::StrCat(method, ": Hessian inversion failed (potri info ", info, ")"));
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) h[i * n + j] = h[j * n + i];
  }
  info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', ni, h.data(), ni);
  if (info != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(method, ": the inverse Hessian is numerically not positive definite (potrf info ", info,
                     "); raise the damping"));
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < i; ++j) h[i * n + j] = 0.0;
  }
  return absl::OkStatus();
}


absl::StatusOr<GptqResult> GptqQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                        const GptqOptions& o) {
  if (rows <= 0 || cols <= 0) return absl::InvalidArgumentError("gptq: empty matrix");
  if (o.bits < 2 || o.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat("gptq: bits must be 2..8, got ", o.bits));
  }
  const int64_t g = o.group > 0 ? o.group : cols;
  if (o.group < 0 || cols % g != 0) {
    return absl::InvalidArgumentError(absl::StrCat("gptq: group ", o.group, " does not divide ", cols, " columns"));
  }
  if (o.percdamp < 0 || o.block_size <= 0) return absl::InvalidArgumentError("gptq: percdamp < 0 or block_size <= 0");
  const int64_t groups = cols / g;
  const bool static_groups = o.group > 0 && (o.static_groups || o.act_order);
  const bool subgroups = static_cast<bool>(o.choose_subgroup_grids);
  const int64_t sub = subgroups ? o.subgroup : g;  // columns per grid
  if (subgroups && (o.group <= 0 || o.subgroup <= 0 || g % o.subgroup != 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("gptq: subgroup ", o.subgroup, " does not divide the group ", o.group));
  }
  const int64_t grids_per_group = g / sub;

  std::vector<double> W(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows * cols; ++i) W[i] = w[i];
  std::vector<double> H(hessian, hessian + cols * cols);

  // Inputs that never fire carry no information: any value is as good, zero is the cheapest.
  for (int64_t i = 0; i < cols; ++i) {
    if (H[i * cols + i] == 0.0) {
      H[i * cols + i] = 1.0;
      for (int64_t r = 0; r < rows; ++r) W[r * cols + i] = 0.0;
    }
  }

  GptqResult res;
  res.codes.assign(static_cast<size_t>(rows * cols), 0);
  res.scales.assign(static_cast<size_t>(rows * groups), 0);
  res.zeros.assign(static_cast<size_t>(rows * groups), 0);
  // grid[(r * groups + k) * grids_per_group + c / sub]: the grid of column c of group k in row r.
  std::vector<QIntGrid> grid(static_cast<size_t>(rows * groups * grids_per_group));
  // What choose_subgroup_grids weighs each column by (the header comment says why); filled before it is called.
  std::vector<float> importance(subgroups ? static_cast<size_t>(cols) : 0);
  if (subgroups && static_groups) {
    for (int64_t i = 0; i < cols; ++i) importance[i] = static_cast<float>(H[i * cols + i]);
  }
  // Called for distinct rows from several threads: each call has its own scratch.
  auto choose_grid = [&](int64_t r, int64_t group, const double* values) {
    std::vector<float> seg(static_cast<size_t>(g));
    for (int64_t i = 0; i < g; ++i) seg[i] = static_cast<float>(values[i]);
    QIntGrid* grids = &grid[(r * groups + group) * grids_per_group];
    if (subgroups) {
      o.choose_subgroup_grids(r, group, seg.data(), &importance[group * g], g, grids);
      return;
    }
    const QIntGrid q = o.choose_grid ? o.choose_grid(seg.data(), g) : ChooseQIntGrid(seg.data(), g, o.bits, o.symmetric);
    grids[0] = q;
    res.scales[r * groups + group] = q.scale_half;
    res.zeros[r * groups + group] = static_cast<uint8_t>(q.zero);
  };
  if (static_groups) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < groups; ++k) choose_grid(r, k, &W[r * cols + k * g]);
    }
  }

  // perm[j] = the original column quantized j-th.
  std::vector<int64_t> perm(static_cast<size_t>(cols));
  std::iota(perm.begin(), perm.end(), 0);
  if (o.act_order) {
    perm = ActOrderPermutation(H.data(), cols);
    std::vector<double> t(W.size());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) t[r * cols + j] = W[r * cols + perm[j]];
    }
    W.swap(t);
    std::vector<double> hp(H.size());
    for (int64_t i = 0; i < cols; ++i) {
      for (int64_t j = 0; j < cols; ++j) hp[i * cols + j] = H[perm[i] * cols + perm[j]];
    }
    H.swap(hp);
  }

  double mean_diag = 0;
  for (int64_t i = 0; i < cols; ++i) mean_diag += H[i * cols + i];
  const double damp = o.percdamp * mean_diag / static_cast<double>(cols);
  for (int64_t i = 0; i < cols; ++i) H[i * cols + i] += damp;
  if (auto s = UpperCholeskyOfInverse(H, cols, "gptq"); !s.ok()) return s;
  const std::vector<double>& U = H;
  // Without act order the columns keep their places, so U_jj is column j's: [H_F⁻¹]_jj = U_jj².
  if (subgroups && !static_groups) {
    for (int64_t j = 0; j < cols; ++j) importance[j] = static_cast<float>(1.0 / (U[j * cols + j] * U[j * cols + j]));
  }

  // Lazy batches: a block's columns update each other immediately, the columns after the block once, with a
  // GEMM. Without static groups a group's grid is chosen from its fully updated weights when its first
  // column comes up, so no group may straddle a block boundary (the block's deferred update would still be
  // missing from its tail); the block width is rounded to a multiple of the group (or to the group).
  int64_t block = o.block_size;
  if (o.group > 0 && !static_groups) block = g <= block ? block / g * g : g;
  std::vector<double> err(static_cast<size_t>(rows * block));
  for (int64_t i1 = 0; i1 < cols; i1 += block) {
    const int64_t i2 = std::min(cols, i1 + block);
    const int64_t count = i2 - i1;
    // Within a block every row runs the same column recurrence on its own weights: split the rows.
    ParallelForOrInline(o.pool, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t j = i1; j < i2; ++j) {
        const int64_t orig = perm[j];
        const int64_t k = orig / g;
        const bool group_start = !static_groups && j % g == 0;  // without static groups perm is the identity
        const double d = U[j * cols + j];
        const double* u = &U[j * cols];
        for (int64_t r = r0; r < r1; ++r) {
          double* wr = &W[r * cols];
          if (group_start) choose_grid(r, k, wr + j);
          const QIntGrid& q = grid[(r * groups + k) * grids_per_group + (orig % g) / sub];
          const int code = QIntCode(wr[j], q);
          res.codes[r * cols + orig] = static_cast<uint8_t>(code);
          const double e = (wr[j] - static_cast<double>(QIntValue(code, q))) / d;
          err[r * count + (j - i1)] = e;
          for (int64_t c = j + 1; c < i2; ++c) wr[c] -= e * u[c];
        }
      }
    });
    if (i2 < cols) {
      // W[:, i2:] -= Err[:, 0:count] · U[i1:i2, i2:]
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(cols - i2),
                  static_cast<int>(count), -1.0, err.data(), static_cast<int>(count), &U[i1 * cols + i2],
                  static_cast<int>(cols), 1.0, &W[i2], static_cast<int>(cols));
    }
  }
  return res;
}

void LayerOutputError(const float* w, const float* w_hat, int64_t rows, int64_t cols, const double* hessian,
                      double* err, double* ref) {
  // tr(A H Aᵀ) = sum over rows of a_r · (H a_r); row panels bound the scratch memory.
  constexpr int64_t kPanel = 256;
  std::vector<double> a(static_cast<size_t>(kPanel * cols)), ah(static_cast<size_t>(kPanel * cols));
  double e = 0, n = 0;
  for (int pass = 0; pass < 2; ++pass) {
    double total = 0;
    for (int64_t r0 = 0; r0 < rows; r0 += kPanel) {
      const int64_t pr = std::min(kPanel, rows - r0);
      for (int64_t i = 0; i < pr * cols; ++i) {
        const double v = w[r0 * cols + i];
        a[i] = pass == 0 ? v - static_cast<double>(w_hat[r0 * cols + i]) : v;
      }
      cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, static_cast<int>(pr), static_cast<int>(cols), 1.0, hessian,
                  static_cast<int>(cols), a.data(), static_cast<int>(cols), 0.0, ah.data(), static_cast<int>(cols));
      for (int64_t i = 0; i < pr * cols; ++i) total += a[i] * ah[i];
    }
    (pass == 0 ? e : n) = total;
  }
  *err = e;
  *ref = n;
}

}  // namespace qforge::quant
