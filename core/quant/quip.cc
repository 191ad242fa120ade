#include "core/quant/quip.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/kernels/orthogonal.h"
#include "core/kernels/quip.h"
#include "core/quant/gptq.h"
#include "core/quant/packing.h"

namespace qforge::quant {
namespace {

// The rotation of both sides of a [rows, cols] fp64 matrix in place: W ← L W Rᵀ (L over columns, R over rows).
void RotateBothSides(std::vector<double>& w, int64_t rows, int64_t cols, const kernels::KroneckerOrthogonal& left,
                     const kernels::KroneckerOrthogonal& right) {
  std::vector<double> s(static_cast<size_t>(3 * std::max(rows, cols)));
  // Row i of W Rᵀ is R w_i.
  for (int64_t i = 0; i < rows; ++i) {
    std::copy_n(&w[i * cols], cols, s.data());
    right.Apply(s.data(), &w[i * cols], s.data() + cols);
  }
  // Column j of L (W Rᵀ) is L times column j.
  std::vector<double> col(static_cast<size_t>(rows));
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) col[i] = w[i * cols + j];
    left.Apply(col.data(), s.data(), s.data() + rows);
    for (int64_t i = 0; i < rows; ++i) w[i * cols + j] = s[i];
  }
}

absl::Status CheckFactor(int64_t n, const char* side) {
  const int64_t a = kernels::KroneckerSplit(n);
  if (std::max(a, n / a) > kernels::kQuipMaxFactor) {
    return absl::InvalidArgumentError(absl::StrCat("quip: the ", side, " dimension ", n, " splits into ", a, " x ",
                                                   n / a, ", a factor above ", kernels::kQuipMaxFactor));
  }
  return absl::OkStatus();
}

// Greedy coordinate descent on Σ_r Δ_r H Δ_rᵀ (Δ = Ŵ - W) over the codes, grids fixed: each element moves to
// the grid point nearest its one-dimensional minimiser, and only when the loss strictly drops.
void GreedyPasses(const std::vector<float>& w, int64_t rows, int64_t cols, const std::vector<double>& h, int passes,
                  int bits, bool symmetric, int64_t group, GptqResult& r) {
  const int64_t groups = cols / group;
  std::vector<double> delta(static_cast<size_t>(rows * cols)), e(static_cast<size_t>(rows * cols));
  auto grid_of = [&](int64_t row, int64_t k) {
    QIntGrid g;
    g.scale_half = r.scales[row * groups + k];
    g.scale = HalfToFloat(g.scale_half);
    g.zero = symmetric ? 1 << (bits - 1) : r.zeros[row * groups + k];
    g.max_code = (1 << bits) - 1;
    return g;
  };
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const QIntGrid g = grid_of(i, j / group);
      delta[i * cols + j] = static_cast<double>(QIntValue(r.codes[i * cols + j], g)) - w[i * cols + j];
    }
  }
  // E = Δ H: e_rj is ∂/∂Δ_rj of the loss, halved.
  cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, static_cast<int>(rows), static_cast<int>(cols), 1.0, h.data(),
              static_cast<int>(cols), delta.data(), static_cast<int>(cols), 0.0, e.data(), static_cast<int>(cols));
  for (int pass = 0; pass < passes; ++pass) {
    int64_t changed = 0;
    for (int64_t j = 0; j < cols; ++j) {
      const double hjj = h[j * cols + j];
      if (!(hjj > 0)) continue;
      const double* hj = &h[j * cols];
      for (int64_t i = 0; i < rows; ++i) {
        const QIntGrid g = grid_of(i, j / group);
        const double wij = w[i * cols + j];
        const double d0 = delta[i * cols + j];
        const double eij = e[i * cols + j];
        // loss(d) - loss(d0) = hjj (d² - d0²) + 2 (d - d0)(eij - hjj d0), minimised at d0 - eij / hjj.
        const int code = QIntCode(wij + d0 - eij / hjj, g);
        if (code == r.codes[i * cols + j]) continue;
        const double d1 = static_cast<double>(QIntValue(code, g)) - wij;
        const double gain = hjj * (d1 * d1 - d0 * d0) + 2 * (d1 - d0) * (eij - hjj * d0);
        if (!(gain < 0)) continue;
        r.codes[i * cols + j] = static_cast<uint8_t>(code);
        delta[i * cols + j] = d1;
        double* ei = &e[i * cols];
        const double step = d1 - d0;
        for (int64_t c = 0; c < cols; ++c) ei[c] += step * hj[c];
        ++changed;
      }
    }
    if (changed == 0) break;
  }
}

// Per (row, group) grids fixed before the pass, each the kQInt grid of the group's values shrunk by the
// r in {1, 0.95, ..., 0.5} with the least squared rounding error (incoherent rows are Gaussian-like, where
// absmax / min-max ranges waste most levels at 2 bits).
void ChooseMseGrids(const std::vector<float>& w, int64_t rows, int64_t cols, int64_t group, int bits, bool symmetric,
                    GptqResult& r) {
  const int64_t groups = cols / group;
  r.scales.assign(static_cast<size_t>(rows * groups), 0);
  r.zeros.assign(static_cast<size_t>(rows * groups), 0);
  std::vector<float> shrunk(static_cast<size_t>(group));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t k = 0; k < groups; ++k) {
      const float* x = &w[i * cols + k * group];
      double best = -1;
      for (int step = 0; step <= 10; ++step) {
        const float ratio = 1.0f - 0.05f * static_cast<float>(step);
        for (int64_t c = 0; c < group; ++c) shrunk[c] = x[c] * ratio;
        const QIntGrid g = ChooseQIntGrid(shrunk.data(), group, bits, symmetric);
        double err = 0;
        for (int64_t c = 0; c < group; ++c) {
          const double d = static_cast<double>(QIntValue(QIntCode(x[c], g), g)) - x[c];
          err += d * d;
        }
        if (best < 0 || err < best) {
          best = err;
          r.scales[i * groups + k] = g.scale_half;
          r.zeros[i * groups + k] = static_cast<uint8_t>(g.zero);
        }
      }
    }
  }
}

// LDLQ (the GPTQ recurrence, no lazy batches) on grids fixed by ChooseMseGrids. `h` is the damped H'.
absl::Status LdlqFixedGrids(const std::vector<float>& w, int64_t rows, int64_t cols, std::vector<double> h, int bits,
                            bool symmetric, int64_t group, GptqResult& r) {
  QF_RETURN_IF_ERROR(UpperCholeskyOfInverse(h, cols, "quip"));
  const int64_t groups = cols / group;
  r.codes.assign(static_cast<size_t>(rows * cols), 0);
  std::vector<double> wr(static_cast<size_t>(cols));
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t c = 0; c < cols; ++c) wr[c] = w[i * cols + c];
    for (int64_t j = 0; j < cols; ++j) {
      QIntGrid g;
      g.scale_half = r.scales[i * groups + j / group];
      g.scale = HalfToFloat(g.scale_half);
      g.zero = symmetric ? 1 << (bits - 1) : r.zeros[i * groups + j / group];
      g.max_code = (1 << bits) - 1;
      const int code = QIntCode(wr[j], g);
      r.codes[i * cols + j] = static_cast<uint8_t>(code);
      const double e = (wr[j] - static_cast<double>(QIntValue(code, g))) / h[j * cols + j];
      for (int64_t c = j + 1; c < cols; ++c) wr[c] -= e * h[j * cols + c];
    }
  }
  return absl::OkStatus();
}

}  // namespace

uint64_t QuipTensorSeed(uint32_t seed, const float* w, int64_t rows, int64_t cols) {
  // FNV-1a over the fp32 bytes, then the shape and the user's seed through the splitmix64 finaliser.
  uint64_t h = 0xcbf29ce484222325ULL;
  const auto* bytes = reinterpret_cast<const uint8_t*>(w);
  const size_t n = static_cast<size_t>(rows * cols) * sizeof(float);
  for (size_t i = 0; i < n; ++i) h = (h ^ bytes[i]) * 0x100000001b3ULL;
  h = kernels::Mix64(h ^ kernels::Mix64((static_cast<uint64_t>(rows) << 32) ^ static_cast<uint64_t>(cols)));
  return kernels::Mix64(h ^ (static_cast<uint64_t>(seed) * 0x9e3779b97f4a7c15ULL));
}

absl::StatusOr<std::vector<uint8_t>> QuipQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian,
                                                  const QuipOptions& o) {
  if (rows <= 0 || cols <= 0) return absl::InvalidArgumentError("quip: empty matrix");
  if (o.bits < 2 || o.bits > 8) return absl::InvalidArgumentError(absl::StrCat("quip: bits must be 2..8, got ", o.bits));
  if (o.group < 0 || (o.group > 0 && cols % o.group != 0)) {
    return absl::InvalidArgumentError(absl::StrCat("quip: group ", o.group, " does not divide ", cols, " columns"));
  }
  if (!(o.percdamp >= 0)) return absl::InvalidArgumentError(absl::StrCat("quip: damp must be >= 0, got ", o.percdamp));
  if (o.greedy_passes < 0) return absl::InvalidArgumentError("quip: greedy_passes must be >= 0");
  QF_RETURN_IF_ERROR(CheckFactor(rows, "output"));
  QF_RETURN_IF_ERROR(CheckFactor(cols, "input"));
  const WeightFormat f = WeightFormat::Quip(o.bits, o.group, o.symmetric);
  QF_ASSIGN_OR_RETURN(const QuipLayout l, GetQuipLayout(f, rows, cols));

  std::vector<double> W(w, w + rows * cols);
  std::vector<double> H(hessian, hessian + cols * cols);
  double mean_diag = 0;
  for (int64_t j = 0; j < cols; ++j) mean_diag += H[j * cols + j];
  mean_diag /= static_cast<double>(cols);
  // Dead inputs (never fire): their weights are irrelevant on the calibration data, zero is cheapest (as gptq).
  for (int64_t j = 0; j < cols; ++j) {
    if (H[j * cols + j] == 0.0) {
      for (int64_t i = 0; i < rows; ++i) W[i * cols + j] = 0.0;
    }
  }

  // Diagonal rescaling. c = 1/D̃ multiplies the input at run time (stored as f16), so D̃ is taken back from the
  // rounded c: W D̃ and c ⊙ x then cancel exactly up to fp rounding.
  std::vector<uint16_t> c_half(static_cast<size_t>(cols), FloatToHalf(1.0f));
  std::vector<double> d(static_cast<size_t>(cols), 1.0);
  if (o.rescale) {
    const double lambda = o.percdamp * mean_diag;
    std::vector<double> raw(static_cast<size_t>(cols), 0.0);
    double log_sum = 0;
    int64_t live = 0;
    for (int64_t j = 0; j < cols; ++j) {
      double n2 = 0;
      for (int64_t i = 0; i < rows; ++i) n2 += W[i * cols + j] * W[i * cols + j];
      const double hjj = H[j * cols + j];
      if (hjj > 0 && n2 > 0) {
        raw[j] = std::sqrt(std::sqrt((hjj + lambda) / n2));
        log_sum += std::log(raw[j]);
        ++live;
      }
    }
    // D̃ is scale-free (a common factor is absorbed by the grids); normalise to geometric mean 1 and keep
    // it well inside f16 range.
    const double norm = live > 0 ? std::exp(log_sum / static_cast<double>(live)) : 1.0;
    for (int64_t j = 0; j < cols; ++j) {
      if (raw[j] == 0) continue;
      const double dj = std::clamp(raw[j] / norm, 1.0 / 256, 256.0);
      c_half[j] = FloatToHalf(static_cast<float>(1.0 / dj));
      d[j] = 1.0 / static_cast<double>(HalfToFloat(c_half[j]));
    }
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < cols; ++j) W[i * cols + j] *= d[j];
    }
    for (int64_t i = 0; i < cols; ++i) {
      for (int64_t j = 0; j < cols; ++j) H[i * cols + j] /= d[i] * d[j];
    }
  }

  kernels::QuipHeader header;
  header.seed = o.seed;
  header.a_out = kernels::KroneckerSplit(rows);
  header.b_out = rows / header.a_out;
  header.a_in = kernels::KroneckerSplit(cols);
  header.b_in = cols / header.a_in;
  const kernels::KroneckerOrthogonal U = kernels::MakeKroneckerOrthogonal(header.a_out, header.b_out, o.seed, 0);
  const kernels::KroneckerOrthogonal V = kernels::MakeKroneckerOrthogonal(header.a_in, header.b_in, o.seed, 1);
  // W' = U W Vᵀ, H' = V H Vᵀ (symmetrised: the two sides round differently).
  RotateBothSides(W, rows, cols, U, V);
  RotateBothSides(H, cols, cols, V, V);
  for (int64_t i = 0; i < cols; ++i) {
    for (int64_t j = 0; j < i; ++j) {
      const double s = 0.5 * (H[i * cols + j] + H[j * cols + i]);
      H[i * cols + j] = H[j * cols + i] = s;
    }
  }

  std::vector<float> wr(W.size());
  for (size_t i = 0; i < W.size(); ++i) wr[i] = static_cast<float>(W[i]);
  GptqOptions g;
  g.bits = o.bits;
  g.group = o.group;
  g.symmetric = o.symmetric;
  g.act_order = o.act_order;
  g.percdamp = o.percdamp;
  absl::StatusOr<GptqResult> r;
  if (o.mse_grid) {
    // Experiment (docs/calibrated.md "QuIP"): grids fixed up front by an MSE range search, then LDLQ.
    const int64_t gs = o.group > 0 ? o.group : cols;
    std::vector<double> hd = H;
    double md = 0;
    for (int64_t j = 0; j < cols; ++j) md += hd[j * cols + j];
    for (int64_t j = 0; j < cols; ++j) hd[j * cols + j] += o.percdamp * md / static_cast<double>(cols);
    GptqResult fixed;
    ChooseMseGrids(wr, rows, cols, gs, o.bits, o.symmetric, fixed);
    absl::Status s = LdlqFixedGrids(wr, rows, cols, std::move(hd), o.bits, o.symmetric, gs, fixed);
    if (s.ok()) {
      r = std::move(fixed);
    } else {
      r = s;
    }
  } else {
    r = GptqQuantize(wr.data(), rows, cols, H.data(), g);
  }
  if (!r.ok()) {
    // gptq's messages ("gptq: the damped Hessian ...") describe the rotated problem here.
    return absl::Status(r.status().code(), absl::StrCat("quip (LDLQ on the rotated layer): ", r.status().message()));
  }
  if (o.greedy_passes > 0) {
    // The loss LDLQ minimises: the damped rotated Hessian.
    double md = 0;
    for (int64_t j = 0; j < cols; ++j) md += H[j * cols + j];
    const double lambda = o.percdamp * md / static_cast<double>(cols);
    for (int64_t j = 0; j < cols; ++j) H[j * cols + j] += lambda;
    GreedyPasses(wr, rows, cols, H, o.greedy_passes, o.bits, o.symmetric, o.group > 0 ? o.group : cols, *r);
  }

  std::vector<uint8_t> out(l.total_bytes, 0);
  kernels::WriteQuipHeader(header, out.data());
  std::memcpy(out.data() + l.col_scales_offset, c_half.data(), 2 * c_half.size());
  PackQInt(r->codes.data(), r->scales.data(), r->zeros.data(), rows, cols, l.payload, l.qint,
           out.data() + l.payload_offset);
  return out;
}

namespace {

class QuipMethod : public QuantMethod {
 public:
  std::string name() const override { return "quip"; }
  std::string description() const override {
    return "QuIP: random orthogonal incoherence processing + LDLQ (GPTQ rule) into quip/qint (needs calibration)";
  }
  QuantParams DefaultParams() const override {
    QuantParams p;
    // The paper's setting: 2 bits, one scale per row of W'. Symmetric like gptq (the CLI only has --asym).
    p.bits = 2;
    p.group = 0;
    p.symmetric = true;
    p.double_quant = false;
    return p;
  }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.bits < 2 || p.bits > 8) return absl::InvalidArgumentError(absl::StrCat("quip: bits must be 2..8, got ", p.bits));
    if (p.group < 0) {
      return absl::InvalidArgumentError(absl::StrCat("quip: group must be 0 (per-row) or positive, got ", p.group));
    }
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("quip: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("quip: cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    if (p.group > 0 && cols % p.group != 0) {
      return absl::InvalidArgumentError(absl::StrCat("quip: group ", p.group, " does not divide the row length ", cols));
    }
    QF_RETURN_IF_ERROR(CheckFactor(rows, "output"));
    QF_RETURN_IF_ERROR(CheckFactor(cols, "input"));
    return WeightFormat::Quip(p.bits, p.group, p.symmetric);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool*, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    if (calib == nullptr) {
      return absl::FailedPreconditionError("quip: needs calibration statistics (the layer's input Hessian)");
    }
    if (calib->cols != cols || calib->hessian.size() != static_cast<size_t>(cols * cols)) {
      return absl::InvalidArgumentError(
          absl::StrCat("quip: calibration statistics are for ", calib->cols, " inputs, the matrix has ", cols));
    }
    QuipOptions o;
    o.bits = p.bits;
    o.group = p.group;
    o.symmetric = p.symmetric;
    o.act_order = p.act_order;
    o.percdamp = p.damp;
    o.rescale = kRescale;
    o.greedy_passes = kGreedyPasses;
    o.mse_grid = kMseGrid;
    o.seed = QuipTensorSeed(p.seed, w, rows, cols);
    return QuipQuantize(w, rows, cols, calib->hessian.data(), o);
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    QuantParams pc = p;
    pc.group = 0;
    pc.static_groups = false;
    if (p.group != 0) return std::make_pair(std::string("quip"), pc);
    // A side QuIP cannot rotate (too large a prime factor): gptq at the same bits, whose own chain ends in
    // q8_0 / f16.
    return std::make_pair(std::string("gptq"), pc);
  }

 private:
  static constexpr bool kRescale = true;
  static constexpr int kGreedyPasses = 4;
  static constexpr bool kMseGrid = true;
};

}  // namespace

std::unique_ptr<QuantMethod> MakeQuipMethod() { return std::make_unique<QuipMethod>(); }

}  // namespace qforge::quant
