#include "services/scheduler/scheduler_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "core/calib/activations_codec.h"
#include "core/calib/stats_codec.h"
#include "core/lora/lora.h"
#include "core/formats/parsers.h"
#include "core/quant/quantize_model.h"
#include "core/tokenizer/tokenizer.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "qforge/v1/jobs.grpc.pb.h"
#include "qforge/v1/worker.grpc.pb.h"
#include "scheduler/model_description.h"
#include "services/metrics/process_metrics.h"
#include "services/metrics/registry.h"
#include "services/rpc/rpc_util.h"
#include "services/scheduler/evaluation.h"
#include "storage/chunk_codec.h"
#include "storage/model_store.h"

namespace qforge::services {
namespace {

namespace v1 = qforge::v1;
using scheduler::JobId;
using scheduler::JobState;
using scheduler::Plan;
using scheduler::TaskKind;
using scheduler::TaskRef;

int64_t NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

v1::JobState ToProto(JobState s) {
  switch (s) {
    case JobState::kRunning: return v1::JOB_STATE_RUNNING;
    case JobState::kSucceeded: return v1::JOB_STATE_SUCCEEDED;
    case JobState::kFailed: return v1::JOB_STATE_FAILED;
    case JobState::kCancelled: return v1::JOB_STATE_CANCELLED;
  }
  return v1::JOB_STATE_UNSPECIFIED;
}

v1::TaskKind ToProto(TaskKind k) {
  switch (k) {
    case TaskKind::kCalibrate: return v1::TASK_KIND_CALIBRATE;
    case TaskKind::kQuantize: return v1::TASK_KIND_QUANTIZE;
    case TaskKind::kAssemble: return v1::TASK_KIND_ASSEMBLE;
    case TaskKind::kEvaluate: return v1::TASK_KIND_EVALUATE;
  }
  return v1::TASK_KIND_UNSPECIFIED;
}

// A model name from a file name: "stories260K.bin" -> "stories260k".
std::string NameFromPath(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  if (const size_t dot = base.find('.'); dot != std::string::npos && dot > 0) base.resize(dot);
  std::string out;
  for (char c : absl::AsciiStrToLower(base)) {
    const bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
    out.push_back(ok ? c : '-');
  }
  while (!out.empty() && !absl::ascii_isalnum(static_cast<unsigned char>(out[0]))) out.erase(0, 1);
  if (out.size() > storage::kMaxModelNameChars) out.resize(storage::kMaxModelNameChars);
  return out.empty() ? "model" : out;
}

// A quantize task's committed result: "<nbytes>:<plane>.<chunk id>,<plane>.<chunk id>,...", every chunk tagged
// with the plane of the encoding it holds part of (PlaneSizes), in the slice's byte order.
struct SliceChunk {
  size_t plane;
  std::string id;
};

// A slice whose encoding holds a data-dependent field the plan could not know (spqr's outlier count) records the
// worker's format after the byte count: "<nbytes>;<format>:...". Results without one keep the plain form.
std::string EncodeSliceResult(uint64_t nbytes, const std::vector<SliceChunk>& chunks, const std::string& format = "") {
  std::string out = absl::StrCat(nbytes, format.empty() ? "" : ";", format, ":");
  for (size_t i = 0; i < chunks.size(); ++i) absl::StrAppend(&out, i ? "," : "", chunks[i].plane, ".", chunks[i].id);
  return out;
}

// The slice's reconstruction error as the worker reported it (its TensorReport), kept for Job.tensors: sums of
// squared errors and of squared weights, so the slices of a tensor add up exactly. Appended as "@<sse>,<ssw>";
// results committed without it (older ones, or a worker that sent no report) decode with `known = false`.
struct SliceError {
  bool known = false;
  double squared_error = 0.0, squared_weights = 0.0;
};

std::string SliceErrorSuffix(const v1::TensorReport& report, int64_t elements) {
  const double sse = report.rmse() * report.rmse() * static_cast<double>(elements);
  // ||W||^2 = ||E||^2 / rel^2; a slice encoded without error (rel 0) leaves its weights' norm unknown but adds
  // nothing to the tensor's error, which is what matters.
  const double ssw = report.relative_error() > 0 ? sse / (report.relative_error() * report.relative_error()) : 0.0;
  if (!std::isfinite(sse) || !std::isfinite(ssw) || sse < 0) return "";
  return absl::StrFormat("@%.17g,%.17g", sse, ssw);
}

absl::Status DecodeSliceResult(const std::string& ref, uint64_t* nbytes, std::vector<SliceChunk>* chunks,
                               std::string* format = nullptr, SliceError* error = nullptr) {
  const auto bad = [&] { return absl::DataLossError(absl::StrCat("malformed task result '", ref.substr(0, 80), "'")); };
  const size_t colon = ref.find(':');
  if (colon == std::string::npos) return bad();
  const size_t semi = ref.substr(0, colon).find(';');
  if (!absl::SimpleAtoi(ref.substr(0, std::min(colon, semi)), nbytes)) return bad();
  if (format != nullptr) *format = semi == std::string::npos ? "" : ref.substr(semi + 1, colon - semi - 1);
  const size_t at = ref.find('@', colon);
  if (at != std::string::npos && error != nullptr) {
    const std::vector<std::string> sums = absl::StrSplit(ref.substr(at + 1), ',');
    if (sums.size() != 2 || !absl::SimpleAtod(sums[0], &error->squared_error) ||
        !absl::SimpleAtod(sums[1], &error->squared_weights)) {
      return bad();
    }
    error->known = true;
  }
  const std::string list = ref.substr(colon + 1, at == std::string::npos ? std::string::npos : at - colon - 1);
  if (list.empty()) return absl::OkStatus();
  for (const std::string& item : std::vector<std::string>(absl::StrSplit(list, ','))) {
    const size_t dot = item.find('.');
    SliceChunk c;
    if (dot == std::string::npos || !absl::SimpleAtoi(item.substr(0, dot), &c.plane)) return bad();
    c.id = item.substr(dot + 1);
    chunks->push_back(std::move(c));
  }
  return absl::OkStatus();
}

// The one model transform a job runs after calibration (quant::ModelTransformOf's rule), errors naming the recipe.
absl::StatusOr<std::optional<std::pair<const quant::QuantMethod*, quant::QuantParams>>> ModelTransformOf(
    const scheduler::JobRecipe& recipe) {
  std::vector<quant::LayerRule> layers;
  for (const scheduler::LayerRule& r : recipe.layers) layers.push_back({r.pattern, r.method, r.params});
  return quant::ModelTransformOf(recipe.method, recipe.params, layers, "recipe.defaults", "recipe.layers");
}

// The planner puts a calibrated job's (first) calibrate task at index 0; asked on every lease, so O(1).
bool IsCalibrated(const Plan& plan) { return !plan.tasks.empty() && plan.tasks[0].kind == TaskKind::kCalibrate; }

// The calibrate task task `t` reads from: a quantize task's (its block's, or the last block's for tensors outside
// the blocks), and for calibrate block i the one of block i-1, whose output hidden states are its input. -1: none.
int64_t CalibrateDependencyOf(const Plan& plan, uint32_t t) {
  for (const uint32_t d : plan.DepsOf(t)) {
    if (plan.tasks[d].kind == TaskKind::kCalibrate) return d;
  }
  return -1;
}

// Manifest entries by tensor name.
using ManifestTensors = std::map<std::string, v1::ManifestTensor>;

// A calibrate task's committed result, indexed: the artifacts by tensor name.
struct CalibrationIndex {
  v1::CompleteTaskRequest result;  // only `calibration`, `outputs` and `activations` set
  std::map<std::string, int> stats_of, weights_of;
};

absl::StatusOr<std::shared_ptr<const CalibrationIndex>> ParseCalibrationResult(const std::string& ref) {
  auto index = std::make_shared<CalibrationIndex>();
  if (!index->result.ParseFromString(ref)) return absl::DataLossError("calibrate task: unreadable committed result");
  for (int i = 0; i < index->result.calibration_size(); ++i) {
    for (const std::string& n : index->result.calibration(i).tensor_names()) index->stats_of[n] = i;
  }
  for (int i = 0; i < index->result.outputs_size(); ++i) index->weights_of[index->result.outputs(i).name()] = i;
  return index;
}

absl::StatusOr<storage::ModelRef> RefFromProto(const v1::ModelRef& ref) {
  if (ref.version().empty()) return storage::ParseModelRef(ref.name());
  return storage::ParseModelRef(absl::StrCat(ref.name(), "@", ref.version()));
}

}  // namespace

std::string JobPinHolder(JobId job) { return absl::StrCat("qforge-job-", job); }

// ---------------------------------------------------------------------------------------------------------------
// Shared state of the three services.
class SchedulerServer::Impl {
 public:
  Impl(SchedulerServer* server, SchedulerServiceOptions options)
      : server_(server), options_(std::move(options)), jobs_svc_(this), workers_svc_(this), artifacts_svc_(this) {}

  storage::ArtifactStore& store() { return *server_->store_; }
  scheduler::JobScheduler& sched() { return *server_->jobs_; }
  const SchedulerServiceOptions& options() const { return options_; }
  bool stopping() const { return stopping_.load(); }
  void Stop() {
    stopping_ = true;
    std::lock_guard<std::mutex> l(tick_mu_);
    tick_cv_.notify_all();
  }

  // Expires overdue leases and releases the pins of jobs that ended without a version, until Stop().
  void TickerLoop() {
    std::unique_lock<std::mutex> l(tick_mu_);
    while (!stopping_) {
      tick_cv_.wait_for(l, std::chrono::milliseconds(options_.expiry_scan_ms));
      if (stopping_) break;
      l.unlock();
      sched().ExpireLeases(NowMs()).IgnoreError();  // a failed store write is retried at the next tick
      ReleaseFinishedJobPins();
      l.lock();
    }
  }

  void ReleaseFinishedJobPins() {
    for (JobId id : sched().Jobs()) {
      {
        std::lock_guard<std::mutex> l(mu_);
        if (pins_released_.contains(id)) continue;
      }
      auto p = sched().Progress(id, NowMs());
      if (!p.ok() || p->state == JobState::kRunning) continue;
      storage::StateBatch release;
      release.ReleasePins(JobPinHolder(id));
      if (store().Write(release).ok()) {
        std::lock_guard<std::mutex> l(mu_);
        pins_released_.insert(id);
      }
    }
  }

  // Bytes of the version job `id` made, read from its manifest once: versions are immutable, and GetJob, ListJobs,
  // WatchJob and every metrics scrape ask again.
  absl::StatusOr<uint64_t> VersionBytes(JobId id, const storage::ModelRef& version) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = output_bytes_.find(id); it != output_bytes_.end()) return it->second;
    }
    QF_ASSIGN_OR_RETURN(const v1::Manifest m, store().GetManifest(version));
    uint64_t bytes = 0;
    for (const auto& t : m.tensors()) bytes += t.nbytes();
    std::lock_guard<std::mutex> l(mu_);
    output_bytes_[id] = bytes;
    return bytes;
  }

  // Committed task results of job `id`, as evaluation.h reads them.
  CommittedResult CommittedOf(JobId id) {
    return [this, id](uint32_t t) { return sched().ResultRef({id, t}); };
  }

  // The manifest of the version job `id` committed (its assemble task's result), for its evaluate tasks.
  absl::StatusOr<v1::Manifest> VersionOf(JobId id, const Plan& plan) {
    for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
      if (plan.tasks[t].kind != TaskKind::kAssemble) continue;
      QF_ASSIGN_OR_RETURN(const std::string ref, sched().ResultRef({id, t}));
      QF_ASSIGN_OR_RETURN(const storage::ModelRef model, storage::ParseModelRef(ref));
      return store().GetManifest(model);
    }
    return absl::FailedPreconditionError(absl::StrCat("job ", id, ": no assemble task"));
  }

  // Job.quality of a succeeded job, merged from its evaluate tasks once (their results never change again).
  absl::StatusOr<std::optional<v1::QualityReport>> QualityOf(JobId id, const Plan& plan, const v1::Job& record) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = quality_.find(id); it != quality_.end()) return it->second;
    }
    QF_ASSIGN_OR_RETURN(auto q, MergeQuality(plan, EvaluationSource(record.request().recipe()), CommittedOf(id)));
    std::lock_guard<std::mutex> l(mu_);
    quality_[id] = q;
    return q;
  }

  // The job's identity (tenant, request, creation time), persisted inside its plan.
  absl::StatusOr<v1::Job> JobRecord(JobId id) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = records_.find(id); it != records_.end()) return it->second;
    }
    const Plan* plan = sched().PlanOf(id);
    if (plan == nullptr) return absl::NotFoundError(absl::StrCat("job_id: job ", id, " not found"));
    v1::Job job;
    if (!job.ParseFromString(plan->attachment)) return absl::DataLossError(absl::StrCat("job ", id, ": unreadable request"));
    std::lock_guard<std::mutex> l(mu_);
    records_.emplace(id, job);
    if (!job.request().idempotency_key().empty()) {
      idempotency_.emplace(std::make_pair(job.tenant(), job.request().idempotency_key()), id);
    }
    return job;
  }

  // Job.tensors of a succeeded job: every quantized tensor of its version, format, shape, bits per weight and
  // bytes from the manifest, the reconstruction error added up over the slices the workers reported (left 0 when
  // a slice's report is missing). Built once: versions and committed results never change.
  using TensorReports = google::protobuf::RepeatedPtrField<v1::TensorReport>;
  absl::StatusOr<std::shared_ptr<const TensorReports>> TensorReportsOf(JobId id, const Plan& plan) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = tensor_reports_.find(id); it != tensor_reports_.end()) return it->second;
    }
    std::map<std::string, SliceError> errors;  // by tensor; known only if every slice's is
    for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
      const scheduler::PlanTask& pt = plan.tasks[t];
      if (pt.kind != TaskKind::kQuantize) continue;
      QF_ASSIGN_OR_RETURN(const std::string ref, sched().ResultRef({id, t}));
      uint64_t nbytes = 0;
      std::vector<SliceChunk> chunks;
      SliceError e;
      QF_RETURN_IF_ERROR(DecodeSliceResult(ref, &nbytes, &chunks, nullptr, &e));
      auto [it, first] = errors.try_emplace(std::string(plan.model.name(pt.tensor)), SliceError{.known = true});
      it->second.known &= e.known;
      it->second.squared_error += e.squared_error;
      it->second.squared_weights += e.squared_weights;
    }
    QF_ASSIGN_OR_RETURN(const v1::Manifest manifest, VersionOf(id, plan));
    auto reports = std::make_shared<TensorReports>();
    for (const v1::ManifestTensor& mt : manifest.tensors()) {
      auto it = errors.find(mt.name());
      if (it == errors.end()) continue;  // copied, not quantized
      int64_t elements = 1;
      for (int64_t d : mt.shape()) elements *= d;
      v1::TensorReport* r = reports->Add();
      r->set_name(mt.name());
      r->set_format(mt.format());
      *r->mutable_shape() = mt.shape();
      r->set_bits_per_weight(elements > 0 ? 8.0 * static_cast<double>(mt.nbytes()) / static_cast<double>(elements) : 0);
      r->set_bytes_before(static_cast<uint64_t>(elements) * sizeof(float));
      r->set_bytes_after(mt.nbytes());
      const SliceError& e = it->second;
      if (e.known && elements > 0) {
        r->set_rmse(std::sqrt(e.squared_error / static_cast<double>(elements)));
        r->set_relative_error(e.squared_weights > 0 ? std::sqrt(e.squared_error / e.squared_weights) : 0.0);
      }
    }
    std::lock_guard<std::mutex> l(mu_);
    tensor_reports_[id] = reports;
    return std::shared_ptr<const TensorReports>(reports);
  }

  // `with_tensors`: also Job.tensors (GetJob; ListJobs and the watchers leave the per-tensor list out).
  absl::StatusOr<v1::Job> DescribeJob(JobId id, bool with_tensors = false) {
    QF_ASSIGN_OR_RETURN(v1::Job job, JobRecord(id));
    QF_ASSIGN_OR_RETURN(scheduler::JobProgress p, sched().Progress(id, NowMs()));
    job.set_job_id(rpc::FormatJobId(id));
    v1::JobProgress* out = job.mutable_progress();
    out->set_state(ToProto(p.state));
    out->set_tasks_done(static_cast<int64_t>(p.tasks_done));
    out->set_tasks_total(static_cast<int64_t>(p.tasks_total));
    out->set_bytes_in(static_cast<int64_t>(p.bytes_done));
    out->set_bytes_in_total(static_cast<int64_t>(p.bytes_total));
    out->set_eta_seconds(p.eta_seconds);
    out->set_message(p.message);
    job.set_finished_unix_ms(p.finished_ms);
    if (p.state == JobState::kFailed || p.state == JobState::kCancelled) job.set_error(p.message);
    if (p.state == JobState::kSucceeded) {
      const Plan* plan = sched().PlanOf(id);
      for (uint32_t t = 0; t < plan->tasks.size(); ++t) {
        if (plan->tasks[t].kind != TaskKind::kAssemble) continue;
        auto ref = sched().ResultRef({id, t});
        if (!ref.ok()) break;
        auto model = storage::ParseModelRef(*ref);
        if (!model.ok()) break;
        job.mutable_result()->set_name(model->name);
        job.mutable_result()->set_version(absl::StrCat(model->version.value_or(0)));
        if (auto bytes = VersionBytes(id, *model); bytes.ok()) out->set_bytes_out(static_cast<int64_t>(*bytes));
      }
      QF_ASSIGN_OR_RETURN(const std::optional<v1::QualityReport> quality, QualityOf(id, *plan, job));
      if (quality) *job.mutable_quality() = *quality;
      if (with_tensors) {
        QF_ASSIGN_OR_RETURN(const std::shared_ptr<const TensorReports> tensors, TensorReportsOf(id, *plan));
        *job.mutable_tensors() = *tensors;
      }
    }
    return job;
  }

  // --- JobService ---------------------------------------------------------------------------------------------
  absl::StatusOr<JobId> Submit(const v1::SubmitJobRequest& req) {
    QF_ASSIGN_OR_RETURN(const std::string source, rpc::ResolveUnderRoots(req.source_uri(), roots_, "source_uri"));
    const std::string name = req.output_name().empty() ? NameFromPath(source) : req.output_name();
    if (absl::Status s = storage::ValidateModelName(name); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("output_name: ", s.message()));
    }
    QF_ASSIGN_OR_RETURN(scheduler::JobRecipe recipe, rpc::RecipeFromProto(req.recipe()));
    QF_RETURN_IF_ERROR(ModelTransformOf(recipe).status());
    std::string calibration_text;
    if (!recipe.calibration_text_uri.empty()) {
      auto path = rpc::ResolveUnderRoots(recipe.calibration_text_uri, roots_, "recipe.calibration_text_uri");
      // A missing text is a bad recipe like any other field (the source model's NOT_FOUND is about the job's input).
      if (absl::IsNotFound(path.status())) return absl::InvalidArgumentError(path.status().message());
      QF_RETURN_IF_ERROR(path.status());
      if (!std::filesystem::is_regular_file(*path)) {
        return absl::InvalidArgumentError(absl::StrCat("recipe.calibration_text_uri: '", recipe.calibration_text_uri,
                                                       "' is not a regular file"));
      }
      calibration_text = *std::move(path);
    }
    if (!req.idempotency_key().empty()) {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = idempotency_.find({req.tenant(), req.idempotency_key()}); it != idempotency_.end()) return it->second;
    }
    auto description = scheduler::DescribeModel(source);
    if (!description.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("source_uri: '", req.source_uri(), "' is not a model qforge reads: ", description.status().message()));
    }
    std::string tokenizer;
    if (!req.tokenizer_uri().empty()) {
      QF_ASSIGN_OR_RETURN(tokenizer, rpc::ResolveUnderRoots(req.tokenizer_uri(), roots_, "tokenizer_uri"));
      auto vocab = ReadVocabFile(tokenizer, description->config.vocab_size);
      if (!vocab.ok() || static_cast<int>(vocab->tokens.size()) != description->config.vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tokenizer_uri: '", req.tokenizer_uri(), "' is not a tokenizer of this model's ",
            description->config.vocab_size, " tokens",
            vocab.ok() ? absl::StrCat(" (it has ", vocab->tokens.size(), ")") : absl::StrCat(": ", vocab.status().message())));
      }
    }
    v1::Recipe stored_recipe = req.recipe();
    if (recipe.evaluates()) {
      QF_RETURN_IF_ERROR(ResolveEvaluation(roots_, *description, tokenizer, &recipe, &stored_recipe));
    }
    scheduler::PlanOptions plan_options;
    plan_options.max_task_input_bytes = req.max_task_bytes() > 0 ? req.max_task_bytes() : options_.max_task_bytes;
    // Calibration runs as the per-block chain: one calibrate task per block, each reading its block's weights and
    // the hidden states the previous one stored (docs/distributed.md).
    plan_options.calibrate_per_block = true;
    if (calibration_text.empty() && recipe.calibration_length > description->config.seq_len) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.calibration_length: ", recipe.calibration_length,
                                                     " is more than the model's context length ",
                                                     description->config.seq_len));
    }
    QF_ASSIGN_OR_RETURN(Plan plan, scheduler::PlanJob(*std::move(description), recipe, plan_options));
    v1::Job record;
    record.set_tenant(req.tenant());
    *record.mutable_request() = req;
    *record.mutable_request()->mutable_recipe() = std::move(stored_recipe);
    record.mutable_request()->set_output_name(name);
    record.mutable_request()->set_tokenizer_uri(tokenizer);
    if (!calibration_text.empty()) record.mutable_request()->mutable_recipe()->set_calibration_text_uri(calibration_text);
    record.set_created_unix_ms(NowMs());
    plan.attachment = record.SerializeAsString();
    // Submits with one idempotency key are serialised so a concurrent retry cannot create a second job.
    std::lock_guard<std::mutex> submit(submit_mu_);
    if (!req.idempotency_key().empty()) {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = idempotency_.find({req.tenant(), req.idempotency_key()}); it != idempotency_.end()) return it->second;
    }
    QF_ASSIGN_OR_RETURN(const JobId id, sched().SubmitJob(std::move(plan), record.created_unix_ms()));
    std::lock_guard<std::mutex> l(mu_);
    records_.emplace(id, record);
    if (!req.idempotency_key().empty()) idempotency_.emplace(std::make_pair(req.tenant(), req.idempotency_key()), id);
    return id;
  }

  // --- WorkerService --------------------------------------------------------------------------------------------
  std::string RegisterWorker(const v1::RegisterWorkerRequest& req) {
    std::string host;
    for (char c : req.hostname().substr(0, 64)) host.push_back(absl::ascii_isalnum(static_cast<unsigned char>(c)) ? c : '-');
    if (host.empty()) host = "worker";
    static thread_local std::mt19937_64 rng(std::random_device{}());
    const std::string id = absl::StrCat(host, "-", absl::Hex(rng(), absl::kZeroPad16));
    std::lock_guard<std::mutex> l(mu_);
    workers_[id] = req;
    return id;
  }

  absl::Status FillTask(const scheduler::LeasedTask& leased, v1::Task* task) {
    const Plan* plan = sched().PlanOf(leased.ref.job);
    const scheduler::TaskSpec& spec = leased.spec;
    task->set_task_id(rpc::FormatTaskId(leased.ref.job, leased.ref.task));
    task->set_job_id(rpc::FormatJobId(leased.ref.job));
    task->set_kind(ToProto(spec.kind));
    task->set_source_uri(spec.source_uri);
    task->set_attempt(leased.attempt);
    task->set_layer(spec.layer);
    if (spec.kind == TaskKind::kQuantize) {
      task->add_tensor_names(spec.tensor);
      *task->mutable_params() = rpc::ParamsToProto(spec.config->method, spec.config->params);
      task->set_format(FormatName(spec.config->format));
      task->set_row_begin(spec.row_begin);
      task->set_row_end(spec.row_end);
      // The committed calibrate task this one waited for names the artifacts of its tensor.
      QF_ASSIGN_OR_RETURN(std::shared_ptr<const CalibrationIndex> calib,
                          CalibrationOf(leased.ref.job, *plan, CalibrateDependencyOf(*plan, leased.ref.task)));
      if (calib != nullptr) {
        if (auto it = calib->stats_of.find(spec.tensor); it != calib->stats_of.end()) {
          *task->mutable_stats() = calib->result.calibration(it->second);
        }
        if (auto it = calib->weights_of.find(spec.tensor); it != calib->weights_of.end()) {
          *task->mutable_weights() = calib->result.outputs(it->second);
        }
      }
    } else if (spec.kind == TaskKind::kCalibrate) {
      QF_ASSIGN_OR_RETURN(v1::Job record, JobRecord(leased.ref.job));
      QF_ASSIGN_OR_RETURN(const scheduler::JobRecipe recipe, rpc::RecipeFromProto(record.request().recipe()));
      QF_ASSIGN_OR_RETURN(const auto transform, ModelTransformOf(recipe));
      if (transform) *task->mutable_params() = rpc::ParamsToProto(transform->first->name(), transform->second);
      task->set_tokenizer_uri(record.request().tokenizer_uri());
      task->set_calibration_text_uri(recipe.calibration_text_uri);
      task->set_calibration_samples(recipe.calibration_samples);
      task->set_calibration_length(recipe.calibration_length);
      task->set_calibration_seed(recipe.calibration_seed);
      // Block i > 0 of the chain reads what block i-1 produced.
      const int64_t previous = CalibrateDependencyOf(*plan, leased.ref.task);
      if (spec.layer > 0) {
        QF_ASSIGN_OR_RETURN(std::shared_ptr<const CalibrationIndex> calib,
                            CalibrationOf(leased.ref.job, *plan, previous));
        if (calib == nullptr || !calib->result.has_activations()) {
          return absl::DataLossError(absl::StrCat("job ", leased.ref.job, ": calibrate block ", spec.layer - 1,
                                                  " committed no output hidden states"));
        }
        *task->mutable_activations() = calib->result.activations();
        // Sequential: block i-1 as quantized (its quantize tasks are dependencies, so committed), with the
        // tensors its calibrate task transformed; the worker runs it over those hidden states.
        if (recipe.sequential_calibration) {
          QF_ASSIGN_OR_RETURN(
              ManifestTensors previous_block,
              QuantizedTensorsOf(leased.ref.job, *plan, spec.layer - 1,
                                 absl::StrCat("job ", leased.ref.job, ": calibrate block ", spec.layer)));
          AddTransformedTensors(*calib, &previous_block);
          for (auto& [n, mt] : previous_block) *task->add_previous_block() = std::move(mt);
        }
      }
      task->set_sequential_calibration(recipe.sequential_calibration);
    } else if (spec.kind == TaskKind::kAssemble) {
      const std::vector<bool> quantized = QuantizedTensors(*plan);
      // Tensors the model transform changed (the RMSNorm weights) come from the calibrate task's artifacts
      // (CommitVersion), not from the source file.
      QF_ASSIGN_OR_RETURN(const auto calibrations, AllCalibrationsOf(leased.ref.job, *plan));
      auto transformed = [&](const std::string& n) {
        for (const auto& c : calibrations) {
          if (c->weights_of.contains(n)) return true;
        }
        return false;
      };
      for (size_t i = 0; i < plan->model.tensors.size(); ++i) {
        const std::string n(plan->model.name(i));
        if (!quantized[i] && !transformed(n)) task->add_tensor_names(n);
      }
      QF_ASSIGN_OR_RETURN(v1::Job record, JobRecord(leased.ref.job));
      QF_RETURN_IF_ERROR(QuantMetadata(*plan, record.request().recipe(), task->mutable_metadata()));
      task->set_tokenizer_uri(record.request().tokenizer_uri());
    } else if (spec.kind == TaskKind::kEvaluate) {
      QF_ASSIGN_OR_RETURN(v1::Job record, JobRecord(leased.ref.job));
      QF_ASSIGN_OR_RETURN(const v1::Manifest version, VersionOf(leased.ref.job, *plan));
      QF_RETURN_IF_ERROR(FillEvaluateTask(*plan, leased.ref.task, record, version, task));
    }
    return absl::OkStatus();
  }

  // The committed result of calibrate task `task` of the job (CalibrateDependencyOf), parsed once; nullptr for
  // none (task -1). FAILED_PRECONDITION while it is not committed (callers only ask on behalf of tasks that depend
  // on it).
  absl::StatusOr<std::shared_ptr<const CalibrationIndex>> CalibrationOf(JobId job, const Plan& plan, int64_t task) {
    if (task < 0 || !IsCalibrated(plan)) return std::shared_ptr<const CalibrationIndex>();
    const std::pair<JobId, uint32_t> key(job, static_cast<uint32_t>(task));
    {
      std::lock_guard<std::mutex> l(mu_);
      if (auto it = calibrations_.find(key); it != calibrations_.end()) return it->second;
    }
    auto ref = sched().ResultRef({job, static_cast<uint32_t>(task)});
    if (!ref.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", job, ": ", plan.Describe(static_cast<uint32_t>(task)), " is not committed yet"));
    }
    QF_ASSIGN_OR_RETURN(std::shared_ptr<const CalibrationIndex> index, ParseCalibrationResult(*ref));
    std::lock_guard<std::mutex> l(mu_);
    calibrations_.emplace(key, index);
    return index;
  }

  // Every calibrate task's committed result (assemble and the version commit, which run after all of them).
  absl::StatusOr<std::vector<std::shared_ptr<const CalibrationIndex>>> AllCalibrationsOf(JobId job, const Plan& plan) {
    std::vector<std::shared_ptr<const CalibrationIndex>> out;
    for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
      if (plan.tasks[t].kind != TaskKind::kCalibrate) continue;
      QF_ASSIGN_OR_RETURN(std::shared_ptr<const CalibrationIndex> index, CalibrationOf(job, plan, t));
      if (index != nullptr) out.push_back(std::move(index));
    }
    return out;
  }

  // A calibrate completion: statistics for known matrices of the right width, in chunks the store holds intact
  // (read back), covering every tensor a calibrated method quantizes; transformed tensors in fp32 and in their
  // source shape. A per-block task (layer >= 0) names only tensors of its block (the last block also those outside
  // the blocks, the classifier), covers the quantize tasks that wait on it, and, below the last block, hands on its
  // output hidden states (`sequential`: its input hidden states, which the next block runs through this block's
  // quantized weights). Returns the result to commit: only the artifacts.
  absl::StatusOr<std::string> CheckCalibration(const Plan& plan, uint32_t task, bool sequential,
                                               const v1::CompleteTaskRequest& req, const std::string& what) {
    const int32_t layer = plan.tasks[task].layer;
    const int32_t n_layers = plan.model.config.n_layers;
    std::map<std::string_view, size_t> index;
    for (size_t i = 0; i < plan.model.tensors.size(); ++i) {
      const int32_t l = plan.model.tensors[i].layer;
      // Per block: the block's own tensors, and for the last block those outside every block (the classifier).
      if (layer >= 0 && l != layer && !(l < 0 && layer == n_layers - 1)) continue;
      index.emplace(plan.model.name(i), i);
    }
    std::set<std::string> with_stats;
    for (const v1::CalibrationArtifact& a : req.calibration()) {
      if (a.tensor_names().empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": statistics name no tensor"));
      for (const std::string& n : a.tensor_names()) {
        const std::string where = absl::StrCat(what, ": statistics of '", n.substr(0, 128), "'");
        auto it = index.find(n);
        if (it == index.end() || plan.model.tensors[it->second].ndim != 2 || !with_stats.insert(n).second) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": not a matrix of the model (or repeated)"));
        }
        if (plan.model.tensors[it->second].cols != a.cols()) {
          return absl::InvalidArgumentError(absl::StrCat(where, ": ", a.cols(), " inputs, the tensor has ",
                                                         plan.model.tensors[it->second].cols));
        }
      }
      const std::string where = absl::StrCat(what, ": statistics of '", a.tensor_names(0), "'");
      if (a.nbytes() != calib::EncodedLayerStatsBytes(a.cols()) &&
          a.nbytes() != calib::EncodedPooledLayerStatsBytes(a.cols())) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": ", a.nbytes(), " bytes, ", a.cols(), " inputs need ",
                                                       calib::EncodedLayerStatsBytes(a.cols()), " (or ",
                                                       calib::EncodedPooledLayerStatsBytes(a.cols()),
                                                       " with pooled tokens)"));
      }
      QF_RETURN_IF_ERROR(VerifyChunks(a.chunk_ids(), a.nbytes(), where).status());
    }
    for (uint32_t i = 0; i < plan.tasks.size(); ++i) {
      const scheduler::PlanTask& t = plan.tasks[i];
      if (t.kind != TaskKind::kQuantize || (layer >= 0 && CalibrateDependencyOf(plan, i) != task)) continue;
      const std::string n(plan.model.name(t.tensor));
      if (quant::FindMethod(plan.configs[t.config].method)->NeedsCalibration() && !with_stats.contains(n)) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": no statistics for ", n, ", which ",
                                                       plan.configs[t.config].method, " quantizes"));
      }
    }
    std::set<std::string> transformed;
    for (const v1::StoredTensor& st : req.outputs()) {
      const std::string where = absl::StrCat(what, ": transformed tensor '", st.name().substr(0, 128), "'");
      auto it = index.find(st.name());
      if (it == index.end() || !transformed.insert(st.name()).second) {
        return absl::InvalidArgumentError(absl::StrCat(where, " is not in the model (or repeated)"));
      }
      const scheduler::TensorDesc& td = plan.model.tensors[it->second];
      const std::vector<int64_t> shape =
          td.ndim == 1 ? std::vector<int64_t>{td.cols} : std::vector<int64_t>{td.rows, td.cols};
      QF_RETURN_IF_ERROR(CheckStoredTensor(st, where, WeightFormat::F32(), shape));
      QF_RETURN_IF_ERROR(VerifyChunks(st.chunk_ids(), st.nbytes(), where).status());
    }
    const bool hands_on = layer >= 0 && layer + 1 < n_layers;
    if (hands_on != req.has_activations()) {
      return absl::InvalidArgumentError(absl::StrCat(what, hands_on ? ": no output hidden states for the next block"
                                                                    : ": output hidden states nobody reads"));
    }
    if (hands_on) {
      const v1::ActivationArtifact& a = req.activations();
      const std::string where = absl::StrCat(what, ": output hidden states");
      auto format = calib::ParseActivationFormat(a.format());
      if (!format.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", format.status().message()));
      // One-pass: block i's output. Sequential: its input (block 0's: the embedding, "block -1's output").
      const int32_t of_block = sequential ? layer - 1 : layer;
      if (a.layer() != of_block || a.dim() != plan.model.config.dim || a.windows() < 1 || a.tokens() < a.windows() ||
          a.nbytes() != calib::EncodedActivationsBytes(*format, a.dim(), a.windows(), a.tokens())) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": block ", a.layer(), ", dim ", a.dim(), ", ",
                                                       a.windows(), " windows of ", a.tokens(), " tokens in ",
                                                       a.nbytes(), " bytes do not fit block ", of_block, " of dim ",
                                                       plan.model.config.dim));
      }
      QF_RETURN_IF_ERROR(VerifyChunks(a.chunk_ids(), a.nbytes(), where).status());
    }
    v1::CompleteTaskRequest result;
    *result.mutable_calibration() = req.calibration();
    *result.mutable_outputs() = req.outputs();
    if (hands_on) *result.mutable_activations() = req.activations();
    std::string bytes = result.SerializeAsString();
    if (bytes.size() >= (size_t{1} << 24)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": the artifact list takes ", bytes.size(),
                                                     " bytes, over the 16 MiB a task result may hold"));
    }
    return bytes;
  }

  // The metadata QuantizeModel adds, so a version made by the scheduler matches `qforge quantize`.
  static absl::Status QuantMetadata(const Plan& plan, const v1::Recipe& recipe_proto,
                                    google::protobuf::Map<std::string, std::string>* md) {
    QF_ASSIGN_OR_RETURN(scheduler::JobRecipe recipe, rpc::RecipeFromProto(recipe_proto));
    const quant::QuantParams defaults = recipe.params.value_or(quant::FindMethod(recipe.method)->DefaultParams());
    // Tensors in QuantizeModel's order (LinearWeightNames, then embeddings), then any others (MoE experts).
    std::map<std::string_view, uint32_t> config_of;
    for (const scheduler::PlanTask& t : plan.tasks) {
      if (t.kind == TaskKind::kQuantize) config_of.emplace(plan.model.name(t.tensor), t.config);
    }
    std::vector<std::string> order = LinearWeightNames(plan.model.config);
    order.push_back(names::kTokenEmbd);
    order.push_back(names::kOutput);
    for (const auto& [name, c] : config_of) {
      if (std::find(order.begin(), order.end(), name) == order.end()) order.emplace_back(name);
    }
    std::vector<std::string> fallbacks;
    for (const std::string& name : order) {
      auto it = config_of.find(name);
      if (it == config_of.end()) continue;
      const scheduler::QuantConfig& c = plan.configs[it->second];
      const int rule = scheduler::MatchLayerRule(recipe, name);
      const std::string& method = rule < 0 ? recipe.method : recipe.layers[rule].method;
      const quant::QuantParams params = rule < 0 ? defaults
                                                 : recipe.layers[rule].params.value_or(
                                                       quant::FindMethod(method)->DefaultParams());
      if (c.method != method || !(c.params == params)) fallbacks.push_back(name);
    }
    (*md)["quant.method"] = recipe.method;
    (*md)["quant.params"] = quant::ParamsToString(defaults);
    (*md)["quant.quantize_embeddings"] = recipe.quantize_embeddings ? "true" : "false";
    (*md)["quant.fallbacks"] = absl::StrJoin(fallbacks, ",");
    // As QuantizeModel records them (only when there are rules, so rule-free versions are unchanged).
    if (!recipe.layers.empty()) {
      std::vector<quant::LayerRule> rules;
      for (const scheduler::LayerRule& r : recipe.layers) rules.push_back({r.pattern, r.method, r.params});
      (*md)["quant.layers"] = quant::LayerRulesToString(rules);
    }
    return absl::OkStatus();
  }

  static std::vector<bool> QuantizedTensors(const Plan& plan) {
    std::vector<bool> quantized(plan.model.tensors.size(), false);
    for (const scheduler::PlanTask& t : plan.tasks) {
      if (t.kind == TaskKind::kQuantize) quantized[t.tensor] = true;
    }
    return quantized;
  }

  // Reads every chunk back (verifying it) and checks that they add up to `nbytes`: what a task reports must be
  // in the store, intact, before it is committed. Returns each chunk's size.
  absl::StatusOr<std::vector<size_t>> VerifyChunks(const google::protobuf::RepeatedPtrField<std::string>& ids,
                                                   uint64_t nbytes, const std::string& what) {
    std::vector<size_t> sizes;
    uint64_t total = 0;
    for (const std::string& id : ids) {
      if (absl::Status s = storage::ValidateChunkId(id); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": ", s.message()));
      }
      auto bytes = store().GetChunk(id);
      if (!bytes.ok()) {
        return absl::Status(bytes.status().code() == absl::StatusCode::kNotFound ? absl::StatusCode::kFailedPrecondition
                                                                                   : bytes.status().code(),
                            absl::StrCat(what, ": ", bytes.status().message()));
      }
      total += bytes->size();
      sizes.push_back(bytes->size());
    }
    if (total != nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": chunks hold ", total, " bytes, expected ", nbytes));
    }
    return sizes;
  }

  // Tags each chunk of a slice with its plane; INVALID_ARGUMENT if one crosses a plane boundary (the slices could
  // then not be interleaved plane by plane).
  static absl::StatusOr<std::vector<SliceChunk>> AssignPlanes(const google::protobuf::RepeatedPtrField<std::string>& ids,
                                                              const std::vector<size_t>& chunk_sizes,
                                                              const std::vector<size_t>& plane_sizes,
                                                              const std::string& what) {
    std::vector<SliceChunk> out;
    size_t plane = 0, offset = 0, plane_end = plane_sizes.empty() ? 0 : plane_sizes[0];
    for (int i = 0; i < ids.size(); ++i) {
      while (offset == plane_end && plane + 1 < plane_sizes.size()) plane_end += plane_sizes[++plane];
      offset += chunk_sizes[i];
      if (offset > plane_end) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": chunk ", ids[i], " crosses a plane boundary of the encoding"));
      }
      out.push_back({plane, ids[i]});
    }
    return out;
  }

  static absl::Status CheckStoredTensor(const v1::StoredTensor& t, const std::string& what, WeightFormat format,
                                        const std::vector<int64_t>& shape) {
    if (t.format() != FormatName(format)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": format '", t.format().substr(0, 64), "', the plan says '", FormatName(format), "'"));
    }
    if (!std::equal(t.shape().begin(), t.shape().end(), shape.begin(), shape.end())) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": shape [", absl::StrJoin(t.shape(), ", "),
                                                     "], the plan says [", absl::StrJoin(shape, ", "), "]"));
    }
    int64_t rows = 1;
    for (size_t i = 0; i + 1 < shape.size(); ++i) rows *= shape[i];
    QF_ASSIGN_OR_RETURN(const size_t expected, EncodedBytes(format, rows, shape.back()));
    if (t.nbytes() != expected) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", t.nbytes(), " bytes, the encoding needs ", expected));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<v1::CompleteTaskResponse> Complete(const v1::CompleteTaskRequest& req) {
    QF_ASSIGN_OR_RETURN(const auto ids, rpc::ParseTaskId(req.task_id()));
    const TaskRef ref{ids.first, ids.second};
    const Plan* plan = sched().PlanOf(ref.job);
    if (plan == nullptr || ref.task >= plan->tasks.size()) {
      return absl::NotFoundError(absl::StrCat("task_id: ", req.task_id(), " not found"));
    }
    const scheduler::PlanTask& pt = plan->tasks[ref.task];
    const std::string what = absl::StrCat("task ", req.task_id(), " (", plan->Describe(ref.task), ")");
    std::string result;
    if (pt.kind == TaskKind::kQuantize) {
      if (req.outputs_size() != 1) return absl::InvalidArgumentError(absl::StrCat(what, ": expected one output"));
      const v1::StoredTensor& out = req.outputs(0);
      const scheduler::TensorDesc& td = plan->model.tensors[pt.tensor];
      if (out.name() != plan->model.name(pt.tensor)) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": output names '", out.name().substr(0, 128), "'"));
      }
      WeightFormat format = plan->configs[pt.config].format;
      // The plan cannot know an spqr tensor's outlier count nor a qmoe tensor's codeword count: take the
      // worker's, all else must be the plan's (CheckStoredTensor then holds the bytes to that count).
      if ((format.type == WeightType::kSpQR && format.outliers == 0) ||
          (format.type == WeightType::kQMoE && format.codewords == 0)) {
        if (auto reported = ParseFormatName(out.format()); reported.ok() && reported->type == format.type) {
          WeightFormat base = *reported;
          base.outliers = 0;
          base.codewords = 0;
          if (base == format) format = *reported;
        }
      }
      const int64_t rows = int64_t{pt.row_end} - pt.row_begin;
      QF_RETURN_IF_ERROR(CheckStoredTensor(out, what, format, {rows, td.cols}));
      QF_ASSIGN_OR_RETURN(const std::vector<size_t> sizes, VerifyChunks(out.chunk_ids(), out.nbytes(), what));
      QF_ASSIGN_OR_RETURN(const std::vector<size_t> planes, PlaneSizes(format, rows, td.cols));
      QF_ASSIGN_OR_RETURN(const std::vector<SliceChunk> chunks, AssignPlanes(out.chunk_ids(), sizes, planes, what));
      result = EncodeSliceResult(out.nbytes(), chunks,
                                 format == plan->configs[pt.config].format ? "" : FormatName(format));
      if (req.tensors_size() == 1 && req.tensors(0).name() == out.name()) {
        absl::StrAppend(&result, SliceErrorSuffix(req.tensors(0), rows * td.cols));
      }
    } else if (pt.kind == TaskKind::kCalibrate) {
      QF_ASSIGN_OR_RETURN(v1::Job record, JobRecord(ref.job));
      QF_ASSIGN_OR_RETURN(result, CheckCalibration(*plan, ref.task, record.request().recipe().sequential_calibration(),
                                                   req, what));
    } else if (pt.kind == TaskKind::kEvaluate) {
      QF_ASSIGN_OR_RETURN(result, CheckEvaluation(*plan, ref.task, req, CommittedOf(ref.job), what));
    } else if (pt.kind == TaskKind::kAssemble) {
      // One assemble at a time: the check for an existing version and the commit must not interleave.
      std::lock_guard<std::mutex> l(assemble_mu_);
      QF_ASSIGN_OR_RETURN(result, CommitVersion(ref.job, *plan, req, what));
    } else {
      return absl::UnimplementedError(absl::StrCat(what, ": this task kind is not run by the distributed pipeline"));
    }
    QF_ASSIGN_OR_RETURN(const scheduler::CompleteOutcome outcome, sched().Complete(req.worker_id(), ref, result, NowMs()));
    if (outcome == scheduler::CompleteOutcome::kJobNotRunning) {
      return absl::FailedPreconditionError(absl::StrCat("job ", ref.job, " is no longer running"));
    }
    v1::CompleteTaskResponse resp;
    resp.set_duplicate(outcome == scheduler::CompleteOutcome::kDuplicate);
    return resp;
  }

  // The tensors the committed quantize tasks hold — of block `layer` only, or all for -1 — as manifest entries:
  // plane by plane, each slice's chunks of that plane, slices in row order (the plan lists a tensor's slices in
  // row order). Every one of those tasks must be committed.
  absl::StatusOr<ManifestTensors> QuantizedTensorsOf(JobId job, const Plan& plan,
                                                                              int32_t layer, const std::string& what) {
    ManifestTensors tensors;
    std::map<std::string, std::vector<std::vector<std::string>>> plane_chunks;
    for (uint32_t t = 0; t < plan.tasks.size(); ++t) {
      const scheduler::PlanTask& pt = plan.tasks[t];
      if (pt.kind != TaskKind::kQuantize || (layer >= 0 && pt.layer != layer)) continue;
      const std::string name(plan.model.name(pt.tensor));
      const scheduler::TensorDesc& td = plan.model.tensors[pt.tensor];
      v1::ManifestTensor& mt = tensors[name];
      if (mt.name().empty()) {
        mt.set_name(name);
        mt.set_format(FormatName(plan.configs[pt.config].format));
        mt.add_shape(td.rows);
        mt.add_shape(td.cols);
      }
      QF_ASSIGN_OR_RETURN(const std::string ref, sched().ResultRef({job, t}));
      uint64_t nbytes = 0;
      std::vector<SliceChunk> chunks;
      std::string slice_format;
      QF_RETURN_IF_ERROR(DecodeSliceResult(ref, &nbytes, &chunks, &slice_format));
      // A format only the worker knew (spqr's outlier count) is the tensor's; such tensors are never sliced.
      if (!slice_format.empty()) {
        if (pt.row_begin != 0 || pt.row_end != td.rows) {
          return absl::DataLossError(absl::StrCat(what, ": task ", t, " reports ", slice_format, " for a row slice"));
        }
        mt.set_format(slice_format);
      }
      mt.set_nbytes(mt.nbytes() + nbytes);
      std::vector<std::vector<std::string>>& by_plane = plane_chunks[name];
      for (SliceChunk& c : chunks) {
        if (c.plane >= 8) return absl::DataLossError(absl::StrCat(what, ": task ", t, " names plane ", c.plane));
        if (by_plane.size() <= c.plane) by_plane.resize(c.plane + 1);
        by_plane[c.plane].push_back(std::move(c.id));
      }
    }
    for (auto& [name, by_plane] : plane_chunks) {
      for (std::vector<std::string>& ids : by_plane) {
        for (std::string& id : ids) tensors[name].add_chunk_ids(std::move(id));
      }
    }
    return tensors;
  }

  // The tensors a calibrate task's model transform changed and no quantize task re-encodes (AWQ's RMSNorm
  // weights), added to `tensors`; the quantized ones are there already (their tasks read the transformed weights).
  static void AddTransformedTensors(const CalibrationIndex& calib, ManifestTensors* tensors) {
    for (const v1::StoredTensor& st : calib.result.outputs()) {
      if (tensors->contains(st.name())) continue;
      v1::ManifestTensor& mt = (*tensors)[st.name()];
      mt.set_name(st.name());
      mt.set_format(st.format());
      *mt.mutable_shape() = st.shape();
      mt.set_nbytes(st.nbytes());
      *mt.mutable_chunk_ids() = st.chunk_ids();
    }
  }

  // Builds the manifest from the committed slices and the assemble worker's copied tensors, and commits it as
  // the next version (or finds the version an earlier run of this assemble task already committed).
  absl::StatusOr<std::string> CommitVersion(JobId job, const Plan& plan, const v1::CompleteTaskRequest& req,
                                            const std::string& what) {
    QF_ASSIGN_OR_RETURN(v1::Job record, JobRecord(job));
    const std::string& name = record.request().output_name();
    const std::string job_id = rpc::FormatJobId(job);
    if (auto existing = FindVersionOfJob(name, job_id); existing.ok()) {
      return storage::FormatModelRef(name, *existing);
    }
    v1::Manifest manifest;
    auto config = formats::ParseHfConfig(req.config_json());
    if (!config.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": config_json: ", config.status().message()));
    if (!(*config == plan.model.config)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": config_json does not describe the planned model"));
    }
    manifest.set_config_json(req.config_json());
    *manifest.mutable_recipe() = record.request().recipe();
    manifest.set_source_uri(record.request().source_uri());
    manifest.set_job_id(job_id);
    if (!req.vocab_chunk_id().empty()) {
      QF_ASSIGN_OR_RETURN(const bool has, store().HasChunk(req.vocab_chunk_id()));
      if (!has) return absl::FailedPreconditionError(absl::StrCat(what, ": vocabulary chunk not stored"));
      manifest.set_vocab_chunk_id(req.vocab_chunk_id());
    }
    QF_ASSIGN_OR_RETURN(ManifestTensors tensors, QuantizedTensorsOf(job, plan, -1, what));
    // Copied tensors: exactly the ones the plan does not quantize, in their source shape and encoding, except
    // those the model transform changed, which come from the calibrate task's artifacts (checked at its commit).
    const std::vector<bool> quantized = QuantizedTensors(plan);
    QF_ASSIGN_OR_RETURN(const auto calibrations, AllCalibrationsOf(job, plan));
    for (const std::shared_ptr<const CalibrationIndex>& calib : calibrations) AddTransformedTensors(*calib, &tensors);
    std::map<std::string_view, size_t> index;
    for (size_t i = 0; i < plan.model.tensors.size(); ++i) index.emplace(plan.model.name(i), i);
    for (const v1::StoredTensor& st : req.outputs()) {
      const std::string where = absl::StrCat(what, ": tensor '", st.name().substr(0, 128), "'");
      auto it = index.find(st.name());
      if (it == index.end() || quantized[it->second] || tensors.contains(st.name())) {
        return absl::InvalidArgumentError(absl::StrCat(where, " is not one the job copies (or is repeated)"));
      }
      auto format = ParseFormatName(st.format());
      if (!format.ok()) return absl::InvalidArgumentError(absl::StrCat(where, ": ", format.status().message()));
      const scheduler::TensorDesc& td = plan.model.tensors[it->second];
      const std::vector<int64_t> shape =
          td.ndim == 1 ? std::vector<int64_t>{td.cols} : std::vector<int64_t>{td.rows, td.cols};
      QF_RETURN_IF_ERROR(CheckStoredTensor(st, where, *format, shape));
      QF_RETURN_IF_ERROR(VerifyChunks(st.chunk_ids(), st.nbytes(), where).status());
      v1::ManifestTensor& mt = tensors[st.name()];
      mt.set_name(st.name());
      mt.set_format(st.format());
      *mt.mutable_shape() = st.shape();
      mt.set_nbytes(st.nbytes());
      *mt.mutable_chunk_ids() = st.chunk_ids();
    }
    if (tensors.size() != plan.model.tensors.size()) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": ", plan.model.tensors.size() - tensors.size(),
                                                     " tensors the job copies are missing"));
    }
    for (auto& [n, mt] : tensors) *manifest.add_tensors() = std::move(mt);
    storage::StateBatch also;
    also.ReleasePins(JobPinHolder(job));
    QF_ASSIGN_OR_RETURN(const uint64_t version, store().CommitVersion(name, std::move(manifest), &also));
    return storage::FormatModelRef(name, version);
  }

  // The version of `name` whose manifest records `job_id`; NOT_FOUND if none.
  absl::StatusOr<uint64_t> FindVersionOfJob(const std::string& name, const std::string& job_id) {
    QF_ASSIGN_OR_RETURN(std::vector<storage::ModelVersions> models, store().ListModels());
    for (const storage::ModelVersions& m : models) {
      if (m.name != name) continue;
      for (auto v = m.versions.rbegin(); v != m.versions.rend(); ++v) {
        auto manifest = store().GetManifest(storage::ModelRef{name, *v});
        if (manifest.ok() && manifest->job_id() == job_id) return *v;
      }
    }
    return absl::NotFoundError("no version of this job");
  }

  // --- metrics --------------------------------------------------------------------------------------------------
  void RegisterMetrics() {
    metrics::RegisterProcessCollectors(metrics_, nullptr);
    metrics_.AddCollector([this](metrics::Registry& r) { CollectMetrics(r); });
  }

  void CollectMetrics(metrics::Registry& r) {
    auto gauge = [&r](const char* name, const char* help, double v, const metrics::Labels& labels = {}) {
      if (auto g = r.GetGauge(name, help, labels); g.ok()) (*g)->Set(v);
    };
    std::map<JobState, int> by_state = {{JobState::kRunning, 0}, {JobState::kSucceeded, 0}, {JobState::kFailed, 0},
                                        {JobState::kCancelled, 0}};
    double bytes_done = 0, in_succeeded = 0, out_succeeded = 0;
    for (JobId id : sched().Jobs()) {
      auto p = sched().Progress(id, NowMs());
      if (!p.ok()) continue;
      ++by_state[p->state];
      bytes_done += static_cast<double>(p->bytes_done);
      if (p->state != JobState::kSucceeded) continue;
      auto job = DescribeJob(id);
      if (job.ok() && job->progress().bytes_out() > 0) {
        in_succeeded += static_cast<double>(p->bytes_total);
        out_succeeded += static_cast<double>(job->progress().bytes_out());
      }
      if (job.ok() && job->has_quality()) CollectQuality(r, *job);
    }
    for (const auto& [state, n] : by_state) {
      gauge("qforge_scheduler_jobs", "Jobs in the store by state", n, {{"state", scheduler::JobStateName(state)}});
    }
    gauge("qforge_scheduler_input_bytes_done", "Source bytes of every committed quantize task of every job", bytes_done);
    if (out_succeeded > 0) {
      gauge("qforge_scheduler_compression_ratio",
            "Source bytes of the quantized tensors over the bytes of the versions made, over succeeded jobs",
            in_succeeded / out_succeeded);
    }
    gauge("qforge_scheduler_leased_tasks", "Tasks leased to workers now", static_cast<double>(sched().LeasedCount()));
    const scheduler::TaskStateCounts tasks = sched().TaskCounts();
    for (const auto& [state, n] : {std::pair<const char*, uint64_t>{"blocked", tasks.blocked}, {"ready", tasks.ready},
                                   {"leased", tasks.leased}, {"done", tasks.done}}) {
      gauge("qforge_scheduler_tasks",
            "Tasks of running jobs by state: waiting on dependencies, ready to lease (the queue), leased, committed",
            static_cast<double>(n), {{"state", state}});
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      gauge("qforge_scheduler_workers_registered", "Workers registered since this process started",
            static_cast<double>(workers_.size()));
    }
    // Task events since this process started: counters advanced by what happened since the last scrape.
    const scheduler::QueueCounters c = sched().counters();
    const std::pair<const char*, uint64_t> events[] = {{"leased", c.leased},       {"committed", c.committed},
                                                       {"duplicate", c.duplicates}, {"failed", c.failed},
                                                       {"lease_expired", c.expired}};
    std::lock_guard<std::mutex> l(mu_);
    for (const auto& [event, value] : events) {
      auto counter = r.GetCounter("qforge_scheduler_task_events_total",
                                  "Task leases, first completions, duplicate completions, failures reported by the "
                                  "lease holder and expired leases",
                                  {{"event", event}});
      if (!counter.ok()) continue;
      uint64_t& seen = events_seen_[event];
      (*counter)->Inc(static_cast<double>(value - seen));
      seen = value;
    }
  }

  // A succeeded job's Job.quality, labelled by job id (and by model for the two perplexities).
  static void CollectQuality(metrics::Registry& r, const v1::Job& job) {
    const v1::QualityReport& q = job.quality();
    const metrics::Labels labels = {{"job_id", job.job_id()}};
    auto gauge = [&r](const char* name, const char* help, double v, const metrics::Labels& l) {
      if (auto g = r.GetGauge(name, help, l); g.ok()) (*g)->Set(v);
    };
    gauge("qforge_job_quality_kl", "Mean KL(source || version) per predicted token of a job's evaluation text, nats",
          q.kl_mean(), labels);
    gauge("qforge_job_quality_top1", "Fraction of a job's evaluation positions where source and version agree on the "
          "most likely token", q.top1_agreement(), labels);
    for (const auto& [model, ppl] : {std::pair<const char*, double>{"source", q.perplexity_base()},
                                     {"version", q.perplexity_quantized()}}) {
      gauge("qforge_job_quality_perplexity", "Perplexity of a job's evaluation text under the source and the version",
            ppl, {{"job_id", job.job_id()}, {"model", model}});
    }
  }

  void RegisterRoutes(http::HttpServer& s) {
    s.Route("GET", "/metrics", [this](const http::Request&, http::ResponseWriter& w) {
      w.Send(200, metrics::kTextContentType, metrics_.Render());
    });
    s.Route("GET", "/healthz", [this](const http::Request&, http::ResponseWriter& w) {
      w.Send(stopping() ? 503 : 200, "text/plain", stopping() ? "stopping\n" : "ok\n");
    });
  }

  // --- the gRPC services ----------------------------------------------------------------------------------------
  class JobServiceImpl final : public v1::JobService::Service {
   public:
    explicit JobServiceImpl(Impl* impl) : impl_(impl) {}
    grpc::Status SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* req, v1::SubmitJobResponse* resp) override {
      auto id = impl_->Submit(*req);
      if (!id.ok()) return rpc::ToGrpc(id.status());
      resp->set_job_id(rpc::FormatJobId(*id));
      return grpc::Status::OK;
    }
    grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* req, v1::Job* resp) override {
      return Describe(req->job_id(), resp, /*with_tensors=*/true);
    }
    grpc::Status CancelJob(grpc::ServerContext*, const v1::CancelJobRequest* req, v1::Job* resp) override {
      auto id = rpc::ParseJobId(req->job_id());
      if (!id.ok()) return rpc::ToGrpc(id.status());
      if (absl::Status s = impl_->sched().CancelJob(*id, NowMs()); !s.ok()) return rpc::ToGrpc(s);
      impl_->ReleaseFinishedJobPins();
      return Describe(req->job_id(), resp);
    }
    grpc::Status WatchJob(grpc::ServerContext* ctx, const v1::WatchJobRequest* req,
                          grpc::ServerWriter<v1::JobProgress>* writer) override {
      v1::Job job;
      if (grpc::Status s = Describe(req->job_id(), &job); !s.ok()) return s;
      std::string last;
      int64_t last_sent_ms = 0;
      while (!ctx->IsCancelled()) {
        const std::string now = job.progress().SerializeAsString();
        // Send on every change, and at least once a second so the client's ETA and throughput stay live.
        if (now != last || NowMs() - last_sent_ms >= 1000) {
          if (!writer->Write(job.progress())) return grpc::Status::OK;  // the client went away
          last = now;
          last_sent_ms = NowMs();
        }
        if (job.progress().state() != v1::JOB_STATE_RUNNING) return grpc::Status::OK;
        if (impl_->stopping()) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "scheduler shutting down");
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        if (grpc::Status s = Describe(req->job_id(), &job); !s.ok()) return s;
      }
      return grpc::Status(grpc::StatusCode::CANCELLED, "client cancelled");
    }
    grpc::Status ListJobs(grpc::ServerContext*, const v1::ListJobsRequest* req, v1::ListJobsResponse* resp) override {
      if (req->page_size() < 0) return {grpc::StatusCode::INVALID_ARGUMENT, "page_size: negative"};
      const int limit = req->page_size() == 0 ? 100 : std::min(req->page_size(), 1000);
      JobId after = 0;
      if (!req->page_token().empty()) {
        auto t = rpc::ParseJobId(req->page_token());
        if (!t.ok()) return {grpc::StatusCode::INVALID_ARGUMENT, "page_token: not one ListJobs returned"};
        after = *t;
      }
      for (JobId id : impl_->sched().Jobs()) {
        if (id <= after) continue;
        auto job = impl_->DescribeJob(id);
        if (!job.ok()) return rpc::ToGrpc(job.status());
        if (!req->tenant().empty() && job->tenant() != req->tenant()) continue;
        if (resp->jobs_size() == limit) {
          resp->set_next_page_token(rpc::FormatJobId(after));
          break;
        }
        *resp->add_jobs() = *std::move(job);
        after = id;
      }
      return grpc::Status::OK;
    }

   private:
    grpc::Status Describe(const std::string& job_id, v1::Job* out, bool with_tensors = false) {
      auto id = rpc::ParseJobId(job_id);
      if (!id.ok()) return rpc::ToGrpc(id.status());
      auto job = impl_->DescribeJob(*id, with_tensors);
      if (!job.ok()) return rpc::ToGrpc(job.status());
      *out = *std::move(job);
      return grpc::Status::OK;
    }
    Impl* impl_;
  };

  class WorkerServiceImpl final : public v1::WorkerService::Service {
   public:
    explicit WorkerServiceImpl(Impl* impl) : impl_(impl) {}
    grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest* req,
                                v1::RegisterWorkerResponse* resp) override {
      resp->set_worker_id(impl_->RegisterWorker(*req));
      return grpc::Status::OK;
    }
    grpc::Status LeaseTask(grpc::ServerContext*, const v1::LeaseTaskRequest* req, v1::LeaseTaskResponse* resp) override {
      if (req->worker_id().empty()) return {grpc::StatusCode::INVALID_ARGUMENT, "worker_id: empty"};
      auto leased = impl_->sched().Lease(req->worker_id(), NowMs());
      if (!leased.ok()) return rpc::ToGrpc(leased.status());
      if (!leased->has_value()) {
        resp->set_available(false);
        return grpc::Status::OK;
      }
      if (absl::Status s = impl_->FillTask(**leased, resp->mutable_task()); !s.ok()) {
        impl_->sched().Fail(req->worker_id(), (*leased)->ref, std::string(s.message()), NowMs()).IgnoreError();
        return rpc::ToGrpc(s);
      }
      resp->set_available(true);
      resp->set_lease_deadline_unix_ms((*leased)->deadline_ms);
      return grpc::Status::OK;
    }
    grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* req, v1::HeartbeatResponse* resp) override {
      auto ids = rpc::ParseTaskId(req->task_id());
      if (!ids.ok()) return rpc::ToGrpc(ids.status());
      auto deadline = impl_->sched().Heartbeat(req->worker_id(), {ids->first, ids->second}, NowMs());
      if (!deadline.ok()) return rpc::ToGrpc(deadline.status());
      resp->set_lease_deadline_unix_ms(*deadline);
      return grpc::Status::OK;
    }
    grpc::Status UploadChunk(grpc::ServerContext*, grpc::ServerReader<v1::UploadChunkRequest>* reader,
                             v1::UploadChunkResponse* resp) override {
      v1::UploadChunkRequest piece;
      if (!reader->Read(&piece)) return {grpc::StatusCode::INVALID_ARGUMENT, "UploadChunk: empty stream"};
      auto ids = rpc::ParseTaskId(piece.task_id());
      if (!ids.ok()) return rpc::ToGrpc(ids.status());
      auto progress = impl_->sched().Progress(ids->first, NowMs());
      if (!progress.ok()) return rpc::ToGrpc(progress.status());
      if (progress->state != JobState::kRunning) {
        return {grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("job ", ids->first, " is no longer running")};
      }
      std::string bytes = std::move(*piece.mutable_data());
      while (reader->Read(&piece)) {
        if (bytes.size() + piece.data().size() > storage::kMaxChunkBytes) {
          return {grpc::StatusCode::INVALID_ARGUMENT,
                  absl::StrCat("UploadChunk: a chunk holds at most ", storage::kMaxChunkBytes, " bytes")};
        }
        bytes += piece.data();
      }
      auto id = impl_->store().PutChunk(
          std::span(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()), JobPinHolder(ids->first));
      if (!id.ok()) return rpc::ToGrpc(id.status());
      // The job may have ended (and released its pins) while the chunk arrived: release this late pin too.
      if (auto after = impl_->sched().Progress(ids->first, NowMs()); after.ok() && after->state != JobState::kRunning) {
        storage::StateBatch release;
        release.ReleasePins(JobPinHolder(ids->first));
        impl_->store().Write(release).IgnoreError();  // CollectGarbage finds what a failure here leaves
        return {grpc::StatusCode::FAILED_PRECONDITION, absl::StrCat("job ", ids->first, " is no longer running")};
      }
      resp->set_chunk_id(*id);
      resp->set_size(bytes.size());
      return grpc::Status::OK;
    }
    grpc::Status CompleteTask(grpc::ServerContext*, const v1::CompleteTaskRequest* req,
                              v1::CompleteTaskResponse* resp) override {
      auto r = impl_->Complete(*req);
      if (!r.ok()) return rpc::ToGrpc(r.status());
      *resp = *std::move(r);
      return grpc::Status::OK;
    }
    grpc::Status FailTask(grpc::ServerContext*, const v1::FailTaskRequest* req, v1::FailTaskResponse*) override {
      auto ids = rpc::ParseTaskId(req->task_id());
      if (!ids.ok()) return rpc::ToGrpc(ids.status());
      const std::string error = req->error().substr(0, 4096);
      return rpc::ToGrpc(impl_->sched().Fail(req->worker_id(), {ids->first, ids->second}, error, NowMs()));
    }

   private:
    Impl* impl_;
  };

  class ArtifactServiceImpl final : public v1::ArtifactService::Service {
   public:
    explicit ArtifactServiceImpl(Impl* impl) : impl_(impl) {}
    grpc::Status ListModels(grpc::ServerContext*, const v1::ListModelsRequest*, v1::ListModelsResponse* resp) override {
      auto models = impl_->store().ListModels();
      if (!models.ok()) return rpc::ToGrpc(models.status());
      for (const storage::ModelVersions& m : *models) {
        v1::ModelVersions* out = resp->add_models();
        out->set_name(m.name);
        for (uint64_t v : m.versions) out->add_versions(absl::StrCat(v));
      }
      return grpc::Status::OK;
    }
    grpc::Status GetManifest(grpc::ServerContext*, const v1::GetManifestRequest* req, v1::Manifest* resp) override {
      auto ref = RefFromProto(req->model());
      if (!ref.ok()) return rpc::ToGrpc(ref.status());
      auto m = impl_->store().GetManifest(*ref);
      if (!m.ok()) return rpc::ToGrpc(m.status());
      *resp = *std::move(m);
      return grpc::Status::OK;
    }
    grpc::Status GetChunk(grpc::ServerContext* ctx, const v1::GetChunkRequest* req,
                          grpc::ServerWriter<v1::ChunkData>* writer) override {
      if (absl::Status s = storage::ValidateChunkId(req->chunk_id()); !s.ok()) return rpc::ToGrpc(s);
      auto bytes = impl_->store().GetChunk(req->chunk_id());
      if (!bytes.ok()) return rpc::ToGrpc(bytes.status());
      v1::ChunkData piece;
      for (size_t off = 0; off < bytes->size() || off == 0; off += rpc::kChunkPieceBytes) {
        if (ctx->IsCancelled()) return {grpc::StatusCode::CANCELLED, "client cancelled"};
        const size_t n = std::min(rpc::kChunkPieceBytes, bytes->size() - off);
        piece.set_offset(off);
        piece.set_data(bytes->data() + off, n);
        if (!writer->Write(piece)) break;
        if (n == 0) break;
      }
      return grpc::Status::OK;
    }
    grpc::Status ExportModel(grpc::ServerContext*, const v1::ExportModelRequest* req,
                             v1::ExportModelResponse* resp) override {
      auto ref = RefFromProto(req->model());
      if (!ref.ok()) return rpc::ToGrpc(ref.status());
      const std::string& path = req->output_path();
      if (path.empty() || path.back() == '/') return {grpc::StatusCode::INVALID_ARGUMENT, "output_path: not a file path"};
      const size_t slash = path.find_last_of('/');
      const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
      auto real_dir = rpc::ResolveUnderRoots(dir, impl_->roots_, "output_path");
      if (!real_dir.ok()) return rpc::ToGrpc(real_dir.status());
      storage::ExportFormat format;
      switch (req->format()) {
        case v1::EXPORT_FORMAT_GGUF: format = storage::ExportFormat::kGguf; break;
        case v1::EXPORT_FORMAT_SAFETENSORS: format = storage::ExportFormat::kSafetensors; break;
        default: return {grpc::StatusCode::INVALID_ARGUMENT, "format: must be GGUF or SAFETENSORS"};
      }
      const std::string out = absl::StrCat(*real_dir, "/", path.substr(slash + 1));
      if (absl::Status s = storage::ExportModel(impl_->store(), *ref, out, format); !s.ok()) return rpc::ToGrpc(s);
      std::error_code ec;
      resp->set_bytes_written(std::filesystem::file_size(out, ec));
      return grpc::Status::OK;
    }
    grpc::Status DeleteVersion(grpc::ServerContext*, const v1::DeleteVersionRequest* req,
                               v1::DeleteVersionResponse* resp) override {
      auto ref = RefFromProto(req->model());
      if (!ref.ok()) return rpc::ToGrpc(ref.status());
      auto version = impl_->store().ResolveVersion(*ref);
      if (!version.ok()) return rpc::ToGrpc(version.status());
      auto n = impl_->store().DeleteVersion(ref->name, *version);
      if (!n.ok()) return rpc::ToGrpc(n.status());
      resp->set_chunks_collected(*n);
      return grpc::Status::OK;
    }
    grpc::Status PutAdapter(grpc::ServerContext*, const v1::PutAdapterRequest* req,
                            v1::PutAdapterResponse* resp) override {
      auto stored = impl_->PutAdapter(*req);
      if (!stored.ok()) return rpc::ToGrpc(stored.status());
      resp->mutable_adapter()->set_name(req->name());
      resp->mutable_adapter()->set_version(absl::StrCat(stored->version));
      *resp->mutable_base() = stored->base;
      resp->set_format(stored->adapter.format);
      resp->set_matrices(static_cast<uint32_t>(stored->adapter.matrices.size()));
      resp->set_rank(static_cast<uint32_t>(stored->adapter.max_rank()));
      return grpc::Status::OK;
    }

   private:
    Impl* impl_;
  };

  // ArtifactService.PutAdapter: the files are read where the scheduler runs, under its allowed roots, as a job's
  // source is; errors name the request's fields.
  absl::StatusOr<storage::StoredAdapter> PutAdapter(const v1::PutAdapterRequest& req) {
    if (stopping_) return absl::UnavailableError("scheduler shutting down");
    if (absl::Status s = storage::ValidateModelName(req.name()); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("name: ", s.message()));
    }
    if (req.base().name().empty()) return absl::InvalidArgumentError("base.name: required");
    auto base = RefFromProto(req.base());
    if (!base.ok()) return absl::InvalidArgumentError(absl::StrCat("base: ", base.status().message()));
    QF_ASSIGN_OR_RETURN(const std::string path, rpc::ResolveUnderRoots(req.source_uri(), roots_, "source_uri"));
    auto files = lora::ReadAdapterFiles(path);
    if (!files.ok()) return absl::Status(files.status().code(), absl::StrCat("source_uri: ", files.status().message()));
    // Serialised with the version commits so that `name`'s kind check and its commit see the same latest version.
    std::lock_guard<std::mutex> lock(assemble_mu_);
    return storage::PutAdapter(store(), req.name(), *base, *files, path);
  }

  SchedulerServer* server_;
  SchedulerServiceOptions options_;
  std::vector<std::string> roots_;  // realpath'd allowed roots
  std::atomic<bool> stopping_{false};
  std::mutex tick_mu_;
  std::condition_variable tick_cv_;
  std::mutex submit_mu_;    // serialises submits (idempotency keys)
  std::mutex assemble_mu_;  // serialises version commits
  std::mutex mu_;           // guards the maps below
  std::map<JobId, v1::Job> records_;
  std::map<std::pair<std::string, std::string>, JobId> idempotency_;
  std::set<JobId> pins_released_;
  std::map<std::string, v1::RegisterWorkerRequest> workers_;
  std::map<JobId, uint64_t> output_bytes_;
  std::map<std::pair<JobId, uint32_t>, std::shared_ptr<const CalibrationIndex>> calibrations_;  // by calibrate task
  std::map<JobId, std::optional<v1::QualityReport>> quality_;
  std::map<JobId, std::shared_ptr<const TensorReports>> tensor_reports_;
  std::map<std::string, uint64_t> events_seen_;
  metrics::Registry metrics_;

 public:
  JobServiceImpl jobs_svc_;
  WorkerServiceImpl workers_svc_;
  ArtifactServiceImpl artifacts_svc_;
};

// ---------------------------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<SchedulerServer>> SchedulerServer::Open(const std::string& store_dir,
                                                                       SchedulerServiceOptions options) {
  std::unique_ptr<SchedulerServer> s(new SchedulerServer());
  QF_ASSIGN_OR_RETURN(std::vector<std::string> roots, rpc::ResolveRoots(options.allowed_roots));
  QF_ASSIGN_OR_RETURN(s->store_, storage::ArtifactStore::Open(store_dir));
  s->state_ = std::make_unique<scheduler::RocksDbStateStore>(s->store_.get());
  QF_ASSIGN_OR_RETURN(s->jobs_, scheduler::JobScheduler::Recover(s->state_.get(), options.scheduler, NowMs()));
  s->impl_ = std::make_unique<Impl>(s.get(), std::move(options));
  s->impl_->roots_ = std::move(roots);
  // Load every job's record now: idempotency keys must be known before the first submit.
  for (JobId id : s->jobs_->Jobs()) QF_RETURN_IF_ERROR(s->impl_->JobRecord(id).status());
  s->impl_->RegisterMetrics();
  s->ticker_ = std::thread([impl = s->impl_.get()] { impl->TickerLoop(); });
  return s;
}

absl::StatusOr<int> SchedulerServer::StartMetrics(const std::string& address, int port) {
  if (metrics_http_ != nullptr) return absl::FailedPreconditionError("scheduler: metrics already started");
  metrics_http_ = std::make_unique<http::HttpServer>();
  impl_->RegisterRoutes(*metrics_http_);
  http::HttpServerOptions options;
  options.address = address;
  options.port = port;
  QF_RETURN_IF_ERROR(metrics_http_->Start(options));
  return metrics_http_->port();
}

SchedulerServer::~SchedulerServer() {
  Shutdown(0);
  if (ticker_.joinable()) ticker_.join();
}

absl::StatusOr<int> SchedulerServer::Start(const std::string& address) {
  if (server_ != nullptr) return absl::FailedPreconditionError("scheduler: already started");
  grpc::ServerBuilder builder;
  rpc::ConfigureServer(builder);
  int port = 0;
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&impl_->jobs_svc_);
  builder.RegisterService(&impl_->workers_svc_);
  builder.RegisterService(&impl_->artifacts_svc_);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port == 0) {
    server_.reset();
    return absl::UnavailableError(absl::StrCat("scheduler: cannot listen on ", address));
  }
  return port;
}

std::shared_ptr<grpc::Channel> SchedulerServer::InProcessChannel() {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(rpc::kMaxMessageBytes);
  args.SetMaxSendMessageSize(rpc::kMaxMessageBytes);
  return server_->InProcessChannel(args);
}

void SchedulerServer::Shutdown(int64_t grace_ms) {
  if (impl_ != nullptr) impl_->Stop();
  if (server_ != nullptr) {
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::milliseconds(grace_ms));
  }
  if (metrics_http_ != nullptr) metrics_http_->Shutdown();
}

void SchedulerServer::Wait() {
  if (server_ != nullptr) server_->Wait();
}

}  // namespace qforge::services
