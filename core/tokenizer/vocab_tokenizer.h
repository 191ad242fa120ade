// SentencePiece-BPE tokenization from a vocabulary (pieces + scores + types + the normaliser flags of
// VocabNormalizer), as .model files, GGUF files and llama2.c's tokenizer.bin carry it: no normaliser beyond
// space escaping, merges ranked by piece score.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "core/tokenizer/tokenizer.h"


namespace qforge {

class VocabTokenizer : public Tokenizer {
 public:
  // Encodes and decodes with vocab.normalizer's flags. INVALID_ARGUMENT when tokens/scores/types disagree in
  // length or bos/eos/unk are out of range.
  static absl::StatusOr<std::unique_ptr<VocabTokenizer>> Create(Vocab vocab);

  // Extra spaces are removed if the normaliser says so, spaces become "▁", a "▁" is prepended (the dummy prefix), the text is split into UTF-8 characters,
  // and the adjacent pair whose concatenation is a normal vocabulary piece with the highest score is
  // merged (leftmost on ties) until no pair merges. Characters without a piece become <0xNN> byte tokens,
  // or, when the vocabulary has no byte tokens, unk (one for a whole run of such characters, as
  // libsentencepiece merges adjacent unknown pieces).
  absl::StatusOr<std::vector<int>> Encode(const std::string& text, bool add_bos) const override;
  // Encode, except that the spelling of a control token (type kControl: "<s>", "</s>", "<|im_start|>", ...)
  // anywhere in `text` becomes that token, the longest spelling where several start at one place; the text
  // between them is encoded on its own (each piece with the dummy prefix, as Hugging Face's legacy Llama
  // tokenizer does after a special token). For prompts rendered by a chat template, whose turns are marked
  // with such tokens; Encode itself never produces control tokens from text.
  absl::StatusOr<std::vector<int>> EncodeWithControlTokens(const std::string& text, bool add_bos) const;
  // As libsentencepiece decodes: a run of byte tokens becomes its UTF-8 text with U+FFFD for each byte that
  // is not part of a well-formed character; the leading "▁" of the first text piece is dropped when the
  // dummy prefix (or remove_extra_whitespaces) is on, and with remove_extra_whitespaces every leading "▁" is
  // dropped until some text has been produced.
  absl::StatusOr<std::string> Decode(std::span<const int> ids) const override;
  // Byte tokens come out raw (a streaming caller cannot know whether the next byte completes a character),
  // and only a piece right after BOS (or at the start) loses its leading "▁". So the concatenation equals
  // Decode when the bytes form valid UTF-8 and, with remove_extra_whitespaces, no whitespace-only piece
  // opens the text.
  absl::StatusOr<std::string> DecodePiece(int prev, int id) const override;
  int vocab_size() const override { return static_cast<int>(vocab_.tokens.size()); }
  int bos_id() const override { return vocab_.bos_id; }
  int eos_id() const override { return vocab_.eos_id; }

  const Vocab& vocab() const { return vocab_; }

 private:
  explicit VocabTokenizer(Vocab vocab);

  Vocab vocab_;
  std::unordered_map<std::string, int> mergeable_;  // normal and user-defined pieces -> id
  std::vector<int> control_ids_;                    // control tokens with a non-empty piece, longest piece first
  int byte_ids_[256];                                // <0xNN> -> id, or -1
};

}  // namespace qforge
