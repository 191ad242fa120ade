#include "bench/table_common.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/base/mapped_file.h"
#include "core/eval/eval.h"
#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "core/tokenizer/tokenizer.h"

namespace qforge::bench {

void Die(const char* program, const std::string& what, const absl::Status& s) {
  std::fprintf(stderr, "%s: %s: %s\n", program, what.c_str(), std::string(s.message()).c_str());
  std::exit(1);
}

std::unique_ptr<Transformer> MakeRuntime(const char* program, Model m, int threads) {
  auto t = Transformer::Create(std::make_shared<const Model>(std::move(m)), RuntimeOptions{.threads = threads});
  if (!t.ok()) Die(program, "runtime", t.status());
  return std::move(*t);
}

absl::StatusOr<std::vector<std::vector<int>>> MakeWindows(const TokenSource& source, Transformer& fp32) {
  const Model& model = fp32.model();
  const int length = std::min(source.length, fp32.max_seq_len());
  if (source.count <= 0 || length < 2) {
    return absl::InvalidArgumentError("window counts must be positive and windows at least 2 tokens long");
  }
  if (source.text.empty()) {
    return eval::SampleStreams(fp32, source.count, length, source.seed, 1.0f,
                               model.vocab.has_value() ? model.vocab->bos_id : 1);
  }
  if (!model.vocab.has_value()) {
    return absl::FailedPreconditionError(
        absl::StrCat("the model has no vocabulary, so ", source.text, " cannot be tokenized"));
  }
  auto tokenizer = TokenizerFromVocab(*model.vocab);
  if (!tokenizer.ok()) return tokenizer.status();
  if ((*tokenizer)->vocab_size() > model.config.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("the model's vocabulary has ", (*tokenizer)->vocab_size(),
                                                   " tokens, its embedding ", model.config.vocab_size));
  }
  auto text = ReadFileToString(source.text);
  if (!text.ok()) return text.status();
  auto ids = (*tokenizer)->Encode(*text, /*add_bos=*/true);
  if (!ids.ok()) return ids.status();
  const size_t n = std::min(ids->size() / static_cast<size_t>(length), static_cast<size_t>(source.count));
  if (n == 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s has %d tokens, fewer than one window of %d", source.text,
                                                      ids->size(), length));
  }
  std::vector<std::vector<int>> windows(n);
  for (size_t w = 0; w < n; ++w) windows[w].assign(ids->begin() + w * length, ids->begin() + (w + 1) * length);
  return windows;
}

std::string Describe(const TokenSource& source, const std::vector<std::vector<int>>& windows) {
  const size_t length = windows.empty() ? 0 : windows.front().size();
  if (source.text.empty()) {
    return absl::StrFormat("%d streams x %d tokens sampled from fp32 (seed %d, T=1)", windows.size(), length,
                           source.seed);
  }
  return absl::StrFormat("the first %d windows x %d tokens of %s (tokenized whole, BOS first, by the model's "
                         "vocabulary)",
                         windows.size(), length, std::filesystem::path(source.text).filename().string());
}

absl::Status CheckCalibrationApart(const std::string& eval_text, const std::string& calib_text) {
  if (eval_text.empty() || calib_text.empty()) return absl::OkStatus();
  std::error_code ec;
  const bool same = eval_text == calib_text || std::filesystem::equivalent(eval_text, calib_text, ec);
  if (same) {
    return absl::InvalidArgumentError(absl::StrCat("--calib-text and --eval-text are the same file (", calib_text,
                                                   "): calibration must never see the evaluation text"));
  }
  return absl::OkStatus();
}

TokenSource TableFlags::Eval(bool sampled_only) const {
  if (!eval_text.empty() && !sampled_only) return {.text = eval_text, .count = eval_windows, .length = window};
  return {.text = "", .count = streams, .length = stream_len, .seed = 1};
}

TokenSource TableFlags::Calib(bool sampled_only) const {
  if (!calib_text.empty() && !sampled_only) return {.text = calib_text, .count = calib_windows, .length = window};
  return {.text = "", .count = calib_streams, .length = calib_len, .seed = calib_seed};
}

absl::StatusOr<bool> ParseTableFlag(TableFlags& f, bool calibrates, int argc, char** argv, int& i) {
  const std::string a = argv[i];
  std::string* text = nullptr;
  int* number = nullptr;
  uint64_t* seed = nullptr;
  bool model = false;
  if (a == "--model" || a == "--stories") model = true;
  else if (a == "--eval-text") text = &f.eval_text;
  else if (a == "--eval-windows") number = &f.eval_windows;
  else if (a == "--window") number = &f.window;
  else if (a == "--streams") number = &f.streams;
  else if (a == "--stream-len") number = &f.stream_len;
  else if (a == "--threads") number = &f.threads;
  else if (calibrates && a == "--calib-text") text = &f.calib_text;
  else if (calibrates && a == "--calib-windows") number = &f.calib_windows;
  else if (calibrates && a == "--calib-streams") number = &f.calib_streams;
  else if (calibrates && a == "--calib-len") number = &f.calib_len;
  else if (calibrates && a == "--calib-seed") seed = &f.calib_seed;
  else return false;
  if (i + 1 >= argc) return absl::InvalidArgumentError(a + " needs a value");
  const std::string v = argv[++i];
  if (model) f.models.push_back(v);
  else if (text != nullptr) *text = v;
  else if (number != nullptr && !absl::SimpleAtoi(v, number)) return absl::InvalidArgumentError("bad value for " + a);
  else if (seed != nullptr && !absl::SimpleAtoi(v, seed)) return absl::InvalidArgumentError("bad value for " + a);
  return true;
}

absl::Status ValidateTableFlags(const TableFlags& f) {
  if (f.eval_windows <= 0 || f.streams <= 0 || f.calib_windows <= 0 || f.calib_streams <= 0) {
    return absl::InvalidArgumentError("window and stream counts must be positive");
  }
  if (f.window < 2 || f.stream_len < 2 || f.calib_len < 2) {
    return absl::InvalidArgumentError("--window, --stream-len and --calib-len must be at least 2");
  }
  if (f.threads < 0) return absl::InvalidArgumentError("--threads must not be negative");
  if (f.calib_seed == 1) return absl::InvalidArgumentError("--calib-seed 1 is the evaluation seed");
  return CheckCalibrationApart(f.eval_text, f.calib_text);
}

Model LoadTableModel(const char* program, const std::string& path, const TableFlags& flags) {
  auto m = formats::LoadModel(path);
  if (!m.ok()) Die(program, path, m.status());
  if (flags.any_text() && !m->vocab.has_value()) {
    std::fprintf(stderr,
                 "%s: %s has no vocabulary, so --eval-text / --calib-text cannot be tokenized for it (a llama2.c "
                 "checkpoint picks up tok{V}.bin or tokenizer.bin beside it; convert with --tokenizer, or drop the "
                 "text flags to measure on sampled streams)\n",
                 program, path.c_str());
    std::exit(2);
  }
  return std::move(*m);
}

std::string SampledOnlyNote(const TableFlags& flags) {
  if (!flags.any_text()) return "";
  return " This model has random weights and no vocabulary, so the text flags do not apply to it: it is measured "
         "on sampled streams.";
}

Model GeneratedEvalModel() {
  const ModelConfig c{.dim = 512, .hidden_dim = 1536, .n_layers = 4, .n_heads = 8, .n_kv_heads = 4,
                      .vocab_size = 2048, .seq_len = 512};
  Model generated = MakeSyntheticModel(c, 7);
  const Tensor& out = generated.tensors.at(names::kOutput);
  std::vector<float> scaled(out.numel());
  std::memcpy(scaled.data(), out.data, out.nbytes);
  for (float& v : scaled) v *= 4.0f;
  generated.tensors[names::kOutput] = Tensor::FromFloats(names::kOutput, out.shape, scaled);
  return generated;
}

}  // namespace qforge::bench
