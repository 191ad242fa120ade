// Helpers the quantization method tests share: seeded Gaussian data, layer statistics of given inputs, a model's
// logits, and a relative comparison of two logit vectors.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "core/calib/stats.h"
#include "core/model/model.h"
#include "core/runtime/transformer.h"
#include "gtest/gtest.h"

namespace qforge::quant::test_util {

// n samples of N(0, stddev²) from std::mt19937(seed).
inline std::vector<float> GaussianF(int64_t n, uint32_t seed, double stddev = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(0.0, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = static_cast<float>(d(rng));
  return v;
}

// The calibration statistics of n input rows of `cols` values.
inline calib::LayerStats StatsOf(const std::vector<float>& x, int64_t n, int64_t cols) {
  calib::StatsAccumulator acc(cols);
  acc.Add(x.data(), n);
  return acc.Finish();
}

// The logits of every position of `tokens` (from an empty cache).
inline std::vector<float> Logits(const Model& m, const std::vector<int>& tokens) {
  auto t = Transformer::Create(std::make_shared<const Model>(m));
  EXPECT_TRUE(t.ok()) << t.status();
  std::vector<float> logits(tokens.size() * static_cast<size_t>(m.config.vocab_size));
  if (t.ok()) EXPECT_TRUE((*t)->Forward(tokens, 0, logits.data(), true).ok());
  return logits;
}

// max |a - b| / max |a|.
inline double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(static_cast<double>(a[i])));
  }
  return num / den;
}

}  // namespace qforge::quant::test_util
