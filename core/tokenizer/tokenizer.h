// Text <-> token ids. The implementation is VocabTokenizer (a Vocab, as embedded in GGUF, read from llama2.c's
// tokenizer.bin or from a SentencePiece .model by core/formats/sentencepiece_model.h, encoded with SentencePiece-BPE merges by score
// and byte fallback). SentencePieceTokenizer (sentencepiece_tokenizer.h, target qforge_tokenizer_sp) wraps
// libsentencepiece and exists only as the reference the tests compare against: production code must not
// link it (its private protobuf copy crashes gRPC binaries at start-up).
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"

namespace qforge {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Token ids for `text`, preceded by BOS when add_bos. Empty text gives just [BOS] (or nothing).
  virtual absl::StatusOr<std::vector<int>> Encode(const std::string& text, bool add_bos) const = 0;
  // The text of `ids`, as libsentencepiece decodes it: control tokens (BOS/EOS) vanish, runs of byte tokens
  // become their bytes (U+FFFD for each byte that is not part of a well-formed UTF-8 character), and the
  // space the encoder prepended (the dummy prefix) is removed at the start of the text. INVALID_ARGUMENT on
  // a bad id.
  virtual absl::StatusOr<std::string> Decode(std::span<const int> ids) const = 0;
  // The text token `id` contributes when it follows `prev` (for streaming): the piece with "▁" as space,
  // raw bytes for byte tokens, "" for control tokens, and no leading space right after BOS.
  // Concatenating DecodePiece over a sequence starting with BOS equals Decode of it when its byte tokens
  // form valid UTF-8 (see VocabTokenizer::DecodePiece for the one other exception).
  virtual absl::StatusOr<std::string> DecodePiece(int prev, int id) const = 0;

  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
};

// A VocabTokenizer over ReadVocabFile(path, vocab_size).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::string& path, int vocab_size = 0);

// The vocabulary of a tokenizer file in canonical SentencePiece spelling (pieces with "▁"), by extension:
// *.model via formats::ReadSentencePieceModel (UNIMPLEMENTED for models VocabTokenizer cannot reproduce
// exactly, e.g. Unigram ones), *.bin via formats::ReadLlama2cTokenizer (llama2.c's tokenizer.bin does not
// record its token count, so `vocab_size`, the model's, is required there).
absl::StatusOr<Vocab> ReadVocabFile(const std::string& path, int vocab_size = 0);

// A VocabTokenizer over `vocab` (checked for consistency), normalising as vocab.normalizer says.
absl::StatusOr<std::unique_ptr<Tokenizer>> TokenizerFromVocab(Vocab vocab);

}  // namespace qforge
