#include "core/tokenizer/piece_text.h"

#include <cstring>

namespace qforge::tokenizer_internal {

int ParseBytePiece(const std::string& piece) {
  if (piece.size() != 6 || piece.compare(0, 3, "<0x") != 0 || piece[5] != '>') return -1;
  int value = 0;
  for (int i = 3; i < 5; ++i) {
    const char ch = piece[i];
    int d;
    if (ch >= '0' && ch <= '9') d = ch - '0';
    else if (ch >= 'A' && ch <= 'F') d = ch - 'A' + 10;
    else if (ch >= 'a' && ch <= 'f') d = ch - 'a' + 10;
    else return -1;
    value = value * 16 + d;
  }
  return value;
}

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
  size_t i = 0;
  if (at_text_start && piece.compare(0, sym, kSpaceSymbol) == 0) i = sym;
  std::string out;
  out.reserve(piece.size());
  while (i < piece.size()) {
    if (piece.compare(i, sym, kSpaceSymbol) == 0) {
      out.push_back(' ');
      i += sym;
    } else {
      out.push_back(piece[i++]);
    }
  }
  return out;
}

}  // namespace qforge::tokenizer_internal
