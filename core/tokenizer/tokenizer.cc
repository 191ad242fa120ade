#include "core/tokenizer/tokenizer.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/formats.h"
#include "core/tokenizer/piece_text.h"
#include "core/tokenizer/sp_model.h"
#include "core/tokenizer/vocab_tokenizer.h"

namespace qforge {

namespace {

absl::StatusOr<Vocab> ReadLlama2cVocab(const std::string& path, int vocab_size) {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a llama2.c tokenizer.bin needs the model's vocab_size to be read"));
  }
  QF_ASSIGN_OR_RETURN(Vocab vocab, formats::ReadLlama2cTokenizer(path, vocab_size));
  // llama2.c's exporter wrote pieces with plain spaces where SentencePiece has "▁"; restore the
  // SentencePiece spelling so the vocabulary is the one GGUF and VocabTokenizer expect.
  for (size_t i = 0; i < vocab.tokens.size(); ++i) {
    if (vocab.types[i] != TokenType::kNormal) continue;
    std::string piece;
    for (char ch : vocab.tokens[i]) {
      if (ch == ' ') piece += tokenizer_internal::kSpaceSymbol;
      else piece.push_back(ch);
    }
    vocab.tokens[i] = std::move(piece);
  }
  return vocab;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path, int vocab_size) {
  if (absl::EndsWith(path, ".model")) {
    QF_ASSIGN_OR_RETURN(SentencePieceModel sp, ReadSentencePieceModel(path));
    QF_ASSIGN_OR_RETURN(auto t, VocabTokenizer::Create(std::move(sp.vocab), sp.options));
    return std::unique_ptr<Tokenizer>(std::move(t));
  }
  if (absl::EndsWith(path, ".bin")) {
    QF_ASSIGN_OR_RETURN(Vocab vocab, ReadLlama2cVocab(path, vocab_size));
    return TokenizerFromVocab(std::move(vocab));
  }
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": unknown tokenizer file type (expected *.model or llama2.c *.bin)"));
}

absl::StatusOr<Vocab> ReadVocabFile(const std::string& path, int vocab_size) {
  if (absl::EndsWith(path, ".model")) {
    QF_ASSIGN_OR_RETURN(SentencePieceModel sp, ReadSentencePieceModel(path));
    return std::move(sp.vocab);
  }
  if (absl::EndsWith(path, ".bin")) return ReadLlama2cVocab(path, vocab_size);
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": unknown tokenizer file type (expected *.model or llama2.c *.bin)"));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromVocab(Vocab vocab) {
  QF_ASSIGN_OR_RETURN(auto t, VocabTokenizer::Create(std::move(vocab)));
  return std::unique_ptr<Tokenizer>(std::move(t));
}

}  // namespace qforge
