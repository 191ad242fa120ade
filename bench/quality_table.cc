// Prints the quality table of docs/quality.md: for each model and quantization config, bits per weight,
// size, KL-divergence and top-1 agreement against fp32, and perplexity, all on token streams sampled from
// the fp32 model with fixed seeds (tokenizer-free), plus perplexity on a text file when one is given.
//
//   quality_table [--stories PATH] [--text FILE --tokenizer TOK] [--streams N] [--stream-len L] [--threads T]
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "bench/table_common.h"
#include "core/base/mapped_file.h"
#include "core/base/thread_pool.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/quant/quantize_model.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"

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

struct Options {
  std::string stories;
  std::string text, tokenizer;
  int streams = 16;
  int stream_len = 256;
  int threads = 0;
};

size_t ModelBytes(const Model& m) {
  size_t b = 0;
  for (const auto& [name, t] : m.tensors) b += t.nbytes;
  return b;
}

void Table(const std::string& title, const Model& base_model, const Options& o) {
  auto base = MakeRuntime(kProgram, base_model, o.threads);
  const int len = std::min(o.stream_len, base->max_seq_len());
  auto streams = eval::SampleStreams(*base, o.streams, len, /*seed=*/1);
  if (!streams.ok()) Die(kProgram, "sampling", streams.status());
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<int> text_tokens;
  if (!o.text.empty()) {
    auto tok = LoadTokenizer(o.tokenizer, base_model.config.vocab_size);
    if (!tok.ok()) Die(kProgram, "tokenizer", tok.status());
    tokenizer = std::move(*tok);
    auto text = ReadFileToString(o.text);
    if (!text.ok()) Die(kProgram, "text", text.status());
    auto ids = tokenizer->Encode(*text, /*add_bos=*/true);
    if (!ids.ok()) Die(kProgram, "tokenize", ids.status());
    text_tokens = std::move(*ids);
  }
  const ModelConfig& c = base_model.config;
  std::printf("\n### %s\n\n", title.c_str());
  std::printf("dim %d, hidden %d, %d layers, %d heads / %d kv heads, vocab %d; %zu f32 bytes. "
              "Evaluation: %d streams x %d tokens sampled from fp32 (seed 1, T=1)%s.\n\n",
              c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, ModelBytes(base_model),
              o.streams, len, o.text.empty() ? "" : absl::StrFormat("; text: %s", o.text).c_str());
  std::printf("| config | encodings of the linear weights | bits/weight (linear) | model size | KL mean (nats) | "
              "KL max | top-1 agreement | perplexity (streams) |%s fallbacks |\n",
              o.text.empty() ? "" : " perplexity (text) |");
  std::printf("|---|---|---|---|---|---|---|---|%s---|\n", o.text.empty() ? "" : "---|");
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
    std::string text_col;
    if (!text_tokens.empty()) {
      auto tp = eval::Perplexity(*subject, text_tokens);
      if (!tp.ok()) Die(kProgram, "text perplexity", tp.status());
      text_col = absl::StrFormat(" %.3f |", tp->perplexity);
    }
    std::printf("| %s | %s | %.3f | %.1f KiB | %.6f | %.4f | %.2f%% | %.4f |%s %s |\n", qc.label, encodings.c_str(),
                bpw, bytes / 1024.0, r->mean_kl, r->max_kl, 100.0 * r->top1_agreement, r->quant.perplexity,
                text_col.c_str(), fallbacks.c_str());
    std::fflush(stdout);
  }
}

}  // namespace
}  // namespace qforge

int main(int argc, char** argv) {
  using namespace qforge;
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "quality_table: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--stories") o.stories = next();
    else if (a == "--text") o.text = next();
    else if (a == "--tokenizer") o.tokenizer = next();
    else if (a == "--streams") o.streams = std::atoi(next().c_str());
    else if (a == "--stream-len") o.stream_len = std::atoi(next().c_str());
    else if (a == "--threads") o.threads = std::atoi(next().c_str());
    else {
      std::fprintf(stderr, "quality_table: unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (o.streams <= 0 || o.stream_len < 2) {
    std::fprintf(stderr, "quality_table: --streams must be positive and --stream-len at least 2\n");
    return 2;
  }
  if (!o.stories.empty()) {
    auto m = formats::LoadModel(o.stories);
    if (!m.ok()) Die(kProgram, o.stories, m.status());
    Table("stories260K (" + o.stories + ")", *m, o);
  }
  Options synthetic = o;
  synthetic.text.clear();  // the text's tokenizer belongs to stories260K
  Table(bench::kGeneratedEvalTitle, bench::GeneratedEvalModel(), synthetic);
  return 0;
}
