// Next-token selection: greedy at temperature 0, otherwise temperature-scaled softmax with optional
// nucleus (top-p) truncation, driven by a seeded generator so that a seed fixes the output.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace qforge {

struct SamplerOptions {
  float temperature = 1.0f;  // <= 0 means greedy (argmax)
  float top_p = 1.0f;        // in (0, 1): sample among the smallest set of tokens whose mass reaches top_p
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerOptions& options);

  // Picks a token from `logits` (vocab floats). Advances the generator unless greedy.
  int Sample(std::span<const float> logits);

  const SamplerOptions& options() const { return options_; }

  // The index of the largest logit (the first one on ties).
  static int Argmax(std::span<const float> logits);

 private:
  // A uniform double in [0, 1) from 53 random bits (portable, unlike std::uniform_real_distribution).
  double NextUniform();

  SamplerOptions options_;
  uint64_t state_;
  std::vector<float> probs_;
  std::vector<int> order_;
};

}  // namespace qforge
