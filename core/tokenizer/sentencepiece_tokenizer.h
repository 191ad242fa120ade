// Tokenizer backed by Debian's libsentencepiece: the reference implementation that tests compare
// ReadSentencePieceModel + VocabTokenizer (what LoadTokenizer uses) against, in the test-only CMake target
// qforge_tokenizer_sp. Never link it into production code: Debian 12's libsentencepiece exports its own copy of
// protobuf-lite, and a process that also links libprotobuf (every gRPC binary) crashes at start-up in
// protobuf's static initialisers.
#pragma once

#include <memory>
#include <string>

#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/vocab_tokenizer.h"

namespace qforge::tokenizer_internal {
class SpProcessor;
}

namespace qforge {

class SentencePieceTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<SentencePieceTokenizer>> Load(const std::string& model_path);
  ~SentencePieceTokenizer() override;

  absl::StatusOr<std::vector<int>> Encode(const std::string& text, bool add_bos) const override;
  absl::StatusOr<std::string> Decode(std::span<const int> ids) const override;
  absl::StatusOr<std::string> DecodePiece(int prev, int id) const override;
  int vocab_size() const override;
  int bos_id() const override;
  int eos_id() const override;

  // The vocabulary as GGUF stores it: pieces, scores, and types from IsControl/IsUnknown/IsByte/IsUnused
  // (the public API cannot tell user-defined pieces apart: they are reported as normal), with
  // NormalizerOptions(), so that VocabTokenizer::Create(ExportVocab()) encodes like this tokenizer.
  Vocab ExportVocab() const;
  // The model's normaliser flags, read from its NormalizerSpec.
  VocabNormalizer NormalizerOptions() const { return normalizer_; }
  // The piece string of `id` (with "▁"), or "" when out of range.
  std::string IdToPiece(int id) const;

 private:
  SentencePieceTokenizer();
  std::unique_ptr<tokenizer_internal::SpProcessor> sp_;
  VocabNormalizer normalizer_;
};

}  // namespace qforge
