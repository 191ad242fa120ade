// SentencePiece .model files (a serialized sentencepiece.ModelProto), read and written by handling the protobuf
// wire format directly. libsentencepiece cannot be used for this in production: Debian 12's build exports its
// own copy of protobuf-lite, and a process that also links libprotobuf (every gRPC binary) crashes in
// protobuf's static initialisers.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/model.h"

namespace qforge::formats {

// What a .model file holds, as a Vocab: pieces, scores and types in file order (TokenType numbers are the
// proto's SentencePiece.Type numbers); bos/eos/unk from TrainerSpec (proto2 defaults 1/2/0); model "llama",
// as GGUF names SentencePiece BPE; normalizer from NormalizerSpec.add_dummy_prefix and
// remove_extra_whitespaces (both default true when absent) and TrainerSpec.unk_surface. VocabTokenizer over
// it encodes and decodes exactly as libsentencepiece does with that file.
// Parses the bytes of a .model file. The bytes are untrusted: every length is bounds-checked and any
// malformation (truncation, a length past the end, an overlong varint, an invalid wire type, more than
// 2^20 pieces, inconsistent special pieces, ...) is INVALID_ARGUMENT naming the problem and its byte offset.
// Unknown fields of every wire type are skipped, and repeated occurrences of a message field merge, as
// protobuf does. A valid model that VocabTokenizer cannot reproduce exactly is UNIMPLEMENTED: a model_type
// other than BPE, a normaliser or denormaliser with a precompiled_charsmap, escape_whitespaces=false,
// treat_whitespace_as_suffix=true, USER_DEFINED pieces (libsentencepiece matches them before BPE),
// UNUSED pieces (it merges through them and splits them again), or no BOS/EOS piece.
absl::StatusOr<Vocab> ParseSentencePieceModel(std::string_view serialized);

// Maps `path` and parses it; errors are prefixed with the path. Files over 256 MiB are rejected unread
// (real models are a few MiB).
absl::StatusOr<Vocab> ReadSentencePieceModel(const std::string& path);

// The .model file of a SentencePiece-BPE vocabulary (vocab.model == "llama"): its pieces, a BPE TrainerSpec
// (byte_fallback when it has byte pieces, the special ids, unk_surface) and an "identity" NormalizerSpec with
// its flags. ParseSentencePieceModel of the result gives `vocab` back, and libsentencepiece loads it.
// INVALID_ARGUMENT for another tokenizer model or inconsistent lengths.
absl::StatusOr<std::string> SerializeSentencePieceModel(const Vocab& vocab);
absl::Status WriteSentencePieceModel(const Vocab& vocab, const std::string& path);

}  // namespace qforge::formats
