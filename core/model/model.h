// The in-memory model: a Llama-architecture configuration, its tensors under canonical (GGUF-style)
// names, and optionally its tokenizer vocabulary. Format readers produce a Model; writers consume one.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/tensor.h"

namespace qforge {

struct ModelConfig {
  std::string arch = "llama";
  int dim = 0;          // embedding width
  int hidden_dim = 0;   // FFN width
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;   // grouped-query attention: n_heads % n_kv_heads == 0
  int vocab_size = 0;
  int seq_len = 0;      // trained context length
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;  // output.weight absent: the classifier is token_embd.weight

  int head_dim() const { return n_heads > 0 ? dim / n_heads : 0; }
  int kv_dim() const { return head_dim() * n_kv_heads; }
  bool operator==(const ModelConfig&) const = default;
};

// Checks every field for sane, consistent values (positive, divisible, not absurdly large).
absl::Status ValidateConfig(const ModelConfig& c);

// Token types as in GGUF's tokenizer.ggml.token_type.
enum class TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// A SentencePiece-style vocabulary (what GGUF's tokenizer.ggml.* and llama2.c's tokenizer.bin hold).
struct Vocab {
  std::string model = "llama";  // tokenizer.ggml.model
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<TokenType> types;
  int bos_id = 1;
  int eos_id = 2;
  int unk_id = 0;
};

struct Model {
  ModelConfig config;
  std::map<std::string, Tensor> tensors;  // canonical names, see names below
  std::optional<Vocab> vocab;
  std::map<std::string, std::string> metadata;  // free-form provenance (source file, quant recipe, ...)

  const Tensor* Find(const std::string& name) const;
  absl::StatusOr<const Tensor*> Get(const std::string& name) const;
};

// Canonical tensor names (GGUF's llama names). Weight matrices are [out_features, in_features];
// q/k rows are in the interleaved-pair RoPE order used by Meta's checkpoints, llama2.c and GGUF.
namespace names {
inline constexpr char kTokenEmbd[] = "token_embd.weight";    // [vocab, dim]
inline constexpr char kOutputNorm[] = "output_norm.weight";  // [dim]
inline constexpr char kOutput[] = "output.weight";           // [vocab, dim], absent when tied
std::string AttnNorm(int layer);    // blk.N.attn_norm.weight    [dim]
std::string AttnQ(int layer);       // blk.N.attn_q.weight       [dim, dim]
std::string AttnK(int layer);       // blk.N.attn_k.weight       [kv_dim, dim]
std::string AttnV(int layer);       // blk.N.attn_v.weight       [kv_dim, dim]
std::string AttnOutput(int layer);  // blk.N.attn_output.weight  [dim, dim]
std::string FfnNorm(int layer);     // blk.N.ffn_norm.weight     [dim]
std::string FfnGate(int layer);     // blk.N.ffn_gate.weight     [hidden, dim]  (w1)
std::string FfnUp(int layer);       // blk.N.ffn_up.weight       [hidden, dim]  (w3)
std::string FfnDown(int layer);     // blk.N.ffn_down.weight     [dim, hidden]  (w2)
}  // namespace names

// Checks that every tensor the config implies is present with the right shape, and no tensor is invalid.
absl::Status ValidateModel(const Model& m);

// The 2-D weight matrices of the model that quantizers act on (everything but norms), in a stable order.
std::vector<std::string> LinearWeightNames(const ModelConfig& c);

}  // namespace qforge
