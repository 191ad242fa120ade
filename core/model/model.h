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
  int hidden_dim = 0;   // FFN width (of each expert in a Mixture-of-Experts model)
  int n_layers = 0;
  int n_heads = 0;
  int n_kv_heads = 0;   // grouped-query attention: n_heads % n_kv_heads == 0
  int vocab_size = 0;
  int seq_len = 0;      // trained context length
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;  // output.weight absent: the classifier is token_embd.weight
  // Mixture of Experts (Mixtral's block): n_experts > 0 replaces each layer's FFN by that many SwiGLU experts
  // and a router; each token runs the n_experts_used experts with the largest router probabilities (softmax
  // over all experts), their outputs weighted by those probabilities renormalised to sum to 1.
  int n_experts = 0;
  int n_experts_used = 0;

  bool is_moe() const { return n_experts > 0; }
  int head_dim() const { return n_heads > 0 ? dim / n_heads : 0; }
  int kv_dim() const { return head_dim() * n_kv_heads; }
  bool operator==(const ModelConfig&) const = default;
};

// Checks every field for sane, consistent values (positive, divisible, not absurdly large).
absl::Status ValidateConfig(const ModelConfig& c);

// Token types as in GGUF's tokenizer.ggml.token_type.
enum class TokenType : int32_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };

// The parts of a SentencePiece normaliser that matter without a character map. The defaults are Llama's (and
// llama.cpp's): dummy prefix on, extra whitespace kept. A .model file records them; GGUF as
// tokenizer.ggml.add_space_prefix / remove_extra_whitespaces; llama2.c's tokenizer.bin does not.
struct VocabNormalizer {
  bool add_dummy_prefix = true;
  // Strip leading/trailing spaces and collapse runs of spaces to one, as SentencePiece's
  // remove_extra_whitespaces does (llama2.c's tok512 models were trained with it on).
  bool remove_extra_whitespaces = false;
  // What Decode writes for the unknown token: TrainerSpec.unk_surface of a .model file, by default
  // libsentencepiece's " ⁇ " (U+2047 between spaces).
  std::string unk_surface = " \xe2\x81\x87 ";
  bool operator==(const VocabNormalizer&) const = default;
};

// A SentencePiece-style vocabulary (what GGUF's tokenizer.ggml.* and llama2.c's tokenizer.bin hold).
struct Vocab {
  std::string model = "llama";  // tokenizer.ggml.model
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<TokenType> types;
  int bos_id = 1;
  int eos_id = 2;
  int unk_id = 0;
  VocabNormalizer normalizer;
};

// The byte a "<0xNN>" byte piece stands for (hex digits of either case), or -1 for any other piece.
int ParseBytePiece(const std::string& piece);

// SentencePiece's escaped space U+2581 "▁", which vocabulary pieces use for ' '.
inline constexpr char kSentencePieceSpace[] = "\xe2\x96\x81";

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
// Mixture of Experts: the router, and expert e's matrices, one 2-D tensor each (so that every expert is quantized,
// calibrated and scheduled as a matrix of its own). GGUF stores them stacked ([E, hidden, dim]) as
// blk.N.ffn_{gate,up,down}_exps.weight; the GGUF reader and writer split and stack them.
std::string FfnGateInp(int layer);                // blk.N.ffn_gate_inp.weight   [n_experts, dim]
std::string FfnGateExpert(int layer, int expert);  // blk.N.ffn_gate.E.weight     [hidden, dim]
std::string FfnUpExpert(int layer, int expert);    // blk.N.ffn_up.E.weight       [hidden, dim]
std::string FfnDownExpert(int layer, int expert);  // blk.N.ffn_down.E.weight     [dim, hidden]
}  // namespace names

// Checks that every tensor the config implies is present with the right shape, and no tensor is invalid.
absl::Status ValidateModel(const Model& m);

// The 2-D weight matrices of the model that quantizers act on, in a stable order: every linear layer, experts
// included; not the norms, the embeddings or the MoE routers (small, and as sensitive as llama.cpp keeps them).
std::vector<std::string> LinearWeightNames(const ModelConfig& c);

}  // namespace qforge
