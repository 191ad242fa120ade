// Lower-level, from-bytes entry points behind the path-based readers in formats.h. The path readers map the
// file and call these; fuzzers and tests call them directly on in-memory buffers. `owner` keeps `bytes`
// alive and becomes the owner of every returned tensor view (pass nullptr only if the model is dropped
// before `bytes` goes away, as a fuzzer does).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/formats/formats.h"
#include "core/model/model.h"

namespace qforge::formats {

absl::StatusOr<Model> ParseLlama2c(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner);
absl::StatusOr<Vocab> ParseLlama2cTokenizer(std::span<const uint8_t> bytes, int vocab_size);

// Gives m a vocabulary from the first of `names` (in the directory of model_path) that exists: a llama2.c
// *.bin or a SentencePiece *.model with m's vocab_size tokens. Records the file in metadata "tokenizer.path";
// a candidate that exists but does not fit is skipped and named in "tokenizer.skipped" with the reason,
// so a stray file never blocks loading the weights.
void AttachSiblingTokenizer(const std::string& model_path, const std::vector<std::string>& names, Model* m);

// A float tensor (f32, f16 or bf16) rewritten in float type `to` (exact to f32, round to nearest even to f16 /
// bf16): CastFloatTensors' step, and the GGUF writer's widening of 1-D tensors.
Tensor CastFloatTensor(const Tensor& t, WeightType to);

absl::StatusOr<Model> ParseGguf(std::span<const uint8_t> bytes, std::shared_ptr<const void> owner);
// llama-imatrix's GGUF file (formats.h ReadImatrixGguf); the result owns its numbers.
absl::StatusOr<ImportanceMatrix> ParseImatrixGguf(std::span<const uint8_t> bytes);
absl::StatusOr<std::vector<uint8_t>> SerializeImatrixGguf(const ImportanceMatrix& m);
// Serialises `m` to GGUF v3 bytes (what WriteGguf writes).
absl::StatusOr<std::vector<uint8_t>> SerializeGguf(const Model& m);

// One safetensors file, parsed and checked, with tensors under their file names (no renaming or
// permutation yet). Raw dtype is kept so callers can decide how to interpret U8 tensors.
struct SafetensorsEntry {
  std::string name;
  std::string dtype;            // "F32", "F16", "BF16", "U8"
  std::vector<int64_t> shape;   // as stored
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
};
struct SafetensorsFile {
  std::vector<SafetensorsEntry> tensors;  // in file offset order
  std::map<std::string, std::string> metadata;  // __metadata__
};
absl::StatusOr<SafetensorsFile> ParseSafetensorsFile(std::span<const uint8_t> bytes);

// Turns HF config.json text into a ModelConfig (llama only; required fields must be present).
absl::StatusOr<ModelConfig> ParseHfConfig(const std::string& json_text);
std::string HfConfigJson(const ModelConfig& c);

// Builds a Model from parsed safetensors files (HF names, rotate-half q/k) and a config: renames to
// canonical names, restores qforge encodings recorded in metadata, un-permutes q/k. `owners[i]` keeps
// files[i]'s bytes alive.
absl::StatusOr<Model> ModelFromSafetensors(const ModelConfig& config, const std::vector<SafetensorsFile>& files,
                                           const std::vector<std::shared_ptr<const void>>& owners);
// Serialises `m` to safetensors bytes (what WriteSafetensors writes, without config.json).
absl::StatusOr<std::vector<uint8_t>> SerializeSafetensors(const Model& m);

// Row permutations between interleaved-pair RoPE order (canonical, Meta/GGUF/llama2.c) and HF's rotate-half
// order, for a [n_head * head_dim, in] projection. ToHf is what HF's conversion from Meta weights does.
// Returns the permuted tensor (a new heap tensor); handles every encoding (see formats docs for NF4).
absl::StatusOr<Tensor> PermuteQkToHf(const Tensor& t, int n_head);
absl::StatusOr<Tensor> PermuteQkFromHf(const Tensor& t, int n_head);

}  // namespace qforge::formats
