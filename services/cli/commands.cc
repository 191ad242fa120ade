#include "services/cli/commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "core/base/half.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/lora/lora.h"
#include "core/model/synthetic.h"
#include "services/cli/flags.h"
#include "services/cli/internal.h"

namespace qforge::cli {


absl::Status NeedPositional(const Flags& f, size_t n, const std::string& usage) {
  if (f.positional().size() != n) return UsageError(absl::StrCat("usage: ", usage));
  return absl::OkStatus();
}

absl::Status SaveModel(const Model& m, const std::string& path) {
  if (absl::EndsWith(path, ".gguf")) {
    // llama.cpp refuses a GGUF without tokenizer.ggml.*: such a file would be of no use to it.
    if (!m.vocab.has_value()) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": the model has no vocabulary and llama.cpp refuses GGUF files without one; pass --tokenizer "
                "(a .model or llama2.c tokenizer.bin)"));
    }
    return formats::WriteGguf(m, path);
  }
  if (absl::EndsWith(path, ".safetensors")) return formats::WriteSafetensors(m, path);
  return UsageError(absl::StrCat("output '", path, "' must end in .gguf or .safetensors"));
}

namespace {

std::string HumanBytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return absl::StrFormat(u == 0 ? "%.0f %s" : "%.2f %s", b, units[u]);
}

absl::Status Inspect(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {}, {"tensors"}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, "qforge inspect FILE [--tensors]"));
  const std::string& path = f.positional()[0];
  QF_ASSIGN_OR_RETURN(formats::FileFormat ff, formats::DetectFormat(path));
  QF_ASSIGN_OR_RETURN(Model m, formats::LoadModel(path));
  const ModelConfig& c = m.config;
  out << "file:       " << path << " (" << formats::FileFormatName(ff) << ")\n";
  out << absl::StrFormat(
      "config:     %s dim=%d hidden=%d layers=%d heads=%d kv_heads=%d vocab=%d seq_len=%d rope_theta=%g eps=%g %s\n",
      c.arch, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len, c.rope_theta,
      c.norm_eps, c.tied_embeddings ? "tied-classifier" : "separate-classifier");
  if (c.is_moe()) out << absl::StrFormat("experts:    %d per layer, %d used per token\n", c.n_experts, c.n_experts_used);
  out << "vocabulary: "
      << (m.vocab ? absl::StrCat(m.vocab->tokens.size(), " tokens (", m.vocab->model, ")") : std::string("none"))
      << "\n";
  int64_t params = 0;
  size_t bytes = 0;
  std::map<std::string, std::pair<int64_t, size_t>> by_format;  // format -> (params, bytes)
  for (const auto& [name, t] : m.tensors) {
    params += t.numel();
    bytes += t.nbytes;
    auto& agg = by_format[FormatName(t.format)];
    agg.first += t.numel();
    agg.second += t.nbytes;
  }
  out << absl::StrFormat("tensors:    %d, %d parameters, %s (%.3f bits/weight overall)\n", m.tensors.size(), params,
                         HumanBytes(static_cast<double>(bytes)), params ? 8.0 * bytes / params : 0.0);
  for (const auto& [fmt, agg] : by_format) {
    out << absl::StrFormat("  %-18s %12d params %12s  %.3f bits/weight\n", fmt, agg.first,
                           HumanBytes(static_cast<double>(agg.second)), 8.0 * agg.second / agg.first);
  }
  if (f.GetBool("tensors")) {
    for (const auto& [name, t] : m.tensors) {
      out << absl::StrFormat("  %-32s [%s] %s %d bytes\n", name, absl::StrJoin(t.shape, ", "), FormatName(t.format),
                             t.nbytes);
    }
  }
  for (const auto& [k, v] : m.metadata) out << "meta:       " << k << " = " << v << "\n";
  return absl::OkStatus();
}

absl::Status Convert(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"tokenizer", "type"}, {}));
  QF_RETURN_IF_ERROR(
      NeedPositional(f, 2, "qforge convert IN OUT.{gguf,safetensors} [--tokenizer TOK] [--type f32|f16|bf16]"));
  std::optional<WeightType> type;
  if (f.Has("type")) {
    const absl::StatusOr<WeightFormat> parsed = ParseFormatName(f.Get("type"));
    if (!parsed.ok() || (parsed->type != WeightType::kF32 && parsed->type != WeightType::kF16 &&
                         parsed->type != WeightType::kBF16)) {
      return UsageError(absl::StrCat("--type '", f.Get("type"), "': expected f32, f16 or bf16"));
    }
    type = parsed->type;
  }
  QF_ASSIGN_OR_RETURN(Model m, formats::LoadModel(f.positional()[0]));
  if (type) QF_RETURN_IF_ERROR(formats::CastFloatTensors(m, *type));
  if (f.Has("tokenizer")) {
    QF_ASSIGN_OR_RETURN(Vocab v, LoadVocab(f.Get("tokenizer"), m.config.vocab_size));
    m.vocab = std::move(v);
  }
  QF_RETURN_IF_ERROR(SaveModel(m, f.positional()[1]));
  out << "wrote " << f.positional()[1] << "\n";
  return absl::OkStatus();
}

absl::Status MakeSynthetic(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"dim", "hidden", "layers", "heads", "kv-heads", "vocab", "seq-len", "seed",
                                                 "experts", "experts-used"},
                                          {"tied"}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, "qforge make-synthetic OUT.{gguf,safetensors} [--dim N --hidden N "
                                          "--layers N --heads N --kv-heads N --vocab N --seq-len N --seed S --tied "
                                          "--experts N --experts-used K]"));
  ModelConfig c = Q4kTestConfig();
  QF_ASSIGN_OR_RETURN(c.dim, f.GetInt("dim", c.dim, 2, 65536));
  QF_ASSIGN_OR_RETURN(c.hidden_dim, f.GetInt("hidden", c.hidden_dim, 1, 262144));
  QF_ASSIGN_OR_RETURN(c.n_layers, f.GetInt("layers", c.n_layers, 1, 1024));
  QF_ASSIGN_OR_RETURN(c.n_heads, f.GetInt("heads", c.n_heads, 1, 1024));
  QF_ASSIGN_OR_RETURN(c.n_kv_heads, f.GetInt("kv-heads", c.n_heads, 1, 1024));
  QF_ASSIGN_OR_RETURN(c.vocab_size, f.GetInt("vocab", c.vocab_size, 259, 1 << 20));
  QF_ASSIGN_OR_RETURN(c.seq_len, f.GetInt("seq-len", c.seq_len, 1, 1 << 20));
  QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("seed", 1));
  c.tied_embeddings = f.GetBool("tied");
  QF_ASSIGN_OR_RETURN(c.n_experts, f.GetInt("experts", 0, 0, 4096));
  QF_ASSIGN_OR_RETURN(c.n_experts_used, f.GetInt("experts-used", c.n_experts > 0 ? std::min(2, c.n_experts) : 0, 0,
                                                 4096));
  if (absl::Status s = ValidateConfig(c); !s.ok()) return UsageError(std::string(s.message()));
  Model m = MakeSyntheticModel(c, seed, /*with_vocab=*/true);
  QF_RETURN_IF_ERROR(SaveModel(m, f.positional()[0]));
  int64_t params = 0;
  for (const auto& [name, t] : m.tensors) params += t.numel();
  out << "wrote " << f.positional()[0] << ": " << params << " parameters\n";
  return absl::OkStatus();
}

// A random LoRA adapter for BASE's shape: a GGUF LoRA (OUT.gguf) or a PEFT directory (anything else). For tests,
// benchmarks and trying the server's /v1/adapters without a trained adapter.
absl::Status MakeLora(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"rank", "alpha", "seed", "targets", "amplitude"}, {}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, "qforge make-lora BASE OUT.gguf|OUT_DIR [--rank R] [--alpha A] [--seed S] "
                                          "[--targets q,k,v,o,gate,up,down] [--amplitude X]"));
  QF_ASSIGN_OR_RETURN(Model base, formats::LoadModel(f.positional()[0]));
  QF_ASSIGN_OR_RETURN(int rank, f.GetInt("rank", 8, 1, 4096));
  QF_ASSIGN_OR_RETURN(double alpha, f.GetDouble("alpha", 2.0 * rank, 0, 1e6));
  QF_ASSIGN_OR_RETURN(double amplitude, f.GetDouble("amplitude", 0.05, 0, 100));
  QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("seed", 1));
  std::vector<lora::LoraTarget> targets;
  const std::map<std::string, lora::LoraTarget> by_name = {
      {"q", lora::LoraTarget::kAttnQ},       {"k", lora::LoraTarget::kAttnK},     {"v", lora::LoraTarget::kAttnV},
      {"o", lora::LoraTarget::kAttnOutput},  {"gate", lora::LoraTarget::kFfnGate}, {"up", lora::LoraTarget::kFfnUp},
      {"down", lora::LoraTarget::kFfnDown}};
  for (absl::string_view t : absl::StrSplit(f.Get("targets", "q,k,v,o,gate,up,down"), ',', absl::SkipEmpty())) {
    auto it = by_name.find(std::string(t));
    if (it == by_name.end()) return UsageError(absl::StrCat("--targets: unknown '", t, "' (q,k,v,o,gate,up,down)"));
    targets.push_back(it->second);
  }
  QF_ASSIGN_OR_RETURN(lora::LoraAdapter a, lora::MakeRandomAdapter(base.config, targets, rank, static_cast<float>(alpha),
                                                                   seed, static_cast<float>(amplitude)));
  const std::string& path = f.positional()[1];
  auto write = [](const std::string& p, const void* data, size_t n) -> absl::Status {
    std::ofstream o(p, std::ios::binary);
    o.write(static_cast<const char*>(data), static_cast<std::streamsize>(n));
    return o ? absl::OkStatus() : absl::InternalError(absl::StrCat("cannot write ", p));
  };
  if (absl::EndsWith(path, ".gguf")) {
    if (const std::filesystem::path parent = std::filesystem::path(path).parent_path(); !parent.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(parent, ec);
    }
    QF_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, lora::SerializeGgufAdapter(a));
    QF_RETURN_IF_ERROR(write(path, bytes.data(), bytes.size()));
  } else {
    QF_ASSIGN_OR_RETURN(lora::PeftFiles files, lora::SerializePeftAdapter(a, base.config));
    std::error_code ec;
    std::filesystem::create_directories(path, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", ec.message()));
    QF_RETURN_IF_ERROR(write(path + "/adapter_model.safetensors", files.safetensors.data(), files.safetensors.size()));
    QF_RETURN_IF_ERROR(write(path + "/adapter_config.json", files.config_json.data(), files.config_json.size()));
  }
  out << "wrote " << path << ": " << a.matrices.size() << " matrices, rank " << rank << ", " << a.bytes()
      << " bytes\n";
  return absl::OkStatus();
}

// Every tensor of A and B (by name, same shapes, any encodings) decoded to fp32 and compared bit for bit: checks
// that two files hold the same numbers, e.g. a quantized GGUF against llama.cpp's dequantization of it.
absl::Status Compare(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {}, {"quiet"}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, "qforge compare A B [--quiet]"));
  QF_ASSIGN_OR_RETURN(Model a, formats::LoadModel(f.positional()[0]));
  QF_ASSIGN_OR_RETURN(Model b, formats::LoadModel(f.positional()[1]));
  const bool quiet = f.GetBool("quiet");
  size_t same = 0, differ = 0, missing = 0;
  std::map<std::string, std::pair<size_t, size_t>> by_format;  // A's format -> (identical, differing) tensors
  for (const auto& [name, ta] : a.tensors) {
    const Tensor* tb = b.Find(name);
    if (tb == nullptr || tb->shape != ta.shape) {
      ++missing;
      out << "missing  " << name << (tb == nullptr ? " (not in B)" : " (another shape in B)") << "\n";
      continue;
    }
    const int64_t rows = ta.rows(), cols = ta.cols();
    std::vector<float> va(static_cast<size_t>(cols)), vb(static_cast<size_t>(cols));
    int64_t diff = 0;
    double max_abs = 0;
    for (int64_t r = 0; r < rows; ++r) {
      QF_RETURN_IF_ERROR(kernels::DequantizeRows(ta, r, r + 1, va.data()));
      QF_RETURN_IF_ERROR(kernels::DequantizeRows(*tb, r, r + 1, vb.data()));
      for (int64_t c = 0; c < cols; ++c) {
        if (FloatBits(va[c]) != FloatBits(vb[c])) {
          ++diff;
          max_abs = std::max(max_abs, std::fabs(static_cast<double>(va[c]) - vb[c]));
        }
      }
    }
    auto& agg = by_format[absl::StrCat(FormatName(ta.format), " / ", FormatName(tb->format))];
    if (diff == 0) {
      ++same, ++agg.first;
      if (!quiet) out << "same     " << name << " (" << FormatName(ta.format) << " / " << FormatName(tb->format) << ")\n";
    } else {
      ++differ, ++agg.second;
      out << absl::StrFormat("DIFFER   %s (%s / %s): %d of %d values, max |a - b| = %g\n", name, FormatName(ta.format),
                             FormatName(tb->format), diff, rows * cols, max_abs);
    }
  }
  for (const auto& [fmts, agg] : by_format) {
    out << absl::StrFormat("  %-20s %d bit-identical, %d differ\n", fmts, agg.first, agg.second);
  }
  out << absl::StrFormat("%d tensors bit-identical, %d differ, %d missing or reshaped (of %d in A, %d in B)\n", same,
                         differ, missing, a.tensors.size(), b.tensors.size());
  if (differ + missing > 0) return absl::DataLossError(absl::StrCat(differ + missing, " tensors are not the same"));
  return absl::OkStatus();
}

struct Command {
  const char* name;
  const char* summary;
  std::function<absl::Status(const std::vector<std::string>&, std::ostream&)> run;
};

const std::vector<Command>& Commands() {
  static const auto* commands = new std::vector<Command>{
      {"inspect", "inspect FILE [--tensors]: format, configuration, tensors and bits/weight", Inspect},
      {"quantize",
       "quantize --method M [--bits B] [--group G] [--asym] [--no-double-quant] [--quantize-embeddings] "
       "[--act-order] [--damp D] [--alpha A] [--outlier-threshold T] [--seed S] [--calib-text FILE | --calib-streams N] [--calib-sequential] [--imatrix FILE] [--threads N] IN OUT.{gguf,safetensors}: "
       "quantize a model (methods: see `qforge methods`; gptq calibrates first)",
       Quantize},
      {"methods", "methods: list the quantization methods", Methods},
      {"generate",
       "generate MODEL --prompt TEXT [--tokenizer TOK] [--max-tokens N] [--temperature T] [--top-p P] [--seed S] "
       "[--threads N] [--activations int8|float] [--mmap]: generate text (streamed)",
       Generate},
      {"imatrix",
       "imatrix MODEL OUT.gguf (--calib-text FILE [--chunks N] | --calib-streams N --calib-len L --calib-seed S) "
       "[--window W] [--threads N] [--tokenizer TOK]: write llama-imatrix's importance-matrix file from qforge's "
       "calibration (for llama-quantize --imatrix and qforge quantize --imatrix)",
       Imatrix},
      {"eval",
       "eval MODEL [--base MODEL] [--text FILE [--chunks N]] [--tokenizer TOK] [--streams N] [--stream-len L] [--seed S] "
       "[--window W] [--threads N] [--activations int8|float] [--mmap]: perplexity, and KL / top-1 agreement against "
       "--base (the base runs with the same activations)",
       Eval},
      {"bench",
       "bench MODEL [--threads 1,2] [-p 512] [-n 128] [-r 3] [--activations int8|float] [--mmap]: prompt (ppN) and "
       "decode (tgN) tokens/s, as llama-bench reports them",
       Bench},
      {"convert",
       "convert IN OUT.{gguf,safetensors} [--tokenizer TOK] [--type f32|f16|bf16]: rewrite a model in another format "
       "(--type: its float matrices in that type, vectors in f32, quantized tensors as they are)",
       Convert},
      {"compare",
       "compare A B [--quiet]: decode every tensor of two models to fp32 and report which are bit-identical "
       "(exit 1 if any differ)",
       Compare},
      {"make-synthetic",
       "make-synthetic OUT [--dim ...] [--experts N --experts-used K]: write a random Llama (or Mixture-of-Experts) "
       "model (tests, benchmarks)",
       MakeSynthetic},
      {"make-lora",
       "make-lora BASE OUT.gguf|OUT_DIR [--rank R] [--alpha A] [--seed S] [--targets q,k,v,o,gate,up,down] "
       "[--amplitude X]: write a random LoRA adapter for BASE (GGUF LoRA, or a PEFT directory)",
       MakeLora},
      {"up",
       "up [--store DIR] [--listen HOST:PORT] [--workers N] [--threads N] [--allowed-roots DIR,...] "
       "[--serve-grpc HOST:PORT] [--serve-http HOST:PORT | --no-serve]: run scheduler, store, workers and the "
       "inference server in one process (embedded mode) until Ctrl-C",
       Up},
      {"submit",
       "submit MODEL --method M [method flags as for quantize] [--name NAME] [--tenant T] [--max-task-mib N] "
       "[--eval-text FILE [--eval-chunks N] | --eval-streams N [--eval-stream-len L] [--eval-seed S]] [--eval-window W] "
       "[--eval-tasks N] [--watch]: submit a quantize job to "
       "the scheduler (--eval-text: perplexity / KL / top-1 of the version against the source in Job.quality, as "
       "`qforge eval --text FILE --window W --chunks N` computes them; --eval-streams: the same on N streams sampled "
       "from the source, as `qforge eval --streams N --stream-len L --seed S`; --watch: live progress, then the result)",
       Submit},
      {"watch", "watch JOB_ID: follow a job's progress until it ends (reconnects if the scheduler restarts)", Watch},
      {"jobs", "jobs [--tenant T]: list the scheduler's jobs", Jobs},
      {"models", "models: list the models and versions in the store", Models},
      {"export", "export NAME@VERSION --format gguf|safetensors OUT: write a stored version to a file", Export},
      {"put-adapter",
       "put-adapter NAME PATH --base BASE@VERSION: store a LoRA adapter (a GGUF LoRA file or a PEFT directory, read "
       "by the scheduler) as the next version of NAME, an adapter of that base version; servers load it with POST "
       "/v1/adapters {\"artifact\": \"NAME@V\"}",
       PutAdapter},
  };
  return *commands;
}

}  // namespace

std::string HelpText() {
  std::string s = "qforge: make large language models small and serve them\n\nusage: qforge COMMAND [ARGS]\n\n";
  for (const Command& c : Commands()) absl::StrAppend(&s, "  ", c.summary, "\n");
  absl::StrAppend(&s, "  help: this text\n\n"
                     "Commands that run a model (generate, eval, bench) read its weights into memory on huge pages "
                     "(faster decoding); --mmap maps the file instead.\n"
                     "Client commands (submit, jobs, models, export, put-adapter) reach the scheduler at "
                     "--scheduler HOST:PORT, else $QFORGE_SCHEDULER, else 127.0.0.1:7700.\n"
                     "Exit codes: 0 ok, 1 the operation failed, 2 bad usage.\n");
  return s;
}

absl::Status RunCommand(const std::vector<std::string>& args, std::ostream& out) {
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    out << HelpText();
    return args.empty() ? UsageError("no command given; see `qforge help`") : absl::OkStatus();
  }
  for (const Command& c : Commands()) {
    if (args[0] == c.name) return c.run(std::vector<std::string>(args.begin() + 1, args.end()), out);
  }
  return UsageError(absl::StrCat("unknown command '", args[0], "'; see `qforge help`"));
}

}  // namespace qforge::cli
