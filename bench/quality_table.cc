// Prints the quality table of docs/quality.md: for each model and quantization config, bits per weight, size,
// KL-divergence and top-1 agreement against fp32, and perplexity, all on the same evaluation windows: the first
// --eval-windows windows of --window tokens of --eval-text (tokenized by the model's own vocabulary), or without it
// token streams sampled from the fp32 model with seed 1 (tokenizer-free). The generated model (random weights, no
// vocabulary) is always measured on sampled streams, and always runs after the --model tables.
//
//   quality_table [--model PATH]... [--eval-text FILE] [--eval-windows N] [--window W] [--streams N]
//                 [--stream-len L] [--threads T]
//   (--stories PATH is --model PATH; windows and streams are capped at the model's context)
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/table_common.h"
#include "core/base/thread_pool.h"
#include "core/eval/eval.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"

namespace qforge {
namespace {

using bench::Die;
using bench::MakeRuntime;
constexpr char kProgram[] = "quality_table";

struct QuantConfig {
  const char* label;
  const char* method;  // nullptr: the fp32 model itself
  int bits = 0;
  int group = 0;
};

const QuantConfig kConfigs[] = {
    {"fp32", nullptr},
    {"Q8_0", "q8_0"},
    {"Q4_K", "q4_k"},
    {"Q4_0", "q4_0"},
    {"NF4 (b64, double quant)", "nf4"},
    {"RTN-4 g128 sym", "rtn", 4, 128},
    {"RTN-3 g64 sym", "rtn", 3, 64},
    {"RTN-2 g64 sym", "rtn", 2, 64},
};

size_t ModelBytes(const Model& m) {
  size_t b = 0;
  for (const auto& [name, t] : m.tensors) b += t.nbytes;
  return b;
}

void Table(const std::string& title, const Model& base_model, const bench::TableFlags& o, bool sampled_only) {
  auto base = MakeRuntime(kProgram, base_model, o.threads);
  const bench::TokenSource source = o.Eval(sampled_only);
  auto streams = bench::MakeWindows(source, *base);
  if (!streams.ok()) Die(kProgram, "evaluation windows", streams.status());
  const ModelConfig& c = base_model.config;
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("dim %d, hidden %d, %d layers, %d heads / %d kv heads, vocab %d; %zu f32 bytes. Evaluation: %s.%s\n\n",
              c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, ModelBytes(base_model),
              bench::Describe(source, *streams).c_str(), sampled_only ? bench::SampledOnlyNote(o).c_str() : "");
  std::printf("| config | encodings of the linear weights | bits/weight (linear) | model size | KL mean (nats) | "
              "KL max | top-1 agreement | perplexity | fallbacks |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  ThreadPool pool(o.threads);
  for (const QuantConfig& qc : kConfigs) {
    Model m = base_model;
    std::string encodings = "f32", fallbacks = "-";
    double bpw = 32.0;
    if (qc.method != nullptr) {
      quant::QuantRecipe recipe;
      recipe.method = qc.method;
      const quant::QuantMethod* method = quant::FindMethod(qc.method);
      quant::QuantParams p = method->DefaultParams();
      if (qc.bits > 0) p.bits = qc.bits;
      if (qc.group > 0) p.group = qc.group;
      recipe.params = p;
      auto q = quant::QuantizeModel(base_model, recipe, &pool);
      if (!q.ok()) Die(kProgram, qc.label, q.status());
      m = std::move(q->model);
      bpw = q->report.bits_per_weight;
      std::vector<std::string> formats;
      for (const auto& t : q->report.tensors) {
        if (std::find(formats.begin(), formats.end(), t.format) == formats.end()) formats.push_back(t.format);
      }
      encodings = absl::StrJoin(formats, ", ");
      if (!q->report.fallbacks.empty()) {
        fallbacks = absl::StrFormat("%d of %d matrices", q->report.fallbacks.size(), q->report.tensors.size());
      }
    }
    const size_t bytes = ModelBytes(m);
    auto subject = MakeRuntime(kProgram, std::move(m), o.threads);
    auto r = eval::CompareModels(*base, *subject, *streams);
    if (!r.ok()) Die(kProgram, qc.label, r.status());
    std::printf("| %s | %s | %.3f | %.1f KiB | %.6f | %.4f | %.2f%% | %.4f | %s |\n", qc.label, encodings.c_str(), bpw,
                bytes / 1024.0, r->mean_kl, r->max_kl, 100.0 * r->top1_agreement, r->quant.perplexity,
                fallbacks.c_str());
    std::fflush(stdout);
  }
}

int Usage(const std::string& why) {
  std::fprintf(stderr, "%s: %s\n", kProgram, why.c_str());
  return 2;
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  using namespace qforge;
  bench::TableFlags o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto shared = bench::ParseTableFlag(o, /*calibrates=*/false, argc, argv, i);
    if (!shared.ok()) return Usage(std::string(shared.status().message()));
    if (*shared) continue;
    if (a == "--text" || a == "--tokenizer") {
      return Usage(a + " was replaced by --eval-text FILE, tokenized by the model's own vocabulary");
    }
    return Usage("unknown argument " + a);
  }
  if (absl::Status s = bench::ValidateTableFlags(o); !s.ok()) return Usage(std::string(s.message()));
  for (const std::string& path : o.models) Table(path, bench::LoadTableModel(kProgram, path, o), o, false);
  Table(bench::kGeneratedEvalTitle, bench::GeneratedEvalModel(), o, /*sampled_only=*/true);
  return 0;
}
