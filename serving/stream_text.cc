#include "serving/stream_text.h"

#include <algorithm>
#include <utility>

namespace qforge::serving {
namespace {

constexpr char kReplacement[] = "\xef\xbf\xbd";  // U+FFFD

// Length of the well-formed UTF-8 character starting at s[0] (RFC 3629: no overlong forms, no surrogates,
// nothing past U+10FFFF); 0 when s[0] cannot start one or a later byte breaks it; -1 when s is a valid
// beginning that is too short to tell.
int CharLength(std::string_view s) {
  const auto b0 = static_cast<unsigned char>(s[0]);
  if (b0 < 0x80) return 1;
  int len;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    return 0;
  }
  for (int i = 1; i < len; ++i) {
    if (i >= static_cast<int>(s.size())) return -1;
    const auto b = static_cast<unsigned char>(s[i]);
    if (i == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
  }
  return len;
}

}  // namespace

StreamText::StreamText(std::vector<std::string> stops) : stops_(std::move(stops)) {
  // An empty stop string would match before any text; the engine rejects it, and here it is ignored.
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

void StreamText::DecodeRaw(bool final) {
  size_t i = 0;
  while (i < raw_.size()) {
    const int len = CharLength(std::string_view(raw_).substr(i));
    if (len < 0 && !final) break;  // wait for the rest of the character
    if (len <= 0) {
      text_ += kReplacement;
      ++i;
    } else {
      text_.append(raw_, i, static_cast<size_t>(len));
      i += static_cast<size_t>(len);
    }
  }
  raw_.erase(0, i);
}

std::string StreamText::Release() {
  size_t stop_at = std::string::npos;
  for (const std::string& s : stops_) stop_at = std::min(stop_at, text_.find(s));
  if (stop_at != std::string::npos) {
    stopped_ = true;
    std::string out = text_.substr(0, stop_at);
    text_.clear();
    raw_.clear();
    return out;
  }
  // Hold back the longest tail that is a proper prefix of a stop string. A stop string begins with a lead
  // byte, so the cut is at a character boundary.
  size_t hold = 0;
  for (const std::string& s : stops_) {
    for (size_t k = std::min(s.size() - 1, text_.size()); k > hold; --k) {
      if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
        hold = k;
        break;
      }
    }
  }
  std::string out = text_.substr(0, text_.size() - hold);
  text_.erase(0, text_.size() - hold);
  return out;
}

std::string StreamText::Push(std::string_view piece) {
  if (stopped_) return "";
  raw_.append(piece);
  DecodeRaw(/*final=*/false);
  return Release();
}

std::string StreamText::Flush() {
  if (stopped_) return "";
  DecodeRaw(/*final=*/true);
  std::string out = Release();
  if (!stopped_) {
    out += text_;
    text_.clear();
  }
  return out;
}

}  // namespace qforge::serving
