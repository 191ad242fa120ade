#include "core/quant/spqr.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/kernels/spqr.h"
#include "core/quant/gptq.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {
namespace {

namespace ks = ::qforge::kernels::spqr;

constexpr int kStatMax = (1 << kSpqrStatBits) - 1;

// value = scale * (q - zero), q in [0, maxq]: the min-max grid of the reference quantizer (asymmetric, zero not
// rounded). The range is floored at 2^-9 of the magnitude so that a (near-)constant group keeps a bounded zero
// (|zero| <= maxq · 2^9, f16-exact enough) instead of the reference's [-1, 1] fallback, which would decode a
// constant group — e.g. an all-zero one — far from its value.
struct Grid {
  double scale = 0, zero = 0;
};
Grid FitGrid(const double* x, int64_t n, int maxq, int64_t skip = -1) {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (int64_t i = 0; i < n; ++i) {
    if (i == skip) continue;
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  if (!(lo <= hi)) lo = hi = 0;  // nothing left
  const double range = std::max({hi - lo, std::max(std::fabs(lo), std::fabs(hi)) * 0x1p-9, 1e-30});
  Grid g;
  g.scale = range / maxq;
  g.zero = -lo / g.scale;
  return g;
}
inline int GridCode(double w, double scale, double zero, int maxq) {
  if (!(scale > 0)) return 0;
  return static_cast<int>(std::clamp(std::nearbyint(w / scale + zero), 0.0, static_cast<double>(maxq)));
}

// Reference's leave-one-out estimate: how much the group's Hessian-weighted squared rounding error
// Σ_k ((q(w_k) - w_k) / d_k)² drops when weight i is left out of both the grid fit and the sum. Leaving out a
// weight that is neither the minimum nor the maximum leaves the grid as it is, so only those two are refit.
void LeaveOneOutReduction(const double* v, const double* d, int64_t n, int maxq, double* reduction) {
  const Grid base = FitGrid(v, n, maxq);
  double total = 0;
  int64_t imin = 0, imax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int q = GridCode(v[i], base.scale, base.zero, maxq);
    const double e = (base.scale * (q - base.zero) - v[i]) / d[i];
    reduction[i] = e * e;
    total += e * e;
    if (v[i] < v[imin]) imin = i;
    if (v[i] > v[imax]) imax = i;
  }
  for (const int64_t i : {imin, imax}) {
    const Grid g = FitGrid(v, n, maxq, i);
    double loo = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (k == i) continue;
      const int q = GridCode(v[k], g.scale, g.zero, maxq);
      const double e = (g.scale * (q - g.zero) - v[k]) / d[k];
      loo += e * e;
    }
    reduction[i] = total - loo;
  }
}

// The 3-bit second-level quantization of m first-level statistics x: f16 (scale, zero) into `pair`, the codes,
// and the decoded floats (what the kernels will use).
void QuantizeStats(const double* x, int64_t m, uint16_t* pair, uint8_t* codes, float* decoded) {
  const Grid g = FitGrid(x, m, kStatMax);
  pair[0] = FloatToHalf(static_cast<float>(g.scale));
  pair[1] = FloatToHalf(static_cast<float>(g.zero));
  const float s = HalfToFloat(pair[0]), z = HalfToFloat(pair[1]);
  for (int64_t i = 0; i < m; ++i) {
    codes[i] = static_cast<uint8_t>(GridCode(x[i], s, z, kStatMax));
    decoded[i] = ks::StatValue(codes[i], s, z);
  }
}


void PutCode(uint8_t* stream, int64_t i, int bits, int code) {
  const int64_t bit = i * bits;
  const uint32_t v = static_cast<uint32_t>(code) << (bit & 7);
  stream[bit >> 3] |= static_cast<uint8_t>(v);
  if ((bit & 7) + bits > 8) stream[(bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
}

}  // namespace

absl::StatusOr<SpqrResult> SpqrQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                        const SpqrOptions& o) {
  if (rows <= 0 || cols <= 0) return absl::InvalidArgumentError("spqr: empty matrix");
  if (o.bits < 2 || o.bits > 4) return absl::InvalidArgumentError(absl::StrCat("spqr: bits must be 2..4, got ", o.bits));
  if (o.group <= 0 || cols % o.group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("spqr: group ", o.group, " does not divide ", cols, " columns"));
  }
  if (!(o.outlier_threshold >= 0)) {
    return absl::InvalidArgumentError(absl::StrCat("spqr: outlier_threshold must be >= 0, got ", o.outlier_threshold));
  }
  if (!(o.percdamp >= 0) || o.block_size <= 0) return absl::InvalidArgumentError("spqr: damp < 0 or block_size <= 0");
  const int maxq = (1 << o.bits) - 1;
  const int64_t g = o.group, groups = cols / g;
  const int64_t row_blocks = (rows + kSpqrStatGroup - 1) / kSpqrStatGroup;

  std::vector<double> W(static_cast<size_t>(rows * cols));
  for (int64_t i = 0; i < rows * cols; ++i) W[i] = w[i];
  std::vector<double> H(hessian, hessian + cols * cols);
  // The reference's order: damping from the mean |diagonal|, then dead inputs (H_ii == 0) set to 1 with zero
  // weights — inputs that never fire carry no information.
  double mean_diag = 0;
  for (int64_t i = 0; i < cols; ++i) mean_diag += std::fabs(H[i * cols + i]);
  const double damp = o.percdamp * mean_diag / static_cast<double>(cols);
  for (int64_t i = 0; i < cols; ++i) {
    if (H[i * cols + i] == 0.0) {
      H[i * cols + i] = 1.0;
      for (int64_t r = 0; r < rows; ++r) W[r * cols + i] = 0.0;
    } else {
      H[i * cols + i] += damp;
    }
  }
  QF_RETURN_IF_ERROR(UpperCholeskyOfInverse(H, cols, "spqr"));
  const std::vector<double>& U = H;

  SpqrResult res;
  // The relative threshold's unit: mean over input columns of the column's variance over the rows, in units of
  // its sensitivity denominator U_jj².
  double scale_sum = 0;
  for (int64_t j = 0; j < cols; ++j) {
    double mean = 0, ss = 0;
    for (int64_t r = 0; r < rows; ++r) mean += W[r * cols + j];
    mean /= static_cast<double>(rows);
    for (int64_t r = 0; r < rows; ++r) ss += (W[r * cols + j] - mean) * (W[r * cols + j] - mean);
    const double var = rows > 1 ? ss / static_cast<double>(rows - 1) : 0.0;
    const double d = U[j * cols + j];
    scale_sum += var / (d * d);
  }
  res.outlier_scale = scale_sum / static_cast<double>(cols);
  const bool detect = std::isfinite(o.outlier_threshold);
  const double thr = detect ? o.outlier_threshold * res.outlier_scale : std::numeric_limits<double>::infinity();
  res.threshold = thr;

  res.codes.assign(static_cast<size_t>(rows * cols), 0);
  res.scale_codes.assign(static_cast<size_t>(rows * groups), 0);
  res.zero_codes.assign(static_cast<size_t>(rows * groups), 0);
  res.second.assign(static_cast<size_t>(row_blocks * groups * 4), 0);
  std::vector<float> row_scale(static_cast<size_t>(rows)), row_zero(static_cast<size_t>(rows));
  std::vector<std::vector<std::pair<uint32_t, uint16_t>>> outliers(static_cast<size_t>(rows));

  // Groups never straddle a lazy block, so a group's statistics are fit on fully updated weights.
  const int64_t block = g <= o.block_size ? o.block_size / g * g : g;
  std::vector<double> err(static_cast<size_t>(rows * block));
  for (int64_t i1 = 0; i1 < cols; i1 += block) {
    const int64_t i2 = std::min(cols, i1 + block);
    const int64_t count = i2 - i1;
    for (int64_t k0 = i1; k0 < i2; k0 += g) {
      const int64_t k = k0 / g;
      // Group start: per row, the likely outliers (leave-one-out) are replaced by the mean of the rest before the
      // min-max fit; then the scales and zeros of each block of 16 rows get their 3-bit grids.
      ParallelForOrInline(o.pool, row_blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<double> v(static_cast<size_t>(g)), d(static_cast<size_t>(g)), red(static_cast<size_t>(g));
        double fs[kSpqrStatGroup], fz[kSpqrStatGroup];
        uint8_t cs[kSpqrStatGroup], cz[kSpqrStatGroup];
        for (int64_t i = 0; i < g; ++i) d[i] = U[(k0 + i) * cols + k0 + i];
        for (int64_t rb = b0; rb < b1; ++rb) {
          const int64_t r_begin = rb * kSpqrStatGroup, r_end = std::min(rows, r_begin + kSpqrStatGroup);
          for (int64_t r = r_begin; r < r_end; ++r) {
            std::copy_n(&W[r * cols + k0], g, v.begin());
            if (detect) {
              LeaveOneOutReduction(v.data(), d.data(), g, maxq, red.data());
              double sum = 0;
              int64_t kept = 0;
              for (int64_t i = 0; i < g; ++i) {
                if (!(red[i] > thr)) {
                  sum += v[i];
                  ++kept;
                }
              }
              const double mean = sum / static_cast<double>(std::max<int64_t>(kept, 1));
              for (int64_t i = 0; i < g; ++i) {
                if (red[i] > thr) v[i] = mean;
              }
            }
            const Grid fit = FitGrid(v.data(), g, maxq);
            fs[r - r_begin] = fit.scale;
            fz[r - r_begin] = fit.zero;
          }
          const int64_t m = r_end - r_begin;
          uint16_t* pair = &res.second[(rb * groups + k) * 4];
          QuantizeStats(fs, m, pair, cs, &row_scale[r_begin]);
          QuantizeStats(fz, m, pair + 2, cz, &row_zero[r_begin]);
          for (int64_t r = r_begin; r < r_end; ++r) {
            res.scale_codes[r * groups + k] = cs[r - r_begin];
            res.zero_codes[r * groups + k] = cz[r - r_begin];
          }
        }
      });
      // The group's columns: codes against the decoded statistics; an outlier keeps w - dense in f16 (so it
      // decodes to w within f16 rounding of that residual) and feeds back only what is left.
      ParallelForOrInline(o.pool, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t j = k0; j < k0 + g; ++j) {
          const double dj = U[j * cols + j];
          const double* u = &U[j * cols];
          for (int64_t r = r0; r < r1; ++r) {
            double* wr = &W[r * cols];
            const double wj = wr[j];
            const int code = GridCode(wj, row_scale[r], row_zero[r], maxq);
            const float dense = ks::WeightValue(code, row_scale[r], row_zero[r]);
            double e = (wj - static_cast<double>(dense)) / dj;
            if (e * e > thr) {
              const uint16_t v = FloatToHalf(static_cast<float>(wj - static_cast<double>(dense)));
              const float decoded = dense + HalfToFloat(v);
              e = (wj - static_cast<double>(decoded)) / dj;
              outliers[r].push_back({static_cast<uint32_t>(j), v});
            }
            res.codes[r * cols + j] = static_cast<uint8_t>(code);
            err[r * count + (j - i1)] = e;
            for (int64_t c = j + 1; c < i2; ++c) wr[c] -= e * u[c];
          }
        }
      });
    }
    if (i2 < cols) {
      // W[:, i2:] -= Err[:, 0:count] · U[i1:i2, i2:]
      cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows), static_cast<int>(cols - i2),
                  static_cast<int>(count), -1.0, err.data(), static_cast<int>(count), &U[i1 * cols + i2],
                  static_cast<int>(cols), 1.0, &W[i2], static_cast<int>(cols));
    }
  }
  res.row_ptr.assign(static_cast<size_t>(rows + 1), 0);
  for (int64_t r = 0; r < rows; ++r) {
    res.row_ptr[r + 1] = res.row_ptr[r] + static_cast<uint32_t>(outliers[r].size());
    for (const auto& [c, v] : outliers[r]) {
      res.col_index.push_back(c);
      res.values.push_back(v);
    }
  }
  return res;
}

absl::StatusOr<std::vector<uint8_t>> PackSpqr(const SpqrResult& r, int64_t rows, int64_t cols, int bits, int group) {
  const int64_t nnz = static_cast<int64_t>(r.values.size());
  const WeightFormat f = WeightFormat::SpQR(bits, group, nnz);
  QF_ASSIGN_OR_RETURN(const SpqrLayout l, GetSpqrLayout(f, rows, cols));
  if (r.codes.size() != static_cast<size_t>(rows * cols) ||
      r.scale_codes.size() != static_cast<size_t>(rows * l.groups_per_row) ||
      r.zero_codes.size() != r.scale_codes.size() ||
      r.second.size() != static_cast<size_t>(l.row_blocks * l.groups_per_row * 4) ||
      r.row_ptr.size() != static_cast<size_t>(rows + 1) || r.col_index.size() != r.values.size()) {
    return absl::InvalidArgumentError("spqr: result arrays do not match the shape");
  }
  std::vector<uint8_t> out(l.total_bytes, 0);
  for (int64_t row = 0; row < rows; ++row) {
    uint8_t* codes = out.data() + l.codes_offset + static_cast<size_t>(row) * l.row_code_bytes;
    for (int64_t c = 0; c < cols; ++c) PutCode(codes, c, bits, r.codes[row * cols + c]);
  }
  for (size_t i = 0; i < r.scale_codes.size(); ++i) {
    PutCode(out.data() + l.scale_codes_offset, static_cast<int64_t>(i), kSpqrStatBits, r.scale_codes[i]);
    PutCode(out.data() + l.zero_codes_offset, static_cast<int64_t>(i), kSpqrStatBits, r.zero_codes[i]);
  }
  std::memcpy(out.data() + l.second_offset, r.second.data(), 2 * r.second.size());
  std::memcpy(out.data() + l.row_ptr_offset, r.row_ptr.data(), 4 * r.row_ptr.size());
  for (int64_t p = 0; p < nnz; ++p) {
    std::memcpy(out.data() + l.col_index_offset + static_cast<size_t>(p) * l.index_bytes, &r.col_index[p],
                l.index_bytes);  // little-endian: the low bytes of the u32
  }
  std::memcpy(out.data() + l.values_offset, r.values.data(), 2 * r.values.size());
  return out;
}

absl::StatusOr<int64_t> SpqrStoredOutliers(const uint8_t* bytes, size_t nbytes, int64_t rows, int64_t cols, int bits,
                                           int group) {
  QF_ASSIGN_OR_RETURN(const SpqrLayout l, GetSpqrLayout(WeightFormat::SpQR(bits, group, 0), rows, cols));
  if (nbytes < l.total_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("spqr: ", nbytes, " bytes, the dense part and row pointers alone need ", l.total_bytes));
  }
  return static_cast<int64_t>(kernels::LoadU32(bytes + l.row_ptr_offset + 4 * static_cast<size_t>(rows)));
}

namespace {

class SpqrMethod : public QuantMethod {
 public:
  std::string name() const override { return "spqr"; }
  std::string description() const override {
    return "SpQR: GPTQ with 3-bit quantized small-group statistics and fp16 CSR outliers (needs calibration), "
           "2..4 bits";
  }
  QuantParams DefaultParams() const override { return {3, 16, false, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.bits < 2 || p.bits > 4) return absl::InvalidArgumentError(absl::StrCat("spqr: bits must be 2..4, got ", p.bits));
    if (p.group <= 0) return absl::InvalidArgumentError(absl::StrCat("spqr: group must be positive, got ", p.group));
    if (!(p.outlier_threshold >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("spqr: outlier_threshold must be >= 0 (inf: no outliers), got ", p.outlier_threshold));
    }
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("spqr: damp must be >= 0, got ", p.damp));
    if (p.act_order) return absl::InvalidArgumentError("spqr: act_order is not supported");
    if (p.static_groups) return absl::InvalidArgumentError("spqr: static_groups is not supported");
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    if (cols % p.group != 0) {
      return absl::InvalidArgumentError(absl::StrCat("spqr: group ", p.group, " does not divide the row length ", cols));
    }
    if ((cols * p.bits) % 8 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("spqr: bits ", p.bits, " times row length ", cols, " is not a whole number of bytes"));
    }
    // The outlier count is known only once the matrix is encoded: EncodedFormat.
    return WeightFormat::SpQR(p.bits, p.group, 0);
  }
  absl::StatusOr<WeightFormat> EncodedFormat(const QuantParams& p, int64_t rows, int64_t cols,
                                             std::span<const uint8_t> bytes) const override {
    QF_ASSIGN_OR_RETURN(WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(f.outliers, SpqrStoredOutliers(bytes.data(), bytes.size(), rows, cols, p.bits, p.group));
    return f;
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    if (calib == nullptr) {
      return absl::FailedPreconditionError("spqr: needs calibration statistics (the layer's input Hessian)");
    }
    if (calib->cols != cols || calib->hessian.size() != static_cast<size_t>(cols * cols)) {
      return absl::InvalidArgumentError(
          absl::StrCat("spqr: calibration statistics are for ", calib->cols, " inputs, the matrix has ", cols));
    }
    SpqrOptions o;
    o.bits = p.bits;
    o.group = p.group;
    o.outlier_threshold = p.outlier_threshold;
    o.percdamp = p.damp;
    o.pool = pool;
    QF_ASSIGN_OR_RETURN(const SpqrResult r, SpqrQuantize(w, rows, cols, calib->hessian.data(), o));
    return PackSpqr(r, rows, cols, p.bits, p.group);
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    QuantParams pc = p;
    pc.group = 0;
    pc.symmetric = false;
    return std::make_pair(std::string("gptq"), pc);
  }
};

}  // namespace

std::unique_ptr<QuantMethod> MakeSpqrMethod() { return std::make_unique<SpqrMethod>(); }

}  // namespace qforge::quant
