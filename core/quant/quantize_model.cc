#include "core/quant/quantize_model.h"

#include <fnmatch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/string_view.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/base/large_buffer.h"
#include "core/base/status_macros.h"
#include "core/kernels/kernels.h"
#include "core/quant/gptq.h"

namespace qforge::quant {
namespace {

// A tensor's values as fp32: the tensor's own memory when it is f32 (and float-aligned), a decoded copy otherwise.
struct F32Values {
  std::vector<float> decoded;
  const float* data = nullptr;
};

absl::StatusOr<F32Values> ToF32(const Tensor& t) {
  F32Values v;
  if (t.format.type == WeightType::kF32 && reinterpret_cast<uintptr_t>(t.data) % alignof(float) == 0) {
    v.data = reinterpret_cast<const float*>(t.data);
    return v;
  }
  v.decoded = LargeZeroedVector<float>(static_cast<size_t>(t.rows() * t.cols()));
  QF_RETURN_IF_ERROR(kernels::DequantizeRows(t, 0, t.rows(), v.decoded.data()));
  v.data = v.decoded.data();
  return v;
}

struct ErrorSums {
  double err2 = 0, ref2 = 0;
};

// Squared reconstruction error, per row then summed in row order so the result is thread-count independent.
absl::StatusOr<ErrorSums> ReconstructionError(const Tensor& q, const float* ref, ThreadPool* pool) {
  const int64_t rows = q.rows(), cols = q.cols();
  std::vector<double> err(static_cast<size_t>(rows)), norm(static_cast<size_t>(rows));
  std::vector<absl::Status> status(static_cast<size_t>(rows));
  // kQuip decodes every row for any row range (its rows are mixed): decode it once, not once per row.
  std::vector<float> all;
  if (q.format.type == WeightType::kQuip) {
    all.resize(static_cast<size_t>(rows * cols));
    QF_RETURN_IF_ERROR(kernels::DequantizeRows(q, 0, rows, all.data()));
  }
  // Rows are decoded a panel at a time (one DequantizeRows call per panel, not per row).
  constexpr int64_t kPanel = 16;
  ParallelForOrInline(pool, rows, kPanel, [&](int64_t r0, int64_t r1) {
    std::vector<float> panel(static_cast<size_t>(kPanel * cols));
    for (int64_t p0 = r0; p0 < r1; p0 += kPanel) {
      const int64_t p1 = std::min(r1, p0 + kPanel);
      if (all.empty()) {
        status[p0] = kernels::DequantizeRows(q, p0, p1, panel.data());
        if (!status[p0].ok()) return;
      } else {
        std::copy_n(&all[p0 * cols], (p1 - p0) * cols, panel.data());
      }
      for (int64_t r = p0; r < p1; ++r) {
        kernels::RowErrorSums(ref + r * cols, panel.data() + (r - p0) * cols, cols, &err[r], &norm[r]);
      }
    }
  });
  ErrorSums s;
  for (int64_t r = 0; r < rows; ++r) {
    QF_RETURN_IF_ERROR(status[r]);
    s.err2 += err[r];
    s.ref2 += norm[r];
  }
  return s;
}

std::string KnownMethods() {
  std::vector<std::string> known;
  for (const QuantMethod* m : ListMethods()) known.push_back(m->name());
  return absl::StrJoin(known, ", ");
}

}  // namespace

int MatchLayerRule(const std::vector<LayerRule>& rules, std::string_view tensor_name) {
  const std::string n(tensor_name);
  for (size_t i = 0; i < rules.size(); ++i) {
    if (fnmatch(rules[i].pattern.c_str(), n.c_str(), 0) == 0) return static_cast<int>(i);
  }
  return -1;
}

std::string LayerRulesToString(const std::vector<LayerRule>& rules) {
  std::vector<std::string> parts;
  for (const LayerRule& r : rules) {
    std::string s = absl::StrCat(r.pattern, "=", r.method);
    if (r.params) {
      const QuantParams& p = *r.params;
      absl::StrAppend(&s, ":bits=", p.bits, ",group=", p.group, p.symmetric ? ",sym" : ",asym",
                      p.double_quant ? ",dq" : ",no-dq");
      if (p.act_order) absl::StrAppend(&s, ",act-order");
      if (p.static_groups) absl::StrAppend(&s, ",static-groups");
      if (p.damp != QuantParams{}.damp) absl::StrAppend(&s, ",damp=", p.damp);
      if (p.alpha != QuantParams{}.alpha) absl::StrAppend(&s, ",alpha=", p.alpha);
      if (p.outlier_threshold != QuantParams{}.outlier_threshold) absl::StrAppend(&s, ",outlier=", p.outlier_threshold);
      if (p.seed != QuantParams{}.seed) absl::StrAppend(&s, ",seed=", p.seed);
    }
    parts.push_back(std::move(s));
  }
  return absl::StrJoin(parts, ";");
}

absl::StatusOr<std::vector<LayerRule>> ParseLayerRules(const std::string& text) {
  std::vector<LayerRule> rules;
  int i = 0;
  for (absl::string_view part : absl::StrSplit(absl::string_view(text), ';', absl::SkipWhitespace())) {
    const std::string field = absl::StrCat("rules[", i++, "]");
    part = absl::StripAsciiWhitespace(part);
    // The pattern ends at the first '=' (tensor names never contain one); the method at the first ':'.
    const size_t eq = part.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(absl::StrCat(field, ": '", part, "' is not GLOB=METHOD[:params]"));
    }
    LayerRule r;
    r.pattern = std::string(part.substr(0, eq));
    absl::string_view rest = part.substr(eq + 1);
    const size_t colon = rest.find(':');
    r.method = std::string(absl::StripAsciiWhitespace(rest.substr(0, colon)));
    const QuantMethod* m = FindMethod(r.method);
    if (m == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".method: unknown method '", r.method, "' (known: ", KnownMethods(), ")"));
    }
    if (colon != absl::string_view::npos) {
      QuantParams p = m->DefaultParams();
      for (absl::string_view kv : absl::StrSplit(rest.substr(colon + 1), ',', absl::SkipWhitespace())) {
        kv = absl::StripAsciiWhitespace(kv);
        const size_t e = kv.find('=');
        const absl::string_view key = kv.substr(0, e);
        const absl::string_view value = e == absl::string_view::npos ? absl::string_view() : kv.substr(e + 1);
        bool ok = true;
        if (key == "bits" && !value.empty()) {
          ok = absl::SimpleAtoi(value, &p.bits);
        } else if (key == "group" && !value.empty()) {
          ok = absl::SimpleAtoi(value, &p.group);
        } else if (key == "damp" && !value.empty()) {
          ok = absl::SimpleAtof(value, &p.damp);
        } else if (key == "alpha" && !value.empty()) {
          ok = absl::SimpleAtof(value, &p.alpha);
        } else if (key == "outlier" && !value.empty()) {
          ok = absl::SimpleAtof(value, &p.outlier_threshold);
        } else if (key == "seed" && !value.empty()) {
          ok = absl::SimpleAtoi(value, &p.seed);
        } else if (e == absl::string_view::npos && key == "sym") {
          p.symmetric = true;
        } else if (e == absl::string_view::npos && key == "asym") {
          p.symmetric = false;
        } else if (e == absl::string_view::npos && key == "dq") {
          p.double_quant = true;
        } else if (e == absl::string_view::npos && key == "no-dq") {
          p.double_quant = false;
        } else if (e == absl::string_view::npos && key == "act-order") {
          p.act_order = true;
        } else if (e == absl::string_view::npos && key == "static-groups") {
          p.static_groups = true;
        } else {
          return absl::InvalidArgumentError(absl::StrCat(
              field, ".params: unknown '", kv, "' (bits=B, group=G, damp=D, alpha=A, outlier=T, seed=S, sym, asym, dq, no-dq, act-order, "
              "static-groups)"));
        }
        if (!ok) return absl::InvalidArgumentError(absl::StrCat(field, ".params: bad number in '", kv, "'"));
      }
      r.params = p;
    }
    rules.push_back(std::move(r));
  }
  return rules;
}

absl::Status PrepareBlock(const QuantMethod& method, Model& model, int layer, calib::CalibrationStats& stats,
                          const QuantParams& params) {
  if (layer < 0 || layer >= model.config.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("PrepareBlock: block ", layer, " outside [0, ", model.config.n_layers, ")"));
  }
  // The block as a one-block model (blk.<layer>.* named blk.0.*), so the whole-model transform sees only it.
  const std::string prefix = absl::StrCat("blk.", layer, "."), as_first = "blk.0.";
  Model block;
  block.config = model.config;
  block.config.n_layers = 1;
  calib::CalibrationStats block_stats;
  for (const auto& [name, t] : model.tensors) {
    if (!absl::StartsWith(name, prefix)) continue;
    Tensor renamed = t;
    renamed.name = as_first + name.substr(prefix.size());
    block.tensors.emplace(renamed.name, std::move(renamed));
  }
  for (const auto& [name, s] : stats) {
    if (absl::StartsWith(name, prefix)) block_stats[as_first + name.substr(prefix.size())] = s;
  }
  QF_RETURN_IF_ERROR(method.PrepareModel(block, block_stats, params));
  for (auto& [name, t] : block.tensors) {
    if (!absl::StartsWith(name, as_first)) {
      return absl::InternalError(absl::StrCat(method.name(), ": the block transform added ", name));
    }
    const std::string real = prefix + name.substr(as_first.size());
    t.name = real;
    model.tensors.insert_or_assign(real, std::move(t));
  }
  for (auto& [name, s] : block_stats) {
    if (absl::StartsWith(name, as_first)) stats[prefix + name.substr(as_first.size())] = s;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::pair<const QuantMethod*, QuantParams>>> ModelTransformOf(
    const std::string& method, const std::optional<QuantParams>& params, const std::vector<LayerRule>& layers,
    const std::string& default_field, const std::string& layers_field) {
  std::optional<std::pair<const QuantMethod*, QuantParams>> found;
  for (size_t i = 0; i <= layers.size(); ++i) {
    const std::string& name = i == 0 ? method : layers[i - 1].method;
    const QuantMethod* m = FindMethod(name);
    if (m == nullptr || !m->HasModelTransform()) continue;
    const std::optional<QuantParams>& given = i == 0 ? params : layers[i - 1].params;
    const QuantParams p = given.value_or(m->DefaultParams());
    if (!found) {
      found.emplace(m, p);
    } else if (found->first != m || !(found->second == p)) {
      return absl::InvalidArgumentError(absl::StrCat(
          i == 0 ? default_field : absl::StrCat(layers_field, "[", i - 1, "]"), ".method: ", name, " (",
          ParamsToString(p), ") is a second model transform; a job runs one (", found->first->name(), " ",
          ParamsToString(found->second), ")"));
    }
  }
  return found;
}

absl::StatusOr<Tensor> QuantizeTensor(const Tensor& in, const QuantMethod& method, const QuantParams& params,
                                      ThreadPool* pool, TensorQuantReport* report, const calib::LayerStats* calib) {
  if (in.shape.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", in.name, "' is not a matrix"));
  }
  QF_RETURN_IF_ERROR(method.Validate(params));
  const int64_t rows = in.rows(), cols = in.cols();
  // Walk the fallback chain until a method accepts this shape.
  const QuantMethod* m = &method;
  QuantParams p = params;
  std::string reason;
  absl::StatusOr<WeightFormat> format = m->OutputFormat(p, rows, cols);
  for (int hops = 0; !format.ok(); ++hops) {
    if (reason.empty()) reason = std::string(format.status().message());
    auto next = m->Fallback(p);
    if (!next || hops > 8) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", in.name, "': ", format.status().message(),
                                                     " and no fallback fits"));
    }
    m = FindMethod(next->first);
    if (m == nullptr) return absl::InternalError(absl::StrCat("fallback method '", next->first, "' not registered"));
    p = next->second;
    format = m->OutputFormat(p, rows, cols);
  }
  QF_ASSIGN_OR_RETURN(const F32Values values, ToF32(in));
  const float* w = values.data;
  QF_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, m->Quantize(w, rows, cols, p, pool, calib));
  // The planned format may lack what only the data decides (spqr's outlier count).
  QF_ASSIGN_OR_RETURN(format, m->EncodedFormat(p, rows, cols, bytes));
  Tensor out = Tensor::FromBytes(in.name, in.shape, *format, std::move(bytes));
  QF_RETURN_IF_ERROR(ValidateTensor(out));
  if (report != nullptr) {
    QF_ASSIGN_OR_RETURN(const ErrorSums e, ReconstructionError(out, w, pool));
    const double n = static_cast<double>(rows * cols);
    report->name = in.name;
    report->rows = rows;
    report->cols = cols;
    report->method = m->name();
    report->format = FormatName(*format);
    report->fell_back = m != &method || !(p == params);
    report->fallback_reason = report->fell_back ? reason : "";
    report->bytes_f32 = static_cast<size_t>(n) * 4;
    report->bytes_f16 = static_cast<size_t>(n) * 2;
    report->bytes_after = out.nbytes;
    report->bits_per_weight = 8.0 * static_cast<double>(out.nbytes) / n;
    report->rmse = std::sqrt(e.err2 / n);
    report->rel_error = e.ref2 > 0 ? std::sqrt(e.err2 / e.ref2) : 0.0;
    report->output_rel_error = -1;
    if (calib != nullptr && m->NeedsCalibration()) {
      report->calib_tokens = calib->tokens;
      report->calib_pooled_tokens = calib->pooled_tokens;
    }
    if (calib != nullptr && calib->cols == cols && calib->tokens > 0 && !calib->hessian.empty()) {
      std::vector<float> w_hat(static_cast<size_t>(rows * cols));
      QF_RETURN_IF_ERROR(kernels::DequantizeRows(out, 0, rows, w_hat.data()));
      double oe = 0, on = 0;
      LayerOutputError(w, w_hat.data(), rows, cols, calib->hessian.data(), &oe, &on);
      report->output_rel_error = on > 0 ? std::sqrt(std::max(0.0, oe) / on) : 0.0;
    }
  }
  return out;
}

absl::StatusOr<QuantizeResult> QuantizeModel(const Model& in, const QuantRecipe& recipe, ThreadPool* pool) {
  const QuantMethod* method = FindMethod(recipe.method);
  if (method == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("unknown quantization method '", recipe.method,
                                                   "' (known: ", KnownMethods(), ")"));
  }
  const QuantParams params = recipe.params.value_or(method->DefaultParams());
  QF_RETURN_IF_ERROR(method->Validate(params));
  // Every rule is checked before any tensor is touched, so a bad rule that matches nothing is still an error.
  struct Resolved {
    const QuantMethod* method;
    QuantParams params;
  };
  std::vector<Resolved> rules;
  for (size_t i = 0; i < recipe.layers.size(); ++i) {
    const LayerRule& r = recipe.layers[i];
    const std::string field = absl::StrCat("layers[", i, "]");
    if (r.pattern.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ".pattern: empty"));
    const QuantMethod* m = FindMethod(r.method);
    if (m == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".method: unknown method '", r.method, "' (known: ", KnownMethods(), ")"));
    }
    const QuantParams p = r.params.value_or(m->DefaultParams());
    if (absl::Status s = m->Validate(p); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".params: ", s.message()));
    }
    rules.push_back({m, p});
  }

  std::vector<std::string> targets = LinearWeightNames(in.config);
  if (recipe.quantize_embeddings) {
    targets.push_back(names::kTokenEmbd);
    if (in.Find(names::kOutput) != nullptr) targets.push_back(names::kOutput);
  }
  if (recipe.only_block) {
    const std::string prefix = absl::StrCat("blk.", *recipe.only_block, ".");
    std::erase_if(targets, [&](const std::string& name) { return !absl::StartsWith(name, prefix); });
  }

  QuantizeResult result;
  result.model.config = in.config;
  result.model.vocab = in.vocab;
  result.model.metadata = in.metadata;
  result.model.tensors = in.tensors;  // shares the bytes of everything left as is
  QuantReport& rep = result.report;
  rep.method = recipe.method;
  rep.params = params;
  double err2 = 0, ref2 = 0;
  for (const std::string& name : targets) {
    QF_ASSIGN_OR_RETURN(const Tensor* t, in.Get(name));
    const calib::LayerStats* stats = nullptr;
    if (recipe.calibration != nullptr) {
      auto it = recipe.calibration->find(name);
      if (it != recipe.calibration->end()) stats = it->second.get();
    }
    const int rule = MatchLayerRule(recipe.layers, name);
    const QuantMethod* m = rule < 0 ? method : rules[static_cast<size_t>(rule)].method;
    const QuantParams& p = rule < 0 ? params : rules[static_cast<size_t>(rule)].params;
    if (stats == nullptr && m->NeedsCalibration()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "method '", m->name(), "' needs calibration statistics and there are none for '", name, "'"));
    }
    TensorQuantReport tr;
    QF_ASSIGN_OR_RETURN(Tensor q, QuantizeTensor(*t, *m, p, pool, &tr, stats));
    tr.rule = rule;
    result.model.tensors[name] = std::move(q);
    const double n = static_cast<double>(tr.rows * tr.cols);
    err2 += tr.rmse * tr.rmse * n;
    ref2 += tr.rel_error > 0 ? tr.rmse * tr.rmse * n / (tr.rel_error * tr.rel_error) : 0;
    rep.weights += tr.rows * tr.cols;
    rep.bytes_f32 += tr.bytes_f32;
    rep.bytes_f16 += tr.bytes_f16;
    rep.bytes_after += tr.bytes_after;
    if (tr.fell_back) rep.fallbacks.push_back(name);
    rep.tensors.push_back(std::move(tr));
  }
  if (rep.weights > 0) {
    rep.bits_per_weight = 8.0 * static_cast<double>(rep.bytes_after) / static_cast<double>(rep.weights);
    rep.rmse = std::sqrt(err2 / static_cast<double>(rep.weights));
    rep.rel_error = ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0;
  }
  for (const auto& [name, t] : in.tensors) rep.model_bytes_before += t.nbytes;
  for (const auto& [name, t] : result.model.tensors) rep.model_bytes_after += t.nbytes;

  auto& md = result.model.metadata;
  md["quant.method"] = recipe.method;
  md["quant.params"] = ParamsToString(params);
  md["quant.quantize_embeddings"] = recipe.quantize_embeddings ? "true" : "false";
  md["quant.fallbacks"] = absl::StrJoin(rep.fallbacks, ",");
  if (!recipe.layers.empty()) md["quant.layers"] = LayerRulesToString(recipe.layers);
  QF_RETURN_IF_ERROR(ValidateModel(result.model));
  return result;
}

std::string FormatReport(const QuantReport& r) {
  std::string s = absl::StrCat("method ", r.method, " (", ParamsToString(r.params), ")\n");
  absl::StrAppendFormat(&s, "%-28s %-12s %-16s %8s %12s %12s %12s %11s %10s\n", "tensor", "shape", "format", "bits/w",
                        "f32 bytes", "f16 bytes", "bytes", "rmse", "rel err");
  for (const TensorQuantReport& t : r.tensors) {
    absl::StrAppendFormat(&s, "%-28s %-12s %-16s %8.4f %12d %12d %12d %11.4e %10.4e%s\n", t.name,
                          absl::StrCat(t.rows, "x", t.cols), t.format, t.bits_per_weight, t.bytes_f32, t.bytes_f16,
                          t.bytes_after, t.rmse, t.rel_error,
                          t.fell_back ? "  (fallback)" : (t.rule >= 0 ? absl::StrCat("  (", t.method, ")") : ""));
  }
  absl::StrAppendFormat(&s, "%-28s %-12s %-16s %8.4f %12d %12d %12d %11.4e %10.4e\n", "total", "", "",
                        r.bits_per_weight, r.bytes_f32, r.bytes_f16, r.bytes_after, r.rmse, r.rel_error);
  absl::StrAppendFormat(&s, "model bytes %d -> %d\n", r.model_bytes_before, r.model_bytes_after);
  for (const TensorQuantReport& t : r.tensors) {
    if (t.fell_back) absl::StrAppend(&s, "fallback: ", t.name, " -> ", t.format, ": ", t.fallback_reason, "\n");
  }
  for (const TensorQuantReport& t : r.tensors) {
    if (t.calib_tokens > 0 && t.calib_pooled_tokens == t.calib_tokens) {
      absl::StrAppend(&s, "pooled calibration: ", t.name, ": no token was routed to it; its statistics are the ",
                      "layer's experts' pool\n");
    } else if (t.calib_pooled_tokens > 0) {
      absl::StrAppend(&s, "pooled calibration: ", t.name, ": ", t.calib_tokens - t.calib_pooled_tokens, " of ",
                      t.calib_tokens, " tokens routed to it, the rest from the layer's experts' pool\n");
    }
  }
  return s;
}

}  // namespace qforge::quant
