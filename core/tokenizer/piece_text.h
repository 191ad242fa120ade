// How one vocabulary piece reads as text; shared by both tokenizers so that they decode identically.
#pragma once

#include <string>

#include "core/model/model.h"

namespace qforge::tokenizer_internal {

inline constexpr const char* kSpaceSymbol = kSentencePieceSpace;
// libsentencepiece's default surface for the unknown token.
inline constexpr char kUnknownSurface[] = " \xe2\x81\x87 ";

// Text of `piece` of `type`: "" for control, raw byte for byte pieces, " ⁇ " for unknown, otherwise
// the piece with "▁" -> " " (dropping one leading "▁" when at_text_start, the encoder's dummy prefix).
std::string PieceSurface(const std::string& piece, TokenType type, bool at_text_start);

// Appends `piece` from byte `from` on, with every "▁" turned into a space.
void AppendUnescaped(const std::string& piece, size_t from, std::string* out);

// Appends a run of consecutive byte-piece bytes as libsentencepiece's Decode renders it: each well-formed
// UTF-8 character (no overlong forms, surrogates or code points past U+10FFFF) as is, and every other byte
// as U+FFFD, one per byte.
void AppendByteRun(const std::string& bytes, std::string* out);

}  // namespace qforge::tokenizer_internal
