// SmoothQuant: the fold leaves the fp model unchanged and its rewritten statistics are the folded model's own,
// the scales follow the paper's formula, smoothing beats plain W8A8 on inputs with outlier channels (measured
// with real int8 activations through the kernels), the method runs end to end on stories260K, validation names
// the field.
#include "core/quant/smoothquant.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/calib/collect.h"
#include "core/calib/stats.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
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
using test_util::MaxRelDiff;

using ::testing::HasSubstr;

std::vector<float> F32(const Model& m, const std::string& name) {
  const Tensor& t = m.tensors.at(name);
  std::vector<float> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data, 4 * v.size());
  return v;
}

std::vector<float> RandomScales(int n, std::mt19937& rng) {
  std::uniform_real_distribution<double> u(-1.5, 1.5);
  std::vector<float> s(static_cast<size_t>(n));
  for (auto& v : s) v = static_cast<float>(std::exp(u(rng)));
  return s;
}

std::vector<std::vector<int>> RandomStreams(int n, int len, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<std::vector<int>> streams(static_cast<size_t>(n));
  for (auto& s : streams) {
    for (int i = 0; i < len; ++i) s.push_back(static_cast<int>(rng() % vocab));
  }
  return streams;
}

// Random scales on all three inputs of every block (and on the down input alone): the weights change, the
// function of the GQA model (4 heads, 2 kv heads) does not.
TEST(SmoothQuantFoldTest, FpLogitsUnchanged) {
  const std::vector<int> tokens = {1, 5, 77, 300, 12, 9, 150, 42};
  for (bool down_only : {false, true}) {
    SCOPED_TRACE(down_only ? "down only" : "attn, ffn and down");
    Model m = MakeSyntheticModel(TinyTestConfig(), 11);
    ASSERT_LT(m.config.n_kv_heads, m.config.n_heads);
    const std::vector<float> before = Logits(m, tokens);
    std::vector<SmoothQuantLayerScales> layers(static_cast<size_t>(m.config.n_layers));
    std::mt19937 rng(3);
    for (auto& l : layers) {
      if (!down_only) {
        l.attn = RandomScales(m.config.dim, rng);
        l.ffn = RandomScales(m.config.dim, rng);
      }
      l.down = RandomScales(m.config.hidden_dim, rng);
    }
    const std::vector<float> up_before = F32(m, names::FfnUp(1)), down_before = F32(m, names::FfnDown(1));
    const std::vector<float> q_before = F32(m, names::AttnQ(0));
    ASSERT_TRUE(SmoothQuantFoldScales(m, layers).ok());
    EXPECT_TRUE(ValidateModel(m).ok());
    // up: row i scaled by 1/down_i and column j by ffn_j; down: column i by down_i.
    const std::vector<float> up = F32(m, names::FfnUp(1)), down = F32(m, names::FfnDown(1));
    const int64_t dim = m.config.dim, hidden = m.config.hidden_dim;
    for (int64_t i : {int64_t{0}, int64_t{7}, hidden - 1}) {
      for (int64_t j : {int64_t{0}, dim - 1}) {
        const float want = up_before[i * dim + j] / layers[1].down[i] * (down_only ? 1.0f : layers[1].ffn[j]);
        EXPECT_FLOAT_EQ(up[i * dim + j], want);
        EXPECT_FLOAT_EQ(down[j * hidden + i], down_before[j * hidden + i] * layers[1].down[i]);
      }
    }
    EXPECT_EQ(F32(m, names::AttnQ(0)) == q_before, down_only);
    EXPECT_LT(MaxRelDiff(before, Logits(m, tokens)), 1e-5);
  }
}

TEST(SmoothQuantFoldTest, RejectsBadScales) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 12);
  std::vector<SmoothQuantLayerScales> layers(1);
  EXPECT_THAT(std::string(SmoothQuantFoldScales(m, layers).message()), HasSubstr("layers"));
  layers.resize(2);
  layers[1].down.assign(3, 1.0f);
  EXPECT_THAT(std::string(SmoothQuantFoldScales(m, layers).message()), HasSubstr("blk.1.ffn_down"));
  layers[1].down.assign(static_cast<size_t>(m.config.hidden_dim), 1.0f);
  layers[1].down[5] = -1.0f;
  EXPECT_THAT(std::string(SmoothQuantFoldScales(m, layers).message()), HasSubstr("positive"));
  layers[1].down.clear();
  layers[0].ffn.assign(4, 1.0f);
  EXPECT_THAT(std::string(SmoothQuantFoldScales(m, layers).message()), HasSubstr("ffn_norm"));
}

// s_j = max|x_j|^α / max_k|W_kj|^(1-α), the weight max over every matrix reading the input, 1e-5 guards.
TEST(SmoothQuantScaleTest, MatchesFormula) {
  const int64_t cols = 4;
  // Column maxima over both matrices: {2, 4, 2, 1e-7 -> clamped to 1e-5}.
  const std::vector<float> a = {1.0f, -4.0f, 0.5f, 1e-7f, -0.5f, 1.0f, -2.0f, 0.0f};
  const std::vector<float> b = {-2.0f, 0.0f, 0.0f, 0.0f};
  const std::vector<double> act = {8.0, 1.0, 0.0, 9.0};
  auto s = SmoothQuantScales({{a.data(), 2}, {b.data(), 1}}, cols, act, 0.5);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_FLOAT_EQ((*s)[0], 2.0f);                       // sqrt(8) / sqrt(2)
  EXPECT_FLOAT_EQ((*s)[1], 0.5f);                       // sqrt(1) / sqrt(4)
  EXPECT_FLOAT_EQ((*s)[2], 1e-5f);                      // 0 -> the 1e-5 floor
  EXPECT_FLOAT_EQ((*s)[3], static_cast<float>(3.0 / std::sqrt(1e-5)));  // weight max clamped to 1e-5
  // α = 1: s = max|x| (all difficulty to the weights); α = 0: s = 1 / max|W| (all to the activations).
  s = SmoothQuantScales({{a.data(), 2}, {b.data(), 1}}, cols, act, 1.0);
  ASSERT_TRUE(s.ok());
  EXPECT_FLOAT_EQ((*s)[0], 8.0f);
  EXPECT_FLOAT_EQ((*s)[2], 1e-5f);
  s = SmoothQuantScales({{a.data(), 2}, {b.data(), 1}}, cols, act, 0.0);
  ASSERT_TRUE(s.ok());
  EXPECT_FLOAT_EQ((*s)[0], 0.5f);
  EXPECT_FLOAT_EQ((*s)[1], 0.25f);
  EXPECT_FLOAT_EQ((*s)[3], 1e5f);
}

TEST(SmoothQuantScaleTest, ValidationErrorsNameTheField) {
  const std::vector<float> w(8, 1.0f);
  const std::vector<double> act(4, 1.0);
  EXPECT_THAT(std::string(SmoothQuantScales({{w.data(), 2}}, 4, act, 1.5).status().message()), HasSubstr("alpha"));
  EXPECT_THAT(std::string(SmoothQuantScales({{w.data(), 2}}, 4, act, std::nan("")).status().message()),
              HasSubstr("alpha"));
  EXPECT_THAT(std::string(SmoothQuantScales({}, 4, act, 0.5).status().message()), HasSubstr("weights"));
  EXPECT_THAT(std::string(SmoothQuantScales({{w.data(), 2}}, 4, {1.0, 2.0}, 0.5).status().message()),
              HasSubstr("act_max"));
  const std::vector<double> bad = {1.0, -1.0, 1.0, 1.0};
  EXPECT_THAT(std::string(SmoothQuantScales({{w.data(), 2}}, 4, bad, 0.5).status().message()), HasSubstr("act_max[1]"));

  const QuantMethod* m = FindMethod("smoothquant");
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->NeedsCalibration());
  EXPECT_TRUE(m->HasModelTransform());
  QuantParams p = m->DefaultParams();
  EXPECT_TRUE(m->Validate(p).ok());
  EXPECT_EQ(p.alpha, 0.5f);
  p.alpha = 1.2f;
  EXPECT_THAT(std::string(m->Validate(p).message()), HasSubstr("alpha"));
  p.alpha = -0.1f;
  EXPECT_THAT(std::string(m->Validate(p).message()), HasSubstr("alpha"));
  p = m->DefaultParams();
  p.bits = 4;
  EXPECT_THAT(std::string(m->Validate(p).message()), HasSubstr("bits"));
  p = m->DefaultParams();
  EXPECT_THAT(std::string(m->OutputFormat(p, 2, kW8A8MaxCols + 1).status().message()), HasSubstr("row length"));
  EXPECT_THAT(std::string(m->OutputFormat(p, 0, 16).status().message()), HasSubstr("empty"));
  const std::vector<float> w2(4 * 64, 0.5f);
  EXPECT_EQ(m->Quantize(w2.data(), 4, 64, p).status().code(), absl::StatusCode::kFailedPrecondition);
  calib::LayerStats wrong;
  wrong.cols = 32;
  EXPECT_THAT(std::string(m->Quantize(w2.data(), 4, 64, p, nullptr, &wrong).status().message()),
              HasSubstr("32 inputs"));
  const auto fb = m->Fallback(p);
  ASSERT_TRUE(fb.has_value());
  EXPECT_EQ(fb->first, "q8_0");
  Model model = MakeSyntheticModel(TinyTestConfig(), 1);
  calib::CalibrationStats none;
  EXPECT_THAT(std::string(m->PrepareModel(model, none, m->DefaultParams()).message()),
              HasSubstr("no calibration statistics for blk.0.attn_q.weight"));
}

// Per output channel: scale = max|w_r| / 127 exactly, the largest element gets ±127, every element within half
// a step; the kernels decode it to scale * code.
TEST(SmoothQuantMethodTest, PerChannelInt8RoundTrip) {
  const int64_t rows = 9, cols = 200;
  std::vector<float> w = GaussianF(rows * cols, 4);
  for (int64_t c = 0; c < cols; ++c) w[3 * cols + c] = 0.0f;  // an all-zero row
  for (int64_t c = 0; c < cols; ++c) w[5 * cols + c] *= 100.0f;  // rows on very different scales
  calib::StatsAccumulator acc(cols);
  const std::vector<float> x = GaussianF(64 * cols, 5);
  acc.Add(x.data(), 64);
  const calib::LayerStats st = acc.Finish();
  const QuantMethod* m = FindMethod("smoothquant");
  auto bytes = m->Quantize(w.data(), rows, cols, m->DefaultParams(), nullptr, &st);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  const WeightFormat f = WeightFormat::Of(WeightType::kW8A8);
  ASSERT_EQ(bytes->size(), EncodedBytes(f, rows, cols).value());
  const Tensor t = Tensor::FromBytes("w", {rows, cols}, f, *bytes);
  std::vector<float> dec(static_cast<size_t>(rows * cols));
  ASSERT_TRUE(kernels::DequantizeRows(t, 0, rows, dec.data()).ok());
  const W8A8Layout l = GetW8A8Layout(f, rows, cols).value();
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0, scale;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[r * cols + c]));
    std::memcpy(&scale, bytes->data() + l.scales_offset + 4 * r, 4);
    EXPECT_EQ(scale, amax / 127.0f) << r;
    int max_code = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const int code = static_cast<int8_t>((*bytes)[r * cols + c]);
      max_code = std::max(max_code, std::abs(code));
      EXPECT_EQ(dec[r * cols + c], scale * static_cast<float>(code));
      EXPECT_LE(std::fabs(dec[r * cols + c] - w[r * cols + c]), 0.5f * scale * (1 + 1e-5f)) << r << "," << c;
    }
    EXPECT_EQ(max_code, r == 3 ? 0 : 127) << r;
  }
  // Row slices quantized on their own assemble, plane by plane (PlaneSizes), into the whole matrix's bytes:
  // what the scheduler does with a sliced tensor.
  const int64_t split = 4;
  auto top = m->Quantize(w.data(), split, cols, m->DefaultParams(), nullptr, &st);
  auto bottom = m->Quantize(w.data() + split * cols, rows - split, cols, m->DefaultParams(), nullptr, &st);
  ASSERT_TRUE(top.ok() && bottom.ok());
  const std::vector<size_t> pt = PlaneSizes(f, split, cols).value(), pb = PlaneSizes(f, rows - split, cols).value();
  ASSERT_EQ(pt.size(), 2u);
  std::vector<uint8_t> assembled;
  size_t ot = 0, ob = 0;
  for (size_t k = 0; k < pt.size(); ++k) {
    assembled.insert(assembled.end(), top->begin() + ot, top->begin() + ot + pt[k]);
    assembled.insert(assembled.end(), bottom->begin() + ob, bottom->begin() + ob + pb[k]);
    ot += pt[k];
    ob += pb[k];
  }
  EXPECT_EQ(assembled, *bytes);
}

// A synthetic layer whose inputs have a few ×50 outlier channels (the paper's premise: per-token int8 then has
// a step so coarse that the ordinary channels are lost). The layer-output error is measured with real W8A8: the
// method's int8 weights and the kernels' per-token int8 activations (kernels::MatMulRows), against the fp64
// product, on the calibration inputs and on held-out inputs from the same distribution.
TEST(SmoothQuantLayerTest, SmoothingBeatsPlainW8A8OnOutlierChannels) {
  const int64_t n = 512, cols = 256, rows = 128;
  auto inputs = [&](uint32_t seed) {
    std::vector<float> x = GaussianF(n * cols, seed);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 5; j < cols; j += 37) x[t * cols + j] *= 50.0f;  // 7 outlier channels
    }
    return x;
  };
  const std::vector<float> x_cal = inputs(31), x_held = inputs(32);
  const std::vector<float> w = GaussianF(rows * cols, 33, 0.05);
  calib::StatsAccumulator acc(cols);
  acc.Add(x_cal.data(), n);
  const calib::LayerStats st = acc.Finish();
  const QuantMethod* method = FindMethod("smoothquant");

  // ||Q(W diag s) Q(diag(1/s) x) - W x|| / ||W x|| over the tokens; s == nullptr: no smoothing.
  auto w8a8_error = [&](const std::vector<float>* s, const std::vector<float>& x) {
    std::vector<float> ws(w), xs(x);
    if (s) {
      for (int64_t i = 0; i < rows * cols; ++i) ws[i] *= (*s)[i % cols];
      for (int64_t i = 0; i < n * cols; ++i) xs[i] /= (*s)[i % cols];
    }
    const calib::LayerStats sst = s ? AwqScaleStats(st, *s) : st;
    auto bytes = method->Quantize(ws.data(), rows, cols, method->DefaultParams(), nullptr, &sst);
    EXPECT_TRUE(bytes.ok()) << bytes.status();
    const Tensor t = Tensor::FromBytes("w", {rows, cols}, WeightFormat::Of(WeightType::kW8A8), *bytes);
    std::vector<float> y(static_cast<size_t>(n * rows));
    EXPECT_TRUE(kernels::MatMulRows(t, 0, rows, xs.data(), n, y.data(), rows).ok());
    double err = 0, ref = 0;
    for (int64_t tk = 0; tk < n; ++tk) {
      for (int64_t r = 0; r < rows; ++r) {
        double want = 0;
        for (int64_t c = 0; c < cols; ++c) want += static_cast<double>(w[r * cols + c]) * x[tk * cols + c];
        err += (y[tk * rows + r] - want) * (y[tk * rows + r] - want);
        ref += want * want;
      }
    }
    return std::sqrt(err / ref);
  };
  const double none = w8a8_error(nullptr, x_cal), none_held = w8a8_error(nullptr, x_held);
  double err[3], held[3];
  const double alphas[3] = {0.0, 0.5, 0.8};
  for (int k = 0; k < 3; ++k) {
    auto s = SmoothQuantScales({{w.data(), rows}}, cols, st.max_abs, alphas[k]);
    ASSERT_TRUE(s.ok()) << s.status();
    err[k] = w8a8_error(&*s, x_cal);
    held[k] = w8a8_error(&*s, x_held);
    std::printf("  alpha %.1f: W8A8 output rel err %.4f (held-out %.4f); unsmoothed %.4f (%.4f)\n", alphas[k],
                err[k], held[k], none, none_held);
  }
  // Smoothing at the paper's default α = 0.5 at least halves the error of plain W8A8 and of α = 0 (which puts
  // all the difficulty on the activations), on both input sets.
  EXPECT_LT(err[1], 0.5 * none);
  EXPECT_LT(held[1], 0.5 * none_held);
  EXPECT_LT(err[1], 0.5 * err[0]);
  EXPECT_LT(held[1], 0.5 * held[0]);
  EXPECT_LT(err[2], none);
}

// CollectCalibration -> SmoothQuantModel: fp logits unchanged, the rewritten statistics are those of the folded
// model's own inputs (recollected), and at α = 0.5 each smoothed channel's activation max equals its weight
// column max (the paper's balance point) wherever no clamp applied.
TEST(SmoothQuantModelTest, RewrittenStatsAreTheFoldedModels) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 13);
  const std::vector<int> tokens = {3, 9, 27, 81, 243, 7, 49, 100};
  const std::vector<float> before = Logits(m, tokens);
  const auto streams = RandomStreams(2, 64, m.config.vocab_size, 5);
  auto stats = calib::CollectCalibration(m, streams);
  ASSERT_TRUE(stats.ok()) << stats.status();
  std::vector<SmoothQuantLayerScales> applied;
  ASSERT_TRUE(SmoothQuantModel(m, *stats, 0.5, &applied).ok());
  ASSERT_EQ(applied.size(), 2u);
  EXPECT_LT(MaxRelDiff(before, Logits(m, tokens)), 1e-5);
  auto fresh = calib::CollectCalibration(m, streams);
  ASSERT_TRUE(fresh.ok());
  for (int l = 0; l < m.config.n_layers; ++l) {
    EXPECT_EQ(stats->at(names::AttnQ(l)), stats->at(names::AttnV(l)));  // still one shared object
    EXPECT_EQ(stats->at(names::FfnGate(l)), stats->at(names::FfnUp(l)));
    for (const std::string& name : {names::AttnQ(l), names::FfnGate(l), names::FfnDown(l), names::AttnOutput(l)}) {
      SCOPED_TRACE(name);
      const calib::LayerStats& a = *stats->at(name);
      const calib::LayerStats& b = *fresh->at(name);
      ASSERT_EQ(a.cols, b.cols);
      for (int64_t j = 0; j < a.cols; ++j) {
        EXPECT_NEAR(a.max_abs[j], b.max_abs[j], 1e-4 * b.max_abs[j] + 1e-9);
        EXPECT_NEAR(a.mean_abs[j], b.mean_abs[j], 1e-4 * b.mean_abs[j] + 1e-9);
      }
      for (size_t i = 0; i < a.hessian.size(); i += 7) {
        EXPECT_NEAR(a.hessian[i], b.hessian[i], 1e-4 * std::fabs(b.hessian[i]) + 1e-6);
      }
    }
    // The balance point: max|x'_j| = sqrt(max|x_j| max|W_j|) = max|W'_j|, for q/k/v (dim) and down (hidden).
    struct Input {
      std::vector<std::string> mats;
      int64_t cols;
    };
    for (const Input& in : {Input{{names::AttnQ(l), names::AttnK(l), names::AttnV(l)}, m.config.dim},
                            Input{{names::FfnDown(l)}, m.config.hidden_dim}}) {
      std::vector<double> w_max(static_cast<size_t>(in.cols), 0.0);
      for (const std::string& name : in.mats) {
        const std::vector<float> wt = F32(m, name);
        for (size_t i = 0; i < wt.size(); ++i) {
          w_max[i % in.cols] = std::max(w_max[i % in.cols], std::fabs(double{wt[i]}));
        }
      }
      const calib::LayerStats& st = *fresh->at(in.mats[0]);
      for (int64_t j = 0; j < in.cols; ++j) {
        EXPECT_NEAR(st.max_abs[j], w_max[j], 1e-4 * w_max[j]) << in.mats[0] << " " << j;
      }
    }
  }
}

// The whole method on the real model: CollectCalibration on sampled streams -> PrepareModel -> QuantizeModel ->
// runtime logits, against fp32 on held-out sampled streams. Plain W8A8 (no PrepareModel) is the comparison.
TEST(SmoothQuantModelTest, Stories260KEndToEnd) {
  const std::string path = std::string(QFORGE_SHARED_DIR) + "/models/stories260K/stories260K.bin";
  if (!std::filesystem::exists(path)) GTEST_SKIP() << path << " not present";
  auto loaded = formats::ReadLlama2c(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Model fp = *std::move(loaded);
  RuntimeOptions ro;
  ro.threads = 2;
  auto base = Transformer::Create(std::make_shared<const Model>(fp), ro);
  ASSERT_TRUE(base.ok());
  auto calib_streams = eval::SampleStreams(**base, 8, 128, /*seed=*/1000);
  auto eval_streams = eval::SampleStreams(**base, 4, 128, /*seed=*/1);
  ASSERT_TRUE(calib_streams.ok() && eval_streams.ok());
  const QuantMethod* method = FindMethod("smoothquant");
  double kl[2];
  for (int smooth = 0; smooth < 2; ++smooth) {
    Model m = fp;
    auto stats = calib::CollectCalibration(m, *calib_streams);
    ASSERT_TRUE(stats.ok()) << stats.status();
    if (smooth) {
      ASSERT_TRUE(method->PrepareModel(m, *stats, method->DefaultParams()).ok());
    }
    QuantRecipe recipe{"smoothquant", method->DefaultParams(), false};
    recipe.calibration = &*stats;
    auto q = QuantizeModel(m, recipe, nullptr);
    ASSERT_TRUE(q.ok()) << q.status();
    EXPECT_TRUE(q->report.fallbacks.empty());
    for (const std::string& name : LinearWeightNames(m.config)) {
      if (name == names::kOutput || name == names::kTokenEmbd) continue;
      EXPECT_EQ(q->model.tensors.at(name).format.type, WeightType::kW8A8) << name;
    }
    auto qt = Transformer::Create(std::make_shared<const Model>(q->model), ro);
    ASSERT_TRUE(qt.ok());
    auto cmp = eval::CompareModels(**base, **qt, *eval_streams);
    ASSERT_TRUE(cmp.ok()) << cmp.status();
    kl[smooth] = cmp->mean_kl;
    if (smooth) {
      // Through a file: safetensors stores w8a8 as U8 with its encoding in the metadata and permutes q/k rows
      // to HF order plane by plane; the logits come back bit-identical.
      const std::string dir = ::testing::TempDir() + "/smoothquant-st";
      std::filesystem::create_directories(dir);
      ASSERT_TRUE(formats::WriteSafetensors(q->model, dir + "/model.safetensors").ok());
      auto back = formats::ReadSafetensors(dir + "/model.safetensors");
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(back->tensors.at(names::AttnQ(0)).format.type, WeightType::kW8A8);
      const std::vector<int> tokens = (*eval_streams)[0];
      const std::vector<float> a = Logits(q->model, tokens), b = Logits(*back, tokens);
      EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float)));
    }
    std::printf("  stories260K W8A8 %s: KL %.5f nats, top-1 %.2f%%, perplexity %.3f (fp32 %.3f)\n",
                smooth ? "smoothquant a=0.5" : "unsmoothed", cmp->mean_kl, 100 * cmp->top1_agreement,
                cmp->quant.perplexity, cmp->base.perplexity);
    EXPECT_GT(cmp->mean_kl, 0.0);  // real int8 arithmetic, not an fp32 pass-through
    // Measured 0.064 (plain) and 0.051 (smoothed), top-1 81% / 86%; this tiny model is sensitive: q8_0
    // weights alone give KL 0.019 (docs/quality.md).
    EXPECT_LT(cmp->mean_kl, 0.1);
    EXPECT_GT(cmp->top1_agreement, 0.75);
  }
  // No assertion on the ratio: stories260K's activations have no strong outlier channels (docs/calibrated.md).
  std::printf("  smoothquant / unsmoothed KL: %.3f\n", kl[1] / kl[0]);
}

}  // namespace
}  // namespace qforge::quant
