// Prints the method x bits x group table of docs/calibrated.md: every calibrated method (and RTN as the baseline)
// at 2, 3, 4 and 8 bits and each group size, through the same path `qforge quantize` takes: calibrate (on the first
// --calib-windows windows of --calib-text, or on streams sampled from the fp32 model with seed --calib-seed), the
// method's model transform (PrepareModel: AWQ's and SmoothQuant's scale folds), QuantizeModel, then the runtime
// against fp32 on the evaluation windows (the first --eval-windows windows of --eval-text, or streams sampled with
// seed 1), so no evaluated token was calibrated on (the two texts must be different files). A method that is not
// registered, or a (bits, group) it rejects, is reported as a row saying why, not skipped silently. The generated
// model (random weights, no vocabulary) is always measured on sampled streams.
//
//   method_table [--model PATH]... [--generated] [--eval-text FILE] [--eval-windows N] [--window W]
//                [--calib-text FILE] [--calib-windows N] [--streams N] [--stream-len L] [--calib-streams N]
//                [--calib-len L] [--calib-seed S] [--threads T] [--methods a,b,...] [--groups 0,32]
//   (--stories PATH is --model PATH; windows and streams are capped at the model's context)
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "bench/table_common.h"
#include "core/base/thread_pool.h"
#include "core/calib/collect.h"
#include "core/eval/eval.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"

namespace qforge {
namespace {

using bench::Die;
using bench::MakeRuntime;
constexpr char kProgram[] = "method_table";

struct Options {
  bench::TableFlags t;
  bool generated = false;
  std::vector<std::string> methods = {"rtn", "gptq", "awq", "quip", "spqr", "smoothquant"};
  std::vector<int> groups = {0, 32};
};

// The (bits, group) grid each method is measured on. SmoothQuant is W8A8 by definition; SpQR's groups are its own
// small first-level groups (the method's default), so it gets one group column.
struct Cell {
  int bits;
  int group;
};
std::vector<Cell> CellsFor(const quant::QuantMethod& m, const Options& o) {
  std::vector<Cell> cells;
  if (m.name() == "smoothquant") return {{8, m.DefaultParams().group}};
  const std::vector<int> bits = m.name() == "spqr" ? std::vector<int>{2, 3, 4} : std::vector<int>{2, 3, 4, 8};
  const std::vector<int> groups = m.name() == "spqr" ? std::vector<int>{m.DefaultParams().group} : o.groups;
  for (const int g : groups) {
    for (const int b : bits) cells.push_back({b, g});
  }
  return cells;
}

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

std::string GroupLabel(int g) { return g == 0 ? "per-channel" : absl::StrCat("g", g); }

void Table(const std::string& title, const Model& base_model, const Options& o, bool sampled_only) {
  auto base = MakeRuntime(kProgram, base_model, o.t.threads);
  const bench::TokenSource eval_source = o.t.Eval(sampled_only), calib_source = o.t.Calib(sampled_only);
  auto streams = bench::MakeWindows(eval_source, *base);
  if (!streams.ok()) Die(kProgram, "evaluation windows", streams.status());
  auto calib_streams = bench::MakeWindows(calib_source, *base);
  if (!calib_streams.ok()) Die(kProgram, "calibration windows", calib_streams.status());
  calib::CalibrationOptions co;
  co.threads = o.t.threads;
  co.include_classifier = false;
  auto stats = calib::CollectCalibration(base_model, *calib_streams, co);
  if (!stats.ok()) Die(kProgram, "calibration", stats.status());

  const ModelConfig& c = base_model.config;
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("dim %d, hidden %d, %d layers, %d heads / %d kv heads, vocab %d. Evaluation: %s. Calibration: %s.%s\n\n",
              c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
              bench::Describe(eval_source, *streams).c_str(), bench::Describe(calib_source, *calib_streams).c_str(),
              sampled_only ? bench::SampledOnlyNote(o.t).c_str() : "");
  std::printf("| method | bits | group | encodings | bits/weight (linear) | linear size (KiB) | model size (KiB) | "
              "perplexity | KL mean (nats) | top-1 agreement | quantize s | fallbacks |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  auto fp = eval::CompareModels(*base, *base, *streams);
  if (!fp.ok()) Die(kProgram, "fp32", fp.status());
  size_t fp_bytes = 0, fp_linear = 0;
  for (const auto& [tensor_name, t] : base_model.tensors) fp_bytes += t.nbytes;
  for (const std::string& n : LinearWeightNames(c)) fp_linear += base_model.Find(n)->nbytes;
  std::printf("| fp32 | 32 | - | f32 | 32.000 | %.1f | %.1f | %.4f | 0 | 100.00%% | - | - |\n", fp_linear / 1024.0,
              fp_bytes / 1024.0, fp->base.perplexity);
  std::fflush(stdout);

  ThreadPool pool(o.t.threads);
  for (const std::string& name : o.methods) {
    const quant::QuantMethod* method = quant::FindMethod(name);
    if (method == nullptr) {
      std::printf("| %s | - | - | not registered | | | | | | | | |\n", name.c_str());
      continue;
    }
    for (const Cell& cell : CellsFor(*method, o)) {
      quant::QuantParams p = method->DefaultParams();
      p.bits = cell.bits;
      p.group = cell.group;
      const std::string row = absl::StrFormat("| %s | %d | %s |", name, cell.bits, GroupLabel(cell.group));
      if (absl::Status s = method->Validate(p); !s.ok()) {
        std::printf("%s %s | | | | | | | | |\n", row.c_str(), std::string(s.message()).c_str());
        continue;
      }
      const auto t0 = std::chrono::steady_clock::now();
      Model prepared = base_model;
      calib::CalibrationStats prepared_stats = *stats;
      if (method->HasModelTransform()) {
        if (absl::Status s = method->PrepareModel(prepared, prepared_stats, p); !s.ok()) Die(kProgram, row, s);
      }
      quant::QuantRecipe recipe;
      recipe.method = name;
      recipe.params = p;
      recipe.calibration = &prepared_stats;
      auto q = quant::QuantizeModel(prepared, recipe, &pool);
      if (!q.ok()) {
        std::printf("%s %s | | | | | | | | |\n", row.c_str(), std::string(q.status().message()).c_str());
        continue;
      }
      const double qtime = Seconds(t0);
      std::vector<std::string> formats;
      int64_t outliers = 0, weights = 0;
      for (const auto& t : q->report.tensors) {
        // spqr's names carry each tensor's outlier count ("spqr3_g16_o150"): list the encoding once.
        std::string f = t.format;
        if (const size_t o = f.rfind("_o"); f.rfind("spqr", 0) == 0 && o != std::string::npos) f.resize(o);
        if (std::find(formats.begin(), formats.end(), f) == formats.end()) formats.push_back(f);
        if (auto parsed = ParseFormatName(t.format); parsed.ok()) outliers += parsed->outliers;
        weights += t.rows * t.cols;
      }
      std::string encodings = absl::StrJoin(formats, ", ");
      if (outliers > 0) {
        absl::StrAppendFormat(&encodings, " (%.2f%% fp16 outliers)",
                              100.0 * static_cast<double>(outliers) / static_cast<double>(std::max<int64_t>(weights, 1)));
      }
      const std::string fallbacks =
          q->report.fallbacks.empty()
              ? "-"
              : absl::StrFormat("%d of %d", q->report.fallbacks.size(), q->report.tensors.size());
      const double bpw = q->report.bits_per_weight;
      const size_t linear_bytes = q->report.bytes_after, model_bytes = q->report.model_bytes_after;
      auto subject = MakeRuntime(kProgram, std::move(q->model), o.t.threads);
      auto r = eval::CompareModels(*base, *subject, *streams);
      if (!r.ok()) Die(kProgram, row, r.status());
      std::printf("%s %s | %.3f | %.1f | %.1f | %.4f | %.6f | %.2f%% | %.1f | %s |\n", row.c_str(), encodings.c_str(),
                  bpw, linear_bytes / 1024.0, model_bytes / 1024.0,
                  r->quant.perplexity, r->mean_kl, 100.0 * r->top1_agreement, qtime, fallbacks.c_str());
      std::fflush(stdout);
    }
  }
  std::printf("\n");
}

int Usage(const std::string& why) {
  std::fprintf(stderr, "method_table: %s\n", why.c_str());
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
    if (a == "--generated") {
      o.generated = true;
      continue;
    }
    if (a != "--methods" && a != "--groups") return Usage("unknown argument " + a);
    if (i + 1 >= argc) return Usage(a + " needs a value");
    const std::string v = argv[++i];
    bool ok = true;
    if (a == "--methods") o.methods = absl::StrSplit(v, ',');
    else if (a == "--groups") {
      o.groups.clear();
      for (absl::string_view g : absl::StrSplit(v, ',')) {
        int n = 0;
        ok = ok && absl::SimpleAtoi(g, &n) && n >= 0;
        o.groups.push_back(n);
      }
    }
    if (!ok) return Usage("bad value for " + a);
  }
  if (absl::Status s = bench::ValidateTableFlags(o.t); !s.ok()) return Usage(std::string(s.message()));
  if (o.t.models.empty() && !o.generated) return Usage("nothing to measure: give --model PATH and/or --generated");
  for (const std::string& path : o.t.models) Table(path, bench::LoadTableModel(kProgram, path, o.t), o, false);
  if (o.generated) Table(bench::kGeneratedEvalTitle, bench::GeneratedEvalModel(), o, /*sampled_only=*/true);
  return 0;
}
