// CLI commands of the distributed service: `up` runs scheduler, store and workers in one process (embedded
// mode); `submit`, `jobs`, `models` and `export` are clients of a running scheduler.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <thread>
#include <tuple>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "qforge/v1/jobs.grpc.pb.h"
#include "services/cli/internal.h"
#include "services/rpc/artifact_client.h"
#include "services/rpc/rpc_util.h"
#include "services/scheduler/scheduler_service.h"
#include "services/server/server.h"
#include "storage/model_ref.h"
#include "workers/worker.h"

namespace qforge::cli {
namespace {

namespace v1 = qforge::v1;

// `path` made absolute against the working directory, for requests whose files the scheduler opens itself.
std::string AbsolutePath(const std::string& path) {
  char cwd[4096];
  if (path.empty() || path[0] == '/' || getcwd(cwd, sizeof(cwd)) == nullptr) return path;
  return absl::StrCat(cwd, "/", path);
}

constexpr char kDefaultAddress[] = "127.0.0.1:7700";

// --scheduler, else $QFORGE_SCHEDULER, else the embedded default.
std::string SchedulerAddress(const Flags& f) {
  if (f.Has("scheduler")) return f.Get("scheduler");
  if (const char* env = std::getenv("QFORGE_SCHEDULER"); env != nullptr && *env != '\0') return env;
  return kDefaultAddress;
}

// A unary call's context: a deadline, so a dead scheduler is an error and not a hang.
std::unique_ptr<grpc::ClientContext> CallContext(int seconds = 30) {
  auto ctx = std::make_unique<grpc::ClientContext>();
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return ctx;
}

absl::Status CallError(const grpc::Status& s, const std::string& address) {
  if (s.error_code() == grpc::StatusCode::UNAVAILABLE || s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED) {
    return absl::UnavailableError(absl::StrCat("no scheduler answers at ", address, " (start one with `qforge up`): ",
                                               s.error_message()));
  }
  return rpc::FromGrpc(s);
}

std::string StateName(v1::JobState s) {
  switch (s) {
    case v1::JOB_STATE_QUEUED: return "queued";
    case v1::JOB_STATE_RUNNING: return "running";
    case v1::JOB_STATE_SUCCEEDED: return "succeeded";
    case v1::JOB_STATE_FAILED: return "failed";
    case v1::JOB_STATE_CANCELLED: return "cancelled";
    default: return "unknown";
  }
}

std::string Mib(double bytes) { return absl::StrFormat("%.1f MiB", bytes / (1 << 20)); }

// Shows a job's progress: a bar redrawn in place on a terminal, plain lines (one per change, at most one a
// second) otherwise. Returns the final progress.
absl::StatusOr<v1::JobProgress> WatchJob(v1::JobService::Stub& jobs, const std::string& job_id,
                                         const std::string& address, std::ostream& out) {
  const bool tty = &out == &std::cout && isatty(STDOUT_FILENO);
  grpc::ClientContext ctx;
  v1::WatchJobRequest req;
  req.set_job_id(job_id);
  auto reader = jobs.WatchJob(&ctx, req);
  v1::JobProgress p, last_line;
  const auto start = std::chrono::steady_clock::now();
  auto last_print = start - std::chrono::seconds(10);
  bool got = false;
  while (reader->Read(&p)) {
    got = true;
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double rate = secs > 0 ? static_cast<double>(p.bytes_in()) / secs : 0;
    const std::string eta = p.eta_seconds() < 0 ? "?" : absl::StrFormat("%.0fs", p.eta_seconds());
    const std::string stats =
        absl::StrFormat("%d/%d tasks  %s/%s  %s/s  ETA %s", p.tasks_done(), p.tasks_total(), Mib(p.bytes_in()),
                        Mib(p.bytes_in_total()), Mib(rate), eta);
    const bool terminal = p.state() != v1::JOB_STATE_RUNNING && p.state() != v1::JOB_STATE_QUEUED;
    if (tty) {
      constexpr int kWidth = 30;
      const int filled = p.tasks_total() > 0 ? static_cast<int>(kWidth * p.tasks_done() / p.tasks_total()) : 0;
      out << "\r[" << std::string(filled, '#') << std::string(kWidth - filled, '.') << "] " << stats << "   "
          << std::flush;
      if (terminal) out << "\n";
    } else {
      const bool changed = p.tasks_done() != last_line.tasks_done() || p.state() != last_line.state();
      if (terminal || (changed && std::chrono::steady_clock::now() - last_print >= std::chrono::seconds(1))) {
        out << "job " << job_id << " " << StateName(p.state()) << ": " << stats << "\n";
        last_line = p;
        last_print = std::chrono::steady_clock::now();
      }
    }
  }
  const grpc::Status s = reader->Finish();
  if (!s.ok()) return CallError(s, address);
  if (!got) return absl::InternalError("WatchJob ended without any progress");
  return p;
}

// WatchJob until the job ends, reconnecting while the scheduler is unreachable (restarting, a dropped
// port-forward): the job goes on without the watcher, so losing the stream is no reason to give up on it.
absl::Status WatchUntilDone(v1::JobService::Stub& jobs, const std::string& job_id, const std::string& address,
                            std::ostream& out) {
  constexpr auto kGiveUpAfter = std::chrono::minutes(10);
  auto outage_start = std::chrono::steady_clock::now();
  bool in_outage = false;
  int backoff_ms = 100;
  for (;;) {
    absl::StatusOr<v1::JobProgress> p = WatchJob(jobs, job_id, address, out);
    if (p.ok() && p->state() != v1::JOB_STATE_RUNNING && p->state() != v1::JOB_STATE_QUEUED) return absl::OkStatus();
    // A request the scheduler refuses is final; anything else (UNAVAILABLE, and the INTERNAL / UNKNOWN a stream
    // can end with when the scheduler dies mid-write) is an outage to wait out.
    if (!p.ok() && (absl::IsInvalidArgument(p.status()) || absl::IsNotFound(p.status()) ||
                    absl::IsPermissionDenied(p.status()) || absl::IsUnauthenticated(p.status()) ||
                    absl::IsUnimplemented(p.status()) || absl::IsFailedPrecondition(p.status()))) {
      return p.status();
    }
    if (!in_outage) {
      in_outage = true;
      outage_start = std::chrono::steady_clock::now();
      out << "\nlost the scheduler at " << address << "; reconnecting (the job carries on)\n" << std::flush;
    } else if (std::chrono::steady_clock::now() - outage_start > kGiveUpAfter) {
      return p.ok() ? absl::UnavailableError(absl::StrCat("watching job ", job_id, ": the stream kept ending"))
                    : p.status();
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(backoff_ms));
    backoff_ms = std::min(backoff_ms * 2, 5000);
    if (p.ok()) in_outage = false;  // the stream was up: a new outage starts its own clock
  }
}

// The job's final line: its result, or an error with its state and message.
absl::Status ReportOutcome(const v1::Job& job, std::ostream& out) {
  if (job.progress().state() != v1::JOB_STATE_SUCCEEDED) {
    return absl::AbortedError(absl::StrCat("job ", job.job_id(), " ", StateName(job.progress().state()), ": ", job.error()));
  }
  out << absl::StrFormat("job %s succeeded: %s@%s (%s -> %s, %.2f s)\n", job.job_id(), job.result().name(),
                         job.result().version(), Mib(job.progress().bytes_in_total()), Mib(job.progress().bytes_out()),
                         (job.finished_unix_ms() - job.created_unix_ms()) / 1000.0);
  if (job.has_quality()) {
    const v1::QualityReport& q = job.quality();
    // `qforge eval VERSION --base SOURCE --text FILE --window W` prints these very lines (same numbers).
    out << absl::StrFormat("evaluation: %d windows of %d tokens of %s; base = the source, model = %s@%s\n",
                           q.windows(), q.window(), q.text_source(), job.result().name(), job.result().version());
    // A text is named "text FILE" as `qforge eval --text` names it; sampled streams come in its words already.
    const bool sampled = job.request().recipe().eval_streams() > 0;
    out << ComparisonLines(sampled ? q.text_source() : absl::StrCat("text ", q.text_source()),
                           q.perplexity_base(), q.perplexity_quantized(),
                           q.tokens(), q.kl_mean(), q.kl_max(), q.top1_agreement());
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> GetJob(v1::JobService::Stub& jobs, const std::string& job_id, const std::string& address) {
  v1::GetJobRequest req;
  req.set_job_id(job_id);
  v1::Job job;
  if (grpc::Status s = jobs.GetJob(CallContext().get(), req, &job); !s.ok()) return CallError(s, address);
  return job;
}

}  // namespace

absl::Status Submit(const std::vector<std::string>& args, std::ostream& out) {
  std::set<std::string> value_flags = {"scheduler", "name", "tenant", "max-task-mib", "idempotency-key", "tokenizer",
                                       "calib-text", "calib-streams", "calib-len", "calib-seed", "eval-text",
                                       "eval-window", "eval-chunks", "eval-tasks", "eval-streams",
                                       "eval-stream-len", "eval-seed"};
  std::set<std::string> bool_flags = {"watch", "quantize-embeddings", "calib-sequential"};
  value_flags.insert(kMethodValueFlags.begin(), kMethodValueFlags.end());
  bool_flags.insert(kMethodBoolFlags.begin(), kMethodBoolFlags.end());
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, value_flags, bool_flags));
  const std::string usage =
      "qforge submit MODEL --method M [--bits B] [--group G] [--asym] [--no-double-quant] [--quantize-embeddings] "
      "[--name NAME] [--tenant T] [--max-task-mib N] [--idempotency-key K] [--tokenizer TOK] "
      "[--calib-text FILE | --calib-streams N --calib-len L --calib-seed S] [--calib-sequential] "
      "[--eval-text FILE [--eval-chunks N] | --eval-streams N [--eval-stream-len L] [--eval-seed S]] "
      "[--eval-window W] [--eval-tasks N] [--watch] [--scheduler HOST:PORT]";
  QF_ASSIGN_OR_RETURN(auto method_and_params, MethodFromFlags(f, usage));
  QF_ASSIGN_OR_RETURN(int task_mib, f.GetInt("max-task-mib", 0, 0, 1 << 20));
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, usage));
  v1::SubmitJobRequest req;
  req.set_source_uri(AbsolutePath(f.positional()[0]));
  if (f.Has("tokenizer")) req.set_tokenizer_uri(AbsolutePath(f.Get("tokenizer")));
  req.set_output_name(f.Get("name"));
  req.set_tenant(f.Get("tenant"));
  req.set_idempotency_key(f.Get("idempotency-key"));
  req.set_max_task_bytes(uint64_t(task_mib) << 20);
  *req.mutable_recipe()->mutable_defaults() =
      rpc::ParamsToProto(method_and_params.first->name(), method_and_params.second);
  req.mutable_recipe()->mutable_defaults()->set_quantize_embeddings(f.GetBool("quantize-embeddings"));
  // Calibration (gptq, awq): only what is given is sent, so the scheduler's defaults (the quantize command's) apply
  // and it checks the ranges (against the model's context length too).
  if (f.Has("calib-text")) req.mutable_recipe()->set_calibration_text_uri(AbsolutePath(f.Get("calib-text")));
  if (f.Has("calib-streams")) {
    QF_ASSIGN_OR_RETURN(int n, f.GetInt("calib-streams", 64, 1, 1 << 20));
    req.mutable_recipe()->set_calibration_samples(n);
  }
  if (f.Has("calib-len")) {
    QF_ASSIGN_OR_RETURN(int n, f.GetInt("calib-len", 256, 2, 1 << 24));
    req.mutable_recipe()->set_calibration_length(n);
  }
  if (f.Has("calib-seed")) {
    QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("calib-seed", 1000));
    req.mutable_recipe()->set_calibration_seed(seed);
  }
  // As `qforge quantize --calib-sequential`; the scheduler refuses it for a method without calibration.
  if (f.GetBool("calib-sequential")) req.mutable_recipe()->set_sequential_calibration(true);
  // Evaluation after assembly (Job.quality): as `qforge eval --text FILE --window W --chunks N`.
  if (f.Has("eval-text")) req.mutable_recipe()->set_evaluation_text_uri(AbsolutePath(f.Get("eval-text")));
  // Or tokenizer-free, on streams sampled from the source: as `qforge eval --streams N --stream-len L --seed S`.
  if (f.Has("eval-text") && f.Has("eval-streams")) {
    return UsageError(absl::StrCat("give --eval-text or --eval-streams, not both; usage: ", usage));
  }
  const bool evaluates = f.Has("eval-text") || f.Has("eval-streams");
  if (f.Has("eval-streams")) {
    QF_ASSIGN_OR_RETURN(int n, f.GetInt("eval-streams", 8, 1, 100000));
    req.mutable_recipe()->set_eval_streams(n);
  }
  if (f.Has("eval-stream-len")) {
    if (!f.Has("eval-streams")) return UsageError(absl::StrCat("--eval-stream-len needs --eval-streams; usage: ", usage));
    QF_ASSIGN_OR_RETURN(int n, f.GetInt("eval-stream-len", 256, 2, 1 << 24));
    req.mutable_recipe()->set_eval_stream_length(n);
  }
  if (f.Has("eval-seed")) {
    if (!f.Has("eval-streams")) return UsageError(absl::StrCat("--eval-seed needs --eval-streams; usage: ", usage));
    QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("eval-seed", 1));
    req.mutable_recipe()->set_eval_seed(seed);
  }
  for (const auto& [flag, set, needs] : {std::tuple<const char*, void (v1::Recipe::*)(int32_t), bool>{
                                             "eval-window", &v1::Recipe::set_evaluation_window, evaluates},
                                         {"eval-chunks", &v1::Recipe::set_evaluation_chunks, f.Has("eval-text")},
                                         {"eval-tasks", &v1::Recipe::set_evaluation_tasks, evaluates}}) {
    if (!f.Has(flag)) continue;
    if (!needs) {
      return UsageError(absl::StrCat("--", flag, " needs --eval-text", std::string(flag) == "eval-chunks" ? "" : " or --eval-streams",
                                     "; usage: ", usage));
    }
    QF_ASSIGN_OR_RETURN(int n, f.GetInt(flag, 0, 1, 1 << 24));
    (req.mutable_recipe()->*set)(n);
  }

  const std::string address = SchedulerAddress(f);
  auto jobs = v1::JobService::NewStub(rpc::MakeChannel(address));
  v1::SubmitJobResponse resp;
  if (grpc::Status s = jobs->SubmitJob(CallContext(120).get(), req, &resp); !s.ok()) return CallError(s, address);
  out << "job " << resp.job_id() << " submitted\n";
  if (!f.GetBool("watch")) return absl::OkStatus();
  QF_RETURN_IF_ERROR(WatchUntilDone(*jobs, resp.job_id(), address, out));
  QF_ASSIGN_OR_RETURN(v1::Job job, GetJob(*jobs, resp.job_id(), address));
  return ReportOutcome(job, out);
}

absl::Status Watch(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"scheduler"}, {}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, "qforge watch JOB_ID [--scheduler HOST:PORT]"));
  const std::string address = SchedulerAddress(f);
  auto jobs = v1::JobService::NewStub(rpc::MakeChannel(address));
  const std::string& job_id = f.positional()[0];
  QF_RETURN_IF_ERROR(WatchUntilDone(*jobs, job_id, address, out));
  QF_ASSIGN_OR_RETURN(v1::Job job, GetJob(*jobs, job_id, address));
  return ReportOutcome(job, out);
}

absl::Status Jobs(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"scheduler", "tenant"}, {}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 0, "qforge jobs [--tenant T] [--scheduler HOST:PORT]"));
  const std::string address = SchedulerAddress(f);
  auto jobs = v1::JobService::NewStub(rpc::MakeChannel(address));
  out << absl::StrFormat("%-6s %-10s %-10s %-13s %-24s %-47s %s\n", "JOB", "TENANT", "STATE", "TASKS", "RESULT",
                         "QUALITY (perplexity source->version, KL, top-1)", "SOURCE");
  v1::ListJobsRequest req;
  req.set_tenant(f.Get("tenant"));
  do {
    v1::ListJobsResponse resp;
    if (grpc::Status s = jobs->ListJobs(CallContext().get(), req, &resp); !s.ok()) return CallError(s, address);
    for (const v1::Job& j : resp.jobs()) {
      const std::string result = j.has_result() ? absl::StrCat(j.result().name(), "@", j.result().version()) : "-";
      const v1::QualityReport& q = j.quality();
      const std::string quality =
          j.has_quality() ? absl::StrFormat("ppl %.4f->%.4f KL %.6f top-1 %.2f%%", q.perplexity_base(),
                                            q.perplexity_quantized(), q.kl_mean(), 100.0 * q.top1_agreement())
                          : "-";
      out << absl::StrFormat("%-6s %-10s %-10s %-13s %-24s %-47s %s\n", j.job_id(),
                             j.tenant().empty() ? "-" : j.tenant(), StateName(j.progress().state()),
                             absl::StrCat(j.progress().tasks_done(), "/", j.progress().tasks_total()), result, quality,
                             j.request().source_uri());
      if (!j.error().empty()) out << "       error: " << j.error() << "\n";
    }
    req.set_page_token(resp.next_page_token());
  } while (!req.page_token().empty());
  return absl::OkStatus();
}

absl::Status Models(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"scheduler"}, {}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 0, "qforge models [--scheduler HOST:PORT]"));
  const std::string address = SchedulerAddress(f);
  auto artifacts = v1::ArtifactService::NewStub(rpc::MakeChannel(address));
  v1::ListModelsResponse resp;
  if (grpc::Status s = artifacts->ListModels(CallContext().get(), {}, &resp); !s.ok()) return CallError(s, address);
  for (const v1::ModelVersions& m : resp.models()) {
    out << m.name() << ": versions " << absl::StrJoin(m.versions(), ", ");
    // A name holds models or adapters, never both (storage::PutAdapter): the latest version tells which.
    v1::GetManifestRequest req;
    req.mutable_model()->set_name(m.name());
    v1::Manifest manifest;
    if (artifacts->GetManifest(CallContext().get(), req, &manifest).ok() && manifest.has_adapter_of()) {
      out << " (LoRA adapter; latest adapts " << manifest.adapter_of().name() << "@" << manifest.adapter_of().version()
          << ")";
    }
    out << "\n";
  }
  if (resp.models().empty()) out << "no models\n";
  return absl::OkStatus();
}

absl::Status PutAdapter(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"scheduler", "base"}, {}));
  const std::string usage = "qforge put-adapter NAME PATH --base BASE@VERSION [--scheduler HOST:PORT]";
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, usage));
  if (!f.Has("base")) return UsageError(absl::StrCat("--base is required; usage: ", usage));
  QF_ASSIGN_OR_RETURN(const storage::ModelRef base, storage::ParseModelRef(f.Get("base")));
  v1::PutAdapterRequest req;
  req.set_name(f.positional()[0]);
  req.mutable_base()->set_name(base.name);
  if (base.version.has_value()) req.mutable_base()->set_version(absl::StrCat(*base.version));
  req.set_source_uri(AbsolutePath(f.positional()[1]));  // the scheduler reads the files, perhaps elsewhere
  const std::string address = SchedulerAddress(f);
  auto artifacts = v1::ArtifactService::NewStub(rpc::MakeChannel(address));
  v1::PutAdapterResponse resp;
  if (grpc::Status s = artifacts->PutAdapter(CallContext().get(), req, &resp); !s.ok()) return CallError(s, address);
  out << "stored " << resp.adapter().name() << "@" << resp.adapter().version() << ": LoRA adapter of "
      << resp.base().name() << "@" << resp.base().version() << " (" << resp.format() << ", " << resp.matrices()
      << " matrices, rank " << resp.rank() << ")\n";
  return absl::OkStatus();
}

absl::Status Export(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"scheduler", "format"}, {}));
  const std::string usage = "qforge export NAME@VERSION --format gguf|safetensors OUT [--scheduler HOST:PORT]";
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, usage));
  const std::string format = f.Get("format");
  if (format != "gguf" && format != "safetensors") return UsageError(absl::StrCat("--format gguf|safetensors; usage: ", usage));
  const std::string& out_path = f.positional()[1];
  if (!absl::EndsWith(out_path, "." + format)) {
    return UsageError(absl::StrCat("output '", out_path, "' must end in .", format));
  }
  QF_ASSIGN_OR_RETURN(storage::ModelRef ref, storage::ParseModelRef(f.positional()[0]));
  const std::string address = SchedulerAddress(f);
  auto artifacts = v1::ArtifactService::NewStub(rpc::MakeChannel(address));
  absl::StatusOr<Model> model = rpc::FetchModel(*artifacts, ref);
  if (absl::IsUnavailable(model.status()) || absl::IsDeadlineExceeded(model.status())) {
    return CallError(rpc::ToGrpc(model.status()), address);
  }
  QF_RETURN_IF_ERROR(model.status());
  QF_RETURN_IF_ERROR(SaveModel(*model, out_path));
  out << "exported " << f.positional()[0] << " to " << out_path << "\n";
  return absl::OkStatus();
}

absl::Status Up(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"store", "listen", "workers", "threads", "allowed-roots",
                                                   "port-file", "lease-ms", "serve-grpc", "serve-http"},
                                          {"no-serve"}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 0, "qforge up [--store DIR] [--listen HOST:PORT] [--workers N] [--threads N] "
                                          "[--allowed-roots DIR,...] [--lease-ms N] [--serve-grpc HOST:PORT] "
                                          "[--serve-http HOST:PORT | --no-serve] [--port-file FILE]"));
  QF_ASSIGN_OR_RETURN(int n_workers, f.GetInt("workers", 2, 0, 256));
  QF_ASSIGN_OR_RETURN(int threads, f.GetInt("threads", 1, 1, 1024));
  QF_ASSIGN_OR_RETURN(int lease_ms, f.GetInt("lease-ms", 30000, 100, 3600000));
  services::SchedulerServiceOptions options;
  if (f.Has("allowed-roots")) options.allowed_roots = absl::StrSplit(f.Get("allowed-roots"), ',', absl::SkipEmpty());
  options.scheduler.lease_ms = lease_ms;

  StopSignals stop_signals;  // before any thread starts

  const std::string store_dir = f.Get("store", "qforge-store");
  QF_ASSIGN_OR_RETURN(auto server, services::SchedulerServer::Open(store_dir, options));
  QF_ASSIGN_OR_RETURN(const int port, server->Start(f.Get("listen", kDefaultAddress)));
  // The serving tier reads stored versions through the same in-process channel.
  std::unique_ptr<server::InferenceServer> inference;
  if (!f.GetBool("no-serve")) {
    server::ServerOptions so;
    so.store_channel = server->InProcessChannel();
    so.grpc_address = f.Get("serve-grpc", "127.0.0.1:7701");
    auto http = rpc::SplitHostPort(f.Get("serve-http", "127.0.0.1:7702"), "--serve-http");
    if (!http.ok()) return UsageError(std::string(http.status().message()));
    std::tie(so.http_address, so.http_port) = *http;
    so.registry.engine.threads = threads;
    QF_ASSIGN_OR_RETURN(inference, server::InferenceServer::Start(so));
  }
  if (f.Has("port-file")) {
    const std::string tmp = f.Get("port-file") + ".tmp";
    std::ofstream(tmp) << port;
    if (inference) std::ofstream(tmp, std::ios::app) << " " << inference->grpc_port() << " " << inference->http_port();
    std::ofstream(tmp, std::ios::app) << "\n";
    if (std::rename(tmp.c_str(), f.Get("port-file").c_str()) != 0) {
      return absl::InternalError(absl::StrCat("cannot write --port-file ", f.Get("port-file")));
    }
  }
  // Workers reach the scheduler in-process: same code path as a cluster, without sockets.
  std::atomic<bool> stop{false};
  std::vector<std::thread> worker_threads;
  std::vector<absl::Status> worker_status(n_workers);
  for (int i = 0; i < n_workers; ++i) {
    workers::WorkerOptions wo;
    wo.name = absl::StrCat("embedded-", i);
    wo.threads = threads;
    wo.allowed_roots = options.allowed_roots;
    worker_threads.emplace_back([&, i, wo, channel = server->InProcessChannel()] {
      workers::Worker worker(channel, wo);
      worker_status[i] = worker.Run(stop);
    });
  }
  out << absl::StrFormat("qforge up: scheduler on port %d, %d workers x %d threads, store %s", port, n_workers,
                         threads, store_dir);
  if (inference) {
    out << absl::StrFormat("; serving gRPC on %d, HTTP (OpenAI, /metrics) on %d", inference->grpc_port(),
                           inference->http_port());
  }
  out << " (Ctrl-C stops)\n" << std::flush;
  stop_signals.Wait();
  out << "qforge up: stopping\n" << std::flush;
  if (inference) inference->Shutdown(5000);
  stop = true;
  for (std::thread& t : worker_threads) t.join();
  server->Shutdown(5000);
  server->Wait();
  for (const absl::Status& s : worker_status) QF_RETURN_IF_ERROR(s);
  return absl::OkStatus();
}

}  // namespace qforge::cli
