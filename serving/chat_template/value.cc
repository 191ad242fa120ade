// Values of the template language: construction, truthiness, equality and printing (Python's conventions,
// since the templates are written for Jinja running in Python).
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "serving/chat_template/chat_template.h"

namespace qforge::chat {

namespace {
const std::string kEmptyString;
const Value::List kEmptyList;
const Value::Dict kEmptyDict;

// Python's repr of a float: the shortest text that reads back the same, with ".0" on integral values.
std::string FloatText(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof(buf), d);
  std::string s(buf, ec == std::errc() ? end : buf);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string QuoteString(const std::string& s) {
  // Python prefers single quotes unless the text holds one and no double quote.
  const char quote = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c == quote) out += '\\';
        out += c;
    }
  }
  out += quote;
  return out;
}
}  // namespace

Value Value::None() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value Value::Bool(bool b) {
  Value v;
  v.kind_ = Kind::kBool;
  v.b_ = b;
  return v;
}
Value Value::Int(int64_t i) {
  Value v;
  v.kind_ = Kind::kInt;
  v.i_ = i;
  return v;
}
Value Value::Float(double d) {
  Value v;
  v.kind_ = Kind::kFloat;
  v.d_ = d;
  return v;
}
Value Value::String(std::string s) {
  Value v;
  v.kind_ = Kind::kString;
  v.s_ = std::make_shared<const std::string>(std::move(s));
  return v;
}
Value Value::MakeList(List items) {
  Value v;
  v.kind_ = Kind::kList;
  for (const Value& item : items) v.depth_ = std::max(v.depth_, item.depth_);
  ++v.depth_;
  v.l_ = std::make_shared<const List>(std::move(items));
  return v;
}
Value Value::MakeDict(Dict members) {
  Value v;
  v.kind_ = Kind::kDict;
  for (const auto& [k, member] : members) v.depth_ = std::max(v.depth_, member.depth_);
  ++v.depth_;
  v.d_members_ = std::make_shared<Dict>(std::move(members));
  return v;
}
Value Value::MakeNamespace(Dict members) {
  Value v = MakeDict(std::move(members));
  v.kind_ = Kind::kNamespace;
  return v;
}

const std::string& Value::string_value() const { return kind_ == Kind::kString ? *s_ : kEmptyString; }
const Value::List& Value::list() const { return kind_ == Kind::kList ? *l_ : kEmptyList; }
const Value::Dict& Value::dict() const { return is_dict() ? *d_members_ : kEmptyDict; }

const Value* Value::Find(std::string_view key) const {
  if (!is_dict()) return nullptr;
  for (const auto& [k, v] : *d_members_) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Value::SetMember(const std::string& key, Value v) {
  if (kind_ != Kind::kNamespace) return;
  for (auto& [k, existing] : *d_members_) {
    if (k == key) {
      existing = std::move(v);
      return;
    }
  }
  d_members_->emplace_back(key, std::move(v));
}

bool Value::Truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool: return b_;
    case Kind::kInt: return i_ != 0;
    case Kind::kFloat: return d_ != 0;
    case Kind::kString: return !s_->empty();
    case Kind::kList: return !l_->empty();
    case Kind::kDict: return !d_members_->empty();
    case Kind::kNamespace: return true;
  }
  return false;
}

std::string Value::ToString() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kString: return *s_;
    default: return Repr();
  }
}

std::string Value::Repr() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kNone: return "None";
    case Kind::kBool: return b_ ? "True" : "False";
    case Kind::kInt: return absl::StrCat(i_);
    case Kind::kFloat: return FloatText(d_);
    case Kind::kString: return QuoteString(*s_);
    case Kind::kList: {
      std::string out = "[";
      for (size_t i = 0; i < l_->size(); ++i) absl::StrAppend(&out, i ? ", " : "", (*l_)[i].Repr());
      return out + "]";
    }
    case Kind::kDict:
    case Kind::kNamespace: {
      std::string out = kind_ == Kind::kNamespace ? "<Namespace {" : "{";
      for (size_t i = 0; i < d_members_->size(); ++i) {
        absl::StrAppend(&out, i ? ", " : "", QuoteString((*d_members_)[i].first), ": ", (*d_members_)[i].second.Repr());
      }
      return out + (kind_ == Kind::kNamespace ? "}>" : "}");
    }
  }
  return "";
}

bool operator==(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.kind() == K::kFloat || b.kind() == K::kFloat) return a.number_value() == b.number_value();
    return a.int_value() == b.int_value();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case K::kUndefined:
    case K::kNone: return true;
    case K::kString: return a.string_value() == b.string_value();
    case K::kList: return a.list() == b.list();
    case K::kDict:
    case K::kNamespace: {
      if (a.dict().size() != b.dict().size()) return false;
      for (const auto& [k, v] : a.dict()) {
        const Value* other = b.Find(k);
        if (other == nullptr || !(*other == v)) return false;
      }
      return true;
    }
    default: return false;
  }
}

}  // namespace qforge::chat
