// Chat templates: the Jinja subset that models' chat templates (GGUF `tokenizer.chat_template`, HF
// tokenizer_config.json `chat_template`) are written in, parsed once and rendered per request into the prompt
// text the model was trained on.
//
// Supported (docs/serving.md lists it for users): text, {{ expr }}, {% stmt %} and {# comments #} with `-`
// whitespace control on either side; trim_blocks and lstrip_blocks as Hugging Face's apply_chat_template
// sets them (on by default, so that real templates render exactly as they do in transformers);
// if / elif / else, for (over lists, strings and dict.items(); `for a, b in`, a trailing `if` filter, `else`,
// loop.index0 / index / revindex / revindex0 / first / last / length / previtem / nextitem, break / continue),
// set (of a name or a namespace attribute; block set), generation blocks (rendered as their body);
// literals (strings, ints, floats, true / false / none in either case, lists, dicts), names, attributes,
// subscripts and slices, calls; operators `if else`, or, and, not, == != < <= > >=, in, not in, is [not] TEST,
// ~ + - * / // % **, unary - and +; filters trim, length / count, upper, lower, title, capitalize, default / d,
// first, last, join, string, int, float, list, reverse, replace, items, tojson (without indent), abs; tests
// defined, undefined, none, boolean, true, false, string, number, integer, float, mapping, iterable, sequence,
// even, odd, divisibleby, eq / equalto / sameas, ne, lt, le, gt, ge, in, lower, upper; string methods strip /
// lstrip / rstrip / upper / lower / title / capitalize / startswith / endswith / split / replace / find, dict
// methods items / keys / values / get; functions raise_exception, range, namespace, dict.
//
// Errors (parse and render) are INVALID_ARGUMENT with "line L, column C" of the offending construct, and
// raise_exception(msg) fails rendering with msg. Templates are treated as untrusted input: nesting depth,
// rendered size, loop iterations and range lengths are bounded, so a hostile template fails instead of
// exhausting the stack, memory or time.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge::chat {

// A value of the template language. Lists and dicts are immutable once built (as in Hugging Face's
// ImmutableSandboxedEnvironment) and share storage when copied; a namespace is the one mutable kind.
class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace };
  using List = std::vector<Value>;
  using Dict = std::vector<std::pair<std::string, Value>>;  // insertion order, unique keys

  Value() = default;  // undefined
  static Value None();
  static Value Bool(bool b);
  static Value Int(int64_t i);
  static Value Float(double d);
  static Value String(std::string s);
  static Value MakeList(List items);
  static Value MakeDict(Dict members);
  static Value MakeNamespace(Dict members);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_bool() const { return kind_ == Kind::kBool; }
  bool is_int() const { return kind_ == Kind::kInt; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat || kind_ == Kind::kBool; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict || kind_ == Kind::kNamespace; }

  bool bool_value() const { return b_; }
  int64_t int_value() const { return kind_ == Kind::kBool ? (b_ ? 1 : 0) : kind_ == Kind::kFloat ? static_cast<int64_t>(d_) : i_; }
  double number_value() const { return kind_ == Kind::kFloat ? d_ : static_cast<double>(int_value()); }
  const std::string& string_value() const;
  const List& list() const;
  const Dict& dict() const;
  // A member of a dict or namespace; nullptr when absent or not a dict.
  const Value* Find(std::string_view key) const;
  // Namespaces only: adds or replaces a member (visible through every copy of the namespace).
  void SetMember(const std::string& key, Value v);
  // Nesting: 0 for scalars, 1 + the deepest element for lists and dicts (at construction).
  int depth() const { return depth_; }

  // Jinja truthiness: undefined, none, false, 0, 0.0, "" and empty lists / dicts are false.
  bool Truthy() const;
  // What {{ value }} prints: strings as they are, undefined as "", none as "None", booleans as
  // "True" / "False", lists and dicts in Python's repr.
  std::string ToString() const;
  // Python's repr (strings quoted), as lists and dicts print their elements.
  std::string Repr() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  int64_t i_ = 0;
  double d_ = 0;
  int depth_ = 0;
  std::shared_ptr<const std::string> s_;
  std::shared_ptr<const List> l_;
  std::shared_ptr<Dict> d_members_;  // dicts (never written after construction) and namespaces
};

// Equality as in Python: numbers by value (True == 1), strings, lists and dicts element by element;
// undefined equals only undefined.
bool operator==(const Value& a, const Value& b);

struct TemplateOptions {
  // Remove the first newline after a block or comment tag (Jinja's trim_blocks).
  bool trim_blocks = true;
  // Remove spaces and tabs from the start of a line up to a block or comment tag (Jinja's lstrip_blocks).
  bool lstrip_blocks = true;
};

struct ChatMessage {
  std::string role;
  std::string content;
};

namespace internal {
struct Node;
}

class ChatTemplate {
 public:
  // INVALID_ARGUMENT "chat template: line L, column C: ..." for syntax errors, unknown tags or templates
  // nested deeper than the parser allows.
  static absl::StatusOr<ChatTemplate> Parse(std::string_view source, TemplateOptions options = {});

  // Renders with `variables` as the globals (raise_exception, range and namespace are always defined).
  absl::StatusOr<std::string> Render(const std::map<std::string, Value>& variables) const;

  // Renders a conversation with the variables every chat template expects: messages (a list of
  // {role, content} dicts), bos_token, eos_token, add_generation_prompt.
  absl::StatusOr<std::string> Apply(std::span<const ChatMessage> messages, const std::string& bos_token,
                                    const std::string& eos_token, bool add_generation_prompt) const;

 private:
  explicit ChatTemplate(std::shared_ptr<const internal::Node> root) : root_(std::move(root)) {}
  std::shared_ptr<const internal::Node> root_;
};

// The template qforge uses for a model that carries none: ChatML (`<|im_start|>ROLE\nCONTENT<|im_end|>\n` per
// message, then `<|im_start|>assistant\n` when a generation prompt is asked for), which is also what
// transformers used as its default before templates became mandatory.
extern const char kDefaultChatTemplate[];

}  // namespace qforge::chat
