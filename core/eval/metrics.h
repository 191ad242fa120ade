// The numeric core of evaluation: log-softmax, negative log-likelihood and KL divergence of one
// position's logits, in double precision (fp32 logits lose too much in exp/log over large vocabularies).
#pragma once

#include <span>
#include <vector>

namespace qforge::eval {

// out[i] = logits[i] - logsumexp(logits), computed in double. out is resized to logits.size().
void LogSoftmax(std::span<const float> logits, std::vector<double>& out);

// -log softmax(logits)[target].
double NegLogLikelihood(std::span<const double> log_probs, int target);

// KL(P || Q) = sum_i p_i (log p_i - log q_i) from log-probabilities; >= 0 up to rounding.
double KlDivergence(std::span<const double> log_p, std::span<const double> log_q);

// Index of the largest value (first on ties).
int ArgMax(std::span<const float> logits);

}  // namespace qforge::eval
