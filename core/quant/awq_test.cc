// AWQ: the scale fold leaves the fp model unchanged, the α search is never worse than rtn and helps on inputs
// with a few loud channels, the clipping search never loses to rtn per group, validation names the field.
#include "core/quant/awq.h"
#include "core/base/half.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/calib/collect.h"
#include "core/calib/stats.h"
#include "core/kernels/kernels.h"
#include "core/model/synthetic.h"
#include "core/quant/gptq.h"
#include "core/quant/packing.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "core/quant/sequential.h"
#include "core/calib/block_chain.h"
#include "core/runtime/transformer.h"
#include "gmock/gmock.h"
#include "core/quant/test_util.h"
#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

using test_util::GaussianF;
using test_util::Logits;
using test_util::MaxRelDiff;
using test_util::StatsOf;

using ::testing::HasSubstr;

// Independent Gaussian channels; every `every`-th channel is `gain` times louder (the outlier channels of LLM
// activations that AWQ is built around).
std::vector<float> LoudInputs(int64_t n, int64_t cols, uint32_t seed, int every, double gain) {
  std::vector<float> x = GaussianF(n * cols, seed);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < cols; j += every) x[t * cols + j] *= static_cast<float>(gain);
  }
  return x;
}

double OutputError(const float* w, const float* w_hat, int64_t rows, int64_t cols, const calib::LayerStats& st) {
  double err = 0, ref = 0;
  LayerOutputError(w, w_hat, rows, cols, st.hessian.data(), &err, &ref);
  return err;
}

TEST(AwqFoldTest, FpLogitsUnchanged) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 11);
  const std::vector<int> tokens = {1, 5, 77, 300, 12, 9, 150, 42};
  const std::vector<float> before = Logits(m, tokens);
  std::vector<AwqLayerScales> layers(static_cast<size_t>(m.config.n_layers));
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(-1.5, 1.5);
  for (auto& l : layers) {
    for (int j = 0; j < m.config.dim; ++j) {
      l.attn.push_back(static_cast<float>(std::exp(u(rng))));
      l.ffn.push_back(static_cast<float>(std::exp(u(rng))));
    }
  }
  const std::vector<float> q_before = [&] {
    std::vector<float> v(static_cast<size_t>(m.tensors.at(names::AttnQ(0)).numel()));
    std::memcpy(v.data(), m.tensors.at(names::AttnQ(0)).data, 4 * v.size());
    return v;
  }();
  ASSERT_TRUE(AwqFoldScales(m, layers).ok());
  // The weights did change...
  std::vector<float> q_after(q_before.size());
  std::memcpy(q_after.data(), m.tensors.at(names::AttnQ(0)).data, 4 * q_after.size());
  EXPECT_NE(q_before, q_after);
  EXPECT_TRUE(ValidateModel(m).ok());
  // ...the function did not.
  EXPECT_LT(MaxRelDiff(before, Logits(m, tokens)), 1e-5);
}

TEST(AwqFoldTest, RejectsBadScales) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 12);
  std::vector<AwqLayerScales> layers(1);
  EXPECT_THAT(std::string(AwqFoldScales(m, layers).message()), HasSubstr("layers"));
  layers.resize(2);
  layers[0].attn.assign(3, 1.0f);
  EXPECT_THAT(std::string(AwqFoldScales(m, layers).message()), HasSubstr("attn_norm"));
  layers[0].attn.assign(static_cast<size_t>(m.config.dim), 0.0f);
  EXPECT_THAT(std::string(AwqFoldScales(m, layers).message()), HasSubstr("positive"));
}

TEST(AwqScaleTest, ScaledStatsMatchScaledInputs) {
  const int64_t n = 300, cols = 32;
  const std::vector<float> x = LoudInputs(n, cols, 5, 8, 10.0);
  const calib::LayerStats st = StatsOf(x, n, cols);
  const std::vector<float> s = AwqChannelScales(st.mean_abs, 0.5);
  std::vector<float> xs(x);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j < cols; ++j) xs[t * cols + j] /= s[j];
  }
  const calib::LayerStats direct = StatsOf(xs, n, cols);
  const calib::LayerStats folded = AwqScaleStats(st, s);
  for (int64_t i = 0; i < cols * cols; ++i) EXPECT_NEAR(folded.hessian[i], direct.hessian[i], 1e-4);
  for (int64_t j = 0; j < cols; ++j) EXPECT_NEAR(folded.mean_abs[j], direct.mean_abs[j], 1e-4);
}

TEST(AwqScaleTest, ChannelScalesNormalised) {
  const std::vector<double> mean_abs = {0.01, 1.0, 4.0, 0.0};
  const std::vector<float> s0 = AwqChannelScales(mean_abs, 0.0);
  for (float v : s0) EXPECT_EQ(v, 1.0f);
  const std::vector<float> s = AwqChannelScales(mean_abs, 0.5);
  // sqrt: {0.1, 1, 2, 1e-4 (clamped)} / sqrt(2 * 1e-4)
  EXPECT_NEAR(s[2] / s[1], 2.0, 1e-6);
  EXPECT_NEAR(s[2] * s[3], 1.0, 1e-5);
}

// Synthetic layers whose inputs have a few loud channels: the α search picks α > 0 and beats rtn (α = 0), on the
// calibration inputs and on held-out inputs from the same distribution.
TEST(AwqScaleTest, NeverWorseThanRtnAndHelpsOnLoudChannels) {
  const int64_t n = 2048, cols = 256, rows = 96;
  const std::vector<float> x = LoudInputs(n, cols, 21, 32, 20.0);
  const calib::LayerStats st = StatsOf(x, n, cols);
  const calib::LayerStats held_out = StatsOf(LoudInputs(n, cols, 22, 32, 20.0), n, cols);
  const std::vector<float> wq = GaussianF(rows * cols, 7, 0.05);
  const std::vector<float> wk = GaussianF(rows / 2 * cols, 8, 0.05);
  struct Case {
    int bits, group;
    bool sym;
  };
  for (const Case& c : {Case{4, 128, true}, Case{3, 64, true}, Case{4, 128, false}, Case{3, 64, false}}) {
    SCOPED_TRACE(testing::Message() << c.bits << "-bit g" << c.group << (c.sym ? " sym" : " asym"));
    AwqOptions o;
    o.bits = c.bits;
    o.group = c.group;
    o.symmetric = c.sym;
    auto r = AwqSearchScales({{wq.data(), rows}, {wk.data(), rows / 2}}, cols, st, o);
    ASSERT_TRUE(r.ok()) << r.status();
    ASSERT_EQ(r->errors.size(), 20u);
    EXPECT_GE(r->alpha, 0.0);
    EXPECT_LT(r->alpha, 1.0);
    EXPECT_LE(r->error, r->errors[0]);
    EXPECT_GT(r->alpha, 0.0);
    // errors[0] is exactly rtn: compare against the rtn method's decoded bytes.
    double rtn_err = 0, awq_err = 0, rtn_held = 0, awq_held = 0;
    for (auto [w, rr] : {std::pair{&wq, rows}, std::pair{&wk, rows / 2}}) {
      const QuantParams p{c.bits, c.group, c.sym, false};
      auto bytes = FindMethod("rtn")->Quantize(w->data(), rr, cols, p);
      ASSERT_TRUE(bytes.ok());
      const Tensor t = Tensor::FromBytes("w", {rr, cols}, WeightFormat::QInt(c.bits, c.group, c.sym), *bytes);
      std::vector<float> dec(static_cast<size_t>(rr * cols)), fake(dec.size());
      ASSERT_TRUE(kernels::DequantizeRows(t, 0, rr, dec.data()).ok());
      AwqFakeQuantize(w->data(), rr, cols, nullptr, o, fake.data());
      EXPECT_EQ(dec, fake);
      rtn_err += OutputError(w->data(), dec.data(), rr, cols, st);
      rtn_held += OutputError(w->data(), dec.data(), rr, cols, held_out);
      AwqFakeQuantize(w->data(), rr, cols, r->scales.data(), o, fake.data());
      awq_err += OutputError(w->data(), fake.data(), rr, cols, st);
      awq_held += OutputError(w->data(), fake.data(), rr, cols, held_out);
    }
    EXPECT_NEAR(r->errors[0], rtn_err, 1e-9 * rtn_err);
    EXPECT_NEAR(r->error, awq_err, 1e-9 * awq_err);
    EXPECT_LT(awq_err, 0.9 * rtn_err);
    EXPECT_LT(awq_held, 0.9 * rtn_held);
    std::printf("  %d-bit g%d %s: alpha %.2f  awq/rtn %.3f (held-out %.3f)\n", c.bits, c.group,
                c.sym ? "sym" : "asym", r->alpha, awq_err / rtn_err, awq_held / rtn_held);
  }
}

// The awq method (clipping search) never loses to rtn on any group's own error, and is valid kQInt.
TEST(AwqMethodTest, ClippingNeverWorseThanRtnPerGroup) {
  const int64_t n = 1024, cols = 128, rows = 32, g = 32;
  const calib::LayerStats st = StatsOf(LoudInputs(n, cols, 31, 16, 8.0), n, cols);
  const std::vector<float> w = GaussianF(rows * cols, 9);
  const QuantParams p{3, static_cast<int>(g), true, false};
  const WeightFormat f = WeightFormat::QInt(3, static_cast<int>(g), true);
  std::vector<float> dec[2];
  for (int k = 0; k < 2; ++k) {
    const QuantMethod* m = FindMethod(k == 0 ? "rtn" : "awq");
    auto bytes = m->Quantize(w.data(), rows, cols, p, nullptr, &st);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    const Tensor t = Tensor::FromBytes("w", {rows, cols}, f, *bytes);
    ASSERT_TRUE(ValidateTensor(t).ok());
    dec[k].resize(static_cast<size_t>(rows * cols));
    ASSERT_TRUE(kernels::DequantizeRows(t, 0, rows, dec[k].data()).ok());
  }
  int better = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += g) {
      double e[2] = {0, 0};
      for (int k = 0; k < 2; ++k) {
        for (int64_t i = c0; i < c0 + g; ++i) {
          for (int64_t j = c0; j < c0 + g; ++j) {
            e[k] += (w[r * cols + i] - dec[k][r * cols + i]) * st.hessian[i * cols + j] *
                    (w[r * cols + j] - dec[k][r * cols + j]);
          }
        }
      }
      EXPECT_LE(e[1], e[0] * (1 + 1e-9) + 1e-12);
      better += e[1] < e[0] * 0.999;
    }
  }
  EXPECT_GT(better, 0);
  const double rtn = OutputError(w.data(), dec[0].data(), rows, cols, st);
  const double awq = OutputError(w.data(), dec[1].data(), rows, cols, st);
  EXPECT_LT(awq, rtn);
  std::printf("  clip awq/rtn %.3f, %d groups improved\n", awq / rtn, better);
}

TEST(AwqMethodTest, ValidationErrorsNameTheField) {
  const QuantMethod* m = FindMethod("awq");
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->NeedsCalibration());
  EXPECT_THAT(std::string(m->Validate({9, 128, true, false}).message()), HasSubstr("bits"));
  EXPECT_THAT(std::string(m->Validate({4, -1, true, false}).message()), HasSubstr("group"));
  EXPECT_THAT(std::string(m->OutputFormat({4, 48, true, false}, 4, 128).status().message()), HasSubstr("group 48"));
  const std::vector<float> w(4 * 128, 0.5f);
  auto q = m->Quantize(w.data(), 4, 128, m->DefaultParams());
  EXPECT_EQ(q.status().code(), absl::StatusCode::kFailedPrecondition);
  calib::LayerStats wrong;
  wrong.cols = 64;
  EXPECT_THAT(std::string(m->Quantize(w.data(), 4, 128, m->DefaultParams(), nullptr, &wrong).status().message()),
              HasSubstr("64 inputs"));
  const calib::LayerStats st = StatsOf(GaussianF(64 * 128, 1), 64, 128);
  AwqOptions o;
  o.bits = 1;
  EXPECT_THAT(std::string(AwqSearchScales({{w.data(), 4}}, 128, st, o).status().message()), HasSubstr("bits"));
  o = {};
  o.group = 48;
  EXPECT_THAT(std::string(AwqSearchScales({{w.data(), 4}}, 128, st, o).status().message()), HasSubstr("group"));
  o = {};
  o.grid = 0;
  EXPECT_THAT(std::string(AwqSearchScales({{w.data(), 4}}, 128, st, o).status().message()), HasSubstr("grid"));
  o = {};
  EXPECT_THAT(std::string(AwqSearchScales({}, 128, st, o).status().message()), HasSubstr("weights"));
  EXPECT_THAT(std::string(AwqSearchScales({{w.data(), 4}}, 256, st, o).status().message()), HasSubstr("inputs"));
}

// The whole pipeline on a synthetic model: calibrate, AwqScaleModel (fold; fp logits unchanged), QuantizeModel
// with the awq method on the folded statistics.
TEST(AwqModelTest, ScaleModelThenQuantize) {
  Model m = MakeSyntheticModel(TinyTestConfig(), 13);
  const std::vector<int> tokens = {3, 9, 27, 81, 243, 7, 49, 100};
  const std::vector<float> before = Logits(m, tokens);
  std::vector<std::vector<int>> streams(2);
  std::mt19937 rng(5);
  for (auto& s : streams) {
    for (int i = 0; i < 64; ++i) s.push_back(static_cast<int>(rng() % m.config.vocab_size));
  }
  auto stats = calib::CollectCalibration(m, streams);
  ASSERT_TRUE(stats.ok()) << stats.status();
  AwqOptions o;
  o.bits = 3;
  o.group = 32;
  std::vector<std::pair<double, double>> alphas;
  ASSERT_TRUE(AwqScaleModel(m, *stats, o, &alphas).ok());
  ASSERT_EQ(alphas.size(), 2u);
  for (auto [a, b] : alphas) {
    EXPECT_TRUE(a >= 0 && a < 1);
    EXPECT_TRUE(b >= 0 && b < 1);
  }
  EXPECT_LT(MaxRelDiff(before, Logits(m, tokens)), 1e-5);
  QuantRecipe recipe{"awq", QuantParams{3, 32, true, false}, false};
  recipe.calibration = &*stats;
  auto q = QuantizeModel(m, recipe, nullptr);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(ValidateModel(q->model).ok());
  // g128 on dim 64: the search falls back to per-channel like the quantizer does.
  Model m2 = MakeSyntheticModel(TinyTestConfig(), 13);
  auto stats2 = calib::CollectCalibration(m2, streams);
  ASSERT_TRUE(stats2.ok());
  o.bits = 4;
  o.group = 128;
  EXPECT_TRUE(AwqScaleModel(m2, *stats2, o).ok());
}

// The per-block calibrate task's transform: PrepareBlock over every block, each from its own statistics, changes
// the same tensors and statistics to the same bits as PrepareModel on the whole model (awq and smoothquant).
TEST(PrepareBlockTest, EveryBlockInTurnEqualsTheWholeModelTransform) {
  const Model source = MakeSyntheticModel(TinyTestConfig(), 17);
  std::vector<std::vector<int>> streams(2);
  std::mt19937 rng(8);
  for (auto& s : streams) {
    for (int i = 0; i < 48; ++i) s.push_back(static_cast<int>(rng() % source.config.vocab_size));
  }
  auto stats = calib::CollectCalibration(source, streams);
  ASSERT_TRUE(stats.ok()) << stats.status();
  for (const char* name : {"awq", "smoothquant"}) {
    const QuantMethod* method = FindMethod(name);
    ASSERT_NE(method, nullptr);
    QuantParams p = method->DefaultParams();
    if (std::string(name) == "awq") p = QuantParams{4, 32, true, false};
    Model whole = source, blocks = source;
    calib::CalibrationStats whole_stats = *stats, block_stats = *stats;
    ASSERT_TRUE(method->PrepareModel(whole, whole_stats, p).ok()) << name;
    for (int l = 0; l < source.config.n_layers; ++l) {
      // Each block alone: the other blocks' statistics are not there.
      calib::CalibrationStats own;
      const std::string prefix = "blk." + std::to_string(l) + ".";
      for (const auto& [n, s] : block_stats) {
        if (n.rfind(prefix, 0) == 0) own[n] = s;
      }
      ASSERT_TRUE(PrepareBlock(*method, blocks, l, own, p).ok()) << name << " block " << l;
      for (const auto& [n, s] : own) block_stats[n] = s;
    }
    int changed = 0;
    for (const auto& [n, t] : whole.tensors) {
      const Tensor& b = blocks.tensors.at(n);
      EXPECT_EQ(b.name, n);
      ASSERT_EQ(t.nbytes, b.nbytes) << n;
      EXPECT_EQ(std::memcmp(t.data, b.data, t.nbytes), 0) << name << " " << n;
      if (t.data != source.tensors.at(n).data) ++changed;
    }
    EXPECT_GT(changed, 0) << name;
    for (const auto& [n, s] : whole_stats) {
      EXPECT_EQ(s->hessian, block_stats.at(n)->hessian) << name << " " << n;
      EXPECT_EQ(s->max_abs, block_stats.at(n)->max_abs) << name << " " << n;
    }
  }
  Model m = source;
  calib::CalibrationStats s = *stats;
  EXPECT_EQ(PrepareBlock(*FindMethod("awq"), m, source.config.n_layers, s, QuantParams{4, 32, true, false}).code(),
            absl::StatusCode::kInvalidArgument);
}

// Sequential calibration: block 0 sees the embedding either way, so its statistics are the chain's; block 1 is
// calibrated on what the quantized block 0 produces (equal to running the chain by hand on QuantizeModel's block 0),
// which differs from the full-precision block 0's output.
TEST(SequentialCalibrationTest, LaterBlocksReadTheQuantizedBlocksOutput) {
  const Model source = MakeSyntheticModel(TinyTestConfig(), 19);
  std::vector<std::vector<int>> streams(2);
  std::mt19937 rng(9);
  for (auto& s : streams) {
    for (int i = 0; i < 40; ++i) s.push_back(static_cast<int>(rng() % source.config.vocab_size));
  }
  const calib::CalibrationOptions o{.threads = 1, .block_chain = calib::kChainActivationFormat};
  QuantRecipe recipe{.method = "gptq", .params = QuantParams{3, 32, true, false}};
  ThreadPool pool(1);
  auto sequential = CalibrateSequentially(source, streams, recipe, std::nullopt, o, &pool);
  ASSERT_TRUE(sequential.ok()) << sequential.status();
  auto one_pass = calib::CollectCalibration(source, streams, o);
  ASSERT_TRUE(one_pass.ok());
  ASSERT_EQ(sequential->stats.size(), one_pass->size());
  EXPECT_EQ(sequential->stats.at(names::AttnQ(0))->hessian, one_pass->at(names::AttnQ(0))->hessian);
  EXPECT_NE(sequential->stats.at(names::AttnQ(1))->hessian, one_pass->at(names::AttnQ(1))->hessian);

  // Block 1 by hand: block 0 quantized with its own statistics, run, rounded, then calibrated.
  auto x = calib::EmbedCalibrationTokens(source, streams, o);
  ASSERT_TRUE(x.ok());
  auto block0 = calib::CalibrateBlock(source, 0, *x, o, nullptr);
  ASSERT_TRUE(block0.ok());
  QuantRecipe only = recipe;
  only.calibration = &*block0;
  only.only_block = 0;
  auto q0 = QuantizeModel(source, only, &pool);
  ASSERT_TRUE(q0.ok()) << q0.status();
  EXPECT_NE(q0->model.tensors.at(names::AttnQ(0)).format, source.tensors.at(names::AttnQ(0)).format);
  EXPECT_EQ(q0->model.tensors.at(names::AttnQ(1)).data, source.tensors.at(names::AttnQ(1)).data);  // untouched
  calib::BlockActivations next;
  ASSERT_TRUE(calib::RunBlock(q0->model, 0, *x, 1, &next).ok());
  ASSERT_TRUE(calib::RoundActivations(next, calib::kChainActivationFormat).ok());
  auto block1 = calib::CalibrateBlock(source, 1, next, o, nullptr);
  ASSERT_TRUE(block1.ok());
  EXPECT_EQ(sequential->stats.at(names::AttnQ(1))->hessian, block1->at(names::AttnQ(1))->hessian);
  EXPECT_EQ(sequential->stats.at(names::FfnDown(1))->hessian, block1->at(names::FfnDown(1))->hessian);

  // A transform is applied block by block, as PrepareModel would on these statistics.
  QuantRecipe awq{.method = "awq", .params = QuantParams{4, 32, true, false}};
  auto folded = CalibrateSequentially(source, streams, awq,
                                      std::make_pair(FindMethod("awq"), QuantParams{4, 32, true, false}), o, &pool);
  ASSERT_TRUE(folded.ok()) << folded.status();
  EXPECT_NE(folded->model.tensors.at(names::AttnNorm(1)).data, source.tensors.at(names::AttnNorm(1)).data);
}

// A bf16 checkpoint (how Hugging Face models come) folds like its exact f32 widening: the fold reads the bf16
// values, and the folded tensors are f32.
TEST(AwqModelTest, Bf16SourceFoldsLikeItsF32Widening) {
  Model wide = MakeSyntheticModel(TinyTestConfig(), 21);
  Model narrow = wide;
  for (auto& [name, t] : narrow.tensors) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    std::memcpy(v.data(), t.data, 4 * v.size());
    std::vector<uint8_t> b(2 * v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const uint16_t h = FloatToBf16(v[i]);
      std::memcpy(&b[2 * i], &h, 2);
      v[i] = Bf16ToFloat(h);
    }
    wide.tensors[name] = Tensor::FromFloats(name, t.shape, v);
    t = Tensor::FromBytes(name, t.shape, WeightFormat::BF16(), std::move(b));
  }
  std::vector<std::vector<int>> streams = {{1, 5, 9, 33, 71, 200, 12, 7, 99, 300, 41, 2}};
  auto stats = calib::CollectCalibration(wide, streams);
  ASSERT_TRUE(stats.ok()) << stats.status();
  AwqOptions o;
  o.bits = 4;
  o.group = 32;
  calib::CalibrationStats wide_stats = *stats, narrow_stats = *stats;  // AwqScaleModel rescales them in place
  ASSERT_TRUE(AwqScaleModel(wide, wide_stats, o).ok());
  ASSERT_TRUE(AwqScaleModel(narrow, narrow_stats, o).ok());
  for (const auto& [name, t] : wide.tensors) {
    const Tensor& u = narrow.tensors.at(name);
    if (u.format.type != WeightType::kF32) continue;  // untouched by the fold: still bf16
    ASSERT_EQ(t.nbytes, u.nbytes) << name;
    EXPECT_EQ(0, std::memcmp(t.data, u.data, t.nbytes)) << name;
  }
  EXPECT_EQ(narrow.tensors.at(names::AttnQ(0)).format.type, WeightType::kF32);
}

}  // namespace
}  // namespace qforge::quant
