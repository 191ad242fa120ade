// Autoregressive generation: prompt prefill in one batched Forward, then one token at a time.
#pragma once

#include <functional>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "core/runtime/sampler.h"
#include "core/runtime/transformer.h"

namespace qforge {

struct GenerateOptions {
  int max_new_tokens = 256;
  SamplerOptions sampler;  // temperature 0 = greedy
  int eos_id = 2;          // generation stops when this token is sampled; < 0 disables
};

enum class StopReason { kMaxTokens, kEos, kContextFull, kCallback };

struct GenerateResult {
  std::vector<int> tokens;  // generated tokens, excluding the prompt and the EOS
  StopReason stop = StopReason::kMaxTokens;
  int prompt_tokens = 0;
};

// Called with each generated token (never the EOS) as soon as it is sampled; returning false stops.
using TokenCallback = std::function<bool(int token)>;

// Resets the transformer's cache and generates from `prompt` (non-empty, typically starting with BOS).
absl::StatusOr<GenerateResult> Generate(Transformer& model, std::span<const int> prompt,
                                        const GenerateOptions& options, const TokenCallback& on_token = nullptr);

}  // namespace qforge
