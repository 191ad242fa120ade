// Pieces the quality tables (quality_table, calibrated_table) share, so both measure the same models.
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "core/model/model.h"
#include "core/runtime/transformer.h"

namespace qforge::bench {

// Prints "<program>: <what>: <message>" to stderr and exits 1.
[[noreturn]] void Die(const char* program, const std::string& what, const absl::Status& s);

// A Transformer over `m`, or Die.
std::unique_ptr<Transformer> MakeRuntime(const char* program, Model m, int threads);

// The generated evaluation model of docs/quality.md: dim 512, hidden 1536, 4 layers, 8 heads / 4 kv heads,
// vocab 2048, seed 7 (every linear row length a multiple of 256, so Q4_K applies everywhere), with the classifier
// scaled by 4: random weights give nearly uniform next-token distributions, where top-1 agreement is noise; the
// scaled classifier gives peaked ones, closer to a trained model's. The classifier stays f32.
Model GeneratedEvalModel();
inline constexpr char kGeneratedEvalTitle[] = "generated Llama (seed 7, classifier x4)";

}  // namespace qforge::bench
