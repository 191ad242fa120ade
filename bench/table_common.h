// Pieces the quality tables (quality_table, calibrated_table, method_table) share, so they measure the same
// models on the same tokens.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/runtime/transformer.h"

namespace qforge::bench {

// Prints "<program>: <what>: <message>" to stderr and exits 1.
[[noreturn]] void Die(const char* program, const std::string& what, const absl::Status& s);

// A Transformer over `m`, or Die.
std::unique_ptr<Transformer> MakeRuntime(const char* program, Model m, int threads);

// Where a table's token windows come from (evaluation or calibration).
struct TokenSource {
  // A text file: tokenized whole (BOS first) with the model's own vocabulary (Model::vocab), cut into
  // consecutive windows of `length` tokens, the first `count` of them (a last partial window is dropped).
  // Empty: `count` streams of `length` tokens sampled from the fp32 model at T=1, stream i seeded from
  // (seed, i) (eval::SampleStreams), starting with the vocabulary's BOS (1 without a vocabulary).
  std::string text;
  int count = 16;
  int length = 256;  // capped at the model's context
  uint64_t seed = 1;
};

// The windows `source` describes, for the model `fp32` runs (it samples the streams). FAILED_PRECONDITION for a
// text source and a model without a vocabulary; INVALID_ARGUMENT for a text shorter than one window.
absl::StatusOr<std::vector<std::vector<int>>> MakeWindows(const TokenSource& source, Transformer& fp32);

// One phrase for a table header, from the windows MakeWindows returned: "64 windows x 256 tokens of
// tinystories-eval.txt (tokenized with BOS by the model's vocabulary)" or "16 streams x 256 tokens sampled from
// fp32 (seed 1, T=1)".
std::string Describe(const TokenSource& source, const std::vector<std::vector<int>>& windows);

// OK unless both are text files and the same file (calibration must never see the evaluation text).
absl::Status CheckCalibrationApart(const std::string& eval_text, const std::string& calib_text);

// The flags all three tables take for their models and tokens (each program's usage line lists them):
//   --model PATH (repeatable; any file or HF directory formats::LoadModel reads; --stories PATH is an alias)
//   --eval-text FILE --eval-windows N (64) --window W (256)   evaluate on the first N windows of W tokens of FILE
//   --streams N (16) --stream-len L (256)                      otherwise on N sampled streams of L tokens, seed 1
// and, where the table calibrates:
//   --calib-text FILE --calib-windows N (64)                   calibrate on the first N windows of W tokens of FILE
//   --calib-streams N (64) --calib-len L (256) --calib-seed S (1000)   otherwise on sampled streams, seed S
// --threads T is shared too. Window and stream lengths are capped at each model's context.
struct TableFlags {
  std::vector<std::string> models;
  std::string eval_text;
  int eval_windows = 64;
  int window = 256;
  int streams = 16;
  int stream_len = 256;
  std::string calib_text;
  int calib_windows = 64;
  int calib_streams = 64;
  int calib_len = 256;
  uint64_t calib_seed = 1000;
  int threads = 0;

  bool any_text() const { return !eval_text.empty() || !calib_text.empty(); }
  // The sources the flags describe; sampled_only (the generated model) ignores the text flags.
  TokenSource Eval(bool sampled_only) const;
  TokenSource Calib(bool sampled_only) const;
};

// If argv[i] is one of TableFlags' flags (the calibration ones only when `calibrates`), reads it and its value,
// advances i past the value and returns true; false for any other argument. INVALID_ARGUMENT for a missing or
// bad value.
absl::StatusOr<bool> ParseTableFlag(TableFlags& flags, bool calibrates, int argc, char** argv, int& i);

// The checks across flags: positive counts, lengths of at least 2, --calib-seed other than the evaluation's seed 1,
// and calibration text apart from evaluation text (CheckCalibrationApart).
absl::Status ValidateTableFlags(const TableFlags& flags);

// formats::LoadModel(path), or Die; exits 2 with a message when text flags are given and the model has no
// vocabulary to tokenize them with.
Model LoadTableModel(const char* program, const std::string& path, const TableFlags& flags);

// "" when no text flag is given; otherwise one sentence for the generated model's header saying it is measured on
// sampled streams anyway (random weights, no vocabulary).
std::string SampledOnlyNote(const TableFlags& flags);

// The generated evaluation model of docs/quality.md: dim 512, hidden 1536, 4 layers, 8 heads / 4 kv heads,
// vocab 2048, seed 7 (every linear row length a multiple of 256, so Q4_K applies everywhere), with the classifier
// scaled by 4: random weights give nearly uniform next-token distributions, where top-1 agreement is noise; the
// scaled classifier gives peaked ones, closer to a trained model's. The classifier stays f32. It has random
// weights and no vocabulary, so the tables measure it on sampled streams only.
Model GeneratedEvalModel();
inline constexpr char kGeneratedEvalTitle[] = "generated Llama (seed 7, classifier x4)";

}  // namespace qforge::bench
