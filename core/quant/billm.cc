#include "core/quant/billm.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/base/thread_pool.h"
#include "core/kernels/billm.h"
#include "core/quant/gptq.h"
#include "core/quant/ternary.h"

namespace qforge::quant {

namespace {

// f16 round trip: the values the decoder will read.
float AsStored(double v) { return HalfToFloat(FloatToHalf(static_cast<float>(v))); }

}  // namespace

void ResidualBinaryValues(const double* x, int64_t n, float values[4]) {
  double a1 = 0;
  for (int64_t i = 0; i < n; ++i) a1 += std::fabs(x[i]);
  a1 = n > 0 ? a1 / static_cast<double>(n) : 0;
  double a2 = 0;
  for (int64_t i = 0; i < n; ++i) a2 += std::fabs(x[i] - (x[i] >= 0 ? a1 : -a1));
  a2 = n > 0 ? a2 / static_cast<double>(n) : 0;
  const double hi = a1 + a2, lo = std::fabs(a1 - a2);
  values[0] = AsStored(-hi);
  values[1] = AsStored(-lo);
  values[2] = AsStored(lo);
  values[3] = AsStored(hi);
}

void SplitBinaryValues(const double* x, int64_t n, float values[4]) {
  std::vector<double> m(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) m[i] = std::fabs(x[i]);
  std::sort(m.begin(), m.end());
  // Squared error of the split after the k smallest magnitudes: sum m² - (sum of the k)² / k - (rest)² / (n - k).
  double total = 0;
  for (double v : m) total += v;
  double below = 0, best_gain = -1, a_c = 0, a_s = 0;
  for (int64_t k = 0; k <= n; ++k) {
    const double above = total - below;
    const double gain = (k > 0 ? below * below / static_cast<double>(k) : 0) +
                        (k < n ? above * above / static_cast<double>(n - k) : 0);
    if (gain > best_gain) {
      best_gain = gain;
      a_c = k > 0 ? below / static_cast<double>(k) : 0;
      a_s = k < n ? above / static_cast<double>(n - k) : a_c;
    }
    if (k < n) below += m[k];
  }
  if (a_c == 0) a_c = a_s;  // one group: both magnitudes the same
  values[0] = AsStored(-a_s);
  values[1] = AsStored(-a_c);
  values[2] = AsStored(a_c);
  values[3] = AsStored(a_s);
}

namespace {

int NearestCode(const float* values, double w) {
  int best = 0;
  double best_d = std::fabs(w - values[0]);
  for (int k = 1; k < 4; ++k) {
    const double d = std::fabs(w - values[k]);
    if (d < best_d) best_d = d, best = k;
  }
  return best;
}

// Solves g v = b for the codes in use (g is 8 x 8, symmetric positive semidefinite); false when singular.
bool SolveUsed(double g[8][8], double b[8], const bool used[8], double v[8]) {
  int idx[8], m = 0;
  for (int k = 0; k < 8; ++k) {
    if (used[k]) idx[m++] = k;
  }
  double a[8][9];
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < m; ++j) a[i][j] = g[idx[i]][idx[j]];
    a[i][m] = b[idx[i]];
  }
  for (int c = 0; c < m; ++c) {
    int p = c;
    for (int i = c + 1; i < m; ++i) {
      if (std::fabs(a[i][c]) > std::fabs(a[p][c])) p = i;
    }
    if (!(std::fabs(a[p][c]) > 1e-12 * (1 + std::fabs(a[c][c])))) return false;
    std::swap(a[p], a[c]);
    for (int i = c + 1; i < m; ++i) {
      const double f = a[i][c] / a[c][c];
      for (int j = c; j <= m; ++j) a[i][j] -= f * a[c][j];
    }
  }
  for (int i = m - 1; i >= 0; --i) {
    double s = a[i][m];
    for (int j = i + 1; j < m; ++j) s -= a[i][j] * v[idx[j]];
    v[idx[i]] = s / a[i][i];
    if (!std::isfinite(v[idx[i]])) return false;
  }
  return true;
}

struct Pass {
  std::vector<uint8_t> codes;       // [rows, cols]
  std::vector<float> values;        // [rows, 8]
  std::vector<float> reconstructed; // [rows, cols]
  double error = 0;
};

// One binarisation of every row with `salient` columns: codebooks from the row's weights, OBC feedback through
// u (the upper Cholesky factor of H⁻¹), then the row's eight values refitted in the H norm.
Pass Binarise(const float* w, int64_t rows, int64_t cols, const std::vector<uint8_t>& salient,
              const std::vector<double>& u, const double* hessian, ThreadPool* pool) {
  Pass p;
  p.codes.resize(static_cast<size_t>(rows * cols));
  p.values.resize(static_cast<size_t>(rows * 8));
  p.reconstructed.resize(static_cast<size_t>(rows * cols));
  ParallelForOrInline(pool, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<double> row(static_cast<size_t>(cols)), ordinary, key, hw(static_cast<size_t>(cols));
    std::vector<double> ha(static_cast<size_t>(cols * 8));
    for (int64_t r = r0; r < r1; ++r) {
      ordinary.clear();
      key.clear();
      for (int64_t c = 0; c < cols; ++c) (salient[c] ? key : ordinary).push_back(w[r * cols + c]);
      float* v = &p.values[r * 8];
      SplitBinaryValues(ordinary.data(), static_cast<int64_t>(ordinary.size()), v);
      ResidualBinaryValues(key.data(), static_cast<int64_t>(key.size()), v + 4);
      for (int64_t c = 0; c < cols; ++c) row[c] = w[r * cols + c];
      uint8_t* codes = &p.codes[r * cols];
      for (int64_t c = 0; c < cols; ++c) {
        const float* set = v + (salient[c] ? 4 : 0);
        const int code = NearestCode(set, row[c]);
        codes[c] = static_cast<uint8_t>(code);
        const double e = (row[c] - set[code]) / u[c * cols + c];
        const double* uc = &u[c * cols];
        for (int64_t k = c + 1; k < cols; ++k) row[k] -= e * uc[k];
      }
      // Refit: with the codes fixed, (w - A v)ᵀ H (w - A v) is least where (Aᵀ H A) v = Aᵀ H w, A the
      // columns-by-values indicator.
      std::fill(ha.begin(), ha.end(), 0.0);
      for (int64_t i = 0; i < cols; ++i) {
        const double* hi = hessian + i * cols;
        double s = 0;
        for (int64_t j = 0; j < cols; ++j) {
          s += hi[j] * w[r * cols + j];
          ha[i * 8 + (salient[j] ? 4 : 0) + codes[j]] += hi[j];
        }
        hw[i] = s;
      }
      double g[8][8] = {}, b[8] = {}, fit[8];
      bool used[8] = {};
      for (int64_t i = 0; i < cols; ++i) {
        const int k = (salient[i] ? 4 : 0) + codes[i];
        used[k] = true;
        b[k] += hw[i];
        for (int l = 0; l < 8; ++l) g[k][l] += ha[i * 8 + l];
      }
      if (SolveUsed(g, b, used, fit)) {
        for (int k = 0; k < 8; ++k) {
          if (used[k] && std::fabs(fit[k]) <= 65504.0) v[k] = AsStored(fit[k]);
        }
      }
      for (int64_t c = 0; c < cols; ++c) p.reconstructed[r * cols + c] = v[(salient[c] ? 4 : 0) + codes[c]];
    }
  });
  double ref = 0;
  LayerOutputError(w, p.reconstructed.data(), rows, cols, hessian, &p.error, &ref);
  return p;
}

class BillmMethod : public QuantMethod {
 public:
  std::string name() const override { return "billm"; }
  std::string description() const override {
    return "BiLLM: binarisation with a residual binary basis for Hessian-salient columns and a split of the rest "
           "into two magnitudes, GPTQ-style error feedback; 2-bit codes into 8 values per row (needs calibration)";
  }
  QuantParams DefaultParams() const override { return {1, 0, true, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.group != 0) return absl::InvalidArgumentError(absl::StrCat("billm: group must be 0, got ", p.group));
    if (p.act_order) return absl::InvalidArgumentError("billm: act_order is not supported");
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("billm: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    return WeightFormat::Of(WeightType::kBiLLM);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    std::vector<double> identity;
    QF_ASSIGN_OR_RETURN(const double* hessian, CalibrationHessian("billm", cols, calib, &identity));
    // Damped as GPTQ damps (dead inputs get H_ii = 1), then the Cholesky factor of the inverse.
    std::vector<double> u(hessian, hessian + cols * cols);
    double mean_diag = 0;
    for (int64_t i = 0; i < cols; ++i) mean_diag += u[i * cols + i];
    mean_diag /= static_cast<double>(cols);
    for (int64_t i = 0; i < cols; ++i) {
      double& d = u[i * cols + i];
      if (d == 0) d = 1;
      d += p.damp * mean_diag;
    }
    QF_RETURN_IF_ERROR(UpperCholeskyOfInverse(u, cols, "billm"));
    // Salience: [H⁻¹]_cc is the squared norm of column c of U (H⁻¹ = UᵀU).
    std::vector<double> salience(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) {
      double hinv = 0, w2 = 0;
      for (int64_t k = 0; k <= c; ++k) hinv += u[k * cols + c] * u[k * cols + c];
      for (int64_t r = 0; r < rows; ++r) w2 += static_cast<double>(w[r * cols + c]) * w[r * cols + c];
      salience[c] = w2 / (hinv * hinv);
    }
    std::vector<int64_t> order(static_cast<size_t>(cols));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return salience[a] > salience[b]; });
    std::optional<Pass> best;
    std::vector<uint8_t> best_salient;
    for (int share : {64, 32, 16, 8}) {
      std::vector<uint8_t> salient(static_cast<size_t>(cols), 0);
      const int64_t k = std::max<int64_t>(1, (cols + share / 2) / share);
      for (int64_t i = 0; i < std::min(k, cols); ++i) salient[order[i]] = 1;
      Pass pass = Binarise(w, rows, cols, salient, u, hessian, pool);
      if (!best || pass.error < best->error) {
        best = std::move(pass);
        best_salient = salient;
      }
    }
    std::vector<uint16_t> codebooks(static_cast<size_t>(rows * 8));
    for (size_t i = 0; i < codebooks.size(); ++i) codebooks[i] = FloatToHalf(best->values[i]);
    return kernels::billm::Encode(best->codes.data(), codebooks.data(), best_salient.data(), rows, cols);
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::nullopt;  // every shape has a billm form
  }
};

}  // namespace

std::unique_ptr<QuantMethod> MakeBillmMethod() { return std::make_unique<BillmMethod>(); }

}  // namespace qforge::quant
