#include "serving/engine.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/eval/metrics.h"
#include "serving/stream_text.h"

namespace qforge::serving {

using Clock = std::chrono::steady_clock;

namespace {
// The engine whose thread this is (null elsewhere), so that Shutdown from an event callback does not try to
// join the thread it runs on.
thread_local const Engine* engine_on_this_thread = nullptr;
}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength: return "length";
    case FinishReason::kStop: return "stop";
    case FinishReason::kEos: return "eos";
    case FinishReason::kContextFull: return "context";
    case FinishReason::kCancelled: return "cancelled";
    case FinishReason::kDeadline: return "deadline";
    case FinishReason::kError: return "error";
  }
  return "unknown";
}

struct Engine::Request {
  Request(GenerationRequest req, EventCallback cb, std::shared_ptr<RequestHandle> h)
      : request(std::move(req)),
        on_event(std::move(cb)),
        handle(std::move(h)),
        sampler(request.sampler),
        text(request.stop),
        prev_token(request.prompt.back()) {}

  const GenerationRequest request;
  const EventCallback on_event;
  const std::shared_ptr<RequestHandle> handle;

  // Engine thread only, from admission on.
  std::unique_ptr<KvCache> cache;
  Sampler sampler;
  StreamText text;
  int prefilled = 0;         // prompt tokens already sent through the model (or reused from the prefix cache)
  int cached_prefix = 0;     // of those, reused from the prefix cache
  std::vector<int> fed;      // generated tokens fed back, after the prompt: the cache holds prompt[<prefilled] + fed
  bool failed = false;       // a step failed on this sequence: its cache holds nothing reusable
  int next_pos = 0;          // the cache position the next token goes to
  int pending_token = -1;    // sampled and streamed, to be fed at next_pos by the next step
  int prev_token;            // the token before the next one, for DecodePiece
  std::vector<int> unreported;  // generated since the last event
  std::vector<TokenLogprob> unreported_logprobs;  // theirs, when the request asked for log-probabilities
  int completion = 0;
  bool finished = false;

  int prompt_len() const { return static_cast<int>(request.prompt.size()); }
};

Engine::Engine(std::shared_ptr<const Model> model, std::shared_ptr<const Tokenizer> tokenizer, EngineOptions options,
               int context, int eos_id, std::unique_ptr<Transformer> runtime)
    : model_(std::move(model)),
      tokenizer_(std::move(tokenizer)),
      options_(std::move(options)),
      context_(context),
      eos_id_(eos_id),
      runtime_(std::move(runtime)) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(std::shared_ptr<const Model> model,
                                                       std::shared_ptr<const Tokenizer> tokenizer,
                                                       EngineOptions options) {
  if (model == nullptr) return absl::InvalidArgumentError("Engine: null model");
  if (options.max_running < 1) return absl::InvalidArgumentError("Engine: max_running must be >= 1");
  if (options.max_queue < 1) return absl::InvalidArgumentError("Engine: max_queue must be >= 1");
  if (options.max_prefill_tokens_per_step < 1) {
    return absl::InvalidArgumentError("Engine: max_prefill_tokens_per_step must be >= 1");
  }
  const int seq_len = model->config.seq_len;
  if (options.context < 0) return absl::InvalidArgumentError("Engine: context must be >= 0");
  // Clamped as RuntimeOptions::max_seq_len is, so that one option set can serve models of any length.
  const int context = options.context == 0 ? seq_len : std::min(options.context, seq_len);
  if (tokenizer != nullptr && tokenizer->vocab_size() > model->config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("Engine: the tokenizer has ", tokenizer->vocab_size(),
                                                   " tokens, the model only ", model->config.vocab_size));
  }
  int eos_id = -1;
  if (tokenizer != nullptr) {
    eos_id = tokenizer->eos_id();
  } else if (model->vocab.has_value()) {
    eos_id = model->vocab->eos_id;
  }
  // One step (every decoding sequence plus the prefill budget) fits one activation chunk, so each weight is
  // read once per step.
  RuntimeOptions ro{.threads = options.threads,
                    .max_seq_len = context,
                    .max_batch = options.max_running + options.max_prefill_tokens_per_step};
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Transformer> runtime, Transformer::Create(model, ro));
  std::unique_ptr<Engine> engine(
      new Engine(std::move(model), std::move(tokenizer), std::move(options), context, eos_id, std::move(runtime)));
  engine->thread_ = std::thread([e = engine.get()] { e->Loop(); });
  return engine;
}

Engine::~Engine() { Shutdown(); }

void Engine::Shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (engine_on_this_thread == this) return;
  std::lock_guard<std::mutex> lock(join_mu_);
  if (thread_.joinable()) thread_.join();
}

absl::Status Engine::Validate(const GenerationRequest& r) const {
  const int vocab = model_->config.vocab_size;
  if (r.prompt.empty()) return absl::InvalidArgumentError("prompt is empty (it should start with BOS)");
  if (static_cast<int>(r.prompt.size()) > context_) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt of ", r.prompt.size(), " tokens exceeds the context of ", context_));
  }
  if (r.adapter != nullptr) QF_RETURN_IF_ERROR(lora::CheckAdapterFits(*r.adapter, model_->config));
  if (r.max_tokens < 1 || r.max_tokens > context_) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens ", r.max_tokens, " outside [1, ", context_, "]"));
  }
  for (size_t i = 0; i < r.prompt.size(); ++i) {
    if (r.prompt[i] < 0 || r.prompt[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("prompt token id ", r.prompt[i], " at index ", i, " outside [0, ", vocab, ")"));
    }
  }
  if (!std::isfinite(r.sampler.temperature) || !std::isfinite(r.sampler.top_p)) {
    return absl::InvalidArgumentError("sampler temperature and top_p must be finite");
  }
  if (r.logprobs < -1 || r.logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(
        absl::StrCat("logprobs ", r.logprobs, " outside [-1, ", kMaxTopLogprobs, "]"));
  }
  if (!r.stop.empty() && tokenizer_ == nullptr) {
    return absl::InvalidArgumentError("stop strings need an engine with a tokenizer");
  }
  if (static_cast<int>(r.stop.size()) > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat(r.stop.size(), " stop strings, at most ", kMaxStopStrings));
  }
  for (size_t i = 0; i < r.stop.size(); ++i) {
    if (r.stop[i].empty()) return absl::InvalidArgumentError(absl::StrCat("stop string ", i, " is empty"));
    if (r.stop[i].size() > kMaxStopStringBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop string ", i, " has ", r.stop[i].size(), " bytes, at most ", kMaxStopStringBytes));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RequestHandle>> Engine::Submit(GenerationRequest request, EventCallback on_event) {
  if (!on_event) return absl::InvalidArgumentError("no event callback");
  QF_RETURN_IF_ERROR(Validate(request));
  std::shared_ptr<RequestHandle> handle;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopping_) return absl::UnavailableError("the engine is shutting down");
    if (static_cast<int>(queue_.size()) >= options_.max_queue) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the engine's queue is full (", queue_.size(), " requests waiting)"));
    }
    handle = std::shared_ptr<RequestHandle>(new RequestHandle(next_id_++));
    queue_.push_back(std::make_unique<Request>(std::move(request), std::move(on_event), handle));
  }
  wake_.notify_one();
  return handle;
}

EngineStats Engine::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  EngineStats s = stats_;
  s.queued = static_cast<int>(queue_.size());
  return s;
}

void Engine::Loop() {
  engine_on_this_thread = this;
  for (;;) {
    std::vector<std::unique_ptr<Request>> dropped;  // cancelled or expired before they were admitted
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty() || !running_.empty(); });
      if (queue_.empty() && running_.empty()) return;  // stopping, and everything has finished
      const Clock::time_point now = Clock::now();
      for (auto it = queue_.begin(); it != queue_.end();) {
        if ((*it)->handle->cancel_requested() || now >= (*it)->request.deadline) {
          dropped.push_back(std::move(*it));
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      while (!queue_.empty() && static_cast<int>(running_.size()) < options_.max_running) {
        running_.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      stats_.running = static_cast<int>(running_.size());
    }
    for (auto& r : dropped) {
      Finish(*r, r->handle->cancel_requested() ? FinishReason::kCancelled : FinishReason::kDeadline);
    }
    if (!running_.empty()) Step();
  }
}

void Engine::Step() {
  const Clock::time_point start = Clock::now();
  const int vocab = model_->config.vocab_size;

  for (auto& r : running_) {
    if (r->handle->cancel_requested()) {
      Finish(*r, FinishReason::kCancelled);
    } else if (start >= r->request.deadline) {
      Finish(*r, FinishReason::kDeadline);
    } else if (r->cache == nullptr) {
      if (absl::Status s = AcquireCache(*r); !s.ok()) Finish(*r, FinishReason::kError, s);
    }
  }

  // Decode tokens first, then prompt pieces in admission order until the prefill budget is spent.
  batch_.clear();
  logits_owners_.clear();
  int sequences = 0;
  for (auto& r : running_) {
    if (r->finished || r->pending_token < 0) continue;
    batch_.push_back(BatchToken{r->cache.get(), r->pending_token, r->next_pos, true, r->request.adapter.get()});
    logits_owners_.push_back(r.get());
    r->fed.push_back(r->pending_token);
    r->pending_token = -1;
    ++r->next_pos;
    ++sequences;
  }
  int budget = options_.max_prefill_tokens_per_step;
  for (auto& r : running_) {
    if (budget == 0) break;
    if (r->finished || r->prefilled == r->prompt_len()) continue;
    const int piece = std::min(budget, r->prompt_len() - r->prefilled);
    for (int k = 0; k < piece; ++k) {
      const int pos = r->prefilled + k;
      const bool last = pos == r->prompt_len() - 1;
      batch_.push_back(BatchToken{r->cache.get(), r->request.prompt[pos], pos, last, r->request.adapter.get()});
      if (last) logits_owners_.push_back(r.get());
    }
    r->prefilled += piece;
    r->next_pos = r->prefilled;
    budget -= piece;
    ++sequences;
  }

  uint64_t sampled = 0;
  if (!batch_.empty()) {
    logits_.resize(logits_owners_.size() * static_cast<size_t>(vocab));
    const absl::Status status = runtime_->ForwardBatch(batch_, logits_.data());
    if (!status.ok()) {
      for (const BatchToken& b : batch_) {
        for (auto& r : running_) {
          if (r->cache.get() == b.cache) {
            r->failed = true;
            Finish(*r, FinishReason::kError, status);
          }
        }
      }
    } else {
      for (size_t i = 0; i < logits_owners_.size(); ++i) {
        Advance(*logits_owners_[i], std::span<const float>(&logits_[i * vocab], vocab));
        ++sampled;
      }
    }
  }
  RetireFinished();

  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  {
    std::lock_guard<std::mutex> lock(mu_);
    stats_.running = static_cast<int>(running_.size());
    stats_.tokens_generated += sampled;
    if (!batch_.empty()) ++stats_.steps;
    stats_.busy_seconds += seconds;
  }
  if (options_.on_step && !batch_.empty()) {
    options_.on_step(sequences, static_cast<int>(batch_.size()), seconds);
  }
}

void Engine::Advance(Request& r, std::span<const float> logits) {
  const int token = r.sampler.Sample(logits);
  if (r.request.stop_at_eos && token == eos_id_) {
    Finish(r, FinishReason::kEos);
    return;
  }
  r.unreported.push_back(token);
  ++r.completion;
  std::string text;
  std::string piece_text;
  if (tokenizer_ != nullptr) {
    absl::StatusOr<std::string> piece = tokenizer_->DecodePiece(r.prev_token, token);
    if (!piece.ok()) {
      Finish(r, FinishReason::kError, piece.status());
      return;
    }
    piece_text = *piece;
    text = r.text.Push(*piece);
  }
  if (r.request.logprobs >= 0) r.unreported_logprobs.push_back(Logprobs(r, logits, token, std::move(piece_text)));
  r.prev_token = token;
  // Generate's order: the length limit, then the context, so the same prompt stops the same way.
  if (r.text.stopped()) {
    Finish(r, FinishReason::kStop, absl::OkStatus(), std::move(text));
  } else if (r.completion >= r.request.max_tokens) {
    Finish(r, FinishReason::kLength, absl::OkStatus(), std::move(text));
  } else if (r.next_pos >= context_) {
    Finish(r, FinishReason::kContextFull, absl::OkStatus(), std::move(text));
  } else {
    StreamEvent event;
    event.text = std::move(text);
    event.tokens = std::move(r.unreported);
    r.unreported.clear();
    event.logprobs = std::move(r.unreported_logprobs);
    r.unreported_logprobs.clear();
    event.prompt_tokens = r.prompt_len();
    event.completion_tokens = r.completion;
    if (!r.on_event(event)) {
      Finish(r, FinishReason::kCancelled);
      return;
    }
    r.pending_token = token;
  }
}

TokenLogprob Engine::Logprobs(const Request& r, std::span<const float> logits, int token, std::string piece) {
  eval::LogSoftmax(logits, log_probs_);
  TokenLogprob out;
  out.token = token;
  out.piece = std::move(piece);
  out.logprob = static_cast<float>(log_probs_[token]);
  const int k = std::min<int>(r.request.logprobs, static_cast<int>(logits.size()));
  if (k == 0) return out;
  // The k most likely ids, ties to the lower id so the order is deterministic.
  top_ids_.resize(logits.size());
  for (size_t i = 0; i < top_ids_.size(); ++i) top_ids_[i] = static_cast<int>(i);
  std::partial_sort(top_ids_.begin(), top_ids_.begin() + k, top_ids_.end(), [&](int a, int b) {
    return log_probs_[a] > log_probs_[b] || (log_probs_[a] == log_probs_[b] && a < b);
  });
  for (int i = 0; i < k; ++i) {
    TokenLogprob::Alternative alt;
    alt.token = top_ids_[i];
    alt.logprob = static_cast<float>(log_probs_[alt.token]);
    if (tokenizer_ != nullptr) {
      if (absl::StatusOr<std::string> p = tokenizer_->DecodePiece(r.prev_token, alt.token); p.ok()) alt.piece = *p;
    }
    out.top.push_back(std::move(alt));
  }
  return out;
}

void Engine::Finish(Request& r, FinishReason reason, absl::Status error, std::string text) {
  if (r.finished) return;
  r.finished = true;
  if (reason != FinishReason::kStop) {
    text += r.text.Flush();
    // What was held back may complete a stop string once an unfinished character is flushed.
    const bool natural_end = reason == FinishReason::kLength || reason == FinishReason::kEos ||
                             reason == FinishReason::kContextFull;
    if (r.text.stopped() && natural_end) reason = FinishReason::kStop;
  }
  StreamEvent event;
  event.text = std::move(text);
  event.tokens = std::move(r.unreported);
  r.unreported.clear();
  event.logprobs = std::move(r.unreported_logprobs);
  r.unreported_logprobs.clear();
  event.done = true;
  event.finish = reason;
  event.error = std::move(error);
  event.prompt_tokens = r.prompt_len();
  event.cached_prompt_tokens = r.cached_prefix;
  event.completion_tokens = r.completion;
  r.on_event(event);
}

void Engine::RetireFinished() {
  auto done = std::stable_partition(running_.begin(), running_.end(), [](const auto& r) { return !r->finished; });
  for (auto it = done; it != running_.end(); ++it) {
    Request& r = **it;
    if (r.cache == nullptr) continue;
    PooledCache pooled;
    if (options_.prefix_cache && !r.failed) {
      pooled.tokens.assign(r.request.prompt.begin(), r.request.prompt.begin() + r.prefilled);
      pooled.tokens.insert(pooled.tokens.end(), r.fed.begin(), r.fed.end());
      pooled.with_adapter = r.request.adapter != nullptr;
      pooled.adapter = r.request.adapter;
    }
    // What the cache holds must be exactly those tokens' positions; anything else is forgotten.
    if (static_cast<int>(pooled.tokens.size()) != r.cache->positions()) {
      pooled.tokens.clear();
      r.cache->Reset();
    }
    pooled.cache = std::move(r.cache);
    free_caches_.push_back(std::move(pooled));
  }
  running_.erase(done, running_.end());
}

absl::Status Engine::AcquireCache(Request& r) {
  const std::vector<int>& prompt = r.request.prompt;
  // At least the prompt's last token is fed: its logits give the first generated token.
  const size_t most = prompt.size() - 1;
  size_t best = 0, best_len = 0;
  for (size_t i = 0; i < free_caches_.size() && options_.prefix_cache; ++i) {
    const PooledCache& p = free_caches_[i];
    const bool same_adapter = r.request.adapter == nullptr
                                  ? !p.with_adapter
                                  : p.with_adapter && p.adapter.lock() == r.request.adapter;
    if (!same_adapter) continue;
    const size_t limit = std::min(most, p.tokens.size());
    const size_t len = std::mismatch(prompt.begin(), prompt.begin() + limit, p.tokens.begin()).first - prompt.begin();
    if (len > best_len) best = i, best_len = len;
  }
  if (!free_caches_.empty()) {
    // No shared prefix: the oldest entry, so the recent prefixes stay.
    r.cache = std::move(free_caches_[best].cache);
    free_caches_.erase(free_caches_.begin() + static_cast<std::ptrdiff_t>(best));
  } else {
    QF_ASSIGN_OR_RETURN(KvCache cache, runtime_->NewCache(context_));
    r.cache = std::make_unique<KvCache>(std::move(cache));
    std::lock_guard<std::mutex> lock(mu_);
    stats_.kv_bytes += r.cache->bytes();
  }
  r.prefilled = static_cast<int>(best_len);
  r.next_pos = r.prefilled;
  r.cached_prefix = r.prefilled;
  if (best_len > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    ++stats_.prefix_hits;
    stats_.prefix_reused_tokens += best_len;
  }
  return absl::OkStatus();
}

absl::StatusOr<ScoreResult> Engine::Score(const std::vector<int>& tokens) {
  const int n = static_cast<int>(tokens.size());
  const int vocab = model_->config.vocab_size;
  if (n < 2) return absl::InvalidArgumentError("Score: needs at least 2 tokens");
  if (n > context_) {
    return absl::InvalidArgumentError(absl::StrCat("Score: ", n, " tokens exceed the context of ", context_));
  }
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("Score: token id ", tokens[i], " at index ", i, " outside [0, ", vocab, ")"));
    }
  }
  std::lock_guard<std::mutex> lock(score_mu_);
  constexpr int kChunk = 64;  // positions per ForwardBatch: bounds the logits buffer to kChunk x vocab
  if (scorer_ == nullptr) {
    RuntimeOptions ro{.threads = options_.threads,
                      .max_seq_len = context_,
                      .max_batch = kChunk};
    QF_ASSIGN_OR_RETURN(scorer_, Transformer::Create(model_, ro));
  }
  QF_ASSIGN_OR_RETURN(KvCache cache, scorer_->NewCache(n));
  ScoreResult result;
  result.tokens = n - 1;
  result.token_logprobs.reserve(n - 1);
  std::vector<BatchToken> batch;
  std::vector<float> logits;
  std::vector<double> log_probs;
  double sum = 0;
  // Position p's logits predict token p + 1, so the last token is never run.
  for (int begin = 0; begin < n - 1; begin += kChunk) {
    const int end = std::min(n - 1, begin + kChunk);
    batch.clear();
    for (int p = begin; p < end; ++p) batch.push_back(BatchToken{&cache, tokens[p], p, true});
    logits.resize(static_cast<size_t>(end - begin) * vocab);
    QF_RETURN_IF_ERROR(scorer_->ForwardBatch(batch, logits.data()));
    for (int p = begin; p < end; ++p) {
      eval::LogSoftmax(std::span<const float>(&logits[static_cast<size_t>(p - begin) * vocab], vocab), log_probs);
      const double lp = log_probs[tokens[p + 1]];
      sum += lp;
      result.token_logprobs.push_back(static_cast<float>(lp));
    }
  }
  result.perplexity = std::exp(-sum / (n - 1));
  return result;
}

}  // namespace qforge::serving
