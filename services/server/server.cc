#include "services/server/server.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "core/formats/json.h"
#include "core/tokenizer/vocab_tokenizer.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "qforge/v1/inference.grpc.pb.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "storage/model_store.h"

namespace qforge::server {
namespace {

namespace v1 = qforge::v1;
using Clock = std::chrono::steady_clock;
using formats::Json;

double Seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

// What one generation asks for, from either endpoint.
struct GenerationParams {
  std::string prompt;
  int max_tokens = 0;
  double temperature = 1.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::vector<std::string> stop;
  Clock::time_point deadline = Clock::time_point::max();
  int logprobs = -1;  // serving::GenerationRequest::logprobs
  // When set, the prompt as token ids (starting with BOS) instead of `prompt` encoded (chat: control tokens
  // spelled by the template are parsed into their ids).
  std::vector<int> prompt_tokens;
  std::shared_ptr<const lora::LoraAdapter> adapter;  // the request's LoRA adapter, or null for the base model
};

struct GenerationOutcome {
  serving::FinishReason finish = serving::FinishReason::kLength;
  int prompt_tokens = 0, completion_tokens = 0;
  int cached_prompt_tokens = 0;  // of prompt_tokens, reused from the engine's prefix cache
};

constexpr int kMaxStopStrings = 16;

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
class InferenceServer::Impl {
 public:
  Impl(InferenceServer* server, ServerOptions options)
      : server_(server), options_(std::move(options)), energy_(metrics::EnergyOptions{options_.estimate_watts}),
        grpc_service_(this) {}

  metrics::Registry& m() { return server_->metrics_; }
  ModelRegistry& models() { return *server_->registry_; }
  bool stopping() const { return stopping_.load(); }

  // In-flight requests, so a graceful shutdown can wait for them.
  class InFlight {
   public:
    explicit InFlight(Impl* impl) : impl_(impl) { ++impl_->in_flight_; }
    ~InFlight() { --impl_->in_flight_; }

   private:
    Impl* impl_;
  };

  void RegisterMetrics() {
    metrics::RegisterProcessCollectors(m(), &energy_);
    m().AddCollector([this](metrics::Registry& r) { CollectModelGauges(r); });
  }

  void OnStep(const std::string& model, int sequences, int tokens, double seconds) {
    energy_.AddBusySeconds(seconds);
    if (auto h = m().GetHistogram("qforge_batch_sequences", "Sequences decoded together in one engine step",
                                  {1, 2, 4, 8, 16, 32, 64}, {{"model", model}});
        h.ok()) {
      (*h)->Observe(sequences);
    }
    if (auto c = m().GetCounter("qforge_engine_busy_seconds_total", "Seconds the engines spent computing steps",
                                {{"model", model}});
        c.ok()) {
      (*c)->Inc(seconds);
    }
  }

  // Memory, queue and cost gauges of every loaded model, computed at scrape time.
  void CollectModelGauges(metrics::Registry& r) {
    const double gib = 1024.0 * 1024.0 * 1024.0;
    double tokens_all = 0;
    for (const auto& lm : models().List()) {
      const std::string ref = lm->ref();
      const serving::EngineStats st = lm->engine->Stats();
      tokens_all += static_cast<double>(st.tokens_generated);
      auto set = [&](const char* name, const char* help, double v, metrics::Labels labels) {
        labels.insert(labels.begin(), {"model", ref});
        if (auto g = r.GetGauge(name, help, labels); g.ok()) (*g)->Set(v);
      };
      set("qforge_model_weight_bytes", "Bytes of the model's weights as held in memory", lm->weight_bytes, {});
      set("qforge_model_fp16_bytes", "Bytes the same weights take in fp16 (the baseline for bytes saved)",
          lm->fp16_bytes, {});
      set("qforge_model_bytes_saved", "fp16 bytes minus served bytes", static_cast<double>(lm->fp16_bytes) - lm->weight_bytes, {});
      set("qforge_kv_cache_bytes", "Bytes of KV cache held by the model's engine", st.kv_bytes, {});
      set("qforge_queue_depth", "Requests waiting to join the model's batch", st.queued, {});
      set("qforge_running_sequences", "Sequences in the model's running batch", st.running, {});
      // Cost model (docs/serving.md): memory held x time x price; per token over the tokens made since load.
      const double hours = Seconds(Clock::now() - lm->loaded_at) / 3600.0;
      for (const auto& [weights, bytes] : {std::pair<const char*, double>{"served", double(lm->weight_bytes)},
                                           {"fp16", double(lm->fp16_bytes)}}) {
        const double per_hour = bytes / gib * options_.price_per_gib_hour;
        set("qforge_memory_cost_dollars_per_hour", "Weight memory x configured price per GiB-hour", per_hour,
            {{"weights", weights}});
        if (st.tokens_generated > 0) {
          set("qforge_cost_per_million_tokens_dollars",
              "Memory cost since load divided by the tokens generated since load, per million", per_hour * hours /
                  (static_cast<double>(st.tokens_generated) / 1e6),
              {{"weights", weights}});
        }
      }
      set("qforge_cost_saved_dollars", "Memory cost saved against fp16 weights since the model was loaded",
          (static_cast<double>(lm->fp16_bytes) - lm->weight_bytes) / gib * options_.price_per_gib_hour * hours, {});
      // Memory held over time as counters, so GiB-hours over any range are an increase() that survives unloads
      // and restarts. Advanced to now at every scrape; a model unloaded between scrapes loses its last interval.
      const Clock::time_point now = Clock::now();
      Clock::time_point& accrued = memory_accrued_to_[ref];
      if (accrued < lm->loaded_at) accrued = lm->loaded_at;
      const double held = Seconds(now - accrued);
      accrued = now;
      for (const auto& [weights, bytes] : {std::pair<const char*, double>{"served", double(lm->weight_bytes)},
                                           {"fp16", double(lm->fp16_bytes)}}) {
        if (auto c = r.GetCounter("qforge_model_memory_byte_seconds_total",
                                  "Weight bytes held in memory times the seconds they were held (served, and the "
                                  "same weights in fp16)",
                                  {{"model", ref}, {"weights", weights}});
            c.ok()) {
          (*c)->Inc(bytes * held);
        }
      }
    }
    if (tokens_all > 0) {
      if (auto g = r.GetGauge("qforge_energy_per_token_joules", "Energy since start divided by generated tokens",
                              {{"source", energy_.source()}});
          g.ok()) {
        (*g)->Set(energy_.joules() / tokens_all);
      }
    }
  }

  // One generation on `lm`'s engine, from either endpoint: validates, tokenizes, streams every piece through
  // `write` (false = the client is gone), honours `cancelled`, and records the latency metrics.
  absl::StatusOr<GenerationOutcome> Generate(LoadedModel& lm, const GenerationParams& p, const std::string& endpoint,
                                             const std::function<bool(const serving::StreamEvent&)>& write,
                                             const std::function<bool()>& cancelled) {
    const Clock::time_point start = Clock::now();
    const std::string ref = lm.ref();
    auto outcome_counter = [&](const std::string& outcome) {
      if (auto c = m().GetCounter("qforge_requests_total", "Generation requests by model, endpoint and outcome",
                                  {{"model", ref}, {"endpoint", endpoint}, {"outcome", outcome}});
          c.ok()) {
        (*c)->Inc();
      }
    };
    auto fail = [&](absl::Status s) {
      outcome_counter(absl::IsResourceExhausted(s) ? "rejected" : "invalid");
      return s;
    };
    if (p.prompt.empty() && p.prompt_tokens.empty()) return fail(absl::InvalidArgumentError("prompt: empty"));
    if (!lm.tokenizer) {
      return fail(absl::FailedPreconditionError(absl::StrCat(
          ref, " has no tokenizer: load it with tokenizer_path (its file carries no vocabulary)")));
    }
    const int context = lm.context;
    if (p.max_tokens < 1 || p.max_tokens > context) {
      return fail(absl::InvalidArgumentError(
          absl::StrCat("max_tokens: must be 1..", context, " (the model's context), got ", p.max_tokens)));
    }
    if (!(p.temperature >= 0 && p.temperature <= 100)) return fail(absl::InvalidArgumentError("temperature: must be 0..100"));
    if (!(p.top_p >= 0 && p.top_p <= 1)) return fail(absl::InvalidArgumentError("top_p: must be 0..1"));
    if (p.stop.size() > kMaxStopStrings) {
      return fail(absl::InvalidArgumentError(absl::StrCat("stop: at most ", kMaxStopStrings, " strings")));
    }
    auto tokens = p.prompt_tokens.empty() ? lm.tokenizer->Encode(p.prompt, /*add_bos=*/true)
                                          : absl::StatusOr<std::vector<int>>(p.prompt_tokens);
    if (!tokens.ok()) return fail(absl::InvalidArgumentError(absl::StrCat("prompt: ", tokens.status().message())));

    serving::GenerationRequest req;
    req.prompt = *std::move(tokens);
    req.max_tokens = p.max_tokens;
    req.sampler.temperature = static_cast<float>(p.temperature);
    req.sampler.top_p = p.top_p <= 0 ? 1.0f : static_cast<float>(p.top_p);
    req.sampler.seed = p.seed;
    req.stop = p.stop;
    req.deadline = p.deadline;
    req.logprobs = p.logprobs;
    req.adapter = p.adapter;

    // The engine thread hands events over; this thread writes them to the client, so a slow client never
    // stalls the batch.
    struct Mailbox {
      std::mutex mu;
      std::condition_variable cv;
      std::deque<serving::StreamEvent> events;
      std::atomic<bool> abandoned{false};
    };
    auto box = std::make_shared<Mailbox>();
    auto handle = lm.engine->Submit(std::move(req), [box](const serving::StreamEvent& e) {
      {
        std::lock_guard<std::mutex> l(box->mu);
        box->events.push_back(e);
      }
      box->cv.notify_one();
      return !box->abandoned.load();
    });
    if (!handle.ok()) return fail(handle.status());

    GenerationOutcome out;
    std::optional<Clock::time_point> first_token, last_token;
    bool done = false;
    while (!done) {
      std::deque<serving::StreamEvent> batch;
      {
        std::unique_lock<std::mutex> l(box->mu);
        box->cv.wait_for(l, std::chrono::milliseconds(50), [&] { return !box->events.empty(); });
        batch.swap(box->events);
      }
      if (!box->abandoned && cancelled()) {
        box->abandoned = true;
        (*handle)->Cancel();
      }
      for (serving::StreamEvent& e : batch) {
        if (!e.tokens.empty()) {
          const Clock::time_point now = Clock::now();
          if (!first_token) first_token = now;
          last_token = now;
        }
        if (e.done) {
          done = true;
          out.finish = e.finish;
          out.prompt_tokens = e.prompt_tokens;
          out.cached_prompt_tokens = e.cached_prompt_tokens;
          out.completion_tokens = e.completion_tokens;
        }
        if (!box->abandoned && !write(e)) {
          box->abandoned = true;
          (*handle)->Cancel();
        }
      }
    }
    const metrics::Labels labels = {{"model", ref}, {"endpoint", endpoint}};
    auto observe = [&](const char* name, const char* help, const std::vector<double>& buckets, double v) {
      if (auto h = m().GetHistogram(name, help, buckets, labels); h.ok()) (*h)->Observe(v);
    };
    observe("qforge_request_duration_seconds", "Generation request time, end to end",
            metrics::ExponentialBuckets(0.005, 2, 16), Seconds(Clock::now() - start));
    if (first_token) {
      observe("qforge_time_to_first_token_seconds", "Time from request to its first generated token",
              metrics::ExponentialBuckets(0.001, 2, 16), Seconds(*first_token - start));
      if (out.completion_tokens > 1) {
        observe("qforge_time_per_output_token_seconds", "Time per generated token after the first",
                metrics::ExponentialBuckets(0.0005, 2, 16),
                Seconds(*last_token - *first_token) / (out.completion_tokens - 1));
      }
    }
    for (const auto& [kind, n] : {std::pair<const char*, int>{"prompt", out.prompt_tokens}, {"completion", out.completion_tokens}}) {
      if (auto c = m().GetCounter("qforge_tokens_total", "Tokens processed by model and kind", {{"model", ref}, {"kind", kind}});
          c.ok()) {
        (*c)->Inc(n);
      }
    }
    if (out.cached_prompt_tokens > 0) {
      if (auto c = m().GetCounter("qforge_prefix_cache_hits_total",
                                  "Requests that reused a finished request's KV cache for a shared prompt prefix",
                                  {{"model", ref}});
          c.ok()) {
        (*c)->Inc(1);
      }
      if (auto c = m().GetCounter("qforge_prefix_cache_tokens_total",
                                  "Prompt tokens taken from the prefix cache instead of being fed again", {{"model", ref}});
          c.ok()) {
        (*c)->Inc(out.cached_prompt_tokens);
      }
    }
    outcome_counter(serving::FinishReasonName(out.finish));
    return out;
  }

  // --- gRPC ----------------------------------------------------------------------------------------------------
  class GrpcService final : public v1::InferenceService::Service {
   public:
    explicit GrpcService(Impl* impl) : impl_(impl) {}

    grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                          grpc::ServerWriter<v1::GenerateResponse>* writer) override {
      if (impl_->stopping()) return {grpc::StatusCode::UNAVAILABLE, "server shutting down"};
      InFlight in_flight(impl_);
      auto lm = impl_->models().Get(req->model().name(), req->model().version());
      if (!lm.ok()) return rpc::ToGrpc(lm.status());
      GenerationParams p;
      p.prompt = req->prompt();
      p.max_tokens = req->max_tokens() == 0 ? 128 : req->max_tokens();
      p.temperature = req->temperature();
      p.top_p = req->top_p();
      p.seed = req->seed();
      p.stop.assign(req->stop().begin(), req->stop().end());
      if (!req->adapter().empty()) {
        auto adapter = ModelRegistry::FindAdapter(**lm, req->adapter());
        if (!adapter.ok()) return rpc::ToGrpc(adapter.status());
        p.adapter = *std::move(adapter);
      }
      if (ctx->deadline() != std::chrono::system_clock::time_point::max()) {
        p.deadline = Clock::now() + (ctx->deadline() - std::chrono::system_clock::now());
      }
      auto outcome = impl_->Generate(
          **lm, p, "grpc",
          [&](const serving::StreamEvent& e) {
            v1::GenerateResponse r;
            r.set_text(e.text);
            for (int t : e.tokens) r.add_token_ids(t);
            r.set_done(e.done);
            if (e.done) {
              r.set_finish_reason(serving::FinishReasonName(e.finish));
              r.set_prompt_tokens(e.prompt_tokens);
              r.set_cached_prompt_tokens(e.cached_prompt_tokens);
              r.set_completion_tokens(e.completion_tokens);
            }
            return writer->Write(r);
          },
          [ctx] { return ctx->IsCancelled(); });
      if (!outcome.ok()) return rpc::ToGrpc(outcome.status());
      if (ctx->IsCancelled()) return {grpc::StatusCode::CANCELLED, "client cancelled"};
      if (outcome->finish == serving::FinishReason::kDeadline) {
        return {grpc::StatusCode::DEADLINE_EXCEEDED, "deadline reached while generating"};
      }
      return grpc::Status::OK;
    }

    grpc::Status Score(grpc::ServerContext*, const v1::ScoreRequest* req, v1::ScoreResponse* resp) override {
      if (impl_->stopping()) return {grpc::StatusCode::UNAVAILABLE, "server shutting down"};
      InFlight in_flight(impl_);
      auto lm = impl_->models().Get(req->model().name(), req->model().version());
      if (!lm.ok()) return rpc::ToGrpc(lm.status());
      if (!(*lm)->tokenizer) return {grpc::StatusCode::FAILED_PRECONDITION, (*lm)->ref() + " has no tokenizer"};
      if (req->text().empty()) return {grpc::StatusCode::INVALID_ARGUMENT, "text: empty"};
      auto tokens = (*lm)->tokenizer->Encode(req->text(), /*add_bos=*/true);
      if (!tokens.ok()) return rpc::ToGrpc(tokens.status());
      auto score = (*lm)->engine->Score(*tokens);
      if (!score.ok()) return rpc::ToGrpc(score.status());
      for (float lp : score->token_logprobs) resp->add_token_logprobs(lp);
      resp->set_perplexity(score->perplexity);
      resp->set_tokens(score->tokens);
      return grpc::Status::OK;
    }

    grpc::Status LoadModel(grpc::ServerContext*, const v1::LoadModelRequest* req, v1::LoadModelResponse* resp) override {
      auto lm = impl_->models().Load(req->model().name(), req->model().version(), req->path(), req->tokenizer_path());
      if (!lm.ok()) return rpc::ToGrpc(lm.status());
      resp->set_resident_bytes((*lm)->weight_bytes);
      return grpc::Status::OK;
    }

    grpc::Status UnloadModel(grpc::ServerContext*, const v1::UnloadModelRequest* req, v1::UnloadModelResponse*) override {
      return rpc::ToGrpc(impl_->models().Unload(req->model().name(), req->model().version()));
    }

    grpc::Status ListModels(grpc::ServerContext*, const v1::ListLoadedModelsRequest*,
                            v1::ListLoadedModelsResponse* resp) override {
      for (const auto& lm : impl_->models().List()) {
        v1::LoadedModel* out = resp->add_models();
        out->mutable_model()->set_name(lm->name);
        out->mutable_model()->set_version(lm->version == kFileVersion ? "file" : absl::StrCat(lm->version));
        out->set_resident_bytes(lm->weight_bytes);
        out->set_fp16_bytes(lm->fp16_bytes);
        out->set_encoding(lm->encoding);
      }
      return grpc::Status::OK;
    }

   private:
    Impl* impl_;
  };

  // --- HTTP: OpenAI-compatible completions, health, metrics -----------------------------------------------------
  static int HttpStatusOf(const absl::Status& s) {
    switch (s.code()) {
      case absl::StatusCode::kInvalidArgument:
      case absl::StatusCode::kFailedPrecondition:
      case absl::StatusCode::kOutOfRange: return 400;
      case absl::StatusCode::kPermissionDenied: return 403;
      case absl::StatusCode::kNotFound: return 404;
      case absl::StatusCode::kAlreadyExists: return 409;
      case absl::StatusCode::kResourceExhausted: return 429;
      case absl::StatusCode::kUnavailable: return 503;
      case absl::StatusCode::kDeadlineExceeded: return 504;
      default: return 500;
    }
  }

  static std::string ErrorJson(const absl::Status& s) {
    Json err = Json::MakeObject();
    err.Set("message", Json::String(std::string(s.message())));
    err.Set("type", Json::String(HttpStatusOf(s) == 429 ? "rate_limit_error"
                                 : HttpStatusOf(s) < 500 ? "invalid_request_error"
                                                         : "server_error"));
    err.Set("code", Json::String(absl::StatusCodeToString(s.code())));
    Json body = Json::MakeObject();
    body.Set("error", std::move(err));
    return body.Dump();
  }

  // The members /v1/completions and /v1/chat/completions share: sampling, stop strings, streaming. Unknown
  // members are ignored, as OpenAI's API does.
  struct OpenAiRequest {
    std::string model;
    std::string adapter;  // a LoRA adapter loaded for `model` (POST /v1/adapters); "" = the base model
    GenerationParams params;
    bool stream = false;
    bool include_usage_in_stream = false;  // stream_options.include_usage
  };

  static absl::Status ParseSharedMembers(const Json& json, OpenAiRequest* r) {
    GenerationParams& p = r->params;
    p.max_tokens = 16;  // OpenAI's default
    const Json* model = json.Find("model");
    if (model == nullptr || !model->is_string()) return absl::InvalidArgumentError("model: required string");
    r->model = model->string_value();
    if (const Json* v = json.Find("adapter"); v != nullptr && !v->is_null()) {
      if (!v->is_string()) return absl::InvalidArgumentError("adapter: must be a string");
      r->adapter = v->string_value();
    }
    for (const char* name : {"max_tokens", "max_completion_tokens"}) {  // the chat API's newer name for it
      if (const Json* v = json.Find(name); v != nullptr && !v->is_null()) {
        if (!v->is_int() || v->int_value() < 0 || v->int_value() > (1 << 24)) {
          return absl::InvalidArgumentError(absl::StrCat(name, ": must be a non-negative integer"));
        }
        p.max_tokens = static_cast<int>(v->int_value());
      }
    }
    if (const Json* v = json.Find("temperature"); v != nullptr && !v->is_null()) {
      if (!v->is_number()) return absl::InvalidArgumentError("temperature: must be a number");
      p.temperature = v->number_value();
    }
    if (const Json* v = json.Find("top_p"); v != nullptr && !v->is_null()) {
      if (!v->is_number()) return absl::InvalidArgumentError("top_p: must be a number");
      p.top_p = v->number_value();
    }
    if (const Json* v = json.Find("seed"); v != nullptr && !v->is_null()) {
      if (!v->is_int() || v->int_value() < 0) return absl::InvalidArgumentError("seed: must be a non-negative integer");
      p.seed = static_cast<uint64_t>(v->int_value());
    }
    if (const Json* v = json.Find("n"); v != nullptr && !v->is_null()) {
      if (!v->is_int() || v->int_value() != 1) return absl::InvalidArgumentError("n: only 1 choice per request is supported");
    }
    if (const Json* v = json.Find("stop"); v != nullptr && !v->is_null()) {
      if (v->is_string()) {
        p.stop.push_back(v->string_value());
      } else if (v->is_array()) {
        for (const Json& s : v->array()) {
          if (!s.is_string()) return absl::InvalidArgumentError("stop: must be a string or an array of strings");
          p.stop.push_back(s.string_value());
        }
      } else {
        return absl::InvalidArgumentError("stop: must be a string or an array of strings");
      }
      for (const std::string& s : p.stop) {
        if (s.empty()) return absl::InvalidArgumentError("stop: strings must not be empty");
      }
    }
    if (const Json* v = json.Find("stream"); v != nullptr && !v->is_null()) {
      if (!v->is_bool()) return absl::InvalidArgumentError("stream: must be a boolean");
      r->stream = v->bool_value();
    }
    if (const Json* v = json.Find("stream_options"); v != nullptr && !v->is_null()) {
      if (!v->is_object()) return absl::InvalidArgumentError("stream_options: must be an object");
      if (const Json* u = v->Find("include_usage"); u != nullptr && !u->is_null()) {
        if (!u->is_bool()) return absl::InvalidArgumentError("stream_options.include_usage: must be a boolean");
        r->include_usage_in_stream = u->bool_value();
      }
    }
    return absl::OkStatus();
  }

  static absl::StatusOr<Json> ParseBody(const std::string& body) {
    auto json = formats::ParseJson(body);
    if (!json.ok() || !json->is_object()) return absl::InvalidArgumentError("body: not a JSON object");
    return *std::move(json);
  }

  static absl::StatusOr<OpenAiRequest> ParseCompletionRequest(const std::string& body) {
    QF_ASSIGN_OR_RETURN(const Json json, ParseBody(body));
    OpenAiRequest r;
    QF_RETURN_IF_ERROR(ParseSharedMembers(json, &r));
    const Json* prompt = json.Find("prompt");
    if (prompt != nullptr && prompt->is_array() && prompt->array().size() == 1) prompt = &prompt->array()[0];
    if (prompt == nullptr || !prompt->is_string()) return absl::InvalidArgumentError("prompt: required string");
    r.params.prompt = prompt->string_value();
    return r;
  }

  static Json Usage(const GenerationOutcome& o) {
    Json usage = Json::MakeObject();
    usage.Set("prompt_tokens", Json::Int(o.prompt_tokens));
    usage.Set("completion_tokens", Json::Int(o.completion_tokens));
    usage.Set("total_tokens", Json::Int(o.prompt_tokens + o.completion_tokens));
    // OpenAI's field for prompt tokens served from a cache.
    Json details = Json::MakeObject();
    details.Set("cached_tokens", Json::Int(o.cached_prompt_tokens));
    usage.Set("prompt_tokens_details", std::move(details));
    return usage;
  }

  // OpenAI's finish reasons are "stop" (a stop string or EOS) and "length".
  static const char* OpenAiFinish(serving::FinishReason f) {
    return f == serving::FinishReason::kStop || f == serving::FinishReason::kEos ? "stop" : "length";
  }

  // How one endpoint words its answers; ServeGeneration does the rest for both.
  struct ResponseShape {
    // A streamed chunk: new text (may be empty) and the log-probabilities of the tokens it came with; `finish`
    // is null except on the last chunk.
    std::function<Json(const std::string& text, const std::vector<serving::TokenLogprob>& logprobs,
                       const char* finish)> chunk;
    // The whole answer (usage is added by ServeGeneration).
    std::function<Json(const std::string& text, const std::vector<serving::TokenLogprob>& logprobs,
                       const char* finish)> whole;
    // Sent once before the first streamed chunk (the chat API's role delta), or null.
    std::function<Json()> stream_start;
    // A streamed chunk's members without its choices (id, object, created, model): the usage chunk's frame.
    std::function<Json()> chunk_envelope;
  };

  // Runs the generation and answers: server-sent events (`data: {chunk}` per piece, a last chunk with the
  // finish reason, optionally a usage chunk, then `data: [DONE]`) or one JSON object with usage.
  void ServeGeneration(LoadedModel& lm, const OpenAiRequest& r, const std::string& endpoint, const ResponseShape& shape,
                       http::ResponseWriter& w) {
    std::string text;
    std::vector<serving::TokenLogprob> logprobs;
    bool started = false;
    auto send = [&](const Json& chunk) { return w.WriteChunk("data: " + chunk.Dump() + "\n\n"); };
    auto outcome = Generate(
        lm, r.params, endpoint,
        [&](const serving::StreamEvent& e) {
          if (!r.stream) {
            text += e.text;
            logprobs.insert(logprobs.end(), e.logprobs.begin(), e.logprobs.end());
            return true;
          }
          if (!started) {
            if (!w.StartStream(200, "text/event-stream")) return false;
            started = true;
            if (shape.stream_start && !send(shape.stream_start())) return false;
          }
          if ((!e.text.empty() || !e.logprobs.empty()) && !send(shape.chunk(e.text, e.logprobs, nullptr))) return false;
          if (e.done && !send(shape.chunk("", {}, OpenAiFinish(e.finish)))) return false;
          return true;
        },
        [&w] { return w.ClientGone(); });
    if (!outcome.ok()) {
      if (!started) {
        w.Send(HttpStatusOf(outcome.status()), "application/json", ErrorJson(outcome.status()));
        return;
      }
      w.WriteChunk("data: " + ErrorJson(outcome.status()) + "\n\n");
      w.EndStream();
      return;
    }
    if (r.stream) {
      if (r.include_usage_in_stream) {  // OpenAI's last chunk before [DONE]: no choices, the usage
        Json usage_chunk = shape.chunk_envelope();
        usage_chunk.Set("choices", Json::MakeArray());
        usage_chunk.Set("usage", Usage(*outcome));
        send(usage_chunk);
      }
      w.WriteChunk("data: [DONE]\n\n");
      w.EndStream();
      return;
    }
    Json body = shape.whole(text, logprobs, OpenAiFinish(outcome->finish));
    body.Set("usage", Usage(*outcome));
    w.Send(200, "application/json", body.Dump());
  }

  static int64_t NowSeconds() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  }

  // The envelope every OpenAI object shares.
  static Json Envelope(const std::string& id, const char* object, int64_t created, const std::string& model) {
    Json body = Json::MakeObject();
    body.Set("id", Json::String(id));
    body.Set("object", Json::String(object));
    body.Set("created", Json::Int(created));
    body.Set("model", Json::String(model));
    return body;
  }

  // Resolves the request's `adapter` member against the model's loaded adapters.
  static absl::Status AttachAdapter(const LoadedModel& lm, OpenAiRequest& r) {
    if (r.adapter.empty()) return absl::OkStatus();
    QF_ASSIGN_OR_RETURN(r.params.adapter, ModelRegistry::FindAdapter(lm, r.adapter));
    return absl::OkStatus();
  }

  void HandleCompletion(const http::Request& request, http::ResponseWriter& w) {
    auto send_error = [&](const absl::Status& s) { w.Send(HttpStatusOf(s), "application/json", ErrorJson(s)); };
    if (stopping()) return send_error(absl::UnavailableError("server shutting down"));
    InFlight in_flight(this);
    auto parsed = ParseCompletionRequest(request.body);
    if (!parsed.ok()) return send_error(parsed.status());
    auto lm = models().Get(parsed->model, "");
    if (!lm.ok()) return send_error(lm.status());
    if (absl::Status s = AttachAdapter(**lm, *parsed); !s.ok()) return send_error(s);
    const std::string id = absl::StrCat("cmpl-", ++completion_ids_);
    const int64_t created = NowSeconds();
    const std::string ref = (*lm)->ref();
    auto choice_object = [&](const std::string& text, const std::vector<serving::TokenLogprob>&, const char* finish) {
      Json choice = Json::MakeObject();
      choice.Set("text", Json::String(text));
      choice.Set("index", Json::Int(0));
      choice.Set("logprobs", Json::Null());
      choice.Set("finish_reason", finish == nullptr ? Json::Null() : Json::String(finish));
      Json body = Envelope(id, "text_completion", created, ref);
      body.Set("choices", Json::MakeArray({std::move(choice)}));
      return body;
    };
    ServeGeneration(**lm, *parsed, "http",
                    ResponseShape{choice_object, choice_object, nullptr,
                                  [&] { return Envelope(id, "text_completion", created, ref); }},
                    w);
  }

  // --- /v1/chat/completions ---------------------------------------------------------------------------------
  struct ChatRequest {
    OpenAiRequest common;
    std::vector<chat::ChatMessage> messages;
    bool logprobs = false;
    int top_logprobs = 0;
  };

  static absl::StatusOr<ChatRequest> ParseChatRequest(const std::string& body) {
    QF_ASSIGN_OR_RETURN(const Json json, ParseBody(body));
    ChatRequest r;
    QF_RETURN_IF_ERROR(ParseSharedMembers(json, &r.common));
    const Json* messages = json.Find("messages");
    if (messages == nullptr || !messages->is_array() || messages->array().empty()) {
      return absl::InvalidArgumentError("messages: required non-empty array");
    }
    static const std::set<std::string> kRoles = {"system", "developer", "user", "assistant", "tool"};
    for (size_t i = 0; i < messages->array().size(); ++i) {
      const Json& m = messages->array()[i];
      const std::string at = absl::StrCat("messages[", i, "]");
      if (!m.is_object()) return absl::InvalidArgumentError(absl::StrCat(at, ": must be an object"));
      const Json* role = m.Find("role");
      if (role == nullptr || !role->is_string() || !kRoles.count(role->string_value())) {
        return absl::InvalidArgumentError(
            absl::StrCat(at, ".role: must be one of system, developer, user, assistant, tool"));
      }
      chat::ChatMessage message{role->string_value(), ""};
      const Json* content = m.Find("content");
      if (content != nullptr && content->is_string()) {
        message.content = content->string_value();
      } else if (content != nullptr && content->is_array()) {
        // Content parts: only text can be rendered into a prompt; the parts are joined as OpenAI does.
        for (size_t k = 0; k < content->array().size(); ++k) {
          const Json& part = content->array()[k];
          const Json* type = part.Find("type");
          const Json* text = part.Find("text");
          if (type == nullptr || !type->is_string() || type->string_value() != "text" || text == nullptr ||
              !text->is_string()) {
            return absl::InvalidArgumentError(
                absl::StrCat(at, ".content[", k, "]: only {\"type\": \"text\", \"text\": ...} parts are supported"));
          }
          message.content += text->string_value();
        }
      } else if (!(content != nullptr && content->is_null() && message.role == "assistant")) {
        return absl::InvalidArgumentError(absl::StrCat(at, ".content: required string or array of text parts"));
      }
      r.messages.push_back(std::move(message));
    }
    if (const Json* v = json.Find("logprobs"); v != nullptr && !v->is_null()) {
      if (!v->is_bool()) return absl::InvalidArgumentError("logprobs: must be a boolean");
      r.logprobs = v->bool_value();
    }
    if (const Json* v = json.Find("top_logprobs"); v != nullptr && !v->is_null()) {
      if (!v->is_int() || v->int_value() < 0 || v->int_value() > serving::kMaxTopLogprobs) {
        return absl::InvalidArgumentError(
            absl::StrCat("top_logprobs: must be an integer in 0..", serving::kMaxTopLogprobs));
      }
      if (!r.logprobs) return absl::InvalidArgumentError("top_logprobs: needs logprobs: true");
      r.top_logprobs = static_cast<int>(v->int_value());
    }
    if (r.logprobs) r.common.params.logprobs = r.top_logprobs;
    return r;
  }

  // OpenAI's logprobs object of a chat choice: {"content": [{token, logprob, bytes, top_logprobs}, ...]}.
  static Json ChatLogprobs(const std::vector<serving::TokenLogprob>& logprobs) {
    auto entry = [](const std::string& piece, float logprob) {
      Json e = Json::MakeObject();
      e.Set("token", Json::String(piece));  // Dump writes a partial UTF-8 character as U+FFFD; bytes keep it
      e.Set("logprob", Json::Double(logprob));
      Json::Array bytes;
      for (unsigned char c : piece) bytes.push_back(Json::Int(c));
      e.Set("bytes", Json::MakeArray(std::move(bytes)));
      return e;
    };
    Json::Array content;
    for (const serving::TokenLogprob& t : logprobs) {
      Json e = entry(t.piece, t.logprob);
      Json::Array top;
      for (const auto& alt : t.top) top.push_back(entry(alt.piece, alt.logprob));
      e.Set("top_logprobs", Json::MakeArray(std::move(top)));
      content.push_back(std::move(e));
    }
    Json out = Json::MakeObject();
    out.Set("content", Json::MakeArray(std::move(content)));
    return out;
  }

  // The prompt of a conversation under the model's template, as token ids starting with BOS. The spellings of
  // control tokens the template writes (bos_token, eos_token between turns, <|im_start|> of a model that has it)
  // become those tokens, as transformers tokenizes a rendered chat; BOS is added when the text does not start
  // with it.
  static absl::StatusOr<std::vector<int>> ChatPromptTokens(const LoadedModel& lm,
                                                           const std::vector<chat::ChatMessage>& messages) {
    if (!lm.tokenizer) {
      return absl::FailedPreconditionError(absl::StrCat(
          lm.ref(), " has no tokenizer: load it with tokenizer_path (its file carries no vocabulary)"));
    }
    QF_ASSIGN_OR_RETURN(const std::string text, RenderChat(lm, messages));
    const auto* vocab = dynamic_cast<const VocabTokenizer*>(lm.tokenizer.get());
    auto ids = vocab != nullptr ? vocab->EncodeWithControlTokens(text, /*add_bos=*/false)
                                : lm.tokenizer->Encode(text, /*add_bos=*/false);
    if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("messages: ", ids.status().message()));
    if (ids->empty() || ids->front() != lm.tokenizer->bos_id()) ids->insert(ids->begin(), lm.tokenizer->bos_id());
    return ids;
  }

  // The conversation rendered by the model's template.
  static absl::StatusOr<std::string> RenderChat(const LoadedModel& lm, const std::vector<chat::ChatMessage>& messages) {
    if (lm.chat_template == nullptr) {
      return absl::FailedPreconditionError(
          absl::StrCat(lm.ref(), ": its chat template does not parse: ", lm.chat_template_error.message()));
    }
    auto text = lm.chat_template->Apply(messages, lm.bos_text, lm.eos_text, /*add_generation_prompt=*/true);
    if (!text.ok()) return absl::InvalidArgumentError(absl::StrCat("messages: ", text.status().message()));
    if (text->empty() || *text == lm.bos_text) {
      return absl::InvalidArgumentError("messages: the chat template rendered an empty prompt");
    }
    return text;
  }

  void HandleChatCompletion(const http::Request& request, http::ResponseWriter& w) {
    auto send_error = [&](const absl::Status& s) { w.Send(HttpStatusOf(s), "application/json", ErrorJson(s)); };
    if (stopping()) return send_error(absl::UnavailableError("server shutting down"));
    InFlight in_flight(this);
    auto parsed = ParseChatRequest(request.body);
    if (!parsed.ok()) return send_error(parsed.status());
    auto lm = models().Get(parsed->common.model, "");
    if (!lm.ok()) return send_error(lm.status());
    if (absl::Status s = AttachAdapter(**lm, parsed->common); !s.ok()) return send_error(s);
    auto prompt = ChatPromptTokens(**lm, parsed->messages);
    if (!prompt.ok()) return send_error(prompt.status());
    parsed->common.params.prompt_tokens = *std::move(prompt);
    const std::string id = absl::StrCat("chatcmpl-", ++completion_ids_);
    const int64_t created = NowSeconds();
    const std::string ref = (*lm)->ref();
    const bool with_logprobs = parsed->logprobs;
    auto choice = [&](const char* body_member, Json payload, const std::vector<serving::TokenLogprob>& logprobs,
                      const char* finish) {
      Json c = Json::MakeObject();
      c.Set("index", Json::Int(0));
      c.Set(body_member, std::move(payload));
      c.Set("logprobs", with_logprobs && (finish == nullptr || !logprobs.empty()) ? ChatLogprobs(logprobs) : Json::Null());
      c.Set("finish_reason", finish == nullptr ? Json::Null() : Json::String(finish));
      return c;
    };
    ResponseShape shape;
    shape.chunk = [&](const std::string& text, const std::vector<serving::TokenLogprob>& logprobs, const char* finish) {
      Json delta = Json::MakeObject();
      if (finish == nullptr) delta.Set("content", Json::String(text));
      Json body = Envelope(id, "chat.completion.chunk", created, ref);
      body.Set("choices", Json::MakeArray({choice("delta", std::move(delta), logprobs, finish)}));
      return body;
    };
    shape.chunk_envelope = [&] { return Envelope(id, "chat.completion.chunk", created, ref); };
    shape.stream_start = [&] {
      Json delta = Json::MakeObject();
      delta.Set("role", Json::String("assistant"));
      delta.Set("content", Json::String(""));
      Json c = Json::MakeObject();
      c.Set("index", Json::Int(0));
      c.Set("delta", std::move(delta));
      c.Set("logprobs", Json::Null());
      c.Set("finish_reason", Json::Null());
      Json body = Envelope(id, "chat.completion.chunk", created, ref);
      body.Set("choices", Json::MakeArray({std::move(c)}));
      return body;
    };
    shape.whole = [&](const std::string& text, const std::vector<serving::TokenLogprob>& logprobs, const char* finish) {
      Json message = Json::MakeObject();
      message.Set("role", Json::String("assistant"));
      message.Set("content", Json::String(text));
      Json body = Envelope(id, "chat.completion", created, ref);
      Json c = Json::MakeObject();
      c.Set("index", Json::Int(0));
      c.Set("message", std::move(message));
      c.Set("logprobs", with_logprobs ? ChatLogprobs(logprobs) : Json::Null());
      c.Set("finish_reason", Json::String(finish));
      body.Set("choices", Json::MakeArray({std::move(c)}));
      return body;
    };
    ServeGeneration(**lm, parsed->common, "chat", shape, w);
  }

  // --- /tokenize, /detokenize (llama.cpp server style) --------------------------------------------------------
  // The model a request names (`model`), or the only one loaded when it names none.
  absl::StatusOr<std::shared_ptr<LoadedModel>> ModelOf(const Json& body) {
    const Json* model = body.Find("model");
    if (model != nullptr && !model->is_null()) {
      if (!model->is_string()) return absl::InvalidArgumentError("model: must be a string");
      return models().Get(model->string_value(), "");
    }
    const auto loaded = models().List();
    if (loaded.size() == 1) return loaded[0];
    return absl::InvalidArgumentError(
        absl::StrCat("model: required when the server holds ", loaded.size(), " models (see /v1/models)"));
  }

  absl::StatusOr<Json> Tokenize(const std::string& request_body) {
    QF_ASSIGN_OR_RETURN(const Json json, ParseBody(request_body));
    const Json* content = json.Find("content");
    if (content == nullptr || !content->is_string()) return absl::InvalidArgumentError("content: required string");
    bool add_special = false;  // llama.cpp's default: no BOS
    if (const Json* v = json.Find("add_special"); v != nullptr && !v->is_null()) {
      if (!v->is_bool()) return absl::InvalidArgumentError("add_special: must be a boolean");
      add_special = v->bool_value();
    }
    QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> lm, ModelOf(json));
    if (!lm->tokenizer) return absl::FailedPreconditionError(absl::StrCat(lm->ref(), " has no tokenizer"));
    auto ids = lm->tokenizer->Encode(content->string_value(), add_special);
    if (!ids.ok()) return absl::InvalidArgumentError(absl::StrCat("content: ", ids.status().message()));
    Json::Array tokens;
    for (int id : *ids) tokens.push_back(Json::Int(id));
    Json out = Json::MakeObject();
    out.Set("tokens", Json::MakeArray(std::move(tokens)));
    return out;
  }

  absl::StatusOr<Json> Detokenize(const std::string& request_body) {
    QF_ASSIGN_OR_RETURN(const Json json, ParseBody(request_body));
    const Json* tokens = json.Find("tokens");
    if (tokens == nullptr || !tokens->is_array()) return absl::InvalidArgumentError("tokens: required array of integers");
    QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> lm, ModelOf(json));
    if (!lm->tokenizer) return absl::FailedPreconditionError(absl::StrCat(lm->ref(), " has no tokenizer"));
    const int vocab = lm->tokenizer->vocab_size();
    std::vector<int> ids;
    for (size_t i = 0; i < tokens->array().size(); ++i) {
      const Json& t = tokens->array()[i];
      if (!t.is_int() || t.int_value() < 0 || t.int_value() >= vocab) {
        return absl::InvalidArgumentError(absl::StrCat("tokens[", i, "]: must be a token id in 0..", vocab - 1));
      }
      ids.push_back(static_cast<int>(t.int_value()));
    }
    QF_ASSIGN_OR_RETURN(std::string text, lm->tokenizer->Decode(ids));
    Json out = Json::MakeObject();
    out.Set("content", Json::String(std::move(text)));
    return out;
  }

  void HandleJson(const http::Request& request, http::ResponseWriter& w,
                  absl::StatusOr<Json> (Impl::*handler)(const std::string&)) {
    if (stopping()) {
      const absl::Status s = absl::UnavailableError("server shutting down");
      w.Send(HttpStatusOf(s), "application/json", ErrorJson(s));
      return;
    }
    InFlight in_flight(this);
    auto out = (this->*handler)(request.body);
    if (!out.ok()) {
      w.Send(HttpStatusOf(out.status()), "application/json", ErrorJson(out.status()));
      return;
    }
    w.Send(200, "application/json", out->Dump());
  }

  void HandleModels(const http::Request&, http::ResponseWriter& w) {
    Json::Array data;
    for (const auto& lm : models().List()) {
      Json entry = Json::MakeObject();
      entry.Set("id", Json::String(lm->ref()));
      entry.Set("object", Json::String("model"));
      entry.Set("owned_by", Json::String("qforge"));
      data.push_back(std::move(entry));
    }
    Json body = Json::MakeObject();
    body.Set("object", Json::String("list"));
    body.Set("data", Json::MakeArray(std::move(data)));
    w.Send(200, "application/json", body.Dump());
  }

  // --- LoRA adapters: POST / DELETE / GET /v1/adapters ---------------------------------------------------------
  static Json AdapterJson(const LoadedModel& lm, const LoadedAdapter& a) {
    Json entry = Json::MakeObject();
    entry.Set("name", Json::String(a.name));
    entry.Set("model", Json::String(lm.ref()));
    entry.Set(a.artifact.empty() ? "path" : "artifact", Json::String(a.artifact.empty() ? a.path : a.artifact));
    entry.Set("format", Json::String(a.adapter->format));
    entry.Set("rank", Json::Int(a.adapter->max_rank()));
    entry.Set("alpha", Json::Double(a.adapter->alpha));
    entry.Set("matrices", Json::Int(static_cast<int64_t>(a.adapter->matrices.size())));
    entry.Set("bytes", Json::Int(static_cast<int64_t>(a.adapter->bytes())));
    return entry;
  }

  // {"name", "path" | "artifact", "model"?}: a file under --adapter-root, or a stored adapter version
  // (name@version); without `model`, the only loaded model.
  absl::StatusOr<Json> LoadAdapterRequest(const std::string& body) {
    QF_ASSIGN_OR_RETURN(const Json json, ParseBody(body));
    std::string fields[4];
    const char* names[4] = {"name", "path", "artifact", "model"};
    for (int i = 0; i < 4; ++i) {
      const Json* v = json.Find(names[i]);
      if (v == nullptr || v->is_null()) {
        if (i == 0) return absl::InvalidArgumentError("name: required string");
        continue;
      }
      if (!v->is_string()) return absl::InvalidArgumentError(absl::StrCat(names[i], ": must be a string"));
      fields[i] = v->string_value();
    }
    const std::string &name = fields[0], &path = fields[1], &artifact = fields[2];
    if (path.empty() == artifact.empty()) return absl::InvalidArgumentError("path, artifact: give exactly one");
    QF_ASSIGN_OR_RETURN(std::shared_ptr<LoadedModel> lm, ModelFor(fields[3]));
    QF_ASSIGN_OR_RETURN(LoadedAdapter a, path.empty() ? models().LoadStoredAdapter(lm->ref(), name, artifact)
                                                      : models().LoadAdapter(lm->ref(), name, path));
    return AdapterJson(*lm, a);
  }

  // The model a request names, or the only loaded one when it names none.
  absl::StatusOr<std::shared_ptr<LoadedModel>> ModelFor(const std::string& ref) {
    if (!ref.empty()) return models().Get(ref, "");
    const auto all = models().List();
    if (all.size() != 1) {
      return absl::InvalidArgumentError(absl::StrCat("model: required (", all.size(), " models are loaded)"));
    }
    return all[0];
  }

  // A query parameter's value: %XX escapes and '+' decoded (a model ref's '@' arrives as %40).
  static std::string PercentDecode(const std::string& s) {
    auto hex = [](char c) {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
      const int hi = s[i] == '%' && i + 2 < s.size() ? hex(s[i + 1]) : -1;
      const int lo = hi >= 0 ? hex(s[i + 2]) : -1;
      if (lo >= 0) {
        out.push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
      } else {
        out.push_back(s[i] == '+' ? ' ' : s[i]);
      }
    }
    return out;
  }

  void HandleAdapters(const http::Request& request, http::ResponseWriter& w) {
    auto send_error = [&](const absl::Status& s) { w.Send(HttpStatusOf(s), "application/json", ErrorJson(s)); };
    if (request.method == "POST") {
      if (stopping()) return send_error(absl::UnavailableError("server shutting down"));
      auto out = LoadAdapterRequest(request.body);
      if (!out.ok()) return send_error(out.status());
      w.Send(200, "application/json", out->Dump());
      return;
    }
    if (request.method == "DELETE") {  // ?name=NAME[&model=REF]
      std::string name, model;
      for (absl::string_view part : absl::StrSplit(request.query, '&', absl::SkipEmpty())) {
        const size_t eq = part.find('=');
        const std::string key(part.substr(0, eq));
        const std::string value = eq == absl::string_view::npos ? "" : PercentDecode(std::string(part.substr(eq + 1)));
        if (key == "name") name = value;
        if (key == "model") model = value;
      }
      if (name.empty()) return send_error(absl::InvalidArgumentError("name: required query parameter"));
      if (absl::Status s = models().UnloadAdapter(model, name); !s.ok()) return send_error(s);
      w.Send(200, "application/json", absl::StrCat("{\"deleted\":", Json::String(name).Dump(), "}"));
      return;
    }
    Json::Array data;
    for (const auto& lm : models().List()) {
      std::lock_guard<std::mutex> l(lm->adapters_mu);
      for (const auto& [name, a] : lm->adapters) data.push_back(AdapterJson(*lm, a));
    }
    Json body = Json::MakeObject();
    body.Set("object", Json::String("list"));
    body.Set("data", Json::MakeArray(std::move(data)));
    w.Send(200, "application/json", body.Dump());
  }

  void RegisterRoutes(http::HttpServer& s) {
    for (const char* method : {"GET", "POST", "DELETE"}) {
      s.Route(method, "/v1/adapters", [this](const http::Request& r, http::ResponseWriter& w) { HandleAdapters(r, w); });
    }
    s.Route("POST", "/v1/completions", [this](const http::Request& r, http::ResponseWriter& w) { HandleCompletion(r, w); });
    s.Route("POST", "/v1/chat/completions",
            [this](const http::Request& r, http::ResponseWriter& w) { HandleChatCompletion(r, w); });
    s.Route("POST", "/tokenize", [this](const http::Request& r, http::ResponseWriter& w) { HandleJson(r, w, &Impl::Tokenize); });
    s.Route("POST", "/detokenize",
            [this](const http::Request& r, http::ResponseWriter& w) { HandleJson(r, w, &Impl::Detokenize); });
    s.Route("GET", "/health", [this](const http::Request&, http::ResponseWriter& w) {
      if (stopping()) {
        w.Send(503, "application/json", "{\"status\":\"stopping\"}");
      } else {
        w.Send(200, "application/json", "{\"status\":\"ok\"}");
      }
    });
    s.Route("GET", "/v1/models", [this](const http::Request& r, http::ResponseWriter& w) { HandleModels(r, w); });
    s.Route("GET", "/healthz", [this](const http::Request&, http::ResponseWriter& w) {
      if (stopping()) {
        w.Send(503, "text/plain", "stopping\n");
      } else {
        w.Send(200, "text/plain", "ok\n");
      }
    });
    s.Route("GET", "/metrics", [this](const http::Request&, http::ResponseWriter& w) {
      w.Send(200, "text/plain; version=0.0.4; charset=utf-8", m().Render());
    });
  }

  InferenceServer* server_;
  ServerOptions options_;
  metrics::EnergyMeter energy_;
  // Per model ref: how far qforge_model_memory_byte_seconds_total has been advanced. Only collectors touch it,
  // and the registry runs them one at a time.
  std::map<std::string, Clock::time_point> memory_accrued_to_;
  std::atomic<bool> stopping_{false};
  std::atomic<int> in_flight_{0};
  std::atomic<uint64_t> completion_ids_{0};

 public:
  GrpcService grpc_service_;
};

// ---------------------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<InferenceServer>> InferenceServer::Start(ServerOptions options) {
  std::unique_ptr<InferenceServer> s(new InferenceServer());
  std::shared_ptr<grpc::Channel> store = options.store_channel;
  if (store == nullptr && !options.store_address.empty()) store = rpc::MakeChannel(options.store_address);
  StoreFetcher fetch;
  AdapterFetcher fetch_adapter;
  if (store != nullptr) {
    auto stub = std::shared_ptr<v1::ArtifactService::Stub>(v1::ArtifactService::NewStub(store));
    fetch = [stub](const storage::ModelRef& ref) -> absl::StatusOr<std::pair<uint64_t, Model>> {
      QF_ASSIGN_OR_RETURN(const v1::Manifest manifest, rpc::FetchManifest(*stub, ref));
      uint64_t version = 0;
      if (!absl::SimpleAtoi(manifest.model().version(), &version) || version == 0) {
        return absl::DataLossError(absl::StrCat("manifest of ", ref.name, " names version '",
                                                manifest.model().version(), "'"));
      }
      QF_ASSIGN_OR_RETURN(Model model, storage::ModelFromManifest(manifest, [&stub](const std::string& id) {
                            return rpc::FetchChunk(*stub, id);
                          }));
      return std::make_pair(version, std::move(model));
    };
    fetch_adapter = [stub](const storage::ModelRef& ref) -> absl::StatusOr<StoredAdapterFiles> {
      QF_ASSIGN_OR_RETURN(const v1::Manifest manifest, rpc::FetchManifest(*stub, ref));
      const std::string where = absl::StrCat(manifest.model().name(), "@", manifest.model().version());
      if (!manifest.has_adapter_of()) {
        return absl::FailedPreconditionError(absl::StrCat(where, " is a model, not a LoRA adapter"));
      }
      StoredAdapterFiles stored;
      auto base = storage::ParseModelRef(absl::StrCat(manifest.adapter_of().name(), "@", manifest.adapter_of().version()));
      if (!absl::SimpleAtoi(manifest.model().version(), &stored.version) || stored.version == 0 || !base.ok() ||
          base->is_latest()) {
        return absl::DataLossError(absl::StrCat("manifest of ", ref.name, ": malformed version or adapter_of"));
      }
      stored.base = *base;
      QF_ASSIGN_OR_RETURN(stored.files, storage::AdapterFilesFromManifest(manifest, [&stub](const std::string& id) {
                            return rpc::FetchChunk(*stub, id);
                          }));
      return stored;
    };
  }
  RegistryOptions registry_options = options.registry;
  s->impl_ = std::make_unique<Impl>(s.get(), options);
  registry_options.on_step = [impl = s->impl_.get()](const std::string& model, int seqs, int tokens, double secs) {
    impl->OnStep(model, seqs, tokens, secs);
  };
  s->registry_ = std::make_unique<ModelRegistry>(std::move(registry_options), std::move(fetch), std::move(fetch_adapter));
  s->impl_->RegisterMetrics();

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  rpc::ConfigureServer(builder);
  builder.AddListeningPort(options.grpc_address, grpc::InsecureServerCredentials(), &s->grpc_port_);
  builder.RegisterService(&s->impl_->grpc_service_);
  s->grpc_ = builder.BuildAndStart();
  if (s->grpc_ == nullptr || s->grpc_port_ == 0) {
    return absl::UnavailableError(absl::StrCat("qforge-server: cannot listen on ", options.grpc_address));
  }
  s->grpc_->GetHealthCheckService()->SetServingStatus(true);

  s->http_ = std::make_unique<http::HttpServer>();
  s->impl_->RegisterRoutes(*s->http_);
  http::HttpServerOptions http_options;
  http_options.address = options.http_address;
  http_options.port = options.http_port;
  http_options.threads = options.http_threads;
  QF_RETURN_IF_ERROR(s->http_->Start(http_options));
  return s;
}

int InferenceServer::http_port() const { return http_->port(); }

void InferenceServer::Shutdown(int64_t grace_ms) {
  if (impl_ == nullptr || impl_->stopping_.exchange(true)) return;
  if (grpc_ != nullptr) grpc_->GetHealthCheckService()->SetServingStatus(false);
  const Clock::time_point deadline = Clock::now() + std::chrono::milliseconds(grace_ms);
  while (impl_->in_flight_.load() > 0 && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (grpc_ != nullptr) grpc_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
  if (http_ != nullptr) http_->Shutdown();
}

void InferenceServer::Wait() {
  if (grpc_ != nullptr) grpc_->Wait();
}

InferenceServer::~InferenceServer() {
  Shutdown(0);
  grpc_.reset();
  http_.reset();
  registry_.reset();  // engines finish their streams before the metrics they report to go away
}

}  // namespace qforge::server
