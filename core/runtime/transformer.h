// Llama forward pass over a Model whose weights may be in any encoding core/kernels understands.
// Semantics follow llama2.c's run.c: RMSNorm, interleaved-pair RoPE, grouped-query attention with an fp32
// KV cache, SwiGLU FFN, final norm, classifier (output.weight, or token_embd.weight when tied).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/model/model.h"

namespace qforge {

struct RuntimeOptions {
  int threads = 0;      // worker threads for matmuls and attention; <= 0 means hardware concurrency
  int max_seq_len = 0;  // KV-cache capacity in positions; <= 0 means the model's seq_len
  int max_batch = 64;   // tokens per internal chunk in Forward (bounds activation scratch memory)
  // Calibration hook: when set, every matrix product (each linear layer and the classifier) first reports
  // its weight's name and its input x, n_tokens rows of `cols` floats (row-major, valid only during the
  // call). Called on the Forward caller's thread, once per chunk of at most max_batch tokens.
  using LinearObserver = std::function<void(const std::string& tensor_name, const float* x, int n_tokens, int cols)>;
  LinearObserver linear_observer = nullptr;
};

// Not thread-safe: one Transformer (and its KV cache) per concurrent sequence.
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
  absl::Status Forward(std::span<const int> tokens, int start_pos, float* logits_out, bool all_logits);

  // Positions [0, cached_positions()) of the cache hold valid keys/values.
  int cached_positions() const { return cached_; }
  // Forgets the cache (the next Forward must start at 0).
  void Reset() { cached_ = 0; }

  const ModelConfig& config() const { return model_->config; }
  const Model& model() const { return *model_; }
  int vocab_size() const { return model_->config.vocab_size; }
  int max_seq_len() const { return max_seq_len_; }

 private:
  struct Layer {
    std::vector<float> attn_norm, ffn_norm;
    const Tensor *wq, *wk, *wv, *wo, *gate, *up, *down;
  };

  Transformer(std::shared_ptr<const Model> model, const RuntimeOptions& options);
  absl::Status Init();
  absl::Status ForwardChunk(std::span<const int> tokens, int pos0, float* logits_out, bool all_logits);
  // y[t * y_stride + r] = W[r, :] · x[t, :] for all rows r, split over the pool.
  absl::Status MatMul(const Tensor& w, const float* x, int n, float* y, int64_t y_stride);

  std::shared_ptr<const Model> model_;
  RuntimeOptions options_;
  int max_seq_len_ = 0;
  ThreadPool pool_;

  const Tensor* token_embd_ = nullptr;
  const Tensor* classifier_ = nullptr;
  std::vector<float> output_norm_;
  std::vector<Layer> layers_;
  std::vector<float> rope_;  // [max_seq_len, head_dim]: cos, sin per pair and position

  std::vector<float> key_cache_, value_cache_;  // [n_layers, max_seq_len, kv_dim]
  int cached_ = 0;

  // Activations for one chunk of at most max_batch tokens.
  std::vector<float> x_, xb_, xb2_, q_, hb_, hb2_;
};

}  // namespace qforge
