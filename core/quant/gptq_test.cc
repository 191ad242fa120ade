// GPTQ against a textbook implementation, and against RTN on layers whose inputs are correlated.
#include "core/quant/gptq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/base/half.h"
#include "core/calib/stats.h"
#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
#include "core/quant/packing.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "gmock/gmock.h"
#include "core/quant/test_util.h"
#include "core/kernels/ggml_kernels.h"
#include "core/model/ggml_types.h"
#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

using test_util::GaussianF;
using test_util::StatsOf;

using ::testing::HasSubstr;

std::vector<double> Gaussian(int64_t n, uint32_t seed, double stddev = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0.0, stddev);
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

// Inputs X [n, cols] = Z · A with Z and A Gaussian: every channel is a mix of all the latent ones, so
// H = 2XᵀX/n is far from diagonal. `loud` channels get their column scaled by `loud_gain`. The mixing matrix
// depends on mix_seed only, so held-out inputs (another z_seed) come from the same distribution.
std::vector<float> CorrelatedInputs(int64_t n, int64_t cols, uint32_t z_seed, uint32_t mix_seed = 1000, int loud = 0,
                                    double loud_gain = 1.0) {
  const std::vector<double> z = Gaussian(n * cols, z_seed);
  const std::vector<double> a = Gaussian(cols * cols, mix_seed, 1.0 / std::sqrt(static_cast<double>(cols)));
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < cols; ++j) {
      double s = 0;
      for (int64_t k = 0; k < cols; ++k) s += z[t * cols + k] * a[k * cols + j];
      if (j % std::max<int64_t>(1, cols / std::max(1, loud)) == 0 && loud > 0) s *= loud_gain;
      x[t * cols + j] = static_cast<float>(s);
    }
  }
  return x;
}

std::vector<double> DirectHessian(const std::vector<float>& x, int64_t n, int64_t cols) {
  std::vector<double> h(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < cols; ++i) {
      for (int64_t j = 0; j < cols; ++j) h[i * cols + j] += 2.0 * x[t * cols + i] * x[t * cols + j];
    }
  }
  for (double& v : h) v /= static_cast<double>(n);
  return h;
}

// ||(W - Ŵ) Xᵀ||² summed over tokens, computed directly.
double OutputError(const std::vector<float>& w, const std::vector<float>& w_hat, int64_t rows, int64_t cols,
                   const std::vector<float>& x, int64_t n) {
  double e = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < n; ++t) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) {
        s += (static_cast<double>(w[r * cols + c]) - w_hat[r * cols + c]) * x[t * cols + c];
      }
      e += s * s;
    }
  }
  return e;
}

std::vector<float> Decode(const GptqResult& res, int64_t rows, int64_t cols, int group) {
  const int64_t g = group > 0 ? group : cols;
  const int64_t groups = cols / g;
  std::vector<float> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t k = r * groups + c / g;
      out[r * cols + c] = HalfToFloat(res.scales[k]) * static_cast<float>(res.codes[r * cols + c] - res.zeros[k]);
    }
  }
  return out;
}

// The textbook algorithm (OPTQ, section 3 / Algorithm 1 without the lazy-batch and Cholesky reformulation):
// the explicit inverse Hessian of the not-yet-quantized columns, updated after every column by removing that
// column (Gaussian elimination), fp64 throughout.
GptqResult TextbookGptq(const std::vector<float>& w, int64_t rows, int64_t cols, std::vector<double> h,
                        const GptqOptions& o) {
  const int64_t g = o.group > 0 ? o.group : cols;
  const int64_t groups = cols / g;
  const bool static_groups = o.group > 0 && (o.static_groups || o.act_order);
  std::vector<double> W(w.begin(), w.end());
  for (int64_t i = 0; i < cols; ++i) {
    if (h[i * cols + i] == 0) {
      h[i * cols + i] = 1;
      for (int64_t r = 0; r < rows; ++r) W[r * cols + i] = 0;
    }
  }
  GptqResult res;
  res.codes.assign(static_cast<size_t>(rows * cols), 0);
  res.scales.assign(static_cast<size_t>(rows * groups), 0);
  res.zeros.assign(static_cast<size_t>(rows * groups), 0);
  std::vector<QIntGrid> grid(static_cast<size_t>(rows * groups));
  auto set_grid = [&](int64_t r, int64_t k, const std::vector<float>& values) {
    grid[r * groups + k] = ChooseQIntGrid(values.data(), g, o.bits, o.symmetric);
    res.scales[r * groups + k] = grid[r * groups + k].scale_half;
    res.zeros[r * groups + k] = static_cast<uint8_t>(grid[r * groups + k].zero);
  };
  if (static_groups) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < groups; ++k) {
        set_grid(r, k, std::vector<float>(W.begin() + r * cols + k * g, W.begin() + r * cols + (k + 1) * g));
      }
    }
  }
  std::vector<int64_t> order(static_cast<size_t>(cols));
  for (int64_t i = 0; i < cols; ++i) order[i] = i;
  if (o.act_order) order = ActOrderPermutation(h.data(), cols);

  double mean = 0;
  for (int64_t i = 0; i < cols; ++i) mean += h[i * cols + i];
  for (int64_t i = 0; i < cols; ++i) h[i * cols + i] += o.percdamp * mean / static_cast<double>(cols);
  // Gauss-Jordan inverse with partial pivoting.
  std::vector<double> a = h, inv(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) inv[i * cols + i] = 1;
  for (int64_t c = 0; c < cols; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < cols; ++r) {
      if (std::fabs(a[r * cols + c]) > std::fabs(a[p * cols + c])) p = r;
    }
    for (int64_t k = 0; k < cols; ++k) {
      std::swap(a[c * cols + k], a[p * cols + k]);
      std::swap(inv[c * cols + k], inv[p * cols + k]);
    }
    const double piv = a[c * cols + c];
    for (int64_t k = 0; k < cols; ++k) {
      a[c * cols + k] /= piv;
      inv[c * cols + k] /= piv;
    }
    for (int64_t r = 0; r < cols; ++r) {
      if (r == c) continue;
      const double f = a[r * cols + c];
      if (f == 0) continue;
      for (int64_t k = 0; k < cols; ++k) {
        a[r * cols + k] -= f * a[c * cols + k];
        inv[r * cols + k] -= f * inv[c * cols + k];
      }
    }
  }
  std::vector<bool> done(static_cast<size_t>(cols), false);
  for (int64_t step = 0; step < cols; ++step) {
    const int64_t j = order[step];
    const int64_t k = j / g;
    if (!static_groups && step % g == 0) {
      // Without static groups the order is the identity unless g == cols (one group): the next g columns.
      for (int64_t r = 0; r < rows; ++r) {
        std::vector<float> values;
        for (int64_t i = step; i < step + g; ++i) values.push_back(static_cast<float>(W[r * cols + order[i]]));
        set_grid(r, k, values);
      }
    }
    const double d = inv[j * cols + j];
    for (int64_t r = 0; r < rows; ++r) {
      const int code = QIntCode(W[r * cols + j], grid[r * groups + k]);
      res.codes[r * cols + j] = static_cast<uint8_t>(code);
      const double e = (W[r * cols + j] - QIntValue(code, grid[r * groups + k])) / d;
      for (int64_t c = 0; c < cols; ++c) {
        if (!done[c] && c != j) W[r * cols + c] -= e * inv[j * cols + c];
      }
    }
    done[j] = true;
    // Remove column j from the inverse: the inverse Hessian of the remaining columns.
    std::vector<double> row_j(inv.begin() + j * cols, inv.begin() + (j + 1) * cols);
    for (int64_t a_ = 0; a_ < cols; ++a_) {
      if (done[a_]) continue;
      const double f = inv[a_ * cols + j] / d;
      for (int64_t b = 0; b < cols; ++b) {
        if (!done[b]) inv[a_ * cols + b] -= f * row_j[b];
      }
    }
  }
  return res;
}

struct Case {
  const char* name;
  GptqOptions o;
};

TEST(GptqTest, MatchesTextbookImplementation) {
  const int64_t rows = 12, cols = 256, n = 600;
  const std::vector<float> w = GaussianF(rows * cols, 1, 0.05);
  const std::vector<float> x = CorrelatedInputs(n, cols, 2, 1000, 4, 5.0);
  const std::vector<double> h = DirectHessian(x, n, cols);
  GptqOptions base;
  std::vector<Case> cases;
  auto add = [&](const char* name, auto edit) {
    GptqOptions o = base;
    edit(o);
    cases.push_back({name, o});
  };
  add("4-bit g128 sym", [](GptqOptions& o) { o.bits = 4; o.group = 128; });
  add("3-bit g64 sym (group inside a block)", [](GptqOptions& o) { o.bits = 3; o.group = 64; });
  add("2-bit g32 asym", [](GptqOptions& o) { o.bits = 2; o.group = 32; o.symmetric = false; });
  add("4-bit per-channel asym", [](GptqOptions& o) { o.bits = 4; o.group = 0; o.symmetric = false; });
  add("8-bit g64", [](GptqOptions& o) { o.bits = 8; o.group = 64; });
  add("4-bit g128, block 32 (group spans blocks)", [](GptqOptions& o) { o.group = 128; o.block_size = 32; });
  add("3-bit g64, block 48", [](GptqOptions& o) { o.bits = 3; o.group = 64; o.block_size = 48; });
  add("4-bit g64 act-order (static groups)", [](GptqOptions& o) { o.group = 64; o.act_order = true; });
  add("3-bit per-channel act-order", [](GptqOptions& o) { o.bits = 3; o.group = 0; o.act_order = true; });
  add("4-bit g64 static groups", [](GptqOptions& o) { o.group = 64; o.static_groups = true; });
  add("4-bit g128 damp 0.1", [](GptqOptions& o) { o.percdamp = 0.1; });
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto fast = GptqQuantize(w.data(), rows, cols, h.data(), c.o);
    ASSERT_TRUE(fast.ok()) << fast.status();
    const GptqResult slow = TextbookGptq(w, rows, cols, h, c.o);
    EXPECT_EQ(fast->scales, slow.scales);
    if (!c.o.symmetric) {
      EXPECT_EQ(fast->zeros, slow.zeros);
    }
    int64_t differing = 0;
    for (size_t i = 0; i < slow.codes.size(); ++i) differing += fast->codes[i] != slow.codes[i];
    if (differing > 0) {
      // Only a rounding tie decided differently by fp64 noise may separate them: same loss then.
      const double ef = OutputError(w, Decode(*fast, rows, cols, c.o.group), rows, cols, x, n);
      const double es = OutputError(w, Decode(slow, rows, cols, c.o.group), rows, cols, x, n);
      EXPECT_NEAR(ef, es, 1e-9 * es) << differing << " codes differ";
    }
    EXPECT_EQ(differing, 0);
  }
}

// The row split over a pool must not change a single byte: every row runs the same recurrence alone.
TEST(GptqTest, PoolSplitGivesIdenticalResult) {
  const int64_t rows = 75, cols = 256, n = 600;  // 75 rows: uneven chunks for 2 and 3 threads
  const std::vector<float> w = GaussianF(rows * cols, 11, 0.05);
  const std::vector<float> x = CorrelatedInputs(n, cols, 12, 1000, 4, 5.0);
  const std::vector<double> h = DirectHessian(x, n, cols);
  for (const bool act_order : {false, true}) {
    GptqOptions o;
    o.bits = 3;
    o.group = 64;
    o.act_order = act_order;
    auto alone = GptqQuantize(w.data(), rows, cols, h.data(), o);
    ASSERT_TRUE(alone.ok()) << alone.status();
    for (const int threads : {2, 3}) {
      ThreadPool pool(threads);
      o.pool = &pool;
      auto split = GptqQuantize(w.data(), rows, cols, h.data(), o);
      o.pool = nullptr;
      ASSERT_TRUE(split.ok()) << split.status();
      EXPECT_EQ(split->codes, alone->codes) << threads << " threads, act_order " << act_order;
      EXPECT_EQ(split->scales, alone->scales);
      EXPECT_EQ(split->zeros, alone->zeros);
    }
  }
}

struct Quantized {
  std::vector<float> decoded;
  Tensor tensor;
};

Quantized QuantizeWith(const std::string& method, const QuantParams& p, const std::vector<float>& w, int64_t rows,
                       int64_t cols, const calib::LayerStats* stats) {
  const QuantMethod* m = FindMethod(method);
  EXPECT_NE(m, nullptr);
  auto format = m->OutputFormat(p, rows, cols);
  EXPECT_TRUE(format.ok()) << format.status();
  auto bytes = m->Quantize(w.data(), rows, cols, p, nullptr, stats);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  Quantized q{{}, Tensor::FromBytes("w", {rows, cols}, *format, std::move(*bytes))};
  EXPECT_TRUE(ValidateTensor(q.tensor).ok());
  q.decoded.resize(static_cast<size_t>(rows * cols));
  EXPECT_TRUE(kernels::DequantizeRows(q.tensor, 0, rows, q.decoded.data()).ok());
  return q;
}

QuantParams Params(int bits, int group, bool act_order = false, bool symmetric = true) {
  QuantParams p;
  p.bits = bits;
  p.group = group;
  p.symmetric = symmetric;
  p.double_quant = false;
  p.act_order = act_order;
  return p;
}

// The point of GPTQ: with correlated inputs, error feedback through H lowers ||WX - ŴX||² well below
// round-to-nearest on the same grid; measured on held-out inputs from the same distribution.
TEST(GptqTest, BeatsRtnOnCorrelatedInputs) {
  const int64_t rows = 64, cols = 256, n = 2048;
  const std::vector<float> w = GaussianF(rows * cols, 3, 1.0 / 16);
  const std::vector<float> x = CorrelatedInputs(n, cols, 4);
  const std::vector<float> x_test = CorrelatedInputs(512, cols, 4 + 77);
  const calib::LayerStats stats = StatsOf(x, n, cols);
  struct Setting {
    int bits, group;
    bool symmetric;
    double max_ratio;  // GPTQ error / RTN error on held-out inputs must be at most this
  };
  // Measured ratios are ~0.53-0.58 at 3 and 4 bits, ~0.7 at 2 bits asymmetric.
  for (const Setting& s : {Setting{4, 128, true, 0.7}, Setting{3, 64, true, 0.7}, Setting{4, 0, true, 0.7},
                           Setting{4, 128, false, 0.7}, Setting{3, 64, false, 0.7}, Setting{2, 64, false, 0.85},
                           Setting{8, 128, true, 1.0}}) {
    SCOPED_TRACE(testing::Message() << s.bits << " bits, group " << s.group << (s.symmetric ? " sym" : " asym"));
    const Quantized rtn = QuantizeWith("rtn", Params(s.bits, s.group, false, s.symmetric), w, rows, cols, nullptr);
    const Quantized gptq = QuantizeWith("gptq", Params(s.bits, s.group, false, s.symmetric), w, rows, cols, &stats);
    const double e_rtn = OutputError(w, rtn.decoded, rows, cols, x_test, 512);
    const double e_gptq = OutputError(w, gptq.decoded, rows, cols, x_test, 512);
    EXPECT_LE(e_gptq, s.max_ratio * e_rtn) << "gptq " << e_gptq << " rtn " << e_rtn;
  }
  // 2-bit symmetric is qforge's absmax grid {-2, -1, 0, 1} * absmax: so coarse that the error feedback pushes
  // updated weights past the group's range (clipped). GPTQ still wins on its own objective, the calibration
  // inputs, and narrowly loses (~1.04x) on held-out ones in natural order; act-order recovers (~0.56x).
  {
    const Quantized rtn = QuantizeWith("rtn", Params(2, 64), w, rows, cols, nullptr);
    const Quantized gptq = QuantizeWith("gptq", Params(2, 64), w, rows, cols, &stats);
    const Quantized act = QuantizeWith("gptq", Params(2, 64, /*act_order=*/true), w, rows, cols, &stats);
    EXPECT_LE(OutputError(w, gptq.decoded, rows, cols, x, n), OutputError(w, rtn.decoded, rows, cols, x, n));
    EXPECT_LE(OutputError(w, act.decoded, rows, cols, x_test, 512),
              0.7 * OutputError(w, rtn.decoded, rows, cols, x_test, 512));
  }
}

// gptq_q4_0 writes ggml Q4_0 blocks: each block's scale is its own grid's (the signed largest of the updated
// weights / -8), so with no correlation to exploit (H diagonal: no feedback) it decodes within one step of
// ggml's Q4_0 of the same weights, and on correlated inputs its error feedback beats ggml's Q4_0 encoder.
TEST(GptqTest, GptqQ4_0IsAQ4_0FileThatBeatsQ4_0) {
  const int64_t rows = 64, cols = 256, n = 2048;
  const std::vector<float> w = GaussianF(rows * cols, 5, 1.0 / 16);
  const QuantParams p = FindMethod("gptq_q4_0")->DefaultParams();
  const Quantized plain = QuantizeWith("q4_0", FindMethod("q4_0")->DefaultParams(), w, rows, cols, nullptr);
  ASSERT_EQ(plain.tensor.format.type, WeightType::kQ4_0);
  {
    calib::LayerStats diagonal;
    diagonal.cols = cols;
    diagonal.tokens = n;
    diagonal.hessian.assign(static_cast<size_t>(cols * cols), 0.0);
    for (int64_t i = 0; i < cols; ++i) diagonal.hessian[i * cols + i] = 2.0;
    const Quantized g = QuantizeWith("gptq_q4_0", p, w, rows, cols, &diagonal);
    ASSERT_EQ(g.tensor.format.type, WeightType::kQ4_0);
    ASSERT_EQ(g.tensor.nbytes, plain.tensor.nbytes);
    int64_t differ = 0;
    for (int64_t i = 0; i < rows * cols; ++i) {
      float amax = 0;  // the block's grid step is its largest magnitude / 8
      for (int64_t j = i / 32 * 32; j < i / 32 * 32 + 32; ++j) amax = std::max(amax, std::fabs(w[j]));
      ASSERT_LE(std::fabs(g.decoded[i] - plain.decoded[i]), 1.01f * amax / 8) << i;
      differ += g.decoded[i] != plain.decoded[i];
    }
    // Only weights on a rounding boundary may differ (ggml rounds with the unrounded scale and half up).
    EXPECT_LT(differ, rows * cols / 50) << differ;
  }
  const std::vector<float> x = CorrelatedInputs(n, cols, 6);
  const std::vector<float> x_test = CorrelatedInputs(512, cols, 6 + 77);
  const calib::LayerStats stats = StatsOf(x, n, cols);
  const Quantized g = QuantizeWith("gptq_q4_0", p, w, rows, cols, &stats);
  const double e_plain = OutputError(w, plain.decoded, rows, cols, x_test, 512);
  const double e_gptq = OutputError(w, g.decoded, rows, cols, x_test, 512);
  EXPECT_LE(e_gptq, 0.75 * e_plain) << "gptq_q4_0 " << e_gptq << " q4_0 " << e_plain;
  QuantParams wrong = p;
  wrong.group = 64;
  EXPECT_EQ(FindMethod("gptq_q4_0")->Validate(wrong).code(), absl::StatusCode::kInvalidArgument);
}

// gptq_q2_k ... gptq_q6_k write ggml K-quant blocks. With H diagonal (no feedback) each super-block's header is
// the importance-weighted fit with importance H_jj + damping, and every weight its nearest code: the bytes of
// kernels::QuantizeRowWeighted but for float-versus-double rounding ties. On correlated inputs the feedback beats
// that importance-weighted encoding (llama-quantize --imatrix's, given the same diag(H)).
TEST(GptqTest, GptqKQuantsAreGgmlFilesThatBeatImportanceWeightedEncoding) {
  const int64_t rows = 32, cols = 512, n = 2048;
  const std::vector<float> w = GaussianF(rows * cols, 8, 1.0 / 16);
  calib::LayerStats diagonal;
  diagonal.cols = cols;
  diagonal.tokens = n;
  diagonal.hessian.assign(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) diagonal.hessian[i * cols + i] = 1.0 + static_cast<double>(i % 7);
  const std::vector<float> x = CorrelatedInputs(n, cols, 9);
  const std::vector<float> x_test = CorrelatedInputs(512, cols, 9 + 77);
  const calib::LayerStats stats = StatsOf(x, n, cols);
  for (const char* type : {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k"}) {
    SCOPED_TRACE(type);
    const std::string method = std::string("gptq_") + type;
    const QuantParams p = FindMethod(method)->DefaultParams();
    const kernels::GgmlKernelTraits& k = *kernels::FindGgmlKernels(FindGgmlTypeByName(type)->type);
    // The importance-weighted encoding of every row with importance `imp`, decoded.
    auto weighted = [&](const std::vector<float>& imp) {
      const size_t row_bytes = static_cast<size_t>(cols / 256 * FindGgmlType(k.type)->block_bytes);
      std::vector<uint8_t> bytes(row_bytes * rows);
      std::vector<float> decoded(static_cast<size_t>(rows * cols));
      for (int64_t r = 0; r < rows; ++r) {
        kernels::QuantizeRowWeighted(k, &w[r * cols], imp.data(), cols, &bytes[r * row_bytes]);
        k.dequantize(&bytes[r * row_bytes], cols / 256, &decoded[r * cols]);
      }
      return decoded;
    };
    {
      const Quantized g = QuantizeWith(method, p, w, rows, cols, &diagonal);
      ASSERT_EQ(g.tensor.format.type, k.type);
      double mean = 0;
      for (int64_t i = 0; i < cols; ++i) mean += diagonal.hessian[i * cols + i];
      std::vector<float> imp(static_cast<size_t>(cols));
      for (int64_t i = 0; i < cols; ++i) imp[i] = static_cast<float>(diagonal.hessian[i * cols + i] + p.damp * mean / cols);
      const std::vector<float> ref = weighted(imp);
      int64_t differ = 0;
      for (int64_t i = 0; i < rows * cols; ++i) differ += g.decoded[i] != ref[i];
      EXPECT_LE(differ, rows * cols / 1000) << differ;  // measured: none differ
    }
    const Quantized g = QuantizeWith(method, p, w, rows, cols, &stats);
    std::vector<float> diag(static_cast<size_t>(cols));
    for (int64_t i = 0; i < cols; ++i) diag[i] = static_cast<float>(stats.hessian[i * cols + i]);
    const double e_weighted = OutputError(w, weighted(diag), rows, cols, x_test, 512);
    const double e_gptq = OutputError(w, g.decoded, rows, cols, x_test, 512);
    // Measured 0.62 (q3_k) to 0.73 (q2_k).
    EXPECT_LE(e_gptq, 0.8 * e_weighted) << method << " " << e_gptq << " weighted " << e_weighted;
    QuantParams wrong = p;
    wrong.group = 128;
    EXPECT_EQ(FindMethod(method)->Validate(wrong).code(), absl::StatusCode::kInvalidArgument);
  }
}

// Act-order with static groups: the output is an ordinary kQInt tensor (contiguous groups), and on inputs
// where a few channels carry most of the energy it is at least as good as the natural order.
TEST(GptqTest, ActOrderWithStaticGroupsIsValidAndHelps) {
  const int64_t rows = 64, cols = 256, n = 2048;
  const std::vector<float> w = GaussianF(rows * cols, 5, 1.0 / 16);
  const std::vector<float> x = CorrelatedInputs(n, cols, 6, 1006, /*loud=*/8, /*loud_gain=*/10.0);
  const std::vector<float> x_test = CorrelatedInputs(512, cols, 6 + 77, 1006, 8, 10.0);
  const calib::LayerStats stats = StatsOf(x, n, cols);
  for (const int bits : {3, 4}) {
    SCOPED_TRACE(bits);
    const Quantized plain = QuantizeWith("gptq", Params(bits, 64), w, rows, cols, &stats);
    const Quantized act = QuantizeWith("gptq", Params(bits, 64, /*act_order=*/true), w, rows, cols, &stats);
    EXPECT_EQ(FormatName(act.tensor.format), bits == 4 ? "qint4_g64_sym" : "qint3_g64_sym");
    // The static grids are RTN's on the original groups: same scales as rtn.
    const Quantized rtn = QuantizeWith("rtn", Params(bits, 64), w, rows, cols, nullptr);
    QIntLayout l = *GetQIntLayout(act.tensor.format, rows, cols);
    EXPECT_EQ(0, std::memcmp(act.tensor.data + l.scales_offset, rtn.tensor.data + l.scales_offset,
                             2 * rows * l.groups_per_row));
    const double e_plain = OutputError(w, plain.decoded, rows, cols, x_test, 512);
    const double e_act = OutputError(w, act.decoded, rows, cols, x_test, 512);
    const double e_rtn = OutputError(w, rtn.decoded, rows, cols, x_test, 512);
    EXPECT_LE(e_act, 1.02 * e_plain) << "act " << e_act << " plain " << e_plain;
    EXPECT_LT(e_act, 0.8 * e_rtn);
  }
}

// Inputs that never fire (H_ii = 0): the weights there become exactly zero, nothing turns NaN, and the
// live columns are quantized as if the dead ones were absent.
TEST(GptqTest, DeadColumns) {
  const int64_t rows = 16, cols = 128, n = 512;
  std::vector<float> x = CorrelatedInputs(n, cols, 8);
  const std::vector<int64_t> dead = {0, 5, 64, 127};
  for (int64_t t = 0; t < n; ++t) {
    for (const int64_t c : dead) x[t * cols + c] = 0;
  }
  const calib::LayerStats stats = StatsOf(x, n, cols);
  for (const int64_t c : dead) ASSERT_EQ(stats.hessian[c * cols + c], 0.0);
  const std::vector<float> w = GaussianF(rows * cols, 9, 0.1);
  for (const bool act : {false, true}) {
    const Quantized q = QuantizeWith("gptq", Params(4, 32, act), w, rows, cols, &stats);
    for (const float v : q.decoded) ASSERT_TRUE(std::isfinite(v));
    for (int64_t r = 0; r < rows; ++r) {
      for (const int64_t c : dead) EXPECT_EQ(q.decoded[r * cols + c], 0.0f) << r << "," << c;
    }
    const Quantized rtn = QuantizeWith("rtn", Params(4, 32), w, rows, cols, nullptr);
    EXPECT_LT(OutputError(w, q.decoded, rows, cols, x, n), OutputError(w, rtn.decoded, rows, cols, x, n));
  }
  // Every input dead: all weights zero, still a valid tensor.
  calib::LayerStats none = stats;
  std::fill(none.hessian.begin(), none.hessian.end(), 0.0);
  const Quantized z = QuantizeWith("gptq", Params(4, 32), w, rows, cols, &none);
  for (const float v : z.decoded) EXPECT_EQ(v, 0.0f);
}

// A singular Hessian: without damping the Cholesky factorization fails cleanly, with the default damping
// GPTQ works (fewer tokens than inputs is the practical case).
TEST(GptqTest, DampingMakesSingularHessianWork) {
  const int64_t rows = 8, cols = 64;
  // kron(I, [[1, 1], [1, 1]]): exactly singular in floating point too (the second pivot of each pair is 1 - 1).
  std::vector<double> h(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; i += 2) {
    h[i * cols + i] = h[i * cols + i + 1] = h[(i + 1) * cols + i] = h[(i + 1) * cols + i + 1] = 1.0;
  }
  const std::vector<float> w = GaussianF(rows * cols, 10, 0.1);
  GptqOptions o;
  o.group = 32;
  o.percdamp = 0;
  auto undamped = GptqQuantize(w.data(), rows, cols, h.data(), o);
  ASSERT_FALSE(undamped.ok());
  EXPECT_EQ(undamped.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(undamped.status().message(), HasSubstr("positive definite"));
  o.percdamp = 0.01;
  ASSERT_TRUE(GptqQuantize(w.data(), rows, cols, h.data(), o).ok());

  // Rank-deficient from data: 48 tokens for 128 inputs.
  const int64_t c2 = 128, n = 48;
  const std::vector<float> x = CorrelatedInputs(n, c2, 11);
  const calib::LayerStats stats = StatsOf(x, n, c2);
  const std::vector<float> w2 = GaussianF(rows * c2, 12, 0.1);
  const Quantized q = QuantizeWith("gptq", Params(4, 64), w2, rows, c2, &stats);
  const Quantized rtn = QuantizeWith("rtn", Params(4, 64), w2, rows, c2, nullptr);
  for (const float v : q.decoded) ASSERT_TRUE(std::isfinite(v));
  EXPECT_LT(OutputError(w2, q.decoded, rows, c2, x, n), OutputError(w2, rtn.decoded, rows, c2, x, n));
}

TEST(GptqTest, MethodNeedsCalibration) {
  const QuantMethod* m = FindMethod("gptq");
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->NeedsCalibration());
  EXPECT_FALSE(FindMethod("rtn")->NeedsCalibration());
  const std::vector<float> w = GaussianF(4 * 64, 13);
  auto no_stats = m->Quantize(w.data(), 4, 64, Params(4, 32), nullptr);
  EXPECT_EQ(no_stats.status().code(), absl::StatusCode::kFailedPrecondition);
  calib::LayerStats wrong = StatsOf(CorrelatedInputs(100, 32, 14), 100, 32);
  auto mismatch = m->Quantize(w.data(), 4, 64, Params(4, 32), nullptr, &wrong);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(m->Validate(Params(9, 32)).ok());
  // A group that does not divide the row falls back to per-channel GPTQ.
  auto fb = m->Fallback(Params(4, 48, true));
  ASSERT_TRUE(fb.has_value());
  EXPECT_EQ(fb->first, "gptq");
  EXPECT_EQ(fb->second.group, 0);
}

TEST(GptqTest, QuantizeModelRequiresAndUsesCalibration) {
  const Model in = MakeSyntheticModel(TinyTestConfig(), 3);
  QuantRecipe recipe;
  recipe.method = "gptq";
  recipe.params = Params(4, 32);
  auto r = QuantizeModel(in, recipe, nullptr);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  // Identity-like statistics for every linear: GPTQ with H ∝ I is RTN (no off-diagonal feedback).
  calib::CalibrationStats stats;
  for (const std::string& name : LinearWeightNames(in.config)) {
    const Tensor* t = in.Find(name);
    auto s = std::make_shared<calib::LayerStats>();
    s->cols = t->cols();
    s->tokens = 1;
    s->hessian.assign(static_cast<size_t>(s->cols * s->cols), 0.0);
    for (int64_t i = 0; i < s->cols; ++i) s->hessian[i * s->cols + i] = 2.0;
    stats[name] = s;
  }
  recipe.calibration = &stats;
  r = QuantizeModel(in, recipe, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  QuantRecipe rtn_recipe = recipe;
  rtn_recipe.method = "rtn";
  auto rtn = QuantizeModel(in, rtn_recipe, nullptr);
  ASSERT_TRUE(rtn.ok()) << rtn.status();
  for (const std::string& name : LinearWeightNames(in.config)) {
    const Tensor& a = r->model.tensors.at(name);
    const Tensor& b = rtn->model.tensors.at(name);
    ASSERT_EQ(a.nbytes, b.nbytes) << name;
    EXPECT_EQ(0, std::memcmp(a.data, b.data, a.nbytes)) << name;
  }
  for (const TensorQuantReport& t : r->report.tensors) {
    EXPECT_GT(t.output_rel_error, 0) << t.name;
    // With H = 2I the output error is the weight error.
    EXPECT_NEAR(t.output_rel_error, t.rel_error, 1e-9) << t.name;
  }
  EXPECT_EQ(r->model.metadata.at("quant.method"), "gptq");
}

}  // namespace
}  // namespace qforge::quant
