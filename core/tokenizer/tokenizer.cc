#include "core/tokenizer/tokenizer.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/formats/sentencepiece_model.h"
#include "core/tokenizer/vocab_tokenizer.h"

namespace qforge {

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path, int vocab_size) {
  QF_ASSIGN_OR_RETURN(Vocab vocab, ReadVocabFile(path, vocab_size));
  return TokenizerFromVocab(std::move(vocab));
}

absl::StatusOr<Vocab> ReadVocabFile(const std::string& path, int vocab_size) {
  if (absl::EndsWith(path, ".model")) return formats::ReadSentencePieceModel(path);
  if (absl::EndsWith(path, ".bin")) {
    if (vocab_size <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": a llama2.c tokenizer.bin needs the model's vocab_size to be read"));
    }
    return formats::ReadLlama2cTokenizer(path, vocab_size);
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": unknown tokenizer file type (expected *.model or llama2.c *.bin)"));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromVocab(Vocab vocab) {
  QF_ASSIGN_OR_RETURN(auto t, VocabTokenizer::Create(std::move(vocab)));
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace qforge
