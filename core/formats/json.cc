#include "core/formats/json.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qforge::formats {

Json Json::Bool(bool b) {
  Json j;
  j.kind_ = Kind::kBool;
  j.b_ = b;
  return j;
}
Json Json::Int(int64_t i) {
  Json j;
  j.kind_ = Kind::kInt;
  j.i_ = i;
  return j;
}
Json Json::Double(double d) {
  Json j;
  j.kind_ = Kind::kDouble;
  j.d_ = d;
  return j;
}
Json Json::String(std::string s) {
  Json j;
  j.kind_ = Kind::kString;
  j.s_ = std::make_shared<std::string>(std::move(s));
  return j;
}
Json Json::MakeArray(Array a) {
  Json j;
  j.kind_ = Kind::kArray;
  j.a_ = std::make_shared<Array>(std::move(a));
  return j;
}
Json Json::MakeObject(Object o) {
  Json j;
  j.kind_ = Kind::kObject;
  j.o_ = std::make_shared<Object>(std::move(o));
  return j;
}

const std::string& Json::string_value() const {
  static const std::string kEmpty;
  return kind_ == Kind::kString ? *s_ : kEmpty;
}
const Json::Array& Json::array() const {
  static const Array kEmpty;
  return kind_ == Kind::kArray ? *a_ : kEmpty;
}
const Json::Object& Json::object() const {
  static const Object kEmpty;
  return kind_ == Kind::kObject ? *o_ : kEmpty;
}
Json::Array& Json::mutable_array() {
  if (kind_ != Kind::kArray) *this = MakeArray();
  if (a_.use_count() > 1) a_ = std::make_shared<Array>(*a_);
  return *a_;
}
Json::Object& Json::mutable_object() {
  if (kind_ != Kind::kObject) *this = MakeObject();
  if (o_.use_count() > 1) o_ = std::make_shared<Object>(*o_);
  return *o_;
}

const Json* Json::Find(const std::string& key) const {
  if (kind_ != Kind::kObject) return nullptr;
  for (const auto& [k, v] : *o_) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Json::Set(std::string key, Json value) { mutable_object().emplace_back(std::move(key), std::move(value)); }

const char* Json::KindName(Kind k) {
  switch (k) {
    case Kind::kNull: return "null";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "integer";
    case Kind::kDouble: return "number";
    case Kind::kString: return "string";
    case Kind::kArray: return "array";
    case Kind::kObject: return "object";
  }
  return "?";
}

namespace {

// Length of the valid UTF-8 sequence at p (left > 0 bytes available), or 0 if it is invalid (overlong,
// surrogate, beyond U+10FFFF, truncated).
size_t Utf8SequenceLength(const unsigned char* p, size_t left) {
  const unsigned char c0 = p[0];
  auto cont = [&](size_t i) { return i < left && (p[i] & 0xc0) == 0x80; };
  if (c0 < 0x80) return 1;
  if (c0 >= 0xc2 && c0 <= 0xdf) return cont(1) ? 2 : 0;
  if (c0 >= 0xe0 && c0 <= 0xef) {
    if (!cont(1) || !cont(2)) return 0;
    if (c0 == 0xe0 && p[1] < 0xa0) return 0;   // overlong
    if (c0 == 0xed && p[1] >= 0xa0) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c0 >= 0xf0 && c0 <= 0xf4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (c0 == 0xf0 && p[1] < 0x90) return 0;   // overlong
    if (c0 == 0xf4 && p[1] >= 0x90) return 0;  // > U+10FFFF
    return 4;
  }
  return 0;
}

void DumpString(const std::string& s, std::string* out) {
  out->push_back('"');
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = p[i];
    if (c >= 0x80) {
      // JSON text is UTF-8: an invalid byte (e.g. from a binary GGUF string) becomes U+FFFD.
      const size_t n = Utf8SequenceLength(p + i, s.size() - i);
      if (n == 0) {
        out->append("\xef\xbf\xbd");  // U+FFFD
      } else {
        out->append(s, i, n);
        i += n - 1;
      }
      continue;
    }
    switch (c) {
      case '"': out->append("\\\""); break;
      case '\\': out->append("\\\\"); break;
      case '\n': out->append("\\n"); break;
      case '\r': out->append("\\r"); break;
      case '\t': out->append("\\t"); break;
      case '\b': out->append("\\b"); break;
      case '\f': out->append("\\f"); break;
      default:
        if (c < 0x20) {
          static const char kHex[] = "0123456789abcdef";
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 15]);
        } else {
          out->push_back(static_cast<char>(c));
        }
    }
  }
  out->push_back('"');
}

void DumpTo(const Json& j, std::string* out) {
  switch (j.kind()) {
    case Json::Kind::kNull: out->append("null"); break;
    case Json::Kind::kBool: out->append(j.bool_value() ? "true" : "false"); break;
    case Json::Kind::kInt: absl::StrAppend(out, j.int_value()); break;
    case Json::Kind::kDouble: {
      const double d = j.number_value();
      if (!std::isfinite(d)) {
        out->append("null");  // JSON has no inf/NaN
        break;
      }
      char buf[64];
      // Shortest representation that reads back to the same double.
      auto r = std::to_chars(buf, buf + sizeof(buf), d);
      out->append(buf, r.ptr);
      // Keep it a double when read back ("-0" or "5" would come back as integers).
      if (std::find_if(buf, r.ptr, [](char c) { return c == '.' || c == 'e' || c == 'E'; }) == r.ptr) {
        out->append(".0");
      }
      break;
    }
    case Json::Kind::kString: DumpString(j.string_value(), out); break;
    case Json::Kind::kArray: {
      out->push_back('[');
      bool first = true;
      for (const Json& e : j.array()) {
        if (!first) out->push_back(',');
        first = false;
        DumpTo(e, out);
      }
      out->push_back(']');
      break;
    }
    case Json::Kind::kObject: {
      out->push_back('{');
      bool first = true;
      for (const auto& [k, v] : j.object()) {
        if (!first) out->push_back(',');
        first = false;
        DumpString(k, out);
        out->push_back(':');
        DumpTo(v, out);
      }
      out->push_back('}');
      break;
    }
  }
}

class Parser {
 public:
  Parser(const std::string& text, const JsonLimits& limits) : s_(text), limits_(limits) {}

  absl::StatusOr<Json> ParseDocument() {
    if (s_.size() > limits_.max_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("json: document of ", s_.size(), " bytes exceeds the limit of ", limits_.max_bytes));
    }
    Json root;
    if (absl::Status st = ParseValue(&root, 0); !st.ok()) return st;
    SkipSpace();
    if (pos_ != s_.size()) return Error("trailing characters after the JSON value");
    return root;
  }

 private:
  absl::Status Error(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat("json: ", what, " at offset ", pos_));
  }

  void SkipSpace() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  bool Consume(const char* lit) {
    const size_t n = std::strlen(lit);
    if (s_.compare(pos_, n, lit) == 0) {
      pos_ += n;
      return true;
    }
    return false;
  }

  absl::Status ParseValue(Json* out, int depth) {
    SkipSpace();
    if (pos_ >= s_.size()) return Error("unexpected end of input, expected a value");
    const char c = s_[pos_];
    switch (c) {
      case '{': return ParseObject(out, depth + 1);
      case '[': return ParseArray(out, depth + 1);
      case '"': {
        std::string str;
        if (absl::Status st = ParseString(&str); !st.ok()) return st;
        *out = Json::String(std::move(str));
        return absl::OkStatus();
      }
      case 't':
        if (Consume("true")) {
          *out = Json::Bool(true);
          return absl::OkStatus();
        }
        break;
      case 'f':
        if (Consume("false")) {
          *out = Json::Bool(false);
          return absl::OkStatus();
        }
        break;
      case 'n':
        if (Consume("null")) {
          *out = Json::Null();
          return absl::OkStatus();
        }
        break;
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber(out);
    }
    return Error(absl::StrCat("unexpected character '", PrintableChar(c), "'"));
  }

  static std::string PrintableChar(char c) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u < 0x7f) return std::string(1, c);
    return absl::StrCat("\\x", absl::Hex(u, absl::kZeroPad2));
  }

  absl::Status ParseObject(Json* out, int depth) {
    if (depth > limits_.max_depth) return Error(absl::StrCat("nesting deeper than ", limits_.max_depth));
    ++pos_;  // '{'
    Json::Object members;
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == '}') {
      ++pos_;
      *out = Json::MakeObject(std::move(members));
      return absl::OkStatus();
    }
    while (true) {
      SkipSpace();
      if (pos_ >= s_.size() || s_[pos_] != '"') return Error("expected a string key");
      std::string key;
      if (absl::Status st = ParseString(&key); !st.ok()) return st;
      SkipSpace();
      if (pos_ >= s_.size() || s_[pos_] != ':') return Error("expected ':'");
      ++pos_;
      Json value;
      if (absl::Status st = ParseValue(&value, depth); !st.ok()) return st;
      if (members.size() >= limits_.max_members) return Error("object has too many members");
      members.emplace_back(std::move(key), std::move(value));
      SkipSpace();
      if (pos_ >= s_.size()) return Error("unexpected end of input in object");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == '}') {
        ++pos_;
        break;
      }
      return Error("expected ',' or '}'");
    }
    // Duplicate keys are ambiguous (which one wins differs between parsers), so a hostile file could show
    // different tensors to different tools: reject them.
    if (members.size() > 1) {
      std::vector<const std::string*> keys;
      keys.reserve(members.size());
      for (const auto& m : members) keys.push_back(&m.first);
      std::sort(keys.begin(), keys.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
      for (size_t i = 1; i < keys.size(); ++i) {
        if (*keys[i] == *keys[i - 1]) return Error(absl::StrCat("duplicate key \"", *keys[i], "\" in object ending"));
      }
    }
    *out = Json::MakeObject(std::move(members));
    return absl::OkStatus();
  }

  absl::Status ParseArray(Json* out, int depth) {
    if (depth > limits_.max_depth) return Error(absl::StrCat("nesting deeper than ", limits_.max_depth));
    ++pos_;  // '['
    Json::Array items;
    SkipSpace();
    if (pos_ < s_.size() && s_[pos_] == ']') {
      ++pos_;
      *out = Json::MakeArray(std::move(items));
      return absl::OkStatus();
    }
    while (true) {
      Json value;
      if (absl::Status st = ParseValue(&value, depth); !st.ok()) return st;
      if (items.size() >= limits_.max_members) return Error("array has too many elements");
      items.push_back(std::move(value));
      SkipSpace();
      if (pos_ >= s_.size()) return Error("unexpected end of input in array");
      if (s_[pos_] == ',') {
        ++pos_;
        continue;
      }
      if (s_[pos_] == ']') {
        ++pos_;
        break;
      }
      return Error("expected ',' or ']'");
    }
    *out = Json::MakeArray(std::move(items));
    return absl::OkStatus();
  }

  absl::Status ParseHex4(uint32_t* out) {
    if (s_.size() - pos_ < 4) return Error("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_ + i];
      v <<= 4;
      if (c >= '0' && c <= '9') {
        v |= static_cast<uint32_t>(c - '0');
      } else if (c >= 'a' && c <= 'f') {
        v |= static_cast<uint32_t>(c - 'a' + 10);
      } else if (c >= 'A' && c <= 'F') {
        v |= static_cast<uint32_t>(c - 'A' + 10);
      } else {
        return Error("bad hex digit in \\u escape");
      }
    }
    pos_ += 4;
    *out = v;
    return absl::OkStatus();
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      out->push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
      out->push_back(static_cast<char>(0xc0 | (cp >> 6)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
      out->push_back(static_cast<char>(0xe0 | (cp >> 12)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    } else {
      out->push_back(static_cast<char>(0xf0 | (cp >> 18)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3f)));
      out->push_back(static_cast<char>(0x80 | (cp & 0x3f)));
    }
  }

  absl::Status ParseString(std::string* out) {
    ++pos_;  // opening quote
    out->clear();
    while (true) {
      if (pos_ >= s_.size()) return Error("unterminated string");
      if (out->size() > limits_.max_string_bytes) {
        return Error(absl::StrCat("string longer than ", limits_.max_string_bytes, " bytes"));
      }
      const auto c = static_cast<unsigned char>(s_[pos_]);
      if (c == '"') {
        ++pos_;
        return absl::OkStatus();
      }
      if (c < 0x20) return Error("unescaped control character in string");
      if (c == '\\') {
        ++pos_;
        if (pos_ >= s_.size()) return Error("unterminated escape");
        const char e = s_[pos_++];
        switch (e) {
          case '"': out->push_back('"'); break;
          case '\\': out->push_back('\\'); break;
          case '/': out->push_back('/'); break;
          case 'b': out->push_back('\b'); break;
          case 'f': out->push_back('\f'); break;
          case 'n': out->push_back('\n'); break;
          case 'r': out->push_back('\r'); break;
          case 't': out->push_back('\t'); break;
          case 'u': {
            uint32_t cp = 0;
            if (absl::Status st = ParseHex4(&cp); !st.ok()) return st;
            if (cp >= 0xdc00 && cp <= 0xdfff) return Error("lone low surrogate in \\u escape");
            if (cp >= 0xd800 && cp <= 0xdbff) {
              if (s_.compare(pos_, 2, "\\u") != 0) return Error("high surrogate not followed by a \\u low surrogate");
              pos_ += 2;
              uint32_t lo = 0;
              if (absl::Status st = ParseHex4(&lo); !st.ok()) return st;
              if (lo < 0xdc00 || lo > 0xdfff) return Error("high surrogate followed by a non-low-surrogate");
              cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            AppendUtf8(cp, out);
            break;
          }
          default: return Error(absl::StrCat("invalid escape '\\", PrintableChar(e), "'"));
        }
        continue;
      }
      const size_t n = Utf8SequenceLength(reinterpret_cast<const unsigned char*>(s_.data()) + pos_, s_.size() - pos_);
      if (n == 0) return Error("invalid UTF-8 in string");
      out->append(s_, pos_, n);
      pos_ += n;
    }
  }

  absl::Status ParseNumber(Json* out) {
    const size_t start = pos_;
    auto digit = [&] { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; };
    if (s_[pos_] == '-') ++pos_;
    if (!digit()) return Error("expected a digit");
    if (s_[pos_] == '0') {
      ++pos_;
      if (digit()) return Error("leading zero in number");
    } else {
      while (digit()) ++pos_;
    }
    bool integral = true;
    if (pos_ < s_.size() && s_[pos_] == '.') {
      integral = false;
      ++pos_;
      if (!digit()) return Error("expected a digit after '.'");
      while (digit()) ++pos_;
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      integral = false;
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (!digit()) return Error("expected a digit in exponent");
      while (digit()) ++pos_;
    }
    const char* first = s_.data() + start;
    const char* last = s_.data() + pos_;
    if (integral) {
      int64_t i = 0;
      auto r = std::from_chars(first, last, i);
      if (r.ec == std::errc() && r.ptr == last) {
        *out = Json::Int(i);
        return absl::OkStatus();
      }
      // Integers beyond int64 fall through to double.
    }
    double d = 0;
    auto r = std::from_chars(first, last, d);
    if (r.ec == std::errc::result_out_of_range) {
      // Underflow (a negative exponent) to zero is harmless; overflow to infinity is not a JSON number.
      const char* e = std::find_if(first, last, [](char ch) { return ch == 'e' || ch == 'E'; });
      const bool underflow = e != last && e + 1 < last && e[1] == '-';
      if (!underflow) return Error("number out of range");
      d = 0;
    } else if (r.ec != std::errc() || r.ptr != last) {
      return Error("malformed number");
    }
    *out = Json::Double(d);
    return absl::OkStatus();
  }

  const std::string& s_;
  const JsonLimits& limits_;
  size_t pos_ = 0;
};

}  // namespace

std::string Json::Dump() const {
  std::string out;
  DumpTo(*this, &out);
  return out;
}

absl::StatusOr<Json> ParseJson(const std::string& text, const JsonLimits& limits) {
  return Parser(text, limits).ParseDocument();
}

}  // namespace qforge::formats
