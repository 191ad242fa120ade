// Deterministic synthetic Llama models for tests, benchmarks and the quality tables: real shapes,
// random weights, no file needed.
#pragma once

#include <cstdint>

#include "core/model/model.h"

namespace qforge {

// A model with `config`'s shapes and f32 weights drawn from a seeded normal distribution:
// matrices ~ N(0, 1/in_features) (so activations keep their scale), norm weights ~ 1 + N(0, 0.1^2).
// When with_vocab is set, a byte-level vocabulary (<unk>, <s>, </s>, <0x00>..<0xFF>, then pieces) is attached.
Model MakeSyntheticModel(const ModelConfig& config, uint64_t seed, bool with_vocab = false);

// Small configs used across the tests: tiny (dim 64, 2 layers, vocab 320) and q4k (every matrix's row
// length a multiple of 256, so Q4_K applies everywhere).
ModelConfig TinyTestConfig();
ModelConfig Q4kTestConfig();
// TinyTestConfig as a Mixture of Experts: 8 experts, 2 used per token.
ModelConfig TinyMoeTestConfig();

}  // namespace qforge
