// QuIP: the generated factors are orthogonal and reproducible, the transforms are undone exactly, a kquip
// tensor multiplies as Uᵀ·dequant(W')·V·x, QuIP beats GPTQ on layers that are not incoherent, validation names
// the field, and stories260K runs end to end (calibrate -> quantize -> runtime, batched == single).
#include "core/quant/quip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <unistd.h>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/calib/collect.h"
#include "core/calib/stats.h"
#include "core/formats/formats.h"
#include "core/formats/parsers.h"
#include "core/kernels/kernels.h"
#include "core/kernels/orthogonal.h"
#include "core/kernels/quip.h"
#include "core/model/synthetic.h"
#include "core/quant/gptq.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "gmock/gmock.h"
#include "core/quant/test_util.h"
#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

using test_util::GaussianF;
using test_util::Logits;
using test_util::StatsOf;

using ::testing::HasSubstr;

double OutputError(const std::vector<float>& w, const std::vector<float>& w_hat, int64_t rows, int64_t cols,
                   const calib::LayerStats& st) {
  double err = 0, ref = 0;
  LayerOutputError(w.data(), w_hat.data(), rows, cols, st.hessian.data(), &err, &ref);
  return std::sqrt(err / ref);
}

// ‖QᵀQ - I‖_F for a row-major n x n matrix.
double OrthogonalityError(const std::vector<double>& q, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double d = 0;
      for (int64_t k = 0; k < n; ++k) d += q[k * n + i] * q[k * n + j];
      d -= i == j ? 1.0 : 0.0;
      s += d * d;
    }
  }
  return std::sqrt(s);
}

TEST(OrthogonalTest, FactorsAreOrthogonalHaarQrOfTheSeededGaussians) {
  for (int64_t n : {1, 2, 3, 8, 43, 64, 128}) {
    SCOPED_TRACE(n);
    const std::vector<double> q = kernels::RandomOrthogonal(n, 1234 + n);
    EXPECT_LE(OrthogonalityError(q, n), 1e-12);
    // Q is the Q of QR(G) for the Gaussians the seed produces, with R's diagonal positive: R = QᵀG is upper
    // triangular with a positive diagonal.
    kernels::SplitMix64 rng(1234 + n);
    std::vector<double> g(static_cast<size_t>(n * n));
    for (double& v : g) v = rng.Gaussian();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double r = 0;
        for (int64_t k = 0; k < n; ++k) r += q[k * n + i] * g[k * n + j];
        if (i > j) EXPECT_NEAR(r, 0.0, 1e-11) << i << "," << j;
        if (i == j) EXPECT_GT(r, 0.0) << i;
      }
    }
    // The same seed gives the same bits; another seed another matrix.
    EXPECT_EQ(q, kernels::RandomOrthogonal(n, 1234 + n));
    if (n > 1) EXPECT_NE(q, kernels::RandomOrthogonal(n, 99));
  }
}

TEST(OrthogonalTest, GaussiansLookGaussianAndLogIsAccurate) {
  kernels::SplitMix64 rng(7);
  const int n = 200000;
  double s1 = 0, s2 = 0, s4 = 0;
  for (int i = 0; i < n; ++i) {
    const double z = rng.Gaussian();
    s1 += z;
    s2 += z * z;
    s4 += z * z * z * z;
  }
  EXPECT_NEAR(s1 / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
  EXPECT_NEAR(s4 / n, 3.0, 0.05);
  for (double x : {1e-300, 1e-10, 0.1, 0.5, 0.7071, 1.0, 1.5, 2.0, 3.14159, 1e10, 1e300}) {
    EXPECT_NEAR(kernels::DeterministicLog(x), std::log(x), 4e-16 * std::max(1.0, std::fabs(std::log(x)))) << x;
  }
}

TEST(OrthogonalTest, KroneckerSplitAndApply) {
  EXPECT_EQ(kernels::KroneckerSplit(64), 8);
  EXPECT_EQ(kernels::KroneckerSplit(172), 4);
  EXPECT_EQ(kernels::KroneckerSplit(512), 16);
  EXPECT_EQ(kernels::KroneckerSplit(43), 1);
  EXPECT_EQ(kernels::KroneckerSplit(1), 1);
  EXPECT_EQ(kernels::KroneckerSplit(12), 3);
  for (auto [a, b] : std::vector<std::pair<int64_t, int64_t>>{{4, 43}, {8, 8}, {1, 7}, {3, 5}}) {
    SCOPED_TRACE(a * 100 + b);
    const kernels::KroneckerOrthogonal k = kernels::MakeKroneckerOrthogonal(a, b, 42, 1);
    const int64_t n = a * b;
    const std::vector<double> dense = k.Dense();
    EXPECT_LE(OrthogonalityError(dense, n), 1e-12);
    std::mt19937 rng(3);
    std::normal_distribution<double> d;
    std::vector<double> x(n), y(n), z(n), tmp(n);
    for (double& v : x) v = d(rng);
    k.Apply(x.data(), y.data(), tmp.data());
    double err = 0;
    for (int64_t i = 0; i < n; ++i) {
      double s = 0;
      for (int64_t j = 0; j < n; ++j) s += dense[i * n + j] * x[j];
      err = std::max(err, std::fabs(s - y[i]));
    }
    EXPECT_LE(err, 1e-12);
    // The transpose undoes it.
    k.ApplyTranspose(y.data(), z.data(), tmp.data());
    for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(z[i], x[i], 1e-12);
  }
}

TEST(QuipFormatTest, NamesRoundTripAndSizes) {
  for (auto f : {WeightFormat::Quip(2, 0, false), WeightFormat::Quip(3, 64, true), WeightFormat::Quip(8, 32, false)}) {
    auto p = ParseFormatName(FormatName(f));
    ASSERT_TRUE(p.ok()) << FormatName(f);
    EXPECT_EQ(*p, f);
  }
  EXPECT_EQ(FormatName(WeightFormat::Quip(2, 64, true)), "quip2_g64_sym");
  EXPECT_FALSE(ParseFormatName("quip9_pc_sym").ok());
  EXPECT_FALSE(ParseFormatName("quip2_x_sym").ok());
  auto l = GetQuipLayout(WeightFormat::Quip(2, 0, true), 32, 172);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->payload_offset, 384u);  // 32 + 2*172 = 376, rounded up to 32
  EXPECT_EQ(l->total_bytes, 384u + 32 * 172 / 4 + 2 * 32);
  EXPECT_EQ(*EncodedBytes(WeightFormat::Quip(2, 0, true), 32, 172), l->total_bytes);
  auto planes = PlaneSizes(WeightFormat::Quip(2, 0, true), 32, 172);
  ASSERT_TRUE(planes.ok());
  EXPECT_EQ(planes->size(), 1u);
}

// A layer that is not incoherent: Gaussian weights with a few huge entries, inputs with a few loud channels
// and correlated directions.
struct Layer {
  int64_t rows, cols;
  std::vector<float> w, x_calib, x_test;
  int64_t n_calib, n_test;
};

Layer OutlierLayer(int64_t rows, int64_t cols, uint32_t seed) {
  Layer L{rows, cols, GaussianF(rows * cols, seed), {}, {}, 2048, 2048};
  std::mt19937 rng(seed + 1);
  for (int k = 0; k < static_cast<int>(rows * cols / 200); ++k) L.w[rng() % (rows * cols)] *= 12.0f;
  const std::vector<float> mix = GaussianF(cols * cols, seed + 2, 1.0 / std::sqrt(static_cast<double>(cols)));
  auto inputs = [&](int64_t n, uint32_t s) {
    const std::vector<float> z = GaussianF(n * cols, s);
    std::vector<float> x(static_cast<size_t>(n * cols));
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j < cols; ++j) {
        double v = 0.5 * z[t * cols + j];
        for (int64_t k = 0; k < cols; ++k) v += z[t * cols + k] * mix[k * cols + j];
        if (j % 16 == 0) v *= 8.0;
        x[t * cols + j] = static_cast<float>(v);
      }
    }
    return x;
  };
  L.x_calib = inputs(L.n_calib, seed + 3);
  L.x_test = inputs(L.n_test, seed + 4);
  return L;
}

absl::StatusOr<std::vector<float>> QuantizeDequantize(const std::string& method, const QuantParams& p,
                                                      const Layer& L, const calib::LayerStats& st) {
  const QuantMethod* m = FindMethod(method);
  if (m == nullptr) return absl::NotFoundError(method);
  Tensor in = Tensor::FromFloats("w", {L.rows, L.cols}, L.w);
  auto q = QuantizeTensor(in, *m, p, nullptr, nullptr, &st);
  if (!q.ok()) return q.status();
  std::vector<float> w_hat(L.w.size());
  if (auto s = kernels::DequantizeRows(*q, 0, L.rows, w_hat.data()); !s.ok()) return s;
  return w_hat;
}

TEST(QuipTest, BeatsGptqOnLayersThatAreNotIncoherent) {
  const Layer L = OutlierLayer(96, 128, 11);
  const calib::LayerStats st = StatsOf(L.x_calib, L.n_calib, L.cols);
  const calib::LayerStats test = StatsOf(L.x_test, L.n_test, L.cols);
  for (int bits : {2, 3}) {
    for (int group : {0, 64}) {
      for (bool sym : {false, true}) {
        SCOPED_TRACE(absl::StrCat(bits, " bits, group ", group, sym ? " sym" : " asym"));
        QuantParams p;
        p.bits = bits;
        p.group = group;
        p.symmetric = sym;
        auto g = QuantizeDequantize("gptq", p, L, st);
        auto q = QuantizeDequantize("quip", p, L, st);
        ASSERT_TRUE(g.ok()) << g.status();
        ASSERT_TRUE(q.ok()) << q.status();
        const double eg = OutputError(L.w, *g, L.rows, L.cols, test);
        const double eq = OutputError(L.w, *q, L.rows, L.cols, test);
        // The incoherence alone: LDLQ on GPTQ's own grid rule, no greedy passes.
        QuipOptions o;
        o.bits = bits;
        o.group = group;
        o.symmetric = sym;
        o.seed = 17;
        auto bytes = QuipQuantize(L.w.data(), L.rows, L.cols, st.hessian.data(), o);
        ASSERT_TRUE(bytes.ok()) << bytes.status();
        Tensor t = Tensor::FromBytes("w", {L.rows, L.cols}, WeightFormat::Quip(bits, group, sym), *bytes);
        std::vector<float> w_ldlq(L.w.size());
        ASSERT_TRUE(kernels::DequantizeRows(t, 0, L.rows, w_ldlq.data()).ok());
        const double el = OutputError(L.w, w_ldlq, L.rows, L.cols, test);
        std::printf("bits %d group %d %s: gptq %.4f quip %.4f (%.3f) ldlq-only %.4f (%.3f)\n", bits, group,
                    sym ? "sym" : "asym", eg, eq, eq / eg, el, el / eg);
        EXPECT_LT(eq, 0.9 * eg);
        EXPECT_LT(el, 0.9 * eg);
      }
    }
  }
}


// A kquip tensor of [rows, cols] quantized from Gaussian weights on correlated inputs.
struct Quantized {
  std::vector<float> w;
  calib::LayerStats stats;
  Tensor t;
};

Quantized MakeQuip(int64_t rows, int64_t cols, QuantParams p, uint32_t seed = 5) {
  Quantized q;
  q.w = GaussianF(rows * cols, seed);
  const std::vector<float> x = GaussianF(512 * cols, seed + 1);
  q.stats = StatsOf(x, 512, cols);
  Tensor in = Tensor::FromFloats("blk.0.attn_q.weight", {rows, cols}, q.w);
  auto t = QuantizeTensor(in, *FindMethod("quip"), p, nullptr, nullptr, &q.stats);
  EXPECT_TRUE(t.ok()) << t.status();
  if (t.ok()) q.t = *t;
  return q;
}

QuantParams Params(int bits, int group, bool sym, uint32_t seed = 0) {
  QuantParams p = FindMethod("quip")->DefaultParams();
  p.bits = bits;
  p.group = group;
  p.symmetric = sym;
  p.seed = seed;
  return p;
}

TEST(QuipTensorTest, MatMulIsUnrotatedDequantOfThePayload) {
  const int64_t rows = 48, cols = 172, n = 5;
  // 4 bits: 172 x 3 bits would not be whole bytes.
  const Quantized q = MakeQuip(rows, cols, Params(4, 0, false));
  ASSERT_EQ(q.t.format, WeightFormat::Quip(4, 0, false));
  auto tr = kernels::QuipTransform::Create(q.t);
  ASSERT_TRUE(tr.ok()) << tr.status();
  const kernels::QuipTransform& Q = **tr;
  EXPECT_EQ(Q.u().a, 6);
  EXPECT_EQ(Q.u().b, 8);
  EXPECT_EQ(Q.v().a, 4);
  EXPECT_EQ(Q.v().b, 43);
  // With rescaling on and loud-free inputs the scales still differ from 1 (they follow diag H / |W_j|²).
  const std::vector<double> U = Q.u().Dense(), V = Q.v().Dense();
  EXPECT_LE(OrthogonalityError(U, rows), 1e-12);
  EXPECT_LE(OrthogonalityError(V, cols), 1e-12);
  std::vector<float> wp(static_cast<size_t>(rows * cols));
  ASSERT_TRUE(kernels::DequantizeRows(Q.payload(), 0, rows, wp.data()).ok());
  // Dense reference: W = Uᵀ W' V diag(c).
  std::vector<double> wpv(static_cast<size_t>(rows * cols), 0.0), w_ref(static_cast<size_t>(rows * cols), 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k)
      for (int64_t j = 0; j < cols; ++j) wpv[i * cols + j] += wp[i * cols + k] * V[k * cols + j];
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < rows; ++k)
      for (int64_t j = 0; j < cols; ++j) w_ref[i * cols + j] += U[k * rows + i] * wpv[k * cols + j] * Q.col_scales()[j];
  std::vector<float> w_hat(static_cast<size_t>(rows * cols));
  ASSERT_TRUE(kernels::DequantizeRows(q.t, 0, rows, w_hat.data()).ok());
  double wmax = 0, werr = 0;
  for (size_t i = 0; i < w_hat.size(); ++i) {
    wmax = std::max(wmax, std::fabs(w_ref[i]));
    werr = std::max(werr, std::fabs(w_ref[i] - w_hat[i]));
  }
  EXPECT_LE(werr, 1e-6 * wmax);
  // A row range of DequantizeRows is those rows of the whole.
  std::vector<float> part(static_cast<size_t>(7 * cols));
  ASSERT_TRUE(kernels::DequantizeRows(q.t, 20, 27, part.data()).ok());
  EXPECT_TRUE(std::equal(part.begin(), part.end(), w_hat.begin() + 20 * cols));

  const std::vector<float> x = GaussianF(n * cols, 77);
  ThreadPool pool(3);
  std::vector<float> y(static_cast<size_t>(n * rows));
  ASSERT_TRUE(kernels::QuipMatMul(Q, x.data(), n, y.data(), rows, &pool).ok());
  double ymax = 0, e_ref = 0, e_deq = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < rows; ++i) {
      double a = 0, b = 0;
      for (int64_t j = 0; j < cols; ++j) {
        a += w_ref[i * cols + j] * x[t * cols + j];
        b += static_cast<double>(w_hat[i * cols + j]) * x[t * cols + j];
      }
      ymax = std::max(ymax, std::fabs(a));
      e_ref = std::max(e_ref, std::fabs(a - y[t * rows + i]));
      e_deq = std::max(e_deq, std::fabs(b - y[t * rows + i]));
    }
  }
  EXPECT_LE(e_ref, 1e-5 * ymax);
  EXPECT_LE(e_deq, 1e-5 * ymax);
  // Each token alone, and MatMulRows on a row range, give the same bits.
  for (int64_t t = 0; t < n; ++t) {
    std::vector<float> y1(static_cast<size_t>(rows));
    ASSERT_TRUE(kernels::QuipMatMul(Q, x.data() + t * cols, 1, y1.data(), rows, nullptr).ok());
    EXPECT_TRUE(std::equal(y1.begin(), y1.end(), y.begin() + t * rows)) << t;
  }
  std::vector<float> yr(static_cast<size_t>(n * rows), -1.0f);
  ASSERT_TRUE(kernels::MatMulRows(q.t, 10, 30, x.data(), n, yr.data(), rows).ok());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < rows; ++i) {
      if (i >= 10 && i < 30) {
        EXPECT_EQ(yr[t * rows + i], y[t * rows + i]);
      } else {
        EXPECT_EQ(yr[t * rows + i], -1.0f);
      }
    }
  }
}

TEST(QuipTensorTest, SameSeedSameBytesOtherSeedOtherTransforms) {
  const Quantized a = MakeQuip(32, 64, Params(2, 32, false, 7));
  const Quantized b = MakeQuip(32, 64, Params(2, 32, false, 7));
  const Quantized c = MakeQuip(32, 64, Params(2, 32, false, 8));
  ASSERT_EQ(a.t.nbytes, b.t.nbytes);
  EXPECT_TRUE(std::equal(a.t.data, a.t.data + a.t.nbytes, b.t.data));
  auto ta = kernels::QuipTransform::Create(a.t), tc = kernels::QuipTransform::Create(c.t);
  ASSERT_TRUE(ta.ok() && tc.ok());
  EXPECT_NE((*ta)->header().seed, (*tc)->header().seed);
  EXPECT_NE((*ta)->u().A, (*tc)->u().A);
  EXPECT_EQ((*ta)->header().seed, QuipTensorSeed(7, a.w.data(), 32, 64));
  // The stored seed also depends on the weights: another matrix of the same shape gets other transforms.
  std::vector<float> w2 = a.w;
  w2[5] += 1.0f;
  EXPECT_NE(QuipTensorSeed(7, w2.data(), 32, 64), QuipTensorSeed(7, a.w.data(), 32, 64));
}

TEST(QuipTensorTest, QkOrderIsRecordedNotPermuted) {
  const int64_t rows = 64, cols = 64;
  const Quantized q = MakeQuip(rows, cols, Params(4, 0, false));
  std::vector<float> w_hat(static_cast<size_t>(rows * cols));
  ASSERT_TRUE(kernels::DequantizeRows(q.t, 0, rows, w_hat.data()).ok());
  auto hf = formats::PermuteQkToHf(q.t, 4);
  ASSERT_TRUE(hf.ok()) << hf.status();
  // The same permutation applied to the decoded matrix.
  auto hf_ref = formats::PermuteQkToHf(Tensor::FromFloats("w", {rows, cols}, w_hat), 4);
  ASSERT_TRUE(hf_ref.ok());
  std::vector<float> got(static_cast<size_t>(rows * cols));
  ASSERT_TRUE(kernels::DequantizeRows(*hf, 0, rows, got.data()).ok());
  EXPECT_EQ(0, std::memcmp(got.data(), hf_ref->data, got.size() * 4));
  auto back = formats::PermuteQkFromHf(*hf, 4);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(std::equal(back->data, back->data + back->nbytes, q.t.data));
  EXPECT_FALSE(formats::PermuteQkToHf(*hf, 4).ok());    // already in HF order
  EXPECT_FALSE(formats::PermuteQkFromHf(q.t, 4).ok());  // not in HF order
}

TEST(QuipMethodTest, ValidationErrorsNameTheField) {
  const QuantMethod* m = FindMethod("quip");
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->NeedsCalibration());
  QuantParams p = m->DefaultParams();
  p.bits = 1;
  EXPECT_THAT(m->Validate(p).message(), HasSubstr("bits"));
  p = m->DefaultParams();
  p.group = -1;
  EXPECT_THAT(m->Validate(p).message(), HasSubstr("group"));
  p = m->DefaultParams();
  p.damp = -1;
  EXPECT_THAT(m->Validate(p).message(), HasSubstr("damp"));
  p = m->DefaultParams();
  p.group = 48;
  EXPECT_THAT(m->OutputFormat(p, 8, 64).status().message(), HasSubstr("group 48"));
  EXPECT_THAT(m->OutputFormat(m->DefaultParams(), 2053, 8).status().message(), HasSubstr("output dimension 2053"));
  const std::vector<float> w = GaussianF(8 * 64, 1);
  auto no_stats = m->Quantize(w.data(), 8, 64, m->DefaultParams(), nullptr, nullptr);
  EXPECT_EQ(no_stats.status().code(), absl::StatusCode::kFailedPrecondition);
  const calib::LayerStats st32 = StatsOf(GaussianF(64 * 32, 2), 64, 32);
  EXPECT_THAT(m->Quantize(w.data(), 8, 64, m->DefaultParams(), nullptr, &st32).status().message(),
              HasSubstr("calibration statistics are for 32 inputs"));

  // Corrupt headers are refused with the tensor's name and the field.
  Quantized q = MakeQuip(32, 64, Params(2, 0, false));
  auto corrupt = [&](size_t offset, uint32_t value) {
    std::vector<uint8_t> b(q.t.data, q.t.data + q.t.nbytes);
    std::memcpy(b.data() + offset, &value, 4);
    return Tensor::FromBytes("blk.3.ffn_up.weight", q.t.shape, q.t.format, std::move(b));
  };
  auto bad_factor = kernels::QuipTransform::Create(corrupt(QuipLayout::kFactorsOffset, 5));
  EXPECT_THAT(bad_factor.status().message(), HasSubstr("blk.3.ffn_up.weight"));
  EXPECT_THAT(bad_factor.status().message(), HasSubstr("output factors"));
  EXPECT_THAT(kernels::QuipTransform::Create(corrupt(QuipLayout::kQkHeadsOffset, 3)).status().message(),
              HasSubstr("qk_heads"));
  EXPECT_THAT(kernels::QuipTransform::Create(corrupt(QuipLayout::kReservedOffset, 1)).status().message(),
              HasSubstr("reserved"));
  std::vector<float> out(32 * 64);
  EXPECT_FALSE(kernels::DequantizeRows(corrupt(QuipLayout::kFactorsOffset + 8, 0), 0, 32, out.data()).ok());
}

TEST(QuipMethodTest, FallbacksFollowTheShape) {
  const QuantMethod* m = FindMethod("quip");
  // A group that does not divide the row: quip per row.
  {
    const std::vector<float> w = GaussianF(16 * 64, 3);
    const calib::LayerStats st = StatsOf(GaussianF(256 * 64, 4), 256, 64);
    TensorQuantReport r;
    auto t = QuantizeTensor(Tensor::FromFloats("w", {16, 64}, w), *m, Params(2, 48, false), nullptr, &r, &st);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(r.method, "quip");
    EXPECT_EQ(r.format, "quip2_pc_asym");
    EXPECT_TRUE(r.fell_back);
  }
  // A prime output dimension above kQuipMaxFactor: gptq at the same bits.
  {
    const std::vector<float> w = GaussianF(2053 * 8, 5);
    const calib::LayerStats st = StatsOf(GaussianF(256 * 8, 6), 256, 8);
    TensorQuantReport r;
    auto t = QuantizeTensor(Tensor::FromFloats("w", {2053, 8}, w), *m, Params(4, 0, false), nullptr, &r, &st);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(r.method, "gptq");
    EXPECT_EQ(r.format, "qint4_pc_asym");
  }
}

TEST(QuipMethodTest, GreedyPassesNeverIncreaseTheLoss) {
  const Layer L = OutlierLayer(64, 128, 21);
  const calib::LayerStats st = StatsOf(L.x_calib, L.n_calib, L.cols);
  bool some_better = false;
  for (int bits : {2, 3}) {
    for (int group : {0, 32}) {
      QuipOptions o;
      o.bits = bits;
      o.group = group;
      o.symmetric = false;
      o.rescale = false;  // so the loss below is exactly the damped loss LDLQ and the passes see
      o.seed = 99;
      auto loss = [&](int passes) {
        o.greedy_passes = passes;
        auto bytes = QuipQuantize(L.w.data(), L.rows, L.cols, st.hessian.data(), o);
        EXPECT_TRUE(bytes.ok()) << bytes.status();
        Tensor t = Tensor::FromBytes("w", {L.rows, L.cols}, WeightFormat::Quip(bits, group, false), *bytes);
        std::vector<float> w_hat(L.w.size());
        EXPECT_TRUE(kernels::DequantizeRows(t, 0, L.rows, w_hat.data()).ok());
        // Rotations preserve the trace, so the damping on H' equals the damping on H.
        std::vector<double> h = st.hessian;
        double md = 0;
        for (int64_t j = 0; j < L.cols; ++j) md += h[j * L.cols + j];
        for (int64_t j = 0; j < L.cols; ++j) h[j * L.cols + j] += o.percdamp * md / L.cols;
        double err = 0, ref = 0;
        LayerOutputError(L.w.data(), w_hat.data(), L.rows, L.cols, h.data(), &err, &ref);
        return err;
      };
      const double ldlq = loss(0), greedy = loss(4);
      std::printf("bits %d group %d: ldlq %.5g greedy %.5g\n", bits, group, ldlq, greedy);
      EXPECT_LE(greedy, ldlq * (1 + 1e-5));
      some_better |= greedy < ldlq * (1 - 1e-3);
    }
  }
  EXPECT_TRUE(some_better);
}

TEST(QuipMethodTest, MseGridsHelpAtTwoBits) {
  const Layer L = OutlierLayer(64, 128, 31);
  const calib::LayerStats st = StatsOf(L.x_calib, L.n_calib, L.cols);
  const calib::LayerStats test = StatsOf(L.x_test, L.n_test, L.cols);
  for (bool sym : {true, false}) {
    QuipOptions o;
    o.bits = 2;
    o.symmetric = sym;
    o.seed = 5;
    auto err = [&](bool mse) {
      o.mse_grid = mse;
      auto bytes = QuipQuantize(L.w.data(), L.rows, L.cols, st.hessian.data(), o);
      EXPECT_TRUE(bytes.ok()) << bytes.status();
      Tensor t = Tensor::FromBytes("w", {L.rows, L.cols}, WeightFormat::Quip(2, 0, sym), *bytes);
      std::vector<float> w_hat(L.w.size());
      EXPECT_TRUE(kernels::DequantizeRows(t, 0, L.rows, w_hat.data()).ok());
      return OutputError(L.w, w_hat, L.rows, L.cols, test);
    };
    const double absmax = err(false), mse = err(true);
    std::printf("2-bit %s: gptq grids %.4f, mse grids %.4f\n", sym ? "sym" : "asym", absmax, mse);
    EXPECT_LT(mse, 0.95 * absmax);
  }
}

std::vector<float> Logits(const std::shared_ptr<const Model>& m, const std::vector<int>& tokens,
                          RuntimeOptions options = {.threads = 2}) {
  auto t = Transformer::Create(m, options);
  EXPECT_TRUE(t.ok()) << t.status();
  std::vector<float> out(tokens.size() * m->config.vocab_size);
  EXPECT_TRUE((*t)->Forward(tokens, 0, out.data(), true).ok());
  return out;
}

TEST(QuipModelTest, Stories260KEndToEnd) {
  const std::string path = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << "no " << path;
  auto loaded = formats::ReadLlama2c(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Model& m = *loaded;
  std::vector<std::vector<int>> streams(4);
  std::mt19937 rng(5);
  for (auto& s : streams) {
    for (int i = 0; i < 96; ++i) s.push_back(static_cast<int>(rng() % m.config.vocab_size));
  }
  auto stats = calib::CollectCalibration(m, streams);
  ASSERT_TRUE(stats.ok()) << stats.status();
  QuantRecipe recipe{"quip", Params(4, 0, false, 3), false};
  recipe.calibration = &*stats;
  ThreadPool pool(2);
  auto q = QuantizeModel(m, recipe, &pool);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->report.fallbacks.empty());
  for (const TensorQuantReport& t : q->report.tensors) {
    EXPECT_EQ(t.format, "quip4_pc_asym") << t.name;
    EXPECT_GT(t.output_rel_error, 0) << t.name;
    EXPECT_LT(t.output_rel_error, 0.2) << t.name;
  }
  auto qm = std::make_shared<const Model>(q->model);
  // The same model with every quip matrix decoded to f32 (DequantizeRows): the runtime's rotated path must
  // compute the same function.
  Model deq = q->model;
  for (auto& [name, t] : deq.tensors) {
    if (t.format.type != WeightType::kQuip) continue;
    std::vector<float> w(static_cast<size_t>(t.numel()));
    ASSERT_TRUE(kernels::DequantizeRows(t, 0, t.rows(), w.data()).ok());
    t = Tensor::FromFloats(name, t.shape, w);
  }
  const std::vector<int> tokens = {1, 45, 300, 12, 7, 250, 499, 3, 88, 120, 64, 9};
  const std::vector<float> lq = Logits(qm, tokens);
  const std::vector<float> ld = Logits(std::make_shared<const Model>(deq), tokens);
  double mx = 0, diff = 0;
  for (size_t i = 0; i < lq.size(); ++i) {
    ASSERT_TRUE(std::isfinite(lq[i]));
    mx = std::max(mx, static_cast<double>(std::fabs(ld[i])));
    diff = std::max(diff, static_cast<double>(std::fabs(lq[i] - ld[i])));
  }
  EXPECT_LE(diff, 1e-4 * mx);

  // Batched with another sequence == alone, bit for bit.
  {
    auto t = Transformer::Create(qm, {.threads = 3, .max_batch = 5});
    ASSERT_TRUE(t.ok());
    auto ca = (*t)->NewCache(), cb = (*t)->NewCache();
    ASSERT_TRUE(ca.ok() && cb.ok());
    const std::vector<int> other = {2, 17, 402, 31, 5, 6, 77, 190, 11, 300, 23, 42};
    std::vector<BatchToken> batch;
    for (size_t i = 0; i < tokens.size(); ++i) {
      batch.push_back({&*ca, tokens[i], static_cast<int>(i), true});
      batch.push_back({&*cb, other[i], static_cast<int>(i), true});
    }
    const int V = m.config.vocab_size;
    std::vector<float> out(batch.size() * V);
    ASSERT_TRUE((*t)->ForwardBatch(batch, out.data()).ok());
    const std::vector<float> alone = Logits(qm, tokens, {.threads = 1, .max_batch = 1});
    for (size_t i = 0; i < tokens.size(); ++i) {
      EXPECT_EQ(0, std::memcmp(&out[2 * i * V], &alone[i * V], V * sizeof(float))) << i;
    }
  }

  // The calibration hook still sees the original inputs: blk.0.attn_q's input comes before any quantized
  // product, so it is the same in the fp32 and the quip model.
  auto observed = [&](std::shared_ptr<const Model> model) {
    std::vector<float> seen;
    RuntimeOptions o{.threads = 1};
    o.linear_observer = [&](const std::string& name, const float* x, int n, int cols) {
      if (name == "blk.0.attn_q.weight") seen.assign(x, x + static_cast<size_t>(n) * cols);
    };
    Logits(model, tokens, o);
    return seen;
  };
  const std::vector<float> seen_q = observed(qm);
  EXPECT_FALSE(seen_q.empty());
  EXPECT_EQ(seen_q, observed(std::make_shared<const Model>(m)));

  // Through safetensors (q/k in HF order on disk): the same tensors and logits come back.
  const std::string dir = std::filesystem::temp_directory_path() / ("qforge_quip_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(formats::WriteSafetensors(q->model, dir + "/m.safetensors").ok());
  auto back = formats::LoadModel(dir + "/m.safetensors");
  ASSERT_TRUE(back.ok()) << back.status();
  for (const auto& [name, t] : q->model.tensors) {
    const Tensor* u = back->Find(name);
    ASSERT_NE(u, nullptr) << name;
    EXPECT_EQ(u->format, t.format) << name;
    ASSERT_EQ(u->nbytes, t.nbytes) << name;
    EXPECT_EQ(0, std::memcmp(u->data, t.data, t.nbytes)) << name;
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qforge::quant
