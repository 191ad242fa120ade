// CLI commands that quantize, run and evaluate models.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <memory>
#include <set>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "core/base/mapped_file.h"
#include "core/base/status_macros.h"
#include "core/base/thread_pool.h"
#include "core/calib/block_chain.h"
#include "core/calib/collect.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/kernels/kernels.h"
#include "core/quant/ggml_presets.h"
#include "core/quant/mixed_precision.h"
#include "core/quant/quantize_model.h"
#include "core/quant/sequential.h"
#include "core/runtime/generate.h"
#include "core/runtime/transformer.h"
#include "core/tokenizer/tokenizer.h"
#include "services/cli/commands.h"
#include "services/cli/internal.h"

namespace qforge::cli {

absl::StatusOr<Vocab> LoadVocab(const std::string& path, int vocab_size) {
  QF_ASSIGN_OR_RETURN(Vocab v, ReadVocabFile(path, vocab_size));
  if (static_cast<int>(v.tokens.size()) != vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer ", path, " has ", v.tokens.size(),
                                                   " tokens, the model has ", vocab_size));
  }
  return v;
}

namespace {

}  // namespace

MappedFile::Residency WeightResidency(const Flags& f) {
  return f.Has("mmap") ? MappedFile::Residency::kMapped : MappedFile::Residency::kHugePages;
}

absl::StatusOr<kernels::ActivationMode> ActivationsFlag(const Flags& f) {
  const std::string v = f.Get("activations", "int8");
  if (v == "int8") return kernels::ActivationMode::kInt8;
  if (v == "float") return kernels::ActivationMode::kFloat;
  return UsageError(absl::StrCat("--activations must be int8 or float, got '", v, "'"));
}

std::string MethodNames() {
  std::vector<std::string> names;
  for (const quant::QuantMethod* m : quant::ListMethods()) names.push_back(m->name());
  return absl::StrJoin(names, ", ");
}

namespace {

// The model's own vocabulary, else --tokenizer, else null (commands then work on token ids).
absl::StatusOr<std::unique_ptr<Tokenizer>> ResolveTokenizer(const Model& m, const Flags& f) {
  if (f.Has("tokenizer")) {
    QF_ASSIGN_OR_RETURN(auto tok, LoadTokenizer(f.Get("tokenizer"), m.config.vocab_size));
    if (tok->vocab_size() != m.config.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("tokenizer ", f.Get("tokenizer"), " has ", tok->vocab_size(),
                                                     " tokens, the model has ", m.config.vocab_size));
    }
    return tok;
  }
  if (m.vocab.has_value()) return TokenizerFromVocab(*m.vocab);
  return std::unique_ptr<Tokenizer>();
}

absl::StatusOr<std::unique_ptr<Transformer>> MakeTransformer(
    Model m, int threads, kernels::ActivationMode activations = kernels::ActivationMode::kInt8) {
  return Transformer::Create(std::make_shared<const Model>(std::move(m)),
                             RuntimeOptions{.threads = threads, .activations = activations});
}


// The matrices an imatrix entry weights, with the expert row of each: the tensor it names, or for a stacked expert
// entry (blk.N.ffn_*_exps.weight, one row per expert) each expert's matrix of the model (blk.N.ffn_*.E.weight).
std::vector<std::pair<std::string, int64_t>> MatricesOfImatrixEntry(const std::string& name,
                                                                   const formats::ImportanceMatrix::Entry& e) {
  if (e.experts == 1) return {{name, 0}};
  int layer = -1;
  if (std::sscanf(name.c_str(), "blk.%d.", &layer) != 1 || layer < 0) return {};
  for (const auto& [stacked, expert_name] : formats::StackedExpertNames(layer)) {
    if (stacked != name) continue;
    std::vector<std::pair<std::string, int64_t>> matrices;
    for (int64_t x = 0; x < e.experts; ++x) matrices.emplace_back(expert_name(layer, static_cast<int>(x)), x);
    return matrices;
  }
  return {};
}

// --imatrix FILE: llama-imatrix's per-column mean squares as the statistics of the weights they name (GGUF names,
// so a GGUF source; a stacked expert entry weights each expert's matrix with its row), as llama-quantize weighs
// with them: an expert (or matrix) that saw no token gets uniform weights. Weights without an entry are encoded
// plainly. Says how many matrices it weights; an error when it weights none.
absl::StatusOr<calib::CalibrationStats> ImportanceOfImatrix(const Model& model, const std::string& path,
                                                            std::ostream& out) {
  QF_ASSIGN_OR_RETURN(const formats::ImportanceMatrix imatrix, formats::ReadImatrixGguf(path));
  calib::CalibrationStats stats;
  int entries_used = 0, unseen = 0;
  for (const auto& [name, e] : imatrix.entries) {
    bool used = false;
    if (e.experts > 1 && e.experts != model.config.n_experts) {
      return absl::InvalidArgumentError(absl::StrCat("--imatrix ", path, ": '", name, "' stacks ", e.experts,
                                                     " experts, the model has ", model.config.n_experts));
    }
    for (const auto& [matrix, expert] : MatricesOfImatrixEntry(name, e)) {
      const Tensor* t = model.Find(matrix);
      if (t == nullptr) continue;
      if (t->cols() != e.cols) {
        return absl::InvalidArgumentError(absl::StrCat("--imatrix ", path, ": '", name, "' has ", e.cols,
                                                       " columns, the model's tensor ", matrix, " ", t->cols()));
      }
      auto s = std::make_shared<calib::LayerStats>();
      s->cols = e.cols;
      s->tokens = static_cast<int64_t>(e.tokens[static_cast<size_t>(expert)]);
      unseen += s->tokens <= 0;
      const std::vector<float> w = e.Importance(expert);
      s->importance.assign(w.begin(), w.end());
      stats.emplace(matrix, std::move(s));
      used = true;
    }
    entries_used += used;
  }
  if (stats.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--imatrix ", path, ": none of its ", imatrix.entries.size(),
                                                   " entries names a tensor of the model (GGUF names)"));
  }
  out << "imatrix: " << entries_used << " of " << imatrix.entries.size() << " entries weight " << stats.size()
      << " of the model's matrices (" << path << ", " << imatrix.chunk_count << " chunks of " << imatrix.chunk_size
      << " tokens";
  if (unseen > 0) out << "; " << unseen << " saw no token: uniform weights, as llama-quantize";
  out << ")\n";
  return stats;
}

// The calibration tokens: --calib-text (tokenized) or token streams sampled from the source model itself
// (tokenizer-free).
absl::StatusOr<std::vector<std::vector<int>>> CalibrationTokens(const Model& model, const Flags& f, int streams,
                                                                int len, uint64_t seed, int threads,
                                                                std::ostream& out) {
  std::vector<std::vector<int>> tokens;
  if (f.Has("calib-text")) {
    QF_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, ResolveTokenizer(model, f));
    if (!tokenizer) return absl::InvalidArgumentError("--calib-text needs a tokenizer: pass --tokenizer");
    QF_ASSIGN_OR_RETURN(std::string text, ReadFileToString(f.Get("calib-text")));
    QF_ASSIGN_OR_RETURN(std::vector<int> ids, tokenizer->Encode(text, /*add_bos=*/true));
    out << "calibration: " << ids.size() << " tokens of " << f.Get("calib-text") << "\n";
    tokens.push_back(std::move(ids));
  } else {
    QF_ASSIGN_OR_RETURN(auto source, MakeTransformer(model, threads));
    if (len > source->max_seq_len()) {
      return UsageError(absl::StrCat("--calib-len must be at most the context length ", source->max_seq_len()));
    }
    const int bos = model.vocab ? model.vocab->bos_id : 1;
    QF_ASSIGN_OR_RETURN(tokens, eval::SampleStreams(*source, streams, len, seed, 1.0f, bos));
    out << absl::StrFormat("calibration: %d streams x %d tokens sampled from the source model (seed %d)\n", streams,
                           len, seed);
  }
  return tokens;
}

}  // namespace

std::string ComparisonLines(const std::string& what, double perplexity_base, double perplexity_model, int64_t tokens,
                            double kl_mean, double kl_max, double top1_agreement) {
  return absl::StrCat(
      absl::StrFormat("%s: perplexity base %.4f  model %.4f  (%d tokens)\n", what, perplexity_base, perplexity_model,
                      tokens),
      absl::StrFormat("%s: KL(base||model) mean %.6f max %.4f nats   top-1 agreement %.2f%%\n", what, kl_mean, kl_max,
                      100.0 * top1_agreement));
}

absl::Status Methods(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {}, {}));
  QF_RETURN_IF_ERROR(NeedPositional(f, 0, "qforge methods"));
  for (const quant::QuantMethod* m : quant::ListMethods()) {
    out << absl::StrFormat("  %-6s %s (defaults: %s)\n", m->name(), m->description(),
                           quant::ParamsToString(m->DefaultParams()));
  }
  out << "presets (qforge quantize --method NAME; llama-quantize's per-tensor types, embeddings included; --pure: "
         "the base type alone):\n";
  for (const quant::GgmlPreset& p : quant::GgmlPresets()) {
    out << absl::StrFormat("  %-6s %s\n", p.name, p.description);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::pair<const quant::QuantMethod*, quant::QuantParams>> MethodFromFlags(
    const Flags& f, const std::string& usage, const std::string& method_name) {
  if (!f.Has("method")) return UsageError(absl::StrCat("--method is required (", MethodNames(), "); usage: ", usage));
  const std::string name = method_name.empty() ? f.Get("method") : method_name;
  const quant::QuantMethod* method = quant::FindMethod(name);
  if (method == nullptr) {
    return UsageError(absl::StrCat("unknown method '", name, "' (known: ", MethodNames(), ")"));
  }
  quant::QuantParams params = method->DefaultParams();
  QF_ASSIGN_OR_RETURN(params.bits, f.GetInt("bits", params.bits, 1, 64));
  QF_ASSIGN_OR_RETURN(params.group, f.GetInt("group", params.group, 0, 1 << 20));
  if (f.GetBool("asym")) params.symmetric = false;
  if (f.GetBool("no-double-quant")) params.double_quant = false;
  if (f.GetBool("act-order")) params.act_order = true;
  QF_ASSIGN_OR_RETURN(double damp, f.GetDouble("damp", params.damp, 0.0, 10.0));
  params.damp = static_cast<float>(damp);
  QF_ASSIGN_OR_RETURN(double alpha, f.GetDouble("alpha", params.alpha, 0.0, 1.0));
  params.alpha = static_cast<float>(alpha);
  QF_ASSIGN_OR_RETURN(double outlier, f.GetDouble("outlier-threshold", params.outlier_threshold, 0.0, 1e9));
  params.outlier_threshold = static_cast<float>(outlier);
  QF_ASSIGN_OR_RETURN(int seed, f.GetInt("seed", static_cast<int>(params.seed), 0, 0x7fffffff));
  params.seed = static_cast<uint32_t>(seed);
  if (absl::Status s = method->Validate(params); !s.ok()) {
    return UsageError(absl::StrCat("--method ", method->name(), ": ", s.message()));
  }
  return std::make_pair(method, params);
}

absl::Status Quantize(const std::vector<std::string>& args, std::ostream& out) {
  std::set<std::string> value_flags = {"threads",    "tokenizer", "calib-text", "calib-streams", "calib-len",
                                       "calib-seed", "layers",    "target-bpw", "ggml-type",     "imatrix"};
  std::set<std::string> bool_flags = {"quantize-embeddings", "pure", "calib-sequential"};
  value_flags.insert(kMethodValueFlags.begin(), kMethodValueFlags.end());
  bool_flags.insert(kMethodBoolFlags.begin(), kMethodBoolFlags.end());
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, value_flags, bool_flags));
  const std::string usage =
      "qforge quantize (--method M [--ggml-type T (with gptq)] [--bits B] [--group G] [--asym] [--no-double-quant] [--act-order] [--damp D] [--alpha A] [--outlier-threshold T] [--seed S] "
      "[--layers 'GLOB=METHOD[:bits=B,group=G,asym];...'] [--pure] | --target-bpw X) [--quantize-embeddings] "
      "[--calib-text FILE | --calib-streams N --calib-len L --calib-seed S] [--calib-sequential] [--imatrix FILE] "
      "[--threads N] "
      "[--tokenizer TOK] IN OUT.{gguf,safetensors}";
  const bool automatic = f.Has("target-bpw");
  if (automatic && f.Has("layers")) return UsageError("--target-bpw plans every tensor itself: drop --layers");
  // --method gptq --ggml-type T: GPTQ's error feedback onto ggml type T (the method gptq_T), or onto every tensor
  // of llama-quantize preset T whose type has a gptq_ method.
  std::string ggml_type;
  if (f.Has("ggml-type")) {
    ggml_type = f.Get("ggml-type");
    if (f.Get("method") != "gptq") return UsageError("--ggml-type goes with --method gptq (GPTQ onto that ggml type)");
    if (automatic) return UsageError("--target-bpw plans every tensor itself: drop --ggml-type");
    // A preset by its base type: q8_0 is a preset too, but GPTQ has no q8_0 grid.
    const quant::GgmlPreset* named = quant::FindGgmlPreset(ggml_type);
    if (quant::FindMethod(absl::StrCat("gptq_", named != nullptr ? named->base_method : ggml_type)) == nullptr) {
      return UsageError(absl::StrCat("--ggml-type ", ggml_type, ": GPTQ writes q4_0, q2_k, q3_k, q4_k, q5_k, q6_k and "
                                     "the presets (qforge methods lists them)"));
    }
  }
  // A llama-quantize preset (q4_k_m, ..., and q2_k / q6_k, whose names are also types) picks each tensor's type;
  // --pure keeps the method of that name alone, as llama-quantize's --pure does.
  const std::string preset_name = ggml_type.empty() ? f.Get("method") : ggml_type;
  const quant::GgmlPreset* preset =
      f.Has("method") && !f.GetBool("pure") ? quant::FindGgmlPreset(preset_name) : nullptr;
  if (preset != nullptr && automatic) return UsageError("--target-bpw plans every tensor itself: drop the preset");
  // In automatic mode every target tensor gets an explicit rule, so the default method only fills the metadata.
  std::pair<const quant::QuantMethod*, quant::QuantParams> method_and_params = {
      quant::FindMethod("q8_0"), quant::FindMethod("q8_0")->DefaultParams()};
  if (preset != nullptr) {
    method_and_params = {quant::FindMethod(preset->base_method), quant::FindMethod(preset->base_method)->DefaultParams()};
  } else if (!ggml_type.empty()) {
    // --pure with a preset's name: its base type alone.
    const quant::GgmlPreset* named = quant::FindGgmlPreset(ggml_type);
    QF_ASSIGN_OR_RETURN(method_and_params,
                        MethodFromFlags(f, usage, absl::StrCat("gptq_", named ? named->base_method : ggml_type)));
  } else if (!automatic || f.Has("method")) {
    QF_ASSIGN_OR_RETURN(method_and_params, MethodFromFlags(f, usage));
  }
  const auto [method, params] = method_and_params;
  QF_ASSIGN_OR_RETURN(double target_bpw, f.GetDouble("target-bpw", 4.0, 0.5, 32.0));
  std::vector<quant::LayerRule> rules;
  if (f.Has("layers")) {
    auto parsed = quant::ParseLayerRules(f.Get("layers"));
    if (!parsed.ok()) return UsageError(absl::StrCat("--layers: ", parsed.status().message()));
    rules = *std::move(parsed);
  }
  QF_ASSIGN_OR_RETURN(int calib_streams, f.GetInt("calib-streams", 64, 1, 1 << 20));
  QF_ASSIGN_OR_RETURN(int calib_len, f.GetInt("calib-len", 256, 2, 1 << 24));
  // Evaluation samples its streams with seed 1 by default; calibration must not see those tokens.
  QF_ASSIGN_OR_RETURN(uint64_t calib_seed, f.GetSeed("calib-seed", 1000));
  QF_ASSIGN_OR_RETURN(int threads, f.GetInt("threads", 0, 0, 1024));
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, usage));
  const std::string& in_path = f.positional()[0];
  const std::string& out_path = f.positional()[1];
  if (!absl::EndsWith(out_path, ".gguf") && !absl::EndsWith(out_path, ".safetensors")) {
    return UsageError(absl::StrCat("output '", out_path, "' must end in .gguf or .safetensors"));
  }

  QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(in_path));
  if (f.Has("tokenizer")) {
    QF_ASSIGN_OR_RETURN(Vocab v, LoadVocab(f.Get("tokenizer"), model.config.vocab_size));
    model.vocab = std::move(v);
  }
  quant::QuantRecipe recipe;
  recipe.method = method->name();
  recipe.params = params;
  recipe.quantize_embeddings = f.GetBool("quantize-embeddings");
  recipe.layers = rules;
  if (preset != nullptr) {
    QF_ASSIGN_OR_RETURN(quant::QuantRecipe expanded, quant::GgmlPresetRecipe(*preset, model, f.Has("imatrix")));
    // --layers rules come first, so they override the preset's choice for the tensors they match.
    recipe.layers.insert(recipe.layers.end(), expanded.layers.begin(), expanded.layers.end());
    recipe.quantize_embeddings = expanded.quantize_embeddings;
    out << absl::StrFormat("preset %s: base %s, %d tensors raised or lowered\n", preset->name, preset->base_method,
                           expanded.layers.size());
    if (!ggml_type.empty()) {
      QF_ASSIGN_OR_RETURN(const auto gptq, MethodFromFlags(f, usage));
      recipe = quant::GptqOfGgmlRecipe(std::move(recipe), model, gptq.second);
      out << "gptq: every tensor whose type has a gptq_ method gets it\n";
    }
  }
  bool needs_calibration = quant::FindMethod(recipe.method)->NeedsCalibration() || method->HasModelTransform();
  for (const quant::LayerRule& r : recipe.layers) {
    const quant::QuantMethod* m = quant::FindMethod(r.method);
    needs_calibration |= m != nullptr && (m->NeedsCalibration() || m->HasModelTransform());
  }
  // The automatic plan scores by layer-output error when calibration is asked for, by weight error otherwise.
  if (automatic && (f.Has("calib-text") || f.Has("calib-streams"))) needs_calibration = true;
  if (f.GetBool("calib-sequential") && (!needs_calibration || automatic)) {
    return UsageError("--calib-sequential needs a calibrated method (and no --target-bpw)");
  }
  const auto start = std::chrono::steady_clock::now();
  ThreadPool pool(threads);
  calib::CalibrationStats calibration;
  if (f.Has("imatrix")) {
    if (needs_calibration || automatic || f.Has("calib-text") || f.Has("calib-streams")) {
      return UsageError("--imatrix is for the plain ggml methods (q4_0 .. q8_0, q2_k .. q6_k, iq4_nl, iq4_xs, "
                        "presets): not with a calibrated method, --calib-text / --calib-streams or --target-bpw");
    }
    QF_ASSIGN_OR_RETURN(calibration, ImportanceOfImatrix(model, f.Get("imatrix"), out));
    recipe.calibration = &calibration;
  } else if (needs_calibration) {
    QF_ASSIGN_OR_RETURN(const std::vector<std::vector<int>> tokens,
                        CalibrationTokens(model, f, calib_streams, calib_len, calib_seed, threads, out));
    // The same rule as a scheduler job's: the default method's transform, else the first layer rule's.
    QF_ASSIGN_OR_RETURN(const auto transform, quant::ModelTransformOf(recipe.method, recipe.params, recipe.layers,
                                                                      "--method", "--layers"));
    // Block by block with the hidden states rounded as the service's calibrate chain stores them, so a job
    // through the scheduler gives these very bytes (core/calib/block_chain.h).
    const calib::CalibrationOptions options{.threads = threads, .block_chain = calib::kChainActivationFormat};
    if (f.GetBool("calib-sequential")) {
      QF_ASSIGN_OR_RETURN(quant::SequentialCalibration sequential,
                          quant::CalibrateSequentially(model, tokens, recipe, transform, options, &pool));
      calibration = std::move(sequential.stats);
      model = std::move(sequential.model);
      out << "calibration: sequential (block i from the quantized blocks < i)\n";
    } else {
      QF_ASSIGN_OR_RETURN(calibration, calib::CollectCalibration(model, tokens, options));
      if (transform) QF_RETURN_IF_ERROR(transform->first->PrepareModel(model, calibration, transform->second));
    }
    recipe.calibration = &calibration;
    if (transform) {
      out << transform->first->name() << ": model transform applied (" << quant::ParamsToString(transform->second)
          << ")\n";
    }
  }
  if (automatic) {
    quant::MixedPrecisionOptions o;
    o.target_bpw = target_bpw;
    o.quantize_embeddings = recipe.quantize_embeddings;
    o.calibration = recipe.calibration;
    o.pool = &pool;
    QF_ASSIGN_OR_RETURN(quant::MixedPrecisionPlan plan, quant::PlanMixedPrecisionDetailed(model, o));
    out << absl::StrFormat("mixed precision plan for %.4g bits/weight (%s error):\n", target_bpw,
                           recipe.calibration != nullptr ? "layer-output" : "weight");
    for (const quant::TensorPrecisionChoice& t : plan.tensors) {
      const quant::PrecisionCandidate& c = plan.candidates[static_cast<size_t>(t.candidate)];
      out << absl::StrFormat("  %-28s %-6s %-28s -> %-16s %7.4f bits/w  loss %.4e\n", t.name, c.method,
                             quant::ParamsToString(c.params), t.format,
                             8.0 * static_cast<double>(t.bytes) / static_cast<double>(t.weights), t.loss);
    }
    out << absl::StrFormat("achieved %.4f bits/weight (target %.4g), total loss %.4e\n", plan.bits_per_weight,
                           target_bpw, plan.loss);
    recipe.layers = std::move(plan.rules);
  }
  QF_ASSIGN_OR_RETURN(quant::QuantizeResult result, quant::QuantizeModel(model, recipe, &pool));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  result.model.metadata["source"] = in_path;
  QF_RETURN_IF_ERROR(SaveModel(result.model, out_path));
  out << quant::FormatReport(result.report);
  out << absl::StrFormat("quantized %s in %.2f s -> %s\n", in_path, seconds, out_path);
  return absl::OkStatus();
}

absl::Status Generate(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"prompt", "tokenizer", "max-tokens", "temperature", "top-p", "seed",
                                                 "threads", "activations"},
                                          {"mmap"}));
  QF_ASSIGN_OR_RETURN(const kernels::ActivationMode activations, ActivationsFlag(f));
  QF_ASSIGN_OR_RETURN(int max_tokens, f.GetInt("max-tokens", 128, 1, 1 << 20));
  QF_ASSIGN_OR_RETURN(double temperature, f.GetDouble("temperature", 0.8, 0.0, 100.0));
  QF_ASSIGN_OR_RETURN(double top_p, f.GetDouble("top-p", 0.95, 1e-6, 1.0));
  QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("seed", 42));
  QF_ASSIGN_OR_RETURN(int threads, f.GetInt("threads", 0, 0, 1024));
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, "qforge generate MODEL [--prompt TEXT] [--tokenizer TOK] [--max-tokens N] "
                                          "[--temperature T] [--top-p P] [--seed S] [--threads N] [--activations int8|float] [--mmap]"));
  QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(f.positional()[0], WeightResidency(f)));
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, ResolveTokenizer(model, f));
  const int bos = tokenizer ? tokenizer->bos_id() : (model.vocab ? model.vocab->bos_id : 1);
  const int eos = tokenizer ? tokenizer->eos_id() : (model.vocab ? model.vocab->eos_id : 2);
  std::vector<int> prompt = {bos};
  if (f.Has("prompt")) {
    if (!tokenizer) {
      return absl::InvalidArgumentError("--prompt needs a tokenizer: the model has no vocabulary, pass --tokenizer");
    }
    QF_ASSIGN_OR_RETURN(prompt, tokenizer->Encode(f.Get("prompt"), /*add_bos=*/true));
  }
  QF_ASSIGN_OR_RETURN(auto transformer, MakeTransformer(std::move(model), threads, activations));
  max_tokens = std::min(max_tokens, transformer->max_seq_len() - static_cast<int>(prompt.size()));
  if (max_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("the prompt (", prompt.size(),
                                                    " tokens) fills the model's context of ",
                                                    transformer->max_seq_len()));
  }

  GenerateOptions options;
  options.max_new_tokens = max_tokens;
  options.sampler = SamplerOptions{.temperature = static_cast<float>(temperature),
                                   .top_p = static_cast<float>(top_p), .seed = seed};
  options.eos_id = eos;
  // Stream: echo the prompt, then each new piece as it is sampled.
  int prev = prompt.back();
  absl::Status piece_status;
  if (tokenizer) {
    QF_ASSIGN_OR_RETURN(std::string prompt_text, tokenizer->Decode(prompt));
    out << prompt_text << std::flush;
  }
  const auto start = std::chrono::steady_clock::now();
  auto on_token = [&](int token) {
    if (tokenizer) {
      auto piece = tokenizer->DecodePiece(prev, token);
      if (!piece.ok()) {
        piece_status = piece.status();
        return false;
      }
      out << *piece << std::flush;
    } else {
      out << token << ' ' << std::flush;
    }
    prev = token;
    return true;
  };
  QF_ASSIGN_OR_RETURN(GenerateResult result, qforge::Generate(*transformer, prompt, options, on_token));
  QF_RETURN_IF_ERROR(piece_status);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const char* stop = result.stop == StopReason::kEos           ? "end of sequence"
                     : result.stop == StopReason::kContextFull ? "context full"
                                                               : "max tokens";
  out << absl::StrFormat("\n-- %d prompt + %d generated tokens in %.3f s (%.1f tokens/s), stopped at %s\n",
                         result.prompt_tokens, result.tokens.size(), seconds,
                         seconds > 0 ? result.tokens.size() / seconds : 0.0, stop);
  return absl::OkStatus();
}

// qforge imatrix MODEL OUT.gguf: llama-imatrix's file from qforge's calibration, for llama-quantize --imatrix (and
// qforge quantize --imatrix). Each matrix's entry is its input's mean square per column (half the Hessian's
// diagonal) over every calibration token, with the token count, under the tensor's GGUF name.
absl::Status Imatrix(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"calib-text", "calib-streams", "calib-len", "calib-seed", "window",
                                                  "chunks", "threads", "tokenizer"},
                                            {}));
  const std::string usage =
      "qforge imatrix MODEL OUT.gguf (--calib-text FILE [--chunks N] | --calib-streams N --calib-len L --calib-seed S) "
      "[--window W] [--threads N] [--tokenizer TOK]";
  QF_RETURN_IF_ERROR(NeedPositional(f, 2, usage));
  QF_ASSIGN_OR_RETURN(int calib_streams, f.GetInt("calib-streams", 64, 1, 1 << 20));
  QF_ASSIGN_OR_RETURN(int calib_len, f.GetInt("calib-len", 256, 2, 1 << 24));
  QF_ASSIGN_OR_RETURN(uint64_t calib_seed, f.GetSeed("calib-seed", 1000));
  QF_ASSIGN_OR_RETURN(int window, f.GetInt("window", 512, 2, 1 << 24));
  QF_ASSIGN_OR_RETURN(int chunks, f.GetInt("chunks", 0, 0, 1 << 30));
  QF_ASSIGN_OR_RETURN(int threads, f.GetInt("threads", 0, 0, 1024));
  const std::string& out_path = f.positional()[1];
  if (!absl::EndsWith(out_path, ".gguf")) return UsageError(absl::StrCat("output '", out_path, "' must end in .gguf"));
  QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(f.positional()[0]));
  if (f.Has("tokenizer")) {
    QF_ASSIGN_OR_RETURN(Vocab v, LoadVocab(f.Get("tokenizer"), model.config.vocab_size));
    model.vocab = std::move(v);
  }
  window = std::min(window, model.config.seq_len);
  QF_ASSIGN_OR_RETURN(std::vector<std::vector<int>> tokens,
                      CalibrationTokens(model, f, calib_streams, calib_len, calib_seed, threads, out));
  // --chunks N: the first N windows, as llama-imatrix's --chunks.
  if (chunks > 0) {
    for (auto& stream : tokens) eval::KeepFirstWindows(stream, chunks, window, model.config.seq_len);
  }
  calib::CalibrationOptions options;
  options.window = window;
  options.threads = threads;
  options.pool_sparse_experts = false;  // each expert's own tokens, as llama-imatrix counts them
  QF_ASSIGN_OR_RETURN(const calib::CalibrationStats stats, calib::CollectCalibration(model, tokens, options));
  formats::ImportanceMatrix imatrix;
  if (f.Has("calib-text")) imatrix.datasets = {f.Get("calib-text")};
  int64_t n_tokens = 0;
  for (const auto& stream : tokens) n_tokens += static_cast<int64_t>(stream.size());
  imatrix.chunk_size = window;
  imatrix.chunk_count = static_cast<int>((n_tokens + window - 1) / window);
  // One matrix's row of an entry: H = 2/n XᵀX, so its diagonal is twice the mean square; llama-imatrix stores the
  // sum over the n tokens, and the count (an expert that saw no token: zeros).
  int64_t matrices = 0;
  auto add_row = [&matrices](const calib::LayerStats& st, formats::ImportanceMatrix::Entry& e) {
    ++matrices;
    const bool seen = st.tokens > 0 && st.hessian.size() == static_cast<size_t>(st.cols * st.cols);
    e.tokens.push_back(seen ? static_cast<float>(st.tokens) : 0.0f);
    for (int64_t c = 0; c < st.cols; ++c) {
      e.sum_squares.push_back(seen ? static_cast<float>(st.hessian[static_cast<size_t>(c * st.cols + c)] / 2 *
                                                        static_cast<double>(st.tokens))
                                   : 0.0f);
    }
  };
  std::set<std::string> stacked_matrices;
  for (int l = 0; l < model.config.n_layers && model.config.n_experts > 0; ++l) {
    for (const auto& [stacked, expert_name] : formats::StackedExpertNames(l)) {
      formats::ImportanceMatrix::Entry e;
      e.experts = model.config.n_experts;
      for (int x = 0; x < model.config.n_experts; ++x) {
        auto it = stats.find(expert_name(l, x));
        if (it == stats.end()) {
          return absl::InternalError(absl::StrCat("imatrix: no statistics for ", expert_name(l, x)));
        }
        e.cols = it->second->cols;
        add_row(*it->second, e);
        stacked_matrices.insert(it->first);
      }
      imatrix.entries.emplace(stacked, std::move(e));
    }
  }
  for (const auto& [name, st] : stats) {
    if (stacked_matrices.count(name) || st->tokens <= 0) continue;
    formats::ImportanceMatrix::Entry e;
    e.cols = st->cols;
    add_row(*st, e);
    imatrix.entries.emplace(name, std::move(e));
  }
  QF_RETURN_IF_ERROR(formats::WriteImatrixGguf(imatrix, out_path));
  out << "imatrix: " << imatrix.entries.size() << " entries (" << matrices << " matrices), " << n_tokens
      << " tokens in windows of " << window << " -> " << out_path << "\n";
  return absl::OkStatus();
}

absl::Status Eval(const std::vector<std::string>& args, std::ostream& out) {
  QF_ASSIGN_OR_RETURN(Flags f, Flags::Parse(args, {"base", "text", "tokenizer", "streams", "stream-len", "seed",
                                                 "window", "chunks", "threads", "temperature", "activations"},
                                          {"mmap"}));
  QF_ASSIGN_OR_RETURN(const kernels::ActivationMode activations, ActivationsFlag(f));
  QF_ASSIGN_OR_RETURN(int streams, f.GetInt("streams", 8, 0, 100000));
  QF_ASSIGN_OR_RETURN(int stream_len, f.GetInt("stream-len", 0, 0, 1 << 24));
  QF_ASSIGN_OR_RETURN(uint64_t seed, f.GetSeed("seed", 1));
  QF_ASSIGN_OR_RETURN(int window, f.GetInt("window", 0, 0, 1 << 24));
  QF_ASSIGN_OR_RETURN(int chunks, f.GetInt("chunks", 0, 0, 1 << 24));
  QF_ASSIGN_OR_RETURN(int threads, f.GetInt("threads", 0, 0, 1024));
  QF_ASSIGN_OR_RETURN(double temperature, f.GetDouble("temperature", 1.0, 0.0, 100.0));
  if (window == 1) return UsageError("--window must be at least 2");
  QF_RETURN_IF_ERROR(NeedPositional(f, 1, "qforge eval MODEL [--base MODEL] [--text FILE [--chunks N]] "
                                          "[--tokenizer TOK] [--streams N] [--stream-len L] [--seed S] [--window W] "
                                          "[--threads N] [--activations int8|float] [--mmap]"));
  if (streams == 0 && !f.Has("text")) return UsageError("nothing to evaluate: --streams 0 and no --text");

  QF_ASSIGN_OR_RETURN(Model model, formats::LoadModel(f.positional()[0], WeightResidency(f)));
  QF_ASSIGN_OR_RETURN(std::unique_ptr<Tokenizer> tokenizer, ResolveTokenizer(model, f));
  QF_ASSIGN_OR_RETURN(auto subject, MakeTransformer(std::move(model), threads, activations));
  std::unique_ptr<Transformer> base;
  if (f.Has("base")) {
    QF_ASSIGN_OR_RETURN(Model base_model, formats::LoadModel(f.Get("base"), WeightResidency(f)));
    if (base_model.config.vocab_size != subject->vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("--base has vocabulary ", base_model.config.vocab_size,
                                                     ", the model has ", subject->vocab_size()));
    }
    QF_ASSIGN_OR_RETURN(base, MakeTransformer(std::move(base_model), threads, activations));
  }

  auto report = [&](const std::string& what, const eval::CompareResult& r) {
    out << ComparisonLines(what, r.base.perplexity, r.quant.perplexity, r.quant.tokens, r.mean_kl, r.max_kl,
                           r.top1_agreement);
  };

  if (f.Has("text")) {
    if (!tokenizer) return absl::InvalidArgumentError("--text needs a tokenizer: pass --tokenizer");
    QF_ASSIGN_OR_RETURN(std::string text, ReadFileToString(f.Get("text")));
    QF_ASSIGN_OR_RETURN(std::vector<int> tokens, tokenizer->Encode(text, /*add_bos=*/true));
    // --chunks N: only the first N windows, as llama-perplexity's --chunks (and the service's evaluate tasks).
    eval::KeepFirstWindows(tokens, chunks, window, base ? std::min(base->max_seq_len(), subject->max_seq_len())
                                                        : subject->max_seq_len());
    const std::string what = absl::StrCat("text ", f.Get("text"));
    if (base) {
      QF_ASSIGN_OR_RETURN(eval::CompareResult r, eval::CompareModels(*base, *subject, tokens, window));
      report(what, r);
    } else {
      QF_ASSIGN_OR_RETURN(eval::PerplexityResult r, eval::Perplexity(*subject, tokens, window));
      out << absl::StrFormat("%s: perplexity %.4f (%d tokens, %d windows)\n", what, r.perplexity, r.tokens,
                             r.windows);
    }
  }
  if (streams > 0) {
    Transformer& source = base ? *base : *subject;
    const int len = stream_len > 0 ? stream_len : std::min(256, source.max_seq_len());
    if (len < 2 || len > source.max_seq_len()) {
      return UsageError(absl::StrCat("--stream-len must be in [2, ", source.max_seq_len(), "]"));
    }
    const int bos = tokenizer ? tokenizer->bos_id() : 1;
    QF_ASSIGN_OR_RETURN(auto sampled, eval::SampleStreams(source, streams, len, seed,
                                                          static_cast<float>(temperature), bos));
    const std::string what = absl::StrFormat("streams (%d x %d tokens sampled from the %s model, seed %d, T=%g)",
                                             streams, len, base ? "base" : "evaluated", seed, temperature);
    if (base) {
      QF_ASSIGN_OR_RETURN(eval::CompareResult r, eval::CompareModels(*base, *subject, sampled, window));
      report(what, r);
    } else {
      QF_ASSIGN_OR_RETURN(eval::PerplexityResult r, eval::Perplexity(*subject, sampled, window));
      out << absl::StrFormat("%s: perplexity %.4f (%d tokens)\n", what, r.perplexity, r.tokens);
    }
  }
  return absl::OkStatus();
}

}  // namespace qforge::cli
