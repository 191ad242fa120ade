// qforge bench: prompt-processing and decode throughput in llama-bench's terms, so the two tools' tables can be
// read side by side (same tests: ppN = N prompt tokens in one batch from an empty cache, tgN = N tokens decoded
// one at a time from an empty cache; mean and standard deviation over repetitions).
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <numeric>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/runtime/transformer.h"
#include "services/cli/commands.h"
#include "services/cli/internal.h"

namespace qforge::cli {
namespace {

absl::StatusOr<std::vector<int>> ParseIntList(const std::string& flag, const std::string& v, int min, int max) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(v, ',')) {
    int n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < min || n > max) {
      return UsageError(absl::StrCat("--", flag, ": '", part, "' is not an integer in [", min, ", ", max, "]"));
    }
    out.push_back(n);
  }
  return out;
}

// Token ids that exercise the embedding table without depending on a tokenizer (llama-bench uses random ids too).
std::vector<int> BenchTokens(int n, int vocab) {
  std::vector<int> t(static_cast<size_t>(n));
  uint64_t s = 0x9E3779B97F4A7C15ull;
  for (int& id : t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    id = static_cast<int>((s >> 33) % static_cast<uint64_t>(vocab));
  }
  return t;
}

}  // namespace

absl::Status Bench(const std::vector<std::string>& raw_args, std::ostream& out) {
  // llama-bench's short spellings (-p, -n, -r, -t) as well as --p, --n, --r, --threads.
  std::vector<std::string> args;
  for (const std::string& a : raw_args) {
    if (a == "-p" || a == "-n" || a == "-r") args.push_back("-" + a);
    else if (a == "-t") args.push_back("--threads");
    else args.push_back(a);
  }
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"threads", "p", "n", "r", "activations"}, {"mmap"}));
  const std::string usage =
      "qforge bench MODEL [--threads 1,2] [-p 512] [-n 128] [-r 3] [--activations int8|float] [--mmap]";
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, usage));
  QF_ASSIGN_OR_RETURN(std::vector<int> threads, ParseIntList("threads", f.Get("threads", "1,2"), 1, 1024));
  QF_ASSIGN_OR_RETURN(std::vector<int> prompts, ParseIntList("p", f.Get("p", "512"), 0, 1 << 20));
  QF_ASSIGN_OR_RETURN(std::vector<int> decodes, ParseIntList("n", f.Get("n", "128"), 0, 1 << 20));
  QF_ASSIGN_OR_RETURN(int reps, f.GetInt("r", 3, 1, 1000));
  QF_ASSIGN_OR_RETURN(const kernels::ActivationMode activations, ActivationsFlag(f));

  QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(f.positional()[0], WeightResidency(f)));
  int64_t params = 0;
  size_t bytes = 0;
  std::map<std::string, int64_t> by_format;
  for (const auto& [name, t] : model.tensors) {
    params += t.numel();
    bytes += t.nbytes;
    by_format[FormatName(t.format)] += t.numel();
  }
  std::string main_format;
  int64_t most = -1;
  for (const auto& [fmt, n] : by_format) {
    if (n > most) most = n, main_format = fmt;
  }
  const std::string model_label = absl::StrFormat("%s %.2fM %s", model.config.arch, params / 1e6, main_format);
  auto shared = std::make_shared<const Model>(std::move(model));
  out << absl::StrFormat("| %-28s | %10s | %8s | %7s | %7s | %20s |\n", "model", "size", "params", "threads",
                         "test", "t/s");
  out << "| ---------------------------- | ---------: | -------: | ------: | ------: | -------------------: |\n";
  for (int nt : threads) {
    RuntimeOptions o;
    o.threads = nt;
    o.activations = activations;
    o.max_batch = 512;  // a whole pp512 prompt in one batch, as llama-bench's default ubatch
    QF_ASSIGN_OR_RETURN(auto rt, Transformer::Create(shared, o));
    auto run = [&](const std::string& test, int tokens, bool prompt) -> absl::Status {
      if (tokens <= 0) return absl::OkStatus();
      if (tokens > rt->max_seq_len()) {
        return absl::InvalidArgumentError(absl::StrCat(test, ": ", tokens, " tokens exceed the context of ",
                                                       rt->max_seq_len()));
      }
      const std::vector<int> ids = BenchTokens(tokens, rt->vocab_size());
      std::vector<float> logits(static_cast<size_t>(rt->vocab_size()));
      std::vector<double> rates;
      for (int rep = 0; rep <= reps; ++rep) {  // rep 0 warms caches and pages in the weights
        rt->Reset();
        const auto start = std::chrono::steady_clock::now();
        if (prompt) {
          QF_RETURN_IF_ERROR(rt->Forward(ids, 0, logits.data(), /*all_logits=*/false));
        } else {
          for (int i = 0; i < tokens; ++i) {
            QF_RETURN_IF_ERROR(rt->Forward(std::span<const int>(&ids[i], 1), i, logits.data(), false));
          }
        }
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (rep > 0) rates.push_back(tokens / s);
      }
      const double mean = std::accumulate(rates.begin(), rates.end(), 0.0) / rates.size();
      double var = 0;
      for (double r : rates) var += (r - mean) * (r - mean);
      const double sd = rates.size() > 1 ? std::sqrt(var / (rates.size() - 1)) : 0.0;
      out << absl::StrFormat("| %-28s | %6.2f MiB | %7.2fM | %7d | %7s | %11.2f ± %6.2f |\n", model_label,
                             bytes / 1048576.0, params / 1e6, nt, test, mean, sd);
      out.flush();
      return absl::OkStatus();
    };
    for (int p : prompts) QF_RETURN_IF_ERROR(run(absl::StrCat("pp", p), p, true));
    for (int n : decodes) QF_RETURN_IF_ERROR(run(absl::StrCat("tg", n), n, false));
  }
  using kernels::IsaFor;
  using kernels::KernelFamily;
  out << absl::StrFormat("\nkernels: %s (float dot %s, integer decode %s, integer prompt %s), activations %s\n",
                         kernels::IsaName(kernels::ActiveIsa()), kernels::IsaName(IsaFor(KernelFamily::kFloatDot)),
                         kernels::IsaName(IsaFor(KernelFamily::kIntDecode)),
                         kernels::IsaName(IsaFor(KernelFamily::kIntPrompt)),
                         activations == kernels::ActivationMode::kInt8 ? "int8" : "float");
  return absl::OkStatus();
}

}  // namespace qforge::cli
