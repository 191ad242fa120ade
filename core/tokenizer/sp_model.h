// Reads SentencePiece .model files (a serialized sentencepiece.ModelProto) by decoding the protobuf wire
// format directly. libsentencepiece cannot be used for this in production: Debian 12's build exports its own
// copy of protobuf-lite, and a process that also links libprotobuf (every gRPC binary) crashes in protobuf's
// static initialisers.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/tokenizer/vocab_tokenizer.h"

namespace qforge {

// A .model file as VocabTokenizer needs it: VocabTokenizer::Create(vocab, options) encodes and decodes
// exactly as libsentencepiece does with that file.
struct SentencePieceModel {
  // Pieces, scores and types in file order (TokenType numbers are the proto's SentencePiece.Type numbers);
  // bos/eos/unk from TrainerSpec (proto2 defaults 1/2/0); model "llama", as GGUF names SentencePiece BPE.
  Vocab vocab;
  // From NormalizerSpec.add_dummy_prefix and remove_extra_whitespaces (both default true when absent).
  VocabTokenizerOptions options;
};

// Parses the bytes of a .model file. The bytes are untrusted: every length is bounds-checked and any
// malformation (truncation, a length past the end, an overlong varint, an invalid wire type, more than
// 2^20 pieces, inconsistent special pieces, ...) is INVALID_ARGUMENT naming the problem and its byte offset.
// Unknown fields of every wire type are skipped, and repeated occurrences of a message field merge, as
// protobuf does. A valid model that VocabTokenizer cannot reproduce exactly is UNIMPLEMENTED: a model_type
// other than BPE, a normaliser or denormaliser with a precompiled_charsmap, escape_whitespaces=false,
// treat_whitespace_as_suffix=true, USER_DEFINED pieces (libsentencepiece matches them before BPE),
// UNUSED pieces (it merges through them and splits them again), or no BOS/EOS piece.
absl::StatusOr<SentencePieceModel> ParseSentencePieceModel(std::string_view serialized);

// Maps `path` and parses it; errors are prefixed with the path. Files over 256 MiB are rejected unread
// (real models are a few MiB).
absl::StatusOr<SentencePieceModel> ReadSentencePieceModel(const std::string& path);

}  // namespace qforge
