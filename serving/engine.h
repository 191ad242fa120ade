// The serving engine: continuous batching of generation requests over one shared Transformer.
//
// One engine thread runs steps. A step admits waiting requests into the running batch (up to
// max_running), then sends one Transformer::ForwardBatch with one token of every decoding sequence and the
// next pieces of newly admitted prompts (at most max_prefill_tokens_per_step prompt tokens), samples each
// sequence with its own seeded Sampler, streams the new text, and retires finished sequences, whose KV
// caches go back to a pool. No gRPC or HTTP here: the server maps these calls and statuses onto its API.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/lora/lora.h"
#include "core/model/model.h"
#include "core/runtime/sampler.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"

namespace qforge::serving {

struct EngineOptions {
  int threads = 0;       // matmul/attention threads of the shared Transformer; <= 0: hardware concurrency
  int max_running = 32;  // sequences in the batch
  int max_queue = 256;   // waiting requests beyond which Submit is RESOURCE_EXHAUSTED
  int max_prefill_tokens_per_step = 256;  // bounds a step's latency when long prompts arrive
  int context = 0;  // KV capacity per sequence; 0 or more than the model's seq_len = seq_len
  // Prefix caching: a finished sequence's KV cache goes back to the pool with the tokens it holds, and a new
  // request on the same adapter (or on none) takes the pooled cache sharing its longest prompt prefix and feeds
  // only the rest. Exact: a position's keys and values depend only on the tokens up to it and the runtime is batch
  // invariant, so the request's tokens and log-probabilities are those it gets without the cache.
  bool prefix_cache = true;
  // Metrics hook, called on the engine thread after every step.
  std::function<void(int batch_sequences, int batch_tokens, double step_seconds)> on_step = nullptr;
};

// Bounds on GenerationRequest::stop, so that one request cannot make every step slow.
inline constexpr int kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;

// How likely the model found one generated token: the log-softmax of its logits at temperature 1 (the model's own
// distribution, whatever temperature and top_p the sampler used).
struct TokenLogprob {
  struct Alternative {
    int token = 0;
    std::string piece;
    float logprob = 0;
  };
  int token = 0;
  std::string piece;  // the token's DecodePiece after the previous token: raw bytes, "" without a tokenizer
  float logprob = 0;
  std::vector<Alternative> top;  // the GenerationRequest::logprobs most likely tokens, most likely first
};
inline constexpr int kMaxTopLogprobs = 20;

struct GenerationRequest {
  std::vector<int> prompt = {};  // non-empty, starts with BOS
  int max_tokens = 128;          // 1 ..= context
  SamplerOptions sampler = {};   // temperature <= 0: greedy; seeded, so the seed fixes the output
  std::vector<std::string> stop = {};  // stop strings on the decoded text (needs a tokenizer)
  bool stop_at_eos = true;        // the tokenizer's EOS (else the model vocabulary's) ends the stream, unsent
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  // -1: no log-probabilities; 0 ..= kMaxTopLogprobs: every generated token's, with that many alternatives.
  int logprobs = -1;
  // The LoRA adapter this request's tokens apply (nullptr: the base model). Requests on different adapters and
  // on none share every step's batch; each token row adds its own adapter's update (core/runtime), so the tokens
  // equal those of the request alone. Held until the request finishes, so unloading an adapter never cuts one.
  std::shared_ptr<const lora::LoraAdapter> adapter = nullptr;
};

enum class FinishReason { kLength, kStop, kEos, kContextFull, kCancelled, kDeadline, kError };
// "length", "stop", "eos", "context", "cancelled", "deadline", "error".
const char* FinishReasonName(FinishReason reason);

struct StreamEvent {
  std::string text;         // new text since the last event (valid UTF-8; may be empty while held back)
  std::vector<int> tokens;  // tokens generated since the last event (the EOS is never included)
  std::vector<TokenLogprob> logprobs;  // one per entry of `tokens` when the request asked for them
  bool done = false;
  FinishReason finish = FinishReason::kLength;  // meaningful when done
  absl::Status error;                           // set with kError
  int prompt_tokens = 0;
  int cached_prompt_tokens = 0;  // of prompt_tokens, how many came from the prefix cache (not fed again)
  int completion_tokens = 0;  // generated so far, the EOS excluded
};

// Called on the engine thread, in order: one event per generated token (its text may be empty while a
// possible stop string or an unfinished UTF-8 character is held back), then exactly once with done=true
// (which carries the last tokens and text). Must not block long: it stalls every stream. Returning false
// cancels the request (a client that went away); the done event still follows.
using EventCallback = std::function<bool(const StreamEvent&)>;

// Returned by Submit. Thread-safe.
class RequestHandle {
 public:
  // The request finishes with kCancelled at the engine's next step (queued or running). No effect once done.
  void Cancel() { cancelled_.store(true, std::memory_order_relaxed); }
  bool cancel_requested() const { return cancelled_.load(std::memory_order_relaxed); }
  uint64_t id() const { return id_; }

 private:
  friend class Engine;
  explicit RequestHandle(uint64_t id) : id_(id) {}
  const uint64_t id_;
  std::atomic<bool> cancelled_{false};
};

struct ScoreResult {
  std::vector<float> token_logprobs;  // log p(token[i] | tokens[<i]) for i >= 1, in order
  double perplexity = 0;              // exp(-mean of token_logprobs)
  int tokens = 0;                     // scored tokens: tokens.size() - 1
};

struct EngineStats {
  int queued = 0, running = 0;
  size_t kv_bytes = 0;  // KV caches allocated by the pool (in use or idle)
  uint64_t tokens_generated = 0;  // sampled tokens, EOS included
  uint64_t prefix_hits = 0;           // requests that reused a pooled cache's prefix
  uint64_t prefix_reused_tokens = 0;  // prompt tokens they did not feed again
  uint64_t steps = 0;       // ForwardBatch calls
  double busy_seconds = 0;  // time spent in steps
};

class Engine {
 public:
  // `tokenizer` (may be null: no text, no stop strings) decodes generated ids with DecodePiece for
  // streaming and stop strings. INVALID_ARGUMENT for bad options, a tokenizer with more ids than the model,
  // or a model the runtime rejects. Starts the engine thread.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(std::shared_ptr<const Model> model,
                                                        std::shared_ptr<const Tokenizer> tokenizer,
                                                        EngineOptions options);
  // Shutdown().
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues a request; it joins the running batch at a following step. Thread-safe. INVALID_ARGUMENT for an
  // empty prompt, one longer than the context, max_tokens outside [1, context], a bad token id, a
  // non-finite sampler option, logprobs outside [-1, kMaxTopLogprobs], an adapter built for another model's shape
  // (UNIMPLEMENTED: FFN adapters on MoE), bad stop strings (empty, too many, too long, or without a tokenizer), or no
  // callback; RESOURCE_EXHAUSTED when max_queue requests are already waiting; UNAVAILABLE after Shutdown.
  absl::StatusOr<std::shared_ptr<RequestHandle>> Submit(GenerationRequest request, EventCallback on_event);

  // Log-likelihood of `tokens` under the model, on the calling thread with its own Transformer and cache
  // (it does not disturb the batch; concurrent calls take turns). INVALID_ARGUMENT for fewer than 2 tokens,
  // more than the context, or a bad id.
  absl::StatusOr<ScoreResult> Score(const std::vector<int>& tokens);

  EngineStats Stats() const;

  // Stops accepting requests (Submit is then UNAVAILABLE), lets every running and queued request finish
  // normally (deadlines and cancellation still apply), and joins the engine thread. Idempotent; from an
  // event callback it only stops admissions (the engine thread cannot join itself).
  void Shutdown();

 private:
  struct Request;

  Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer, EngineOptions options,
         int context, int eos_id, std::unique_ptr<Transformer> runtime);
  absl::Status Validate(const GenerationRequest& r) const;
  void Loop();
  void Step();
  // Samples the request's next token from `logits` and streams it, finishing the request when it ends.
  void Advance(Request& r, std::span<const float> logits);
  // `token`'s log-probability under `logits` and the request's top alternatives (their pieces after prev_token).
  TokenLogprob Logprobs(const Request& r, std::span<const float> logits, int token, std::string piece);
  // Sends the done event (once) with `text` plus, unless the stream stopped, everything held back.
  void Finish(Request& r, FinishReason reason, absl::Status error = absl::OkStatus(), std::string text = "");
  // Gives the caches of finished running requests back to the pool (with the tokens they hold, for prefix caching)
  // and drops the requests.
  void RetireFinished();
  // A cache for `r` from the pool — the one sharing the longest prefix with its prompt, else the oldest — or a
  // new one; sets r.prefilled to the positions it reuses.
  absl::Status AcquireCache(Request& r);

  // A pooled KV cache and what it holds: the keys and values of `tokens`, computed with `adapter` (its identity:
  // a weak pointer, so an unloaded adapter's entries match nothing and keep nothing alive).
  struct PooledCache {
    std::unique_ptr<KvCache> cache;
    std::vector<int> tokens;
    bool with_adapter = false;
    std::weak_ptr<const lora::LoraAdapter> adapter;
  };

  const std::shared_ptr<const Model> model_;
  const std::shared_ptr<const Tokenizer> tokenizer_;
  const EngineOptions options_;
  const int context_;
  const int eos_id_;  // -1: none known

  // Engine thread only.
  std::unique_ptr<Transformer> runtime_;
  std::vector<std::unique_ptr<Request>> running_;
  std::vector<PooledCache> free_caches_;  // oldest first
  std::vector<BatchToken> batch_;
  std::vector<Request*> logits_owners_;  // the request of each logits row
  std::vector<float> logits_;
  std::vector<double> log_probs_;  // Logprobs' scratch
  std::vector<int> top_ids_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Request>> queue_;  // guarded by mu_
  bool stopping_ = false;                       // guarded by mu_
  uint64_t next_id_ = 1;                        // guarded by mu_
  EngineStats stats_;                           // guarded by mu_ (queued is filled in by Stats)

  std::mutex join_mu_;
  std::thread thread_;

  std::mutex score_mu_;
  std::unique_ptr<Transformer> scorer_;  // created by the first Score, guarded by score_mu_
};

}  // namespace qforge::serving
