#include "services/rpc/rpc_util.h"

#include <climits>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qforge::rpc {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbers.
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  args.SetMaxSendMessageSize(kMaxMessageBytes);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

void ConfigureServer(grpc::ServerBuilder& builder) {
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.SetMaxSendMessageSize(kMaxMessageBytes);
}

namespace {
template <typename T>
bool ParseDecimal(std::string_view s, T* out) {
  if (s.empty() || s.size() > 20 || (s.size() > 1 && s[0] == '0')) return false;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), *out);
  return ec == std::errc() && p == s.data() + s.size();
}
}  // namespace

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address, const std::string& flag) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos || colon == 0 || !ParseDecimal(std::string_view(address).substr(colon + 1), &port) ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": '", address.substr(0, 128), "' is not HOST:PORT"));
  }
  return std::make_pair(address.substr(0, colon), port);
}

std::string FormatJobId(scheduler::JobId job) { return absl::StrCat(job); }

absl::StatusOr<scheduler::JobId> ParseJobId(const std::string& id) {
  scheduler::JobId job = 0;
  if (!ParseDecimal(id, &job) || job == 0) {
    return absl::InvalidArgumentError(absl::StrCat("job_id: '", id.substr(0, 64), "' is not a job id"));
  }
  return job;
}

std::string FormatTaskId(scheduler::JobId job, uint32_t task) { return absl::StrCat(job, "/", task); }

absl::StatusOr<std::pair<scheduler::JobId, uint32_t>> ParseTaskId(const std::string& id) {
  const size_t slash = id.find('/');
  const std::string_view job_text = std::string_view(id).substr(0, slash);
  const std::string_view task_text = slash == std::string::npos ? std::string_view() : std::string_view(id).substr(slash + 1);
  scheduler::JobId job = 0;
  uint32_t task = 0;
  if (!ParseDecimal(job_text, &job) || job == 0 || !ParseDecimal(task_text, &task)) {
    return absl::InvalidArgumentError(absl::StrCat("task_id: '", id.substr(0, 64), "' is not <job>/<task>"));
  }
  return std::make_pair(job, task);
}

namespace {
absl::StatusOr<std::string> RealPath(const std::string& path, const std::string& field) {
  char buf[PATH_MAX];
  if (::realpath(path.c_str(), buf) == nullptr) {
    const int err = errno;
    const std::string what = absl::StrCat(field, ": '", path.substr(0, 256), "': ", std::strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(what);
    if (err == EACCES) return absl::PermissionDeniedError(what);
    return absl::InvalidArgumentError(what);
  }
  return std::string(buf);
}
}  // namespace

absl::StatusOr<std::string> ResolveUnderRoots(const std::string& path, const std::vector<std::string>& roots,
                                              const std::string& field) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": empty"));
  if (path.find('\0') != std::string::npos) return absl::InvalidArgumentError(absl::StrCat(field, ": holds a NUL byte"));
  if (const size_t scheme = path.find("://"); scheme != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": only local paths are read, not '",
                                                   path.substr(0, std::min<size_t>(scheme, 32)), "://' URIs"));
  }
  auto real = RealPath(path, field);
  if (!real.ok()) return real.status();
  if (roots.empty()) return real;
  for (const std::string& root : roots) {
    if (*real == root || root == "/" ||
        (real->size() > root.size() && real->compare(0, root.size(), root) == 0 && (*real)[root.size()] == '/')) {
      return real;
    }
  }
  return absl::PermissionDeniedError(absl::StrCat(field, ": '", path.substr(0, 256),
                                                  "' is outside the allowed roots (", absl::StrJoin(roots, ", "), ")"));
}

absl::StatusOr<std::vector<std::string>> ResolveRoots(const std::vector<std::string>& roots) {
  std::vector<std::string> out;
  for (const std::string& r : roots) {
    auto real = RealPath(r, "allowed root");
    if (!real.ok()) return absl::InvalidArgumentError(real.status().message());
    out.push_back(*std::move(real));
  }
  return out;
}

absl::StatusOr<std::pair<const quant::QuantMethod*, quant::QuantParams>> ParamsFromProto(
    const qforge::v1::QuantParams& p, const std::string& field) {
  const quant::QuantMethod* method = quant::FindMethod(p.method());
  if (method == nullptr) {
    std::string known;
    for (const quant::QuantMethod* m : quant::ListMethods()) absl::StrAppend(&known, known.empty() ? "" : ", ", m->name());
    if (p.method().empty()) return absl::InvalidArgumentError(absl::StrCat(field, ".method: empty (known: ", known, ")"));
    return absl::InvalidArgumentError(
        absl::StrCat(field, ".method: unknown method '", p.method().substr(0, 64), "' (known: ", known, ")"));
  }
  quant::QuantParams q = method->DefaultParams();
  if (p.has_bits()) q.bits = p.bits();
  if (p.has_group_size()) q.group = p.group_size();
  if (p.has_asymmetric()) q.symmetric = !p.asymmetric();
  if (p.has_double_quant()) q.double_quant = p.double_quant();
  if (p.has_act_order()) q.act_order = p.act_order();
  if (p.has_static_groups()) q.static_groups = p.static_groups();
  if (p.has_damp()) q.damp = p.damp();
  if (p.has_alpha()) q.alpha = p.alpha();
  if (p.has_outlier_threshold()) q.outlier_threshold = p.outlier_threshold();
  if (p.has_seed()) q.seed = p.seed();
  return std::make_pair(method, q);
}

qforge::v1::QuantParams ParamsToProto(const std::string& method, const quant::QuantParams& p) {
  qforge::v1::QuantParams out;
  out.set_method(method);
  out.set_bits(p.bits);
  out.set_group_size(p.group);
  out.set_asymmetric(!p.symmetric);
  out.set_double_quant(p.double_quant);
  out.set_act_order(p.act_order);
  out.set_static_groups(p.static_groups);
  out.set_damp(p.damp);
  out.set_alpha(p.alpha);
  out.set_outlier_threshold(p.outlier_threshold);
  out.set_seed(p.seed);
  return out;
}

absl::StatusOr<scheduler::JobRecipe> RecipeFromProto(const qforge::v1::Recipe& recipe) {
  scheduler::JobRecipe r;
  auto defaults = ParamsFromProto(recipe.defaults(), "recipe.defaults");
  if (!defaults.ok()) return defaults.status();
  r.method = defaults->first->name();
  r.params = defaults->second;
  r.quantize_embeddings = recipe.defaults().quantize_embeddings();
  for (int i = 0; i < recipe.layers_size(); ++i) {
    const std::string field = absl::StrCat("recipe.layers[", i, "]");
    auto rule = ParamsFromProto(recipe.layers(i).params(), absl::StrCat(field, ".params"));
    if (!rule.ok()) return rule.status();
    r.layers.push_back({recipe.layers(i).pattern(), rule->first->name(), rule->second});
  }
  r.allow_fallback = !recipe.no_fallback();
  r.calibration_text_uri = recipe.calibration_text_uri();
  r.sequential_calibration = recipe.sequential_calibration();
  r.evaluation_text_uri = recipe.evaluation_text_uri();
  // Sampled evaluation streams, `qforge eval --streams N --stream-len L --seed S`'s ranges; the length's bound by
  // the context needs the model (SubmitJob checks it).
  if (recipe.eval_streams() != 0) {
    if (recipe.eval_streams() < 1 || recipe.eval_streams() > 100000) {
      return absl::InvalidArgumentError(
          absl::StrCat("recipe.eval_streams: must be 1..100000, got ", recipe.eval_streams()));
    }
    if (!r.evaluation_text_uri.empty()) {
      return absl::InvalidArgumentError(
          "recipe.eval_streams: give either evaluation_text_uri or eval_streams, not both");
    }
    r.eval_streams = recipe.eval_streams();
  }
  if ((recipe.has_eval_stream_length() || recipe.has_eval_seed()) && r.eval_streams == 0) {
    return absl::InvalidArgumentError("recipe.eval_stream_length / eval_seed: given without eval_streams");
  }
  if (recipe.has_eval_stream_length()) {
    if (recipe.eval_stream_length() < 2 || recipe.eval_stream_length() > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.eval_stream_length: must be 2..", 1 << 24, ", got ",
                                                     recipe.eval_stream_length()));
    }
    r.eval_stream_length = recipe.eval_stream_length();
  }
  if (recipe.has_eval_seed()) r.eval_seed = recipe.eval_seed();
  // `qforge eval`'s --window / --chunks ranges; the context-length bound needs the model (SubmitJob checks it).
  // Windows and tasks apply to either kind of evaluation; --chunks only cuts a text.
  if ((recipe.has_evaluation_window() || recipe.has_evaluation_tasks()) && !r.evaluates()) {
    return absl::InvalidArgumentError(
        "recipe.evaluation_window / evaluation_tasks: given without evaluation_text_uri or eval_streams");
  }
  if (recipe.has_evaluation_chunks() && r.evaluation_text_uri.empty()) {
    return absl::InvalidArgumentError("recipe.evaluation_chunks: given without evaluation_text_uri");
  }
  if (recipe.has_evaluation_window()) {
    if (recipe.evaluation_window() < 2 || recipe.evaluation_window() > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_window: must be 2..", 1 << 24, ", got ",
                                                     recipe.evaluation_window()));
    }
    r.evaluation_window = recipe.evaluation_window();
  }
  if (recipe.has_evaluation_chunks()) {
    if (recipe.evaluation_chunks() < 1 || recipe.evaluation_chunks() > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_chunks: must be 1..", 1 << 24, ", got ",
                                                     recipe.evaluation_chunks()));
    }
    r.evaluation_chunks = recipe.evaluation_chunks();
  }
  if (recipe.has_evaluation_tasks()) {
    if (recipe.evaluation_tasks() < 1 || recipe.evaluation_tasks() > scheduler::kMaxEvaluationTasks) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.evaluation_tasks: must be 1..",
                                                     scheduler::kMaxEvaluationTasks, ", got ",
                                                     recipe.evaluation_tasks()));
    }
    r.evaluation_tasks = recipe.evaluation_tasks();
  }
  // The CLI's --calib-streams / --calib-len / --calib-seed ranges; the context length bound needs the model
  // (SubmitJob checks it).
  if (recipe.has_calibration_samples()) {
    if (recipe.calibration_samples() < 1 || recipe.calibration_samples() > (1 << 20)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.calibration_samples: must be 1..", 1 << 20, ", got ",
                                                     recipe.calibration_samples()));
    }
    r.calibration_samples = recipe.calibration_samples();
  }
  if (recipe.has_calibration_length()) {
    if (recipe.calibration_length() < 2 || recipe.calibration_length() > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat("recipe.calibration_length: must be 2..", 1 << 24, ", got ",
                                                     recipe.calibration_length()));
    }
    r.calibration_length = recipe.calibration_length();
  }
  if (recipe.has_calibration_seed()) r.calibration_seed = recipe.calibration_seed();
  if (!r.calibration_text_uri.empty() &&
      (recipe.has_calibration_samples() || recipe.has_calibration_length() || recipe.has_calibration_seed())) {
    return absl::InvalidArgumentError(
        "recipe.calibration_text_uri: given together with calibration_samples / calibration_length / "
        "calibration_seed, which describe sampled streams; set one or the other");
  }
  return r;
}

}  // namespace qforge::rpc
