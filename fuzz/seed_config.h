// The small model config the fuzz seeds are written with (kept tiny so seeds stay a few KB).
#pragma once

#include "core/model/model.h"

namespace qforge::fuzz {

inline ModelConfig SeedConfig() {
  return ModelConfig{.dim = 32, .hidden_dim = 64, .n_layers = 1, .n_heads = 4, .n_kv_heads = 2,
                     .vocab_size = 16, .seq_len = 8};
}

}  // namespace qforge::fuzz
