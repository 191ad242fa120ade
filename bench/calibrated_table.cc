// Prints the table of docs/calibrated.md: GPTQ and AWQ next to RTN at the same bits and group, on the same models
// and evaluation windows as the quality table (docs/quality.md): the first --eval-windows windows of --eval-text, or
// token streams sampled from the fp32 model with seed 1. Calibration uses the first --calib-windows windows of
// --calib-text (never the evaluation file), or streams sampled with another seed (--calib-seed), so no evaluated
// token was calibrated on. The generated model (random weights, no vocabulary) is always measured on sampled
// streams; --no-generated skips it.
//
//   calibrated_table [--model PATH]... [--eval-text FILE] [--eval-windows N] [--window W] [--calib-text FILE]
//                    [--calib-windows N] [--streams N] [--stream-len L] [--calib-streams N] [--calib-len L]
//                    [--calib-seed S] [--threads T] [--no-generated]
//   (--stories PATH is --model PATH; windows and streams are capped at the model's context)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/table_common.h"
#include "core/base/thread_pool.h"
#include "core/calib/collect.h"
#include "core/eval/eval.h"
#include "core/quant/awq.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"

namespace qforge {
namespace {

using bench::Die;
using bench::MakeRuntime;
constexpr char kProgram[] = "calibrated_table";

struct QuantConfig {
  const char* label;
  const char* method;  // nullptr: the fp32 model itself
  int bits = 0;
  int group = 0;
  bool act_order = false;
  bool awq_scale = false;  // AwqScaleModel (search s per q/k/v and gate/up input, fold into the norms) first
};

const QuantConfig kConfigs[] = {
    {"fp32", nullptr},
    {"RTN-4 g128 sym", "rtn", 4, 128},
    {"GPTQ-4 g128 sym", "gptq", 4, 128},
    {"GPTQ-4 g128 sym act-order", "gptq", 4, 128, true},
    {"AWQ-4 g128 sym", "awq", 4, 128, false, true},
    {"AWQ-4 g128 sym scales only (rtn)", "rtn", 4, 128, false, true},
    {"AWQ-4 g128 sym clipping only", "awq", 4, 128, false, false},
    {"RTN-3 g64 sym", "rtn", 3, 64},
    {"GPTQ-3 g64 sym", "gptq", 3, 64},
    {"GPTQ-3 g64 sym act-order", "gptq", 3, 64, true},
    {"AWQ-3 g64 sym", "awq", 3, 64, false, true},
    {"AWQ-3 g64 sym scales only (rtn)", "rtn", 3, 64, false, true},
    {"AWQ-3 g64 sym clipping only", "awq", 3, 64, false, false},
    {"RTN-2 g64 sym", "rtn", 2, 64},
    {"GPTQ-2 g64 sym", "gptq", 2, 64},
    {"GPTQ-2 g64 sym act-order", "gptq", 2, 64, true},
};

struct Options {
  bench::TableFlags t;
  bool generated = true;
};

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

// How far from diagonal the Hessians are: ||offdiag(H)||_F / ||H||_F, per distinct input (q/k/v count once).
// 0 means uncorrelated input channels, where GPTQ reduces to RTN.
void PrintHessianShape(const ModelConfig& c, const calib::CalibrationStats& stats) {
  std::set<const calib::LayerStats*> done;
  std::printf("Hessian off-diagonal share ||offdiag H||_F / ||H||_F per layer input:");
  for (const std::string& name : LinearWeightNames(c)) {
    const calib::LayerStats* s = stats.at(name).get();
    if (!done.insert(s).second) continue;
    double off = 0, all = 0;
    for (int64_t i = 0; i < s->cols; ++i) {
      for (int64_t j = 0; j < s->cols; ++j) {
        const double v = s->hessian[i * s->cols + j] * s->hessian[i * s->cols + j];
        all += v;
        if (i != j) off += v;
      }
    }
    std::string shortname = name.substr(0, name.size() - std::strlen(".weight"));
    std::printf(" %s %.2f", shortname.c_str(), all > 0 ? std::sqrt(off / all) : 0.0);
  }
  std::printf("\n\n");
}

void Table(const std::string& title, const Model& base_model, const Options& o, bool sampled_only) {
  auto base = MakeRuntime(kProgram, base_model, o.t.threads);
  const bench::TokenSource eval_source = o.t.Eval(sampled_only), calib_source = o.t.Calib(sampled_only);
  auto streams = bench::MakeWindows(eval_source, *base);
  if (!streams.ok()) Die(kProgram, "evaluation windows", streams.status());
  auto t0 = std::chrono::steady_clock::now();
  auto calib_streams = bench::MakeWindows(calib_source, *base);
  if (!calib_streams.ok()) Die(kProgram, "calibration windows", calib_streams.status());
  const double t_windows = Seconds(t0);
  t0 = std::chrono::steady_clock::now();
  calib::CalibrationOptions co;
  co.threads = o.t.threads;
  co.include_classifier = false;
  auto stats = calib::CollectCalibration(base_model, *calib_streams, co);
  if (!stats.ok()) Die(kProgram, "calibration", stats.status());
  const double t_collect = Seconds(t0);

  const ModelConfig& c = base_model.config;
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("dim %d, hidden %d, %d layers, %d heads / %d kv heads, vocab %d. Evaluation: %s. Calibration: %s, "
              "%.1f s to %s, %.1f s to collect.%s\n\n",
              c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
              bench::Describe(eval_source, *streams).c_str(), bench::Describe(calib_source, *calib_streams).c_str(),
              t_windows, calib_source.text.empty() ? "sample" : "read and tokenize", t_collect,
              sampled_only ? bench::SampledOnlyNote(o.t).c_str() : "");
  PrintHessianShape(c, *stats);
  std::printf("| config | encodings | bits/weight (linear) | weight rel err | layer-output rel err (calib) | "
              "KL mean (nats) | KL max | top-1 agreement | perplexity | quantize s | fallbacks |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  ThreadPool pool(o.t.threads);
  std::vector<std::string> notes;
  for (const QuantConfig& qc : kConfigs) {
    Model m = base_model;
    std::string encodings = "f32", fallbacks = "-", weight_err = "-", out_err = "-", qtime = "-";
    double bpw = 32.0;
    if (qc.method != nullptr) {
      quant::QuantRecipe recipe;
      recipe.method = qc.method;
      quant::QuantParams p = quant::FindMethod(qc.method)->DefaultParams();
      p.bits = qc.bits;
      p.group = qc.group;
      p.act_order = qc.act_order;
      recipe.params = p;
      recipe.calibration = &*stats;  // rtn ignores it; the report then measures every row's output error
      t0 = std::chrono::steady_clock::now();
      // AWQ: scale search + fold on a copy of the fp32 model; the quantizer then sees the folded weights and the
      // statistics of the folded inputs (so the output error stays that of the original layer).
      Model folded = base_model;
      calib::CalibrationStats folded_stats = *stats;
      if (qc.awq_scale) {
        quant::AwqOptions ao;
        ao.bits = qc.bits;
        ao.group = qc.group;
        ao.symmetric = p.symmetric;
        std::vector<std::pair<double, double>> alphas;
        if (absl::Status s = quant::AwqScaleModel(folded, folded_stats, ao, &alphas); !s.ok()) Die(kProgram, qc.label, s);
        recipe.calibration = &folded_stats;
        std::string note = absl::StrFormat("%s: alpha (attn, ffn) per block:", qc.label);
        for (const auto& [a, b] : alphas) note += absl::StrFormat(" (%.2f, %.2f)", a, b);
        if (std::strcmp(qc.method, "awq") == 0) notes.push_back(note);  // the scales-only rows choose the same α
      }
      auto q = quant::QuantizeModel(qc.awq_scale ? folded : base_model, recipe, &pool);
      if (!q.ok()) Die(kProgram, qc.label, q.status());
      qtime = absl::StrFormat("%.1f", Seconds(t0));
      m = std::move(q->model);
      bpw = q->report.bits_per_weight;
      std::vector<std::string> formats;
      // Mean over matrices of the relative layer-output error ||(W - Ŵ)X|| / ||WX||.
      double sum_out = 0;
      int counted = 0;
      for (const auto& t : q->report.tensors) {
        if (std::find(formats.begin(), formats.end(), t.format) == formats.end()) formats.push_back(t.format);
        if (t.output_rel_error >= 0) {
          sum_out += t.output_rel_error;
          ++counted;
        }
      }
      encodings = absl::StrJoin(formats, ", ");
      weight_err = absl::StrFormat("%.4f", q->report.rel_error);
      if (counted > 0) out_err = absl::StrFormat("%.4f", sum_out / counted);
      if (!q->report.fallbacks.empty()) {
        fallbacks = absl::StrFormat("%d of %d matrices", q->report.fallbacks.size(), q->report.tensors.size());
      }
    }
    auto subject = MakeRuntime(kProgram, std::move(m), o.t.threads);
    auto r = eval::CompareModels(*base, *subject, *streams);
    if (!r.ok()) Die(kProgram, qc.label, r.status());
    std::printf("| %s | %s | %.3f | %s | %s | %.6f | %.4f | %.2f%% | %.4f | %s | %s |\n", qc.label, encodings.c_str(),
                bpw, weight_err.c_str(), out_err.c_str(), r->mean_kl, r->max_kl, 100.0 * r->top1_agreement,
                r->quant.perplexity, qtime.c_str(), fallbacks.c_str());
    std::fflush(stdout);
  }
  std::printf("\n");
  for (const std::string& n : notes) std::printf("%s\n\n", n.c_str());
}

int Usage(const std::string& why) {
  std::fprintf(stderr, "%s: %s\n", kProgram, why.c_str());
  return 2;
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  using namespace qforge;
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto shared = bench::ParseTableFlag(o.t, /*calibrates=*/true, argc, argv, i);
    if (!shared.ok()) return Usage(std::string(shared.status().message()));
    if (*shared) continue;
    if (a == "--no-generated") o.generated = false;
    else return Usage("unknown argument " + a);
  }
  if (absl::Status s = bench::ValidateTableFlags(o.t); !s.ok()) return Usage(std::string(s.message()));
  for (const std::string& path : o.t.models) Table(path, bench::LoadTableModel(kProgram, path, o.t), o, false);
  if (o.generated) Table(bench::kGeneratedEvalTitle, bench::GeneratedEvalModel(), o, /*sampled_only=*/true);
  return 0;
}
