// Calibration capture: the Hessian accumulator against a direct computation, and the runtime observer
// against the model's own arithmetic.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/calib/block_chain.h"
#include "core/calib/collect.h"
#include "core/calib/stats.h"
#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
#include "core/runtime/ops.h"
#include "core/runtime/transformer.h"
#include "gtest/gtest.h"

namespace qforge::calib {
namespace {

std::vector<float> Gaussian(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

TEST(StatsAccumulatorTest, MatchesDirectHessianAndChannelStats) {
  const int64_t cols = 48, n = 1300;  // more than one 512-row panel, fed in uneven chunks
  std::vector<float> x = Gaussian(n * cols, 1);
  for (int64_t t = 0; t < n; ++t) x[t * cols + 3] *= 10;  // channels of different scales
  StatsAccumulator acc(cols);
  for (int64_t t = 0, chunk = 1; t < n; t += chunk, chunk = chunk * 3 % 97 + 1) {
    acc.Add(&x[t * cols], std::min(chunk, n - t));
  }
  EXPECT_EQ(acc.tokens(), n);
  const LayerStats s = acc.Finish();
  ASSERT_EQ(s.cols, cols);
  ASSERT_EQ(s.tokens, n);
  for (int64_t i = 0; i < cols; ++i) {
    double mean_abs = 0, max_abs = 0;
    for (int64_t t = 0; t < n; ++t) {
      mean_abs += std::fabs(x[t * cols + i]);
      max_abs = std::max<double>(max_abs, std::fabs(x[t * cols + i]));
    }
    EXPECT_NEAR(s.mean_abs[i], mean_abs / n, 1e-12 * mean_abs);
    EXPECT_EQ(s.max_abs[i], max_abs);
    for (int64_t j = 0; j < cols; ++j) {
      double h = 0;
      for (int64_t t = 0; t < n; ++t) h += static_cast<double>(x[t * cols + i]) * x[t * cols + j];
      h = 2.0 * h / static_cast<double>(n);
      EXPECT_NEAR(s.hessian[i * cols + j], h, 1e-12 * (std::fabs(h) + 1)) << i << "," << j;
      EXPECT_EQ(s.hessian[i * cols + j], s.hessian[j * cols + i]);
    }
  }
}

TEST(StatsAccumulatorTest, EmptyIsZero) {
  StatsAccumulator acc(4);
  const LayerStats s = acc.Finish();
  EXPECT_EQ(s.tokens, 0);
  for (double v : s.hessian) EXPECT_EQ(v, 0.0);
}

struct Observation {
  int n = 0, cols = 0;
  std::vector<float> x;
};

std::vector<float> F32(const Tensor& t) {
  std::vector<float> v(static_cast<size_t>(t.numel()));
  EXPECT_TRUE(kernels::DequantizeRows(t, 0, t.rows(), v.data()).ok());
  return v;
}

// y[t, r] = W[r, :] · x[t, :] in double.
std::vector<double> Apply(const Tensor& w, const std::vector<float>& x, int n) {
  const std::vector<float> wf = F32(w);
  const int64_t rows = w.rows(), cols = w.cols();
  std::vector<double> y(static_cast<size_t>(n * rows));
  for (int t = 0; t < n; ++t) {
    for (int64_t r = 0; r < rows; ++r) {
      double s = 0;
      for (int64_t c = 0; c < cols; ++c) s += static_cast<double>(wf[r * cols + c]) * x[t * cols + c];
      y[t * rows + r] = s;
    }
  }
  return y;
}

std::vector<float> RmsNormRows(const std::vector<double>& h, int n, int dim, const Tensor& norm, float eps) {
  const std::vector<float> w = F32(norm);
  std::vector<float> in(h.begin(), h.end()), out(h.size());
  for (int t = 0; t < n; ++t) runtime_ops::RmsNorm(&in[t * dim], w.data(), dim, eps, &out[t * dim]);
  return out;
}

void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double e = 0, r = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    e += (static_cast<double>(got[i]) - want[i]) * (static_cast<double>(got[i]) - want[i]);
    r += static_cast<double>(want[i]) * want[i];
  }
  EXPECT_LT(std::sqrt(e / r), 1e-5) << what;
}

// The observer reports every matrix product with the weight's name and shape, and the reported inputs are
// the real ones: pushing each layer's observed X through its weight (plus the model's own glue: residual
// adds, RMSNorm, SwiGLU) reproduces the next observed input, and the classifier's reproduces the logits.
TEST(ObserverTest, SeesEveryLinearAndItsInputsReproduceTheForward) {
  const ModelConfig c = TinyTestConfig();
  auto model = std::make_shared<const Model>(MakeSyntheticModel(c, 5));
  std::map<std::string, Observation> seen;
  RuntimeOptions ro;
  ro.threads = 2;
  ro.linear_observer = [&](const std::string& name, const float* x, int n, int cols) {
    Observation& o = seen[name];
    EXPECT_TRUE(o.x.empty()) << name << " observed twice in one chunk";
    o.n = n;
    o.cols = cols;
    o.x.assign(x, x + static_cast<size_t>(n) * cols);
  };
  auto rt = Transformer::Create(model, ro);
  ASSERT_TRUE(rt.ok()) << rt.status();
  const std::vector<int> tokens = {1, 17, 200, 3, 42, 99, 5};
  const int n = static_cast<int>(tokens.size());
  std::vector<float> logits(static_cast<size_t>(n) * c.vocab_size);
  ASSERT_TRUE((*rt)->Forward(tokens, 0, logits.data(), /*all_logits=*/true).ok());

  std::vector<std::string> expected = LinearWeightNames(c);
  expected.push_back(c.tied_embeddings ? names::kTokenEmbd : names::kOutput);
  EXPECT_EQ(seen.size(), expected.size());
  for (const std::string& name : expected) {
    ASSERT_TRUE(seen.count(name)) << name;
    EXPECT_EQ(seen[name].n, n) << name;
    EXPECT_EQ(seen[name].cols, model->Find(name)->cols()) << name;
  }

  const int dim = c.dim;
  // Residual stream before layer 0: the token embeddings.
  std::vector<double> resid(static_cast<size_t>(n) * dim);
  {
    const std::vector<float> emb = F32(*model->Find(names::kTokenEmbd));
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < dim; ++i) resid[t * dim + i] = emb[static_cast<size_t>(tokens[t]) * dim + i];
    }
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const std::string L = std::to_string(l);
    const std::vector<float> attn_in = RmsNormRows(resid, n, dim, *model->Find(names::AttnNorm(l)), c.norm_eps);
    ExpectClose(seen[names::AttnQ(l)].x, attn_in, "attn_q input, layer " + L);
    EXPECT_EQ(seen[names::AttnK(l)].x, seen[names::AttnQ(l)].x);
    EXPECT_EQ(seen[names::AttnV(l)].x, seen[names::AttnQ(l)].x);
    const std::vector<double> o = Apply(*model->Find(names::AttnOutput(l)), seen[names::AttnOutput(l)].x, n);
    for (size_t i = 0; i < resid.size(); ++i) resid[i] += o[i];
    const std::vector<float> ffn_in = RmsNormRows(resid, n, dim, *model->Find(names::FfnNorm(l)), c.norm_eps);
    ExpectClose(seen[names::FfnGate(l)].x, ffn_in, "ffn_gate input, layer " + L);
    EXPECT_EQ(seen[names::FfnUp(l)].x, seen[names::FfnGate(l)].x);
    const std::vector<double> g = Apply(*model->Find(names::FfnGate(l)), seen[names::FfnGate(l)].x, n);
    const std::vector<double> u = Apply(*model->Find(names::FfnUp(l)), seen[names::FfnUp(l)].x, n);
    std::vector<float> act(g.size());
    for (size_t i = 0; i < g.size(); ++i) act[i] = static_cast<float>(g[i] / (1.0 + std::exp(-g[i])) * u[i]);
    ExpectClose(seen[names::FfnDown(l)].x, act, "ffn_down input, layer " + L);
    const std::vector<double> d = Apply(*model->Find(names::FfnDown(l)), seen[names::FfnDown(l)].x, n);
    for (size_t i = 0; i < resid.size(); ++i) resid[i] += d[i];
  }
  const std::string classifier = c.tied_embeddings ? names::kTokenEmbd : names::kOutput;
  ExpectClose(seen[classifier].x, RmsNormRows(resid, n, dim, *model->Find(names::kOutputNorm), c.norm_eps),
              "classifier input");
  const std::vector<double> y = Apply(*model->Find(classifier), seen[classifier].x, n);
  ExpectClose(logits, std::vector<float>(y.begin(), y.end()), "logits");
}

TEST(ObserverTest, UnsetObserverChangesNothing) {
  const ModelConfig c = TinyTestConfig();
  auto model = std::make_shared<const Model>(MakeSyntheticModel(c, 6));
  const std::vector<int> tokens = {1, 2, 3, 4, 5};
  std::vector<float> a(tokens.size() * c.vocab_size), b(a.size());
  RuntimeOptions plain{.threads = 1};
  RuntimeOptions observed = plain;
  int calls = 0;
  observed.linear_observer = [&](const std::string&, const float*, int, int) { ++calls; };
  auto ra = Transformer::Create(model, plain);
  auto rb = Transformer::Create(model, observed);
  ASSERT_TRUE(ra.ok() && rb.ok());
  ASSERT_TRUE((*ra)->Forward(tokens, 0, a.data(), true).ok());
  ASSERT_TRUE((*rb)->Forward(tokens, 0, b.data(), true).ok());
  EXPECT_EQ(a, b);
  EXPECT_EQ(calls, 7 * c.n_layers + 1);
}

TEST(CollectCalibrationTest, SharesInputsAndMatchesObservedHessian) {
  const ModelConfig c = TinyTestConfig();
  const Model model = MakeSyntheticModel(c, 7);
  std::vector<std::vector<int>> streams;
  std::mt19937 rng(3);
  std::uniform_int_distribution<int> tok(0, c.vocab_size - 1);
  int64_t total = 0;
  for (int s = 0; s < 3; ++s) {
    std::vector<int> st(40 + 17 * s);
    for (int& t : st) t = tok(rng);
    total += static_cast<int64_t>(st.size());
    streams.push_back(st);
  }
  CalibrationOptions o;
  o.window = 32;  // streams are cut into windows, as eval does
  o.threads = 2;
  auto stats = CollectCalibration(model, streams, o);
  ASSERT_TRUE(stats.ok()) << stats.status();
  for (int l = 0; l < c.n_layers; ++l) {
    EXPECT_EQ(stats->at(names::AttnQ(l)).get(), stats->at(names::AttnK(l)).get());
    EXPECT_EQ(stats->at(names::AttnQ(l)).get(), stats->at(names::AttnV(l)).get());
    EXPECT_EQ(stats->at(names::FfnGate(l)).get(), stats->at(names::FfnUp(l)).get());
    EXPECT_NE(stats->at(names::AttnQ(l)).get(), stats->at(names::AttnOutput(l)).get());
    EXPECT_EQ(stats->at(names::FfnDown(l))->cols, c.hidden_dim);
  }
  for (const std::string& name : LinearWeightNames(c)) {
    ASSERT_TRUE(stats->count(name)) << name;
    EXPECT_EQ(stats->at(name)->tokens, total) << name;
    EXPECT_EQ(stats->at(name)->cols, model.Find(name)->cols()) << name;
  }

  // The same windows through an observer by hand: the collected Hessian of ffn_down is 2XᵀX/n of them.
  const std::string target = names::FfnDown(1);
  std::vector<float> xs;
  RuntimeOptions ro;
  ro.threads = 1;
  ro.linear_observer = [&](const std::string& name, const float* x, int n, int cols) {
    if (name == target) xs.insert(xs.end(), x, x + static_cast<size_t>(n) * cols);
  };
  auto rt = Transformer::Create(std::make_shared<const Model>(model), ro);
  ASSERT_TRUE(rt.ok());
  for (const auto& st : streams) {
    for (size_t s0 = 0; s0 < st.size(); s0 += 32) {
      (*rt)->Reset();
      const size_t len = std::min<size_t>(32, st.size() - s0);
      ASSERT_TRUE((*rt)->Forward(std::span<const int>(st.data() + s0, len), 0, nullptr, false).ok());
    }
  }
  const int64_t cols = c.hidden_dim;
  ASSERT_EQ(static_cast<int64_t>(xs.size()), total * cols);
  const LayerStats& s = *stats->at(target);
  for (int64_t i = 0; i < cols; i += 7) {
    for (int64_t j = 0; j < cols; j += 5) {
      double h = 0;
      for (int64_t t = 0; t < total; ++t) h += static_cast<double>(xs[t * cols + i]) * xs[t * cols + j];
      h = 2 * h / static_cast<double>(total);
      EXPECT_NEAR(s.hessian[i * cols + j], h, 1e-9 * (std::fabs(h) + 1e-6)) << i << "," << j;
    }
  }

  EXPECT_FALSE(CollectCalibration(model, {}, o).ok());
}


// Experts routed fewer tokens than their inputs get the layer's pool for the rest; the others keep their own.
TEST(CollectCalibrationTest, SparseExpertsAreCompletedFromTheLayersPool) {
  const ModelConfig c = TinyMoeTestConfig();
  const Model model = MakeSyntheticModel(c, 9);
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> tok(0, c.vocab_size - 1);
  std::vector<std::vector<int>> streams(4, std::vector<int>(64));
  for (auto& st : streams) {
    for (int& t : st) t = tok(rng);
  }
  CalibrationOptions own_only;
  own_only.threads = 2;
  own_only.pool_sparse_experts = false;
  CalibrationOptions pooled = own_only;
  pooled.pool_sparse_experts = true;
  auto raw = CollectCalibration(model, streams, own_only);
  auto done = CollectCalibration(model, streams, pooled);
  ASSERT_TRUE(raw.ok() && done.ok());
  int completed = 0, kept = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    for (auto expert_name : {&names::FfnGateExpert, &names::FfnDownExpert}) {
      const int64_t cols = (*expert_name)(l, 0).find("down") != std::string::npos ? c.hidden_dim : c.dim;
      // The pool: token-weighted mean of the experts' own statistics.
      std::vector<double> pool(static_cast<size_t>(cols * cols), 0.0);
      int64_t total = 0;
      for (int e = 0; e < c.n_experts; ++e) {
        const LayerStats& s = *raw->at((*expert_name)(l, e));
        for (size_t i = 0; i < pool.size(); ++i) pool[i] += static_cast<double>(s.tokens) * s.hessian[i];
        total += s.tokens;
      }
      ASSERT_GT(total, 0);
      for (double& h : pool) h /= static_cast<double>(total);
      for (int e = 0; e < c.n_experts; ++e) {
        const std::string name = (*expert_name)(l, e);
        const LayerStats& own = *raw->at(name);
        const LayerStats& got = *done->at(name);
        if (own.tokens >= cols) {
          ++kept;
          EXPECT_EQ(got.tokens, own.tokens) << name;
          EXPECT_EQ(got.pooled_tokens, 0) << name;
          EXPECT_EQ(got.hessian, own.hessian) << name;
          continue;
        }
        ++completed;
        EXPECT_EQ(got.tokens, cols) << name;
        EXPECT_EQ(got.pooled_tokens, cols - own.tokens) << name;
        const double n = static_cast<double>(own.tokens);
        for (size_t i = 0; i < pool.size(); i += 13) {
          const double want = (n * own.hessian[i] + static_cast<double>(cols - own.tokens) * pool[i]) / cols;
          ASSERT_NEAR(got.hessian[i], want, 1e-12 * (1 + std::fabs(want))) << name << " " << i;
        }
      }
      // up reads gate's input: it shares the completed statistics.
      if (expert_name == &names::FfnGateExpert) {
        for (int e = 0; e < c.n_experts; ++e) {
          EXPECT_EQ(done->at(names::FfnUpExpert(l, e)).get(), done->at(names::FfnGateExpert(l, e)).get());
        }
      }
    }
  }
  std::cout << completed << " expert statistics completed from the pool, " << kept << " kept\n";
  EXPECT_GT(completed, 0);
  EXPECT_GT(kept, 0);
}

// Random calibration streams of the given lengths.
std::vector<std::vector<int>> RandomStreams(const ModelConfig& c, std::vector<int> lengths, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> tok(0, c.vocab_size - 1);
  std::vector<std::vector<int>> streams;
  for (int n : lengths) {
    std::vector<int> st(static_cast<size_t>(n));
    for (int& t : st) t = tok(rng);
    streams.push_back(std::move(st));
  }
  return streams;
}

void ExpectSameStats(const CalibrationStats& a, const CalibrationStats& b) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, s] : a) {
    ASSERT_TRUE(b.count(name)) << name;
    const LayerStats& t = *b.at(name);
    EXPECT_EQ(s->tokens, t.tokens) << name;
    EXPECT_EQ(s->pooled_tokens, t.pooled_tokens) << name;
    EXPECT_EQ(s->hessian, t.hessian) << name;
    EXPECT_EQ(s->mean_abs, t.mean_abs) << name;
    EXPECT_EQ(s->max_abs, t.max_abs) << name;
  }
}

// The block chain without rounding is the one pass, bit for bit, dense and MoE (windows longer than the
// runtime's 64-token chunks included); the sharing of q/k/v and gate/up holds in it too. With fp16 between
// blocks block 0 still agrees exactly (its input is the embedding either way), later blocks only closely.
TEST(BlockChainTest, UnroundedChainIsTheOnePassAndFp16IsClose) {
  for (const ModelConfig& c : {TinyTestConfig(), TinyMoeTestConfig()}) {
    const Model model = MakeSyntheticModel(c, 11);
    const auto streams = RandomStreams(c, {150, 37, 64}, 4);
    CalibrationOptions o;
    o.window = 100;
    o.threads = 2;
    auto one_pass = CollectCalibration(model, streams, o);
    ASSERT_TRUE(one_pass.ok()) << one_pass.status();
    CalibrationOptions chained = o;
    chained.block_chain = ActivationFormat::kF32;
    auto chain = CollectCalibration(model, streams, chained);
    ASSERT_TRUE(chain.ok()) << chain.status();
    ExpectSameStats(*one_pass, *chain);
    for (int l = 0; l < c.n_layers; ++l) {
      EXPECT_EQ(chain->at(names::AttnQ(l)).get(), chain->at(names::AttnV(l)).get());
    }

    chained.block_chain = ActivationFormat::kF16;
    auto f16 = CollectCalibration(model, streams, chained);
    ASSERT_TRUE(f16.ok()) << f16.status();
    ASSERT_EQ(f16->size(), one_pass->size());
    EXPECT_EQ(f16->at(names::AttnQ(0))->hessian, one_pass->at(names::AttnQ(0))->hessian);
    const std::string last = names::AttnQ(c.n_layers - 1);
    const std::vector<double>& h16 = f16->at(last)->hessian;
    const std::vector<double>& h32 = one_pass->at(last)->hessian;
    EXPECT_NE(h16, h32);  // rounded inputs
    double diff = 0, norm = 0;
    for (size_t i = 0; i < h32.size(); ++i) {
      diff += (h16[i] - h32[i]) * (h16[i] - h32[i]);
      norm += h32[i] * h32[i];
    }
    EXPECT_LT(std::sqrt(diff / norm), 1e-2) << last;
  }
}

// Block by block: each step reads only its input and gives the next one's; running one step twice gives the
// same bits (what a re-run calibrate task must upload); the last step carries the classifier's statistics.
TEST(BlockChainTest, StepsChainAndRepeatExactly) {
  const ModelConfig c = TinyTestConfig();
  const Model model = MakeSyntheticModel(c, 12);
  const auto streams = RandomStreams(c, {40, 40}, 6);
  CalibrationOptions o;
  o.threads = 1;
  auto x = EmbedCalibrationTokens(model, streams, o);
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(x->windows, (std::vector<int32_t>{40, 40}));
  EXPECT_EQ(x->tokens(), 80);
  BlockActivations a = *x;
  for (int l = 0; l < c.n_layers; ++l) {
    BlockActivations out, again;
    auto s = CalibrateBlock(model, l, a, o, &out);
    auto s2 = CalibrateBlock(model, l, a, o, &again);
    ASSERT_TRUE(s.ok() && s2.ok()) << s.status();
    ExpectSameStats(*s, *s2);
    EXPECT_EQ(out.values, again.values);
    EXPECT_EQ(s->count(names::AttnQ(l)), 1u);
    EXPECT_EQ(s->count(names::kOutput) + s->count(names::kTokenEmbd), l == c.n_layers - 1 ? 1u : 0u) << l;
    BlockActivations plain;
    ASSERT_TRUE(RunBlock(model, l, a, 1, &plain).ok());
    EXPECT_EQ(plain.values, out.values);
    ASSERT_TRUE(RoundActivations(out, ActivationFormat::kF16).ok());
    a = std::move(out);
  }
  BlockActivations wrong = *x;
  wrong.dim = c.dim + 1;
  EXPECT_EQ(CalibrateBlock(model, 0, wrong, o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CalibrateBlock(model, c.n_layers, *x, o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::calib
