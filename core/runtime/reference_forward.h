// Test-only fp64 reference of the Llama forward pass, written as plain loops straight from the math
// (no cache reuse, no batching, no threads) so that the fast path can be checked against it.
#pragma once

#include <span>
#include <vector>

#include "core/model/model.h"

namespace qforge::testing {

// Logits (vocab doubles) after each token of `tokens`, processed from position 0.
std::vector<std::vector<double>> ReferenceLogits(const Model& m, std::span<const int> tokens);

}  // namespace qforge::testing
