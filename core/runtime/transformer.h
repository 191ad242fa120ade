// Llama forward pass over a Model whose weights may be in any encoding core/kernels understands.
// Semantics follow llama2.c's run.c: RMSNorm, interleaved-pair RoPE, grouped-query attention with an fp32
// KV cache, SwiGLU FFN, final norm, classifier (output.weight, or token_embd.weight when tied). A Mixture-of-
// Experts model routes each token through its top-k SwiGLU experts (Mixtral's block, ModelConfig).
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/kernels/kernels.h"
#include "core/lora/lora.h"
#include "core/model/model.h"

namespace qforge {
namespace kernels {
class QuipTransform;
}  // namespace kernels

struct RuntimeOptions {
  int threads = 0;      // worker threads for matmuls and attention; <= 0 means hardware concurrency
  int max_seq_len = 0;  // KV-cache capacity in positions; <= 0 means the model's seq_len
  int max_batch = 64;   // tokens per internal chunk in Forward/ForwardBatch (bounds activation scratch memory)
  // kInt8: each matmul quantizes its activations once into 8-bit blocks for the weight formats with integer
  // kernels (Q8_0, Q4_0, Q4_K; kernels.h), as llama.cpp does. kFloat keeps fp32 activations throughout: the
  // reference mode, without the activation error.
  kernels::ActivationMode activations = kernels::ActivationMode::kInt8;
  // Calibration hook: when set, every matrix product (each linear layer and the classifier) first reports
  // its weight's name and its input x, n_tokens rows of `cols` floats (row-major, valid only during the
  // call). Called on the Forward caller's thread, once per chunk of at most max_batch tokens.
  using LinearObserver = std::function<void(const std::string& tensor_name, const float* x, int n_tokens, int cols)>;
  LinearObserver linear_observer = nullptr;
};

// One sequence's keys and values: fp32, [n_layers][capacity][kv_dim] for each. Positions [0, positions())
// hold valid entries. Independent of any Transformer, so that many sequences can share one Transformer (and
// its weights and scratch) and be batched in ForwardBatch. Movable, not copyable.
class KvCache {
 public:
  // A cache for models of `config`'s shape, 1 <= capacity <= config.seq_len positions.
  static absl::StatusOr<KvCache> Create(const ModelConfig& config, int capacity);

  KvCache(KvCache&&) noexcept = default;
  KvCache& operator=(KvCache&&) noexcept = default;

  int positions() const { return positions_; }
  int capacity() const { return capacity_; }
  // Forgets every position (the next token of this sequence must be at position 0).
  void Reset() { positions_ = 0; }
  // Memory held by keys and values.
  size_t bytes() const { return 2 * layer_floats() * n_layers_ * sizeof(float); }
  int n_layers() const { return n_layers_; }
  int kv_dim() const { return kv_dim_; }

 private:
  friend class Transformer;
  KvCache(int n_layers, int kv_dim, int capacity);
  size_t layer_floats() const { return static_cast<size_t>(capacity_) * kv_dim_; }
  float* keys(int layer, int pos) { return keys_.get() + layer * layer_floats() + static_cast<size_t>(pos) * kv_dim_; }
  float* values(int layer, int pos) {
    return values_.get() + layer * layer_floats() + static_cast<size_t>(pos) * kv_dim_;
  }

  int n_layers_ = 0, kv_dim_ = 0, capacity_ = 0;
  int positions_ = 0;
  // Left uninitialised: attention reads only positions a forward pass wrote, so untouched pages stay
  // uncommitted.
  std::unique_ptr<float[]> keys_, values_;
};

// One token of one sequence in ForwardBatch: its cache, id and position, whether its logits are wanted, and the
// LoRA adapter its linears add (nullptr: the base model alone). Tokens of different adapters, and tokens without
// one, share a batch: every matmul runs once over all of them, then each token row adds its own adapter's
// scale · B (A x) in fp32 (core/kernels/lora_delta.h). The adapter must outlive the call.
struct BatchToken {
  KvCache* cache = nullptr;
  int token = 0;
  int pos = 0;
  bool want_logits = false;
  const lora::LoraAdapter* adapter = nullptr;
};

// Not thread-safe: one call at a time. Many sequences share one Transformer through ForwardBatch, each with
// its own KvCache; Forward runs one sequence on a cache the Transformer owns.
class Transformer {
 public:
  // Fails if the model is inconsistent (ValidateModel) or a norm vector cannot be decoded. A matrix in an
  // encoding the kernels cannot decode surfaces from Forward, with the tensor's name.
  static absl::StatusOr<std::unique_ptr<Transformer>> Create(std::shared_ptr<const Model> model,
                                                             const RuntimeOptions& options = {});

  // Runs tokens at positions [start_pos, start_pos + tokens.size()), writing their keys/values into the
  // cache. Requires start_pos <= cached_positions() (the cache before start_pos is reused as context;
  // anything at or after start_pos is overwritten) and start_pos + tokens.size() <= max_seq_len().
  // logits_out: all_logits ? [tokens.size(), vocab] : [vocab] for the last token; nullptr skips the
  // classifier (prefill only). INVALID_ARGUMENT for a bad token id, OUT_OF_RANGE past the context.
  // FAILED_PRECONDITION for start_pos > cached_positions(). Runs through ForwardBatch's code.
  absl::Status Forward(std::span<const int> tokens, int start_pos, float* logits_out, bool all_logits);

  // Runs tokens of any number of sequences together: every matmul sees all of them (chunks of at most
  // max_batch tokens), so each weight is read once per chunk; attention of each token reads its own cache
  // up to and including its position. The tokens of one sequence (one cache) must appear in position
  // order: the first at pos <= cache->positions() (the cache from pos on is overwritten), the others at
  // consecutive positions; they need not be adjacent in the span. On success each cache's positions()
  // is one past its last token. logits_out receives vocab floats for each token with want_logits, in span
  // order (may be nullptr when none wants logits).
  // Errors, checked before anything is computed (nothing changes then): INVALID_ARGUMENT for an empty span,
  // a null cache, a cache of another shape or longer than max_seq_len(), a bad token id, a negative or
  // non-consecutive position, wanted logits with a null logits_out, or an adapter built for another model's
  // shape (lora::CheckAdapterFits; UNIMPLEMENTED for FFN adapters on MoE); FAILED_PRECONDITION for a first
  // position past cache->positions(); OUT_OF_RANGE for a position at or past cache->capacity().
  absl::Status ForwardBatch(std::span<const BatchToken> tokens, float* logits_out);

  // One block over one window of hidden states: the calibration chain's step (core/calib/block_chain.h). `x` holds
  // n rows of dim floats entering block `layer` at positions [0, n) and is overwritten with the block's output.
  // The same arithmetic as Forward on a window from an empty cache (the same chunks of max_batch tokens, the same
  // kernels, the linear observer called the same way), so Embed, then ForwardBlock over every block, then
  // FinalNorm gives the bits Forward feeds the classifier. Uses (and resets) Forward's cache. INVALID_ARGUMENT for
  // a block out of range, OUT_OF_RANGE for n outside [1, max_seq_len()].
  absl::Status ForwardBlock(int layer, float* x, int n);
  // The embedding rows of `tokens` into x ([tokens.size(), dim]): block 0's input. INVALID_ARGUMENT for a bad id.
  absl::Status Embed(std::span<const int> tokens, float* x) const;
  // The final RMSNorm of n rows of hidden states: the classifier's input.
  void FinalNorm(const float* x, int n, float* out) const;

  // A cache for this Transformer's model; capacity <= 0 means max_seq_len(). INVALID_ARGUMENT past it.
  absl::StatusOr<KvCache> NewCache(int capacity = 0) const;

  // Positions [0, cached_positions()) of Forward's cache hold valid keys/values.
  int cached_positions() const { return own_cache_ ? own_cache_->positions() : 0; }
  // Forgets Forward's cache (the next Forward must start at 0).
  void Reset() {
    if (own_cache_) own_cache_->Reset();
  }

  const ModelConfig& config() const { return model_->config; }
  const Model& model() const { return *model_; }
  int vocab_size() const { return model_->config.vocab_size; }
  int max_seq_len() const { return max_seq_len_; }

 private:
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    const Tensor *wq, *wk, *wv, *wo;
    const Tensor *gate = nullptr, *up = nullptr, *down = nullptr;  // dense FFN
    const Tensor* router = nullptr;                                  // MoE: [n_experts, dim]
    std::vector<const Tensor*> expert_gate, expert_up, expert_down;  // MoE: one per expert
  };

  Transformer(std::shared_ptr<const Model> model, const RuntimeOptions& options);
  absl::Status Init();
  // Checks ForwardBatch's rules; see there.
  absl::Status ValidateBatch(std::span<const BatchToken> tokens, const float* logits_out) const;
  // At most max_batch tokens, already validated; logits_out gets the rows of tokens with want_logits.
  absl::Status ForwardChunk(std::span<const BatchToken> tokens, float* logits_out);
  // Block l over the chunk's hidden states in x_ (at most max_batch tokens), in place.
  absl::Status BlockChunk(std::span<const BatchToken> tokens, int l);
  // y[t * y_stride + r] = W[r, :] · x[t, :] for all rows r, split over the pool. same_input: x is the previous
  // MatMul's input, unchanged since (its quantized form is reused when the formats agree).
  absl::Status MatMul(const Tensor& w, const float* x, int n, float* y, int64_t y_stride, bool same_input = false);
  // The FFN half of a layer over n tokens: xb_ (normalised input) -> xb2_.
  // One adapted linear's output: token t's row is y + t * y_stride.
  struct AdapterOutput {
    lora::LoraTarget target;
    float* y;
    int64_t y_stride;
  };
  // Adds each token's adapter update for (layer, target) to its row of each output, for linears that share the
  // input x (tokens.size() rows of `in` floats). Nothing to do, and no cost, when no token has an adapter for them.
  absl::Status AddAdapterDeltas(std::span<const BatchToken> tokens, int layer,
                                std::initializer_list<AdapterOutput> outputs, const float* x, int64_t in);
  absl::Status DenseFfn(std::span<const BatchToken> tokens, int layer, const Layer& L, int n);
  absl::Status MoeFfn(const Layer& L, int n);

  std::shared_ptr<const Model> model_;
  RuntimeOptions options_;
  int max_seq_len_ = 0;
  ThreadPool pool_;

  const Tensor* token_embd_ = nullptr;
  const Tensor* classifier_ = nullptr;
  std::vector<float> output_norm_;
  std::vector<Layer> layers_;
  std::vector<float> rope_;  // [max_seq_len, head_dim]: cos, sin per pair and position

  // Forward's cache, allocated by the first Forward (a Transformer used only through ForwardBatch never
  // holds a max_seq_len cache of its own).
  std::unique_ptr<KvCache> own_cache_;
  std::vector<BatchToken> forward_tokens_;  // Forward's tokens as BatchTokens, kept to reuse the memory

  // Activations for one chunk of at most max_batch tokens.
  std::vector<float> x_, xb_, xb2_, q_, k_, v_, hb_, hb2_;
  // MoE scratch: router probabilities [b, n_experts]; each token's chosen experts and weights [b, k]; the rows
  // routed to one expert, gathered [b, dim]; each (token, slot)'s expert output [b * k, dim].
  std::vector<float> router_probs_, route_weight_, expert_x_, expert_out_;
  std::vector<int> route_expert_, expert_rows_;
  kernels::MatMulInput input_;  // the current matmul's activations, prepared once for every row range
  // AddAdapterDeltas' scratch: the (matrix, token) pairs of one linear, and their pieces [first, last).
  struct AdapterRow {
    const lora::LoraMatrix* matrix;
    int token;
    int output;  // index into AddAdapterDeltas' outputs
  };
  std::vector<AdapterRow> adapter_rows_;
  std::vector<std::pair<size_t, size_t>> adapter_pieces_;
  // kQuip matrices' regenerated rotations, built on first use (core/kernels/quip.h).
  std::unordered_map<const Tensor*, std::shared_ptr<const kernels::QuipTransform>> quip_;
};

}  // namespace qforge
