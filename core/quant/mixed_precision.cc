#include "core/quant/mixed_precision.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/status_macros.h"

namespace qforge::quant {
namespace {

// DP grid cells over the extra-bytes budget. With the gcd of the candidates' byte differences as the unit the
// DP is exact; only when that would need more cells are costs rounded up to a coarser unit (still never over
// budget, since capacity is rounded down). 2^15 cells keep a 7B model (224 matrices x 8 candidates) at ~60M steps.
constexpr int64_t kMaxCells = int64_t{1} << 15;

// An exact-name glob: fnmatch treats '\\' as an escape, so metacharacters in a name match only themselves.
std::string ExactPattern(const std::string& name) {
  std::string s;
  for (char c : name) {
    if (c == '*' || c == '?' || c == '[' || c == '\\') s.push_back('\\');
    s.push_back(c);
  }
  return s;
}

}  // namespace

std::vector<PrecisionCandidate> DefaultPrecisionCandidates() {
  // Sorted by cost. Small groups at low bit widths (the scale is worth more when there are few levels), g128 at
  // 4+ bits where an f16 per 64 costs more than it buys; q4_k for its per-32 mins (falls back to q4_0 when a row
  // is not a multiple of 256); 8-bit g128 instead of q8_0 (same error class, 8.125 vs 8.5 bits/weight).
  return {
      {"rtn", QuantParams{.bits = 2, .group = 64}}, {"rtn", QuantParams{.bits = 3, .group = 64}},
      {"rtn", QuantParams{.bits = 4, .group = 128}}, {"rtn", QuantParams{.bits = 4, .group = 64}},
      {"q4_k", FindMethod("q4_k")->DefaultParams()}, {"rtn", QuantParams{.bits = 5, .group = 64}},
      {"rtn", QuantParams{.bits = 6, .group = 128}}, {"rtn", QuantParams{.bits = 8, .group = 128}},
  };
}

absl::StatusOr<MixedPrecisionPlan> PlanMixedPrecisionDetailed(const Model& model, const MixedPrecisionOptions& o) {
  MixedPrecisionPlan plan;
  plan.candidates = o.candidates.empty() ? DefaultPrecisionCandidates() : o.candidates;
  const std::vector<PrecisionCandidate>& cands = plan.candidates;
  if (cands.size() > 255) return absl::InvalidArgumentError("candidates: at most 255");
  std::vector<const QuantMethod*> methods;
  for (size_t k = 0; k < cands.size(); ++k) {
    const QuantMethod* m = FindMethod(cands[k].method);
    if (m == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("candidates[", k, "].method: unknown method '", cands[k].method, "'"));
    }
    if (absl::Status s = m->Validate(cands[k].params); !s.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("candidates[", k, "].params: ", s.message()));
    }
    methods.push_back(m);
  }
  if (!(o.target_bpw > 0) || !std::isfinite(o.target_bpw)) {
    return absl::InvalidArgumentError(absl::StrCat("target_bpw: must be a positive number, got ", o.target_bpw));
  }

  std::vector<std::string> targets = LinearWeightNames(model.config);
  if (o.quantize_embeddings) {
    targets.push_back(names::kTokenEmbd);
    if (model.Find(names::kOutput) != nullptr) targets.push_back(names::kOutput);
  }
  const size_t T = targets.size(), K = cands.size();
  constexpr size_t kNone = std::numeric_limits<size_t>::max();
  std::vector<std::vector<size_t>> bytes(T, std::vector<size_t>(K, kNone));
  std::vector<std::vector<double>> loss(T, std::vector<double>(K, 0.0));
  std::vector<std::vector<std::string>> format(T, std::vector<std::string>(K));

  // Sensitivity: each candidate applied for real (fallbacks included), so bytes and errors are what
  // QuantizeModel will produce for the emitted rule.
  for (size_t t = 0; t < T; ++t) {
    QF_ASSIGN_OR_RETURN(const Tensor* w, model.Get(targets[t]));
    const calib::LayerStats* stats = nullptr;
    if (o.calibration != nullptr) {
      auto it = o.calibration->find(targets[t]);
      if (it != o.calibration->end()) stats = it->second.get();
    }
    for (size_t k = 0; k < K; ++k) {
      if (stats == nullptr && methods[k]->NeedsCalibration()) {
        return absl::FailedPreconditionError(absl::StrCat("candidates[", k, "]: method '", cands[k].method,
                                                          "' needs calibration statistics and there are none for '",
                                                          targets[t], "'"));
      }
      TensorQuantReport tr;
      absl::StatusOr<Tensor> q = QuantizeTensor(*w, *methods[k], cands[k].params, o.pool, &tr, stats);
      if (!q.ok()) {
        if (absl::IsInvalidArgument(q.status())) continue;  // no format in the chain fits this shape
        return q.status();
      }
      const double e = tr.output_rel_error >= 0 ? tr.output_rel_error : tr.rel_error;
      bytes[t][k] = tr.bytes_after;
      loss[t][k] = static_cast<double>(tr.rows * tr.cols) * e * e;
      format[t][k] = tr.format;
    }
    if (std::all_of(bytes[t].begin(), bytes[t].end(), [](size_t b) { return b == kNone; })) {
      return absl::InvalidArgumentError(absl::StrCat("no candidate fits tensor '", targets[t], "'"));
    }
    plan.weights += w->rows() * w->cols();
  }

  // Budget in bytes, and the part of it above the cheapest choice of every tensor.
  const auto budget = static_cast<size_t>(std::floor(o.target_bpw * static_cast<double>(plan.weights) / 8.0));
  std::vector<size_t> min_bytes(T, kNone), max_bytes(T, 0);
  size_t base = 0, extra_max = 0;
  for (size_t t = 0; t < T; ++t) {
    for (size_t k = 0; k < K; ++k) {
      if (bytes[t][k] == kNone) continue;
      min_bytes[t] = std::min(min_bytes[t], bytes[t][k]);
      max_bytes[t] = std::max(max_bytes[t], bytes[t][k]);
    }
    base += min_bytes[t];
    extra_max += max_bytes[t] - min_bytes[t];
  }
  if (base > budget) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "target_bpw %.4g is below the cheapest candidates' %.4f bits/weight", o.target_bpw,
        8.0 * static_cast<double>(base) / static_cast<double>(plan.weights)));
  }
  const size_t extra_budget = std::min(budget - base, extra_max);

  // Multiple-choice knapsack by DP over the extra bytes (exact when the gcd unit fits kMaxCells).
  size_t unit = 0;
  for (size_t t = 0; t < T; ++t) {
    for (size_t k = 0; k < K; ++k) {
      if (bytes[t][k] != kNone) unit = std::gcd(unit, bytes[t][k] - min_bytes[t]);
    }
  }
  if (unit == 0) unit = 1;
  if (extra_max / unit > static_cast<size_t>(kMaxCells)) unit = (extra_max + kMaxCells - 1) / kMaxCells;
  const size_t cells = extra_budget / unit;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  std::vector<double> dp(cells + 1, 0.0), next(cells + 1);
  std::vector<std::vector<uint8_t>> choice(T, std::vector<uint8_t>(cells + 1, 0));
  for (size_t t = 0; t < T; ++t) {
    std::fill(next.begin(), next.end(), kInf);
    for (size_t k = 0; k < K; ++k) {
      if (bytes[t][k] == kNone) continue;
      const size_t cost = (bytes[t][k] - min_bytes[t] + unit - 1) / unit;
      for (size_t c = cost; c <= cells; ++c) {
        const double v = dp[c - cost] + loss[t][k];
        if (v < next[c]) {
          next[c] = v;
          choice[t][c] = static_cast<uint8_t>(k);
        }
      }
    }
    dp.swap(next);
  }
  std::vector<size_t> pick(T);
  size_t c = cells;
  for (size_t t = T; t-- > 0;) {
    pick[t] = choice[t][c];
    c -= (bytes[t][pick[t]] - min_bytes[t] + unit - 1) / unit;
  }
  size_t used = 0;
  for (size_t t = 0; t < T; ++t) used += bytes[t][pick[t]];

  // With a rounded unit the grid hides some slack: spend it greedily on the best loss drop per extra byte.
  // (On the exact grid this finds nothing: the DP is already optimal for the whole budget.)
  for (;;) {
    double best_gain = 0;
    size_t bt = kNone, bk = 0;
    for (size_t t = 0; t < T; ++t) {
      for (size_t k = 0; k < K; ++k) {
        if (bytes[t][k] == kNone || loss[t][k] >= loss[t][pick[t]]) continue;
        const size_t now = bytes[t][pick[t]];
        if (bytes[t][k] > now && used + (bytes[t][k] - now) > budget) continue;
        const double gain =
            (loss[t][pick[t]] - loss[t][k]) / static_cast<double>(std::max<size_t>(1, bytes[t][k] > now ? bytes[t][k] - now : 0));
        if (gain > best_gain) {
          best_gain = gain;
          bt = t;
          bk = k;
        }
      }
    }
    if (bt == kNone) break;
    used = used - bytes[bt][pick[bt]] + bytes[bt][bk];
    pick[bt] = bk;
  }

  for (size_t t = 0; t < T; ++t) {
    const size_t k = pick[t];
    plan.rules.push_back({ExactPattern(targets[t]), cands[k].method, cands[k].params});
    TensorPrecisionChoice ch;
    ch.name = targets[t];
    ch.candidate = static_cast<int>(k);
    ch.format = format[t][k];
    ch.bytes = bytes[t][k];
    ch.loss = loss[t][k];
    QF_ASSIGN_OR_RETURN(const Tensor* w, model.Get(targets[t]));
    ch.weights = w->rows() * w->cols();
    plan.bytes += ch.bytes;
    plan.loss += ch.loss;
    plan.tensors.push_back(std::move(ch));
  }
  plan.bits_per_weight = 8.0 * static_cast<double>(plan.bytes) / static_cast<double>(plan.weights);
  return plan;
}

absl::StatusOr<std::vector<LayerRule>> PlanMixedPrecision(const Model& model, const MixedPrecisionOptions& o) {
  QF_ASSIGN_OR_RETURN(MixedPrecisionPlan plan, PlanMixedPrecisionDetailed(model, o));
  return std::move(plan.rules);
}

}  // namespace qforge::quant
