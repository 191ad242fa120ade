#include "core/model/synthetic.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace qforge {
namespace {

Tensor RandomMatrix(const std::string& name, int64_t rows, int64_t cols, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(0.0f, 1.0f / std::sqrt(static_cast<float>(cols)));
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (float& x : v) x = dist(rng);
  return Tensor::FromFloats(name, {rows, cols}, v);
}

Tensor RandomNorm(const std::string& name, int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> dist(1.0f, 0.1f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = dist(rng);
  return Tensor::FromFloats(name, {n}, v);
}

Vocab ByteVocab(int vocab_size) {
  Vocab v;
  auto add = [&](std::string piece, float score, TokenType type) {
    v.tokens.push_back(std::move(piece));
    v.scores.push_back(score);
    v.types.push_back(type);
  };
  add("<unk>", 0.0f, TokenType::kUnknown);
  add("<s>", 0.0f, TokenType::kControl);
  add("</s>", 0.0f, TokenType::kControl);
  for (int b = 0; b < 256 && static_cast<int>(v.tokens.size()) < vocab_size; ++b) {
    add(absl::StrFormat("<0x%02X>", b), 0.0f, TokenType::kByte);
  }
  // Fill the rest with word pieces ("▁a", "▁b", ..., "ab", ..., then three letters and more) so merges exist.
  // Every piece is distinct: llama.cpp refuses a vocabulary with a repeated piece.
  const std::string letters = "etaoinshrdlucmfwypvbgkjqxz";
  const int n_letters = static_cast<int>(letters.size());
  const int two_letter_end = n_letters * (n_letters + 1);  // 26 "▁x" pieces, then 676 two-letter ones
  int i = 0;
  while (static_cast<int>(v.tokens.size()) < vocab_size) {
    std::string piece;
    if (i < n_letters) {
      piece = absl::StrCat("\xe2\x96\x81", std::string(1, letters[i]));
    } else if (i < two_letter_end) {
      piece = {letters[(i / n_letters) % n_letters], letters[i % n_letters]};
    } else {
      // Base-26 digits of i - two_letter_end, at least three of them: distinct, and longer than the above.
      for (int n = i - two_letter_end; n > 0 || piece.size() < 3; n /= n_letters) piece += letters[n % n_letters];
    }
    add(piece, -static_cast<float>(i), TokenType::kNormal);
    ++i;
  }
  return v;
}

}  // namespace

Model MakeSyntheticModel(const ModelConfig& c, uint64_t seed, bool with_vocab) {
  std::mt19937_64 rng(seed);
  Model m;
  m.config = c;
  auto put = [&](Tensor t) { m.tensors.emplace(t.name, std::move(t)); };
  put(RandomMatrix(names::kTokenEmbd, c.vocab_size, c.dim, rng));
  for (int l = 0; l < c.n_layers; ++l) {
    put(RandomNorm(names::AttnNorm(l), c.dim, rng));
    put(RandomMatrix(names::AttnQ(l), c.dim, c.dim, rng));
    put(RandomMatrix(names::AttnK(l), c.kv_dim(), c.dim, rng));
    put(RandomMatrix(names::AttnV(l), c.kv_dim(), c.dim, rng));
    put(RandomMatrix(names::AttnOutput(l), c.dim, c.dim, rng));
    put(RandomNorm(names::FfnNorm(l), c.dim, rng));
    if (!c.is_moe()) {
      put(RandomMatrix(names::FfnGate(l), c.hidden_dim, c.dim, rng));
      put(RandomMatrix(names::FfnUp(l), c.hidden_dim, c.dim, rng));
      put(RandomMatrix(names::FfnDown(l), c.dim, c.hidden_dim, rng));
      continue;
    }
    put(RandomMatrix(names::FfnGateInp(l), c.n_experts, c.dim, rng));
    for (int e = 0; e < c.n_experts; ++e) {
      put(RandomMatrix(names::FfnGateExpert(l, e), c.hidden_dim, c.dim, rng));
      put(RandomMatrix(names::FfnUpExpert(l, e), c.hidden_dim, c.dim, rng));
      put(RandomMatrix(names::FfnDownExpert(l, e), c.dim, c.hidden_dim, rng));
    }
  }
  put(RandomNorm(names::kOutputNorm, c.dim, rng));
  if (!c.tied_embeddings) put(RandomMatrix(names::kOutput, c.vocab_size, c.dim, rng));
  if (with_vocab) m.vocab = ByteVocab(c.vocab_size);
  m.metadata["source"] = absl::StrCat("synthetic seed=", seed);
  return m;
}

ModelConfig TinyTestConfig() {
  return ModelConfig{.dim = 64, .hidden_dim = 160, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                     .vocab_size = 320, .seq_len = 128};
}

ModelConfig TinyMoeTestConfig() {
  ModelConfig c = TinyTestConfig();
  c.hidden_dim = 96;
  c.n_experts = 8;
  c.n_experts_used = 2;
  return c;
}

ModelConfig Q4kTestConfig() {
  return ModelConfig{.dim = 256, .hidden_dim = 768, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2,
                     .vocab_size = 512, .seq_len = 256};
}

}  // namespace qforge
