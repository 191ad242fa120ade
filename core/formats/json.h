// A small, strict JSON parser and writer for safetensors headers, index files and config.json.
// Strict RFC 8259: no comments, no trailing commas, no NaN/Infinity, no leading zeros, no control characters
// in strings, and exactly one value per document. Input is hostile: nesting depth, document size and string
// lengths are bounded, \uXXXX escapes (surrogate pairs included) are validated, and raw strings must be UTF-8.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge::formats {

class Json {
 public:
  enum class Kind { kNull, kBool, kInt, kDouble, kString, kArray, kObject };
  using Array = std::vector<Json>;
  // Members in document order; duplicate keys are rejected by the parser.
  using Object = std::vector<std::pair<std::string, Json>>;

  Json() = default;
  static Json Null() { return Json(); }
  static Json Bool(bool b);
  static Json Int(int64_t i);
  static Json Double(double d);
  static Json String(std::string s);
  static Json MakeArray(Array a = {});
  static Json MakeObject(Object o = {});

  Kind kind() const { return kind_; }
  bool is_null() const { return kind_ == Kind::kNull; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kDouble; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_array() const { return kind_ == Kind::kArray; }
  bool is_object() const { return kind_ == Kind::kObject; }

  // Accessors assume the kind was checked; on a mismatch they return a zero value.
  bool bool_value() const { return kind_ == Kind::kBool && b_; }
  int64_t int_value() const { return kind_ == Kind::kInt ? i_ : 0; }
  double number_value() const { return kind_ == Kind::kInt ? static_cast<double>(i_) : kind_ == Kind::kDouble ? d_ : 0; }
  const std::string& string_value() const;
  const Array& array() const;
  const Object& object() const;
  // Copies share storage until written: these detach first (copy-on-write).
  Array& mutable_array();
  Object& mutable_object();

  // Object member lookup (linear; objects here are small or looked up once). nullptr when absent or not an object.
  const Json* Find(const std::string& key) const;
  // Appends a member to an object (no duplicate check: the writer's caller owns the keys).
  void Set(std::string key, Json value);

  // Compact serialisation: valid JSON; UTF-8 written as-is, control characters escaped, bytes that are not
  // valid UTF-8 replaced by U+FFFD (JSON cannot carry them).
  std::string Dump() const;

  static const char* KindName(Kind k);

 private:
  Kind kind_ = Kind::kNull;
  bool b_ = false;
  int64_t i_ = 0;
  double d_ = 0;
  std::shared_ptr<std::string> s_;
  std::shared_ptr<Array> a_;
  std::shared_ptr<Object> o_;
};

struct JsonLimits {
  size_t max_bytes = 100u << 20;  // whole document
  int max_depth = 64;
  size_t max_string_bytes = 1u << 20;
  size_t max_members = 1u << 20;  // per object or array
};

// Parses one JSON document. Errors name the problem and the byte offset ("json: expected ':' at offset 17").
absl::StatusOr<Json> ParseJson(const std::string& text, const JsonLimits& limits = {});

}  // namespace qforge::formats
