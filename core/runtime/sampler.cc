#include "core/runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace qforge {

Sampler::Sampler(const SamplerOptions& options) : options_(options), state_(options.seed) {}

double Sampler::NextUniform() {
  // splitmix64: a full-period 64-bit generator whose output sequence is fixed by the seed on every platform.
  state_ += 0x9e3779b97f4a7c15ULL;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int Sampler::Argmax(std::span<const float> logits) {
  int best = 0;
  for (int i = 1; i < static_cast<int>(logits.size()); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

int Sampler::Sample(std::span<const float> logits) {
  const int n = static_cast<int>(logits.size());
  if (n == 0) return 0;
  if (options_.temperature <= 0.0f) return Argmax(logits);

  probs_.resize(n);
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (int i = 0; i < n; ++i) {
    probs_[i] = std::exp((logits[i] - max) / options_.temperature);
    sum += probs_[i];
  }
  const double u = NextUniform();

  if (options_.top_p > 0.0f && options_.top_p < 1.0f) {
    order_.resize(n);
    std::iota(order_.begin(), order_.end(), 0);
    // Ties keep index order, so a vanishing top_p selects exactly Argmax's token.
    std::stable_sort(order_.begin(), order_.end(), [&](int a, int b) { return probs_[a] > probs_[b]; });
    const double target = options_.top_p * sum;
    double kept = 0.0;
    int k = 0;
    while (k < n) {
      kept += probs_[order_[k]];
      ++k;
      if (kept >= target) break;
    }
    double r = u * kept;
    for (int i = 0; i < k; ++i) {
      r -= probs_[order_[i]];
      if (r < 0.0) return order_[i];
    }
    return order_[k - 1];
  }

  double r = u * sum;
  for (int i = 0; i < n; ++i) {
    r -= probs_[i];
    if (r < 0.0) return i;
  }
  return n - 1;
}

}  // namespace qforge
