#include "core/eval/metrics.h"

#include <algorithm>
#include <cmath>

namespace qforge::eval {

void LogSoftmax(std::span<const float> logits, std::vector<double>& out) {
  out.resize(logits.size());
  if (logits.empty()) return;
  const double max = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max);
  const double log_z = max + std::log(sum);
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - log_z;
}

double NegLogLikelihood(std::span<const double> log_probs, int target) { return -log_probs[target]; }

double KlDivergence(std::span<const double> log_p, std::span<const double> log_q) {
  double kl = 0.0;
  for (size_t i = 0; i < log_p.size(); ++i) {
    const double p = std::exp(log_p[i]);
    if (p > 0.0) kl += p * (log_p[i] - log_q[i]);
  }
  // Rounding can leave a tiny negative value for identical distributions; KL is never negative.
  return std::max(kl, 0.0);
}

int ArgMax(std::span<const float> logits) {
  int best = 0;
  for (int i = 1; i < static_cast<int>(logits.size()); ++i) {
    if (logits[i] > logits[best]) best = i;
  }
  return best;
}

}  // namespace qforge::eval
