#include "core/tokenizer/piece_text.h"

#include <cstdint>
#include <cstring>

namespace qforge::tokenizer_internal {

std::string PieceSurface(const std::string& piece, TokenType type, bool at_text_start) {
  switch (type) {
    case TokenType::kControl:
      return "";
    case TokenType::kUnknown:
      return kUnknownSurface;
    case TokenType::kByte: {
      const int b = ParseBytePiece(piece);
      if (b >= 0) return std::string(1, static_cast<char>(b));
      break;
    }
    default:
      break;
  }
  const size_t sym = std::strlen(kSpaceSymbol);
  const size_t from = at_text_start && piece.compare(0, sym, kSpaceSymbol) == 0 ? sym : 0;
  std::string out;
  out.reserve(piece.size());
  AppendUnescaped(piece, from, &out);
  return out;
}

void AppendUnescaped(const std::string& piece, size_t from, std::string* out) {
  const size_t sym = std::strlen(kSpaceSymbol);
  for (size_t i = from; i < piece.size();) {
    if (piece.compare(i, sym, kSpaceSymbol) == 0) {
      out->push_back(' ');
      i += sym;
    } else {
      out->push_back(piece[i++]);
    }
  }
}

namespace {

bool IsTrail(unsigned char b) { return (b & 0xC0) == 0x80; }
bool IsValidCodepoint(uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); }

// Length of the well-formed UTF-8 character at s[0..n), or 0 when it is not one.
size_t Utf8CharLength(const unsigned char* s, size_t n) {
  if (s[0] < 0x80) return 1;
  if ((s[0] & 0xE0) == 0xC0) {
    if (n < 2 || !IsTrail(s[1])) return 0;
    const uint32_t c = (uint32_t{s[0] & 0x1Fu} << 6) | (s[1] & 0x3Fu);
    return c >= 0x80 ? 2 : 0;
  }
  if ((s[0] & 0xF0) == 0xE0) {
    if (n < 3 || !IsTrail(s[1]) || !IsTrail(s[2])) return 0;
    const uint32_t c = (uint32_t{s[0] & 0x0Fu} << 12) | (uint32_t{s[1] & 0x3Fu} << 6) | (s[2] & 0x3Fu);
    return c >= 0x800 && IsValidCodepoint(c) ? 3 : 0;
  }
  if ((s[0] & 0xF8) == 0xF0) {
    if (n < 4 || !IsTrail(s[1]) || !IsTrail(s[2]) || !IsTrail(s[3])) return 0;
    const uint32_t c = (uint32_t{s[0] & 0x07u} << 18) | (uint32_t{s[1] & 0x3Fu} << 12) |
                       (uint32_t{s[2] & 0x3Fu} << 6) | (s[3] & 0x3Fu);
    return c >= 0x10000 && IsValidCodepoint(c) ? 4 : 0;
  }
  return 0;
}

}  // namespace

void AppendByteRun(const std::string& bytes, std::string* out) {
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = 0; i < bytes.size();) {
    const size_t len = Utf8CharLength(s + i, bytes.size() - i);
    if (len == 0) {
      out->append("\xef\xbf\xbd");  // U+FFFD REPLACEMENT CHARACTER
      ++i;
    } else {
      out->append(bytes, i, len);
      i += len;
    }
  }
}

}  // namespace qforge::tokenizer_internal
