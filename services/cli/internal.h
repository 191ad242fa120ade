// Pieces shared by the CLI's command files.
#pragma once

#include <ostream>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/mapped_file.h"
#include "core/kernels/kernels.h"
#include "core/model/model.h"
#include "core/quant/quant_method.h"
#include "services/cli/flags.h"

namespace qforge::cli {

// A usage error unless exactly `n` positional arguments were given.
absl::Status NeedPositional(const Flags& f, size_t n, const std::string& usage);
// Writes GGUF or safetensors by the path's extension.
absl::Status SaveModel(const Model& m, const std::string& path);
// A vocabulary from a SentencePiece .model or a llama2.c tokenizer.bin.
absl::StatusOr<Vocab> LoadVocab(const std::string& path, int vocab_size);

// --activations int8 (the default: 8-bit activation blocks for the formats with integer kernels, as llama.cpp)
// or float (fp32 activations everywhere, the reference); anything else is a usage error.
absl::StatusOr<kernels::ActivationMode> ActivationsFlag(const Flags& f);

// Where the commands that run a model keep its weights: a copy on huge pages (MappedFile::Residency, the
// default: decoding streams every weight each token), or with --mmap the file's mapping.
MappedFile::Residency WeightResidency(const Flags& f);

// "rtn, nf4, ...": every registered method.
std::string MethodNames();
// --method and its parameters (--bits, --group, --asym, --no-double-quant, --act-order, --damp, --alpha,
// --outlier-threshold, --seed), validated.
inline const std::set<std::string> kMethodValueFlags = {"method", "bits", "group", "damp", "alpha",
                                                        "outlier-threshold", "seed"};
inline const std::set<std::string> kMethodBoolFlags = {"asym", "no-double-quant", "act-order"};
// `method_name` non-empty: that method instead of --method's (the other flags still apply).
absl::StatusOr<std::pair<const quant::QuantMethod*, quant::QuantParams>> MethodFromFlags(
    const Flags& f, const std::string& usage, const std::string& method_name = "");

// The two lines `qforge eval --base` prints for a comparison of `what` ("text FILE"); `qforge submit --watch` and
// `qforge watch` print them for a job's Job.quality, which holds the same numbers.
std::string ComparisonLines(const std::string& what, double perplexity_base, double perplexity_model, int64_t tokens,
                            double kl_mean, double kl_max, double top1_agreement);

// Commands that run models (model_commands.cc).
absl::Status Quantize(const std::vector<std::string>& args, std::ostream& out);
absl::Status Methods(const std::vector<std::string>& args, std::ostream& out);
absl::Status Generate(const std::vector<std::string>& args, std::ostream& out);
absl::Status Eval(const std::vector<std::string>& args, std::ostream& out);
absl::Status Imatrix(const std::vector<std::string>& args, std::ostream& out);
// Prompt and decode throughput, llama-bench style (bench_command.cc).
absl::Status Bench(const std::vector<std::string>& args, std::ostream& out);

// Commands that talk to a scheduler, or run one (job_commands.cc).
absl::Status Up(const std::vector<std::string>& args, std::ostream& out);
absl::Status Submit(const std::vector<std::string>& args, std::ostream& out);
absl::Status Watch(const std::vector<std::string>& args, std::ostream& out);
absl::Status Jobs(const std::vector<std::string>& args, std::ostream& out);
absl::Status Models(const std::vector<std::string>& args, std::ostream& out);
absl::Status Export(const std::vector<std::string>& args, std::ostream& out);
absl::Status PutAdapter(const std::vector<std::string>& args, std::ostream& out);

}  // namespace qforge::cli
