#include "services/server/server.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/json.h"
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
};

struct GenerationOutcome {
  serving::FinishReason finish = serving::FinishReason::kLength;
  int prompt_tokens = 0, completion_tokens = 0;
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
    if (p.prompt.empty()) return fail(absl::InvalidArgumentError("prompt: empty"));
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
    auto tokens = lm.tokenizer->Encode(p.prompt, /*add_bos=*/true);
    if (!tokens.ok()) return fail(absl::InvalidArgumentError(absl::StrCat("prompt: ", tokens.status().message())));

    serving::GenerationRequest req;
    req.prompt = *std::move(tokens);
    req.max_tokens = p.max_tokens;
    req.sampler.temperature = static_cast<float>(p.temperature);
    req.sampler.top_p = p.top_p <= 0 ? 1.0f : static_cast<float>(p.top_p);
    req.sampler.seed = p.seed;
    req.stop = p.stop;
    req.deadline = p.deadline;

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
      case absl::StatusCode::kNotFound: return 404;
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

  // The OpenAI request body -> what to run. Unknown members are ignored, as OpenAI's API does.
  static absl::StatusOr<std::pair<std::string, GenerationParams>> ParseCompletionRequest(const std::string& body,
                                                                                        bool* stream) {
    auto json = formats::ParseJson(body);
    if (!json.ok() || !json->is_object()) return absl::InvalidArgumentError("body: not a JSON object");
    GenerationParams p;
    p.max_tokens = 16;  // OpenAI's default
    const Json* model = json->Find("model");
    if (model == nullptr || !model->is_string()) return absl::InvalidArgumentError("model: required string");
    const Json* prompt = json->Find("prompt");
    if (prompt != nullptr && prompt->is_array() && prompt->array().size() == 1) prompt = &prompt->array()[0];
    if (prompt == nullptr || !prompt->is_string()) return absl::InvalidArgumentError("prompt: required string");
    p.prompt = prompt->string_value();
    if (const Json* v = json->Find("max_tokens"); v != nullptr && !v->is_null()) {
      if (!v->is_int() || v->int_value() < 0 || v->int_value() > (1 << 24)) {
        return absl::InvalidArgumentError("max_tokens: must be a non-negative integer");
      }
      p.max_tokens = static_cast<int>(v->int_value());
    }
    if (const Json* v = json->Find("temperature"); v != nullptr && !v->is_null()) {
      if (!v->is_number()) return absl::InvalidArgumentError("temperature: must be a number");
      p.temperature = v->number_value();
    }
    if (const Json* v = json->Find("top_p"); v != nullptr && !v->is_null()) {
      if (!v->is_number()) return absl::InvalidArgumentError("top_p: must be a number");
      p.top_p = v->number_value();
    }
    if (const Json* v = json->Find("seed"); v != nullptr && !v->is_null()) {
      if (!v->is_int() || v->int_value() < 0) return absl::InvalidArgumentError("seed: must be a non-negative integer");
      p.seed = static_cast<uint64_t>(v->int_value());
    }
    if (const Json* v = json->Find("stop"); v != nullptr && !v->is_null()) {
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
    }
    *stream = false;
    if (const Json* v = json->Find("stream"); v != nullptr && !v->is_null()) {
      if (!v->is_bool()) return absl::InvalidArgumentError("stream: must be a boolean");
      *stream = v->bool_value();
    }
    return std::make_pair(model->string_value(), p);
  }

  void HandleCompletion(const http::Request& request, http::ResponseWriter& w) {
    auto send_error = [&](const absl::Status& s) { w.Send(HttpStatusOf(s), "application/json", ErrorJson(s)); };
    if (stopping()) return send_error(absl::UnavailableError("server shutting down"));
    InFlight in_flight(this);
    bool stream = false;
    auto parsed = ParseCompletionRequest(request.body, &stream);
    if (!parsed.ok()) return send_error(parsed.status());
    auto lm = models().Get(parsed->first, "");
    if (!lm.ok()) return send_error(lm.status());
    const std::string id = absl::StrCat("cmpl-", ++completion_ids_);
    const int64_t created =
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    auto chunk = [&](const std::string& text, const char* finish) {
      Json choice = Json::MakeObject();
      choice.Set("text", Json::String(text));
      choice.Set("index", Json::Int(0));
      choice.Set("logprobs", Json::Null());
      choice.Set("finish_reason", finish == nullptr ? Json::Null() : Json::String(finish));
      Json body = Json::MakeObject();
      body.Set("id", Json::String(id));
      body.Set("object", Json::String("text_completion"));
      body.Set("created", Json::Int(created));
      body.Set("model", Json::String((*lm)->ref()));
      body.Set("choices", Json::MakeArray({std::move(choice)}));
      return body;
    };
    // OpenAI's finish reasons are "stop" (a stop string or EOS) and "length".
    auto openai_finish = [](serving::FinishReason f) {
      return f == serving::FinishReason::kStop || f == serving::FinishReason::kEos ? "stop" : "length";
    };
    std::string text;
    bool started = false;
    auto outcome = Generate(
        **lm, parsed->second, "http",
        [&](const serving::StreamEvent& e) {
          if (!stream) {
            text += e.text;
            return true;
          }
          if (!started) {
            if (!w.StartStream(200, "text/event-stream")) return false;
            started = true;
          }
          if (!e.text.empty() && !w.WriteChunk("data: " + chunk(e.text, nullptr).Dump() + "\n\n")) return false;
          if (e.done && !w.WriteChunk("data: " + chunk("", openai_finish(e.finish)).Dump() + "\n\ndata: [DONE]\n\n")) {
            return false;
          }
          return true;
        },
        [&w] { return w.ClientGone(); });
    if (!outcome.ok()) {
      if (!started) return send_error(outcome.status());
      w.WriteChunk("data: " + ErrorJson(outcome.status()) + "\n\n");
      w.EndStream();
      return;
    }
    if (stream) {
      w.EndStream();
      return;
    }
    Json body = chunk(text, openai_finish(outcome->finish));
    Json usage = Json::MakeObject();
    usage.Set("prompt_tokens", Json::Int(outcome->prompt_tokens));
    usage.Set("completion_tokens", Json::Int(outcome->completion_tokens));
    usage.Set("total_tokens", Json::Int(outcome->prompt_tokens + outcome->completion_tokens));
    body.Set("usage", std::move(usage));
    w.Send(200, "application/json", body.Dump());
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

  void RegisterRoutes(http::HttpServer& s) {
    s.Route("POST", "/v1/completions", [this](const http::Request& r, http::ResponseWriter& w) { HandleCompletion(r, w); });
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
  }
  RegistryOptions registry_options = options.registry;
  s->impl_ = std::make_unique<Impl>(s.get(), options);
  registry_options.on_step = [impl = s->impl_.get()](const std::string& model, int seqs, int tokens, double secs) {
    impl->OnStep(model, seqs, tokens, secs);
  };
  s->registry_ = std::make_unique<ModelRegistry>(std::move(registry_options), std::move(fetch));
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
