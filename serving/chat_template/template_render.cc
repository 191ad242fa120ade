// The renderer of parsed chat templates: Jinja's semantics as Python runs them (truthiness, `and` / `or`
// returning an operand, undefined printing as "", for-loop scopes that do not leak, namespaces), with
// every bound of template_ast.h enforced.
#include <algorithm>
#include <cmath>
#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/base/status_macros.h"
#include "serving/chat_template/template_ast.h"

namespace qforge::chat {

const char kDefaultChatTemplate[] =
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source, TemplateOptions options) {
  QF_ASSIGN_OR_RETURN(internal::NodePtr root, internal::ParseTemplate(source, options));
  return ChatTemplate(std::move(root));
}

absl::StatusOr<std::string> ChatTemplate::Render(const std::map<std::string, Value>& variables) const {
  return internal::RenderTemplate(*root_, variables);
}

absl::StatusOr<std::string> ChatTemplate::Apply(std::span<const ChatMessage> messages, const std::string& bos_token,
                                                const std::string& eos_token, bool add_generation_prompt) const {
  Value::List list;
  list.reserve(messages.size());
  for (const ChatMessage& m : messages) {
    list.push_back(Value::MakeDict({{"role", Value::String(m.role)}, {"content", Value::String(m.content)}}));
  }
  return Render({{"messages", Value::MakeList(std::move(list))},
                 {"bos_token", Value::String(bos_token)},
                 {"eos_token", Value::String(eos_token)},
                 {"add_generation_prompt", Value::Bool(add_generation_prompt)}});
}

namespace internal {
namespace {

using K = Node::Kind;
using VK = Value::Kind;

enum class Flow { kNormal, kBreak, kContinue };

const char* KindName(VK k) {
  switch (k) {
    case VK::kUndefined: return "undefined";
    case VK::kNone: return "none";
    case VK::kBool: return "boolean";
    case VK::kInt: return "integer";
    case VK::kFloat: return "float";
    case VK::kString: return "string";
    case VK::kList: return "list";
    case VK::kDict: return "dict";
    case VK::kNamespace: return "namespace";
  }
  return "value";
}

// The code points of UTF-8 text, each as its bytes (Python indexes and iterates strings by code point).
std::vector<std::string> CodePoints(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    n = std::min(n, s.size() - i);
    out.push_back(s.substr(i, n));
    i += n;
  }
  return out;
}

bool IsAsciiSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

std::string Strip(const std::string& s, bool left, bool right, const std::string* chars) {
  auto strip_me = [&](char c) { return chars == nullptr ? IsAsciiSpace(c) : chars->find(c) != std::string::npos; };
  size_t b = 0, e = s.size();
  if (left) {
    while (b < e && strip_me(s[b])) ++b;
  }
  if (right) {
    while (e > b && strip_me(s[e - 1])) --e;
  }
  return s.substr(b, e - b);
}

std::string Title(const std::string& s) {
  std::string out = s;
  bool word_start = true;
  for (char& c : out) {
    const bool letter = absl::ascii_isalpha(static_cast<unsigned char>(c));
    if (letter) c = word_start ? absl::ascii_toupper(c) : absl::ascii_tolower(c);
    word_start = !letter;
  }
  return out;
}

std::string Capitalize(const std::string& s) {
  std::string out = absl::AsciiStrToLower(s);
  if (!out.empty()) out[0] = absl::ascii_toupper(out[0]);
  return out;
}

// Python's json.dumps(value, ensure_ascii=False) with its default separators, which is what
// transformers' tojson filter writes.
absl::Status ToJson(const Value& v, std::string* out, int depth = 0) {
  if (depth > kMaxNodeDepth) return absl::InvalidArgumentError("tojson: value nested too deeply");
  switch (v.kind()) {
    case VK::kUndefined: return absl::InvalidArgumentError("tojson: an undefined value");
    case VK::kNone: *out += "null"; return absl::OkStatus();
    case VK::kBool: *out += v.bool_value() ? "true" : "false"; return absl::OkStatus();
    case VK::kInt:
    case VK::kFloat: *out += v.Repr(); return absl::OkStatus();
    case VK::kString: {
      *out += '"';
      for (char c : v.string_value()) {
        switch (c) {
          case '"': *out += "\\\""; break;
          case '\\': *out += "\\\\"; break;
          case '\n': *out += "\\n"; break;
          case '\r': *out += "\\r"; break;
          case '\t': *out += "\\t"; break;
          case '\b': *out += "\\b"; break;
          case '\f': *out += "\\f"; break;
          default:
            if (static_cast<unsigned char>(c) < 0x20) {
              char buf[8];
              std::snprintf(buf, sizeof(buf), "\\u%04x", c);
              *out += buf;
            } else {
              *out += c;
            }
        }
      }
      *out += '"';
      return absl::OkStatus();
    }
    case VK::kList: {
      *out += '[';
      for (size_t i = 0; i < v.list().size(); ++i) {
        if (i) *out += ", ";
        QF_RETURN_IF_ERROR(ToJson(v.list()[i], out, depth + 1));
      }
      *out += ']';
      return absl::OkStatus();
    }
    case VK::kDict:
    case VK::kNamespace: {
      *out += '{';
      bool first = true;
      for (const auto& [k, member] : v.dict()) {
        if (!first) *out += ", ";
        first = false;
        QF_RETURN_IF_ERROR(ToJson(Value::String(k), out, depth + 1));
        *out += ": ";
        QF_RETURN_IF_ERROR(ToJson(member, out, depth + 1));
      }
      *out += '}';
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

class Renderer {
 public:
  explicit Renderer(const std::map<std::string, Value>& globals) { scopes_.push_back(globals); }

  absl::StatusOr<std::string> Run(const Node& root) {
    Flow flow = Flow::kNormal;
    QF_RETURN_IF_ERROR(Exec(root, &flow));
    return std::move(out_);
  }

 private:
  absl::Status Error(const Node& n, absl::string_view what) const { return ErrorAt(n.line, n.column, what); }

  absl::Status Step(const Node& n) {
    if (++steps_ > kMaxRenderSteps) {
      return Error(n, absl::StrCat("the template ran for more than ", kMaxRenderSteps, " steps"));
    }
    return absl::OkStatus();
  }

  absl::Status Append(const Node& n, std::string_view s) {
    if (out_.size() + s.size() > kMaxRenderedBytes) {
      return Error(n, absl::StrCat("the rendered text exceeds ", kMaxRenderedBytes, " bytes"));
    }
    out_.append(s);
    return absl::OkStatus();
  }

  const Value* Lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (auto v = it->find(name); v != it->end()) return &v->second;
    }
    return nullptr;
  }

  // What an expression is called in errors: the name or attribute path, else "a value".
  static std::string Describe(const Node& n) {
    if (n.kind == K::kName) return absl::StrCat("'", n.text, "'");
    if (n.kind == K::kAttribute) return absl::StrCat("'", n.text, "'");
    return "a value";
  }

  // --- statements --------------------------------------------------------------------------------------
  absl::Status Exec(const Node& n, Flow* flow) {
    QF_RETURN_IF_ERROR(Step(n));
    switch (n.kind) {
      case K::kSequence:
        for (const NodePtr& c : n.children) {
          QF_RETURN_IF_ERROR(Exec(*c, flow));
          if (*flow != Flow::kNormal) break;
        }
        return absl::OkStatus();
      case K::kText: return Append(n, n.text);
      case K::kOutput: {
        QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
        return Append(n, v.ToString());
      }
      case K::kIf: {
        const size_t pairs = (n.children.size() - (n.has_else ? 1 : 0)) / 2;
        for (size_t i = 0; i < pairs; ++i) {
          QF_ASSIGN_OR_RETURN(Value cond, Eval(*n.children[2 * i]));
          if (cond.Truthy()) return Exec(*n.children[2 * i + 1], flow);
        }
        if (n.has_else) return Exec(*n.children.back(), flow);
        return absl::OkStatus();
      }
      case K::kFor: return ExecFor(n);
      case K::kSet: {
        QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
        if (n.attribute.empty()) {
          scopes_.back()[n.text] = std::move(v);
          return absl::OkStatus();
        }
        if (ContainsNamespace(v, 0)) {
          // A namespace reachable from a namespace member could form a cycle, which printing would follow forever.
          return Error(n, "a namespace member cannot hold a namespace");
        }
        const Value* target = Lookup(n.text);
        if (target == nullptr || target->kind() != VK::kNamespace) {
          return Error(n, absl::StrCat("cannot set '", n.text, ".", n.attribute, "': '", n.text,
                                       "' is not a namespace"));
        }
        Value ns = *target;  // shares the namespace's members
        ns.SetMember(n.attribute, std::move(v));
        return absl::OkStatus();
      }
      case K::kSetBlock: {
        std::string saved;
        saved.swap(out_);
        Flow inner = Flow::kNormal;
        const absl::Status s = Exec(*n.children[0], &inner);
        std::string body;
        body.swap(out_);
        out_.swap(saved);
        QF_RETURN_IF_ERROR(s);
        scopes_.back()[n.text] = Value::String(std::move(body));
        return absl::OkStatus();
      }
      case K::kBreak: *flow = Flow::kBreak; return absl::OkStatus();
      case K::kContinue: *flow = Flow::kContinue; return absl::OkStatus();
      default: return Error(n, "an expression where a statement was expected");
    }
  }

  static bool ContainsNamespace(const Value& v, int depth) {
    if (v.kind() == VK::kNamespace) return true;
    if (depth > kMaxNodeDepth) return true;
    for (const Value& item : v.list()) {
      if (ContainsNamespace(item, depth + 1)) return true;
    }
    if (v.kind() == VK::kDict) {
      for (const auto& [k, member] : v.dict()) {
        if (ContainsNamespace(member, depth + 1)) return true;
      }
    }
    return false;
  }

  absl::StatusOr<std::vector<Value>> Items(const Node& at, const Value& v) {
    std::vector<Value> items;
    switch (v.kind()) {
      case VK::kUndefined: break;
      case VK::kList: items = v.list(); break;
      case VK::kDict:
      case VK::kNamespace:
        for (const auto& [k, member] : v.dict()) items.push_back(Value::String(k));
        break;
      case VK::kString:
        for (std::string& cp : CodePoints(v.string_value())) items.push_back(Value::String(std::move(cp)));
        break;
      default: return Error(at, absl::StrCat("cannot iterate over ", Describe(at), " (a ", KindName(v.kind()), ")"));
    }
    return items;
  }

  absl::Status Bind(const Node& n, const Value& item, std::map<std::string, Value>* scope) {
    if (n.names.size() == 1) {
      (*scope)[n.names[0]] = item;
      return absl::OkStatus();
    }
    if (!item.is_list() || item.list().size() != n.names.size()) {
      return Error(n, absl::StrCat("cannot unpack a ", KindName(item.kind()), " into ", n.names.size(), " loop variables"));
    }
    for (size_t i = 0; i < n.names.size(); ++i) (*scope)[n.names[i]] = item.list()[i];
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& n) {
    QF_ASSIGN_OR_RETURN(Value iterable, Eval(*n.children[0]));
    QF_ASSIGN_OR_RETURN(std::vector<Value> items, Items(*n.children[0], iterable));
    if (n.children[1] != nullptr) {  // `for x in xs if cond`: the filter sees the loop variables only
      std::vector<Value> kept;
      for (const Value& item : items) {
        scopes_.emplace_back();
        absl::Status s = Bind(n, item, &scopes_.back());
        absl::StatusOr<Value> keep = s.ok() ? Eval(*n.children[1]) : absl::StatusOr<Value>(s);
        scopes_.pop_back();
        if (!keep.ok()) return keep.status();
        if (keep->Truthy()) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      if (n.children[3] == nullptr) return absl::OkStatus();
      Flow flow = Flow::kNormal;
      return Exec(*n.children[3], &flow);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      std::map<std::string, Value> scope;
      QF_RETURN_IF_ERROR(Bind(n, items[i], &scope));
      scope["loop"] = Value::MakeDict({
          {"index0", Value::Int(i)},
          {"index", Value::Int(i + 1)},
          {"revindex0", Value::Int(length - 1 - i)},
          {"revindex", Value::Int(length - i)},
          {"first", Value::Bool(i == 0)},
          {"last", Value::Bool(i == length - 1)},
          {"length", Value::Int(length)},
          {"previtem", i > 0 ? items[i - 1] : Value()},
          {"nextitem", i + 1 < length ? items[i + 1] : Value()},
      });
      scopes_.push_back(std::move(scope));
      Flow flow = Flow::kNormal;
      const absl::Status s = Exec(*n.children[2], &flow);
      scopes_.pop_back();
      QF_RETURN_IF_ERROR(s);
      if (flow == Flow::kBreak) break;
    }
    return absl::OkStatus();
  }

  // --- expressions -------------------------------------------------------------------------------------
  // Every value an expression makes passes here, so no list or dict grows deeper than the bound (printing,
  // comparing and freeing values recurse over their nesting).
  absl::StatusOr<Value> Eval(const Node& n) {
    QF_ASSIGN_OR_RETURN(Value v, EvalNode(n));
    if (v.depth() > kMaxNodeDepth) return Error(n, absl::StrCat("a value nested deeper than ", kMaxNodeDepth, " levels"));
    return v;
  }

  absl::StatusOr<Value> EvalNode(const Node& n) {
    QF_RETURN_IF_ERROR(Step(n));
    switch (n.kind) {
      case K::kLiteral: return n.value;
      case K::kName: {
        const Value* v = Lookup(n.text);
        return v == nullptr ? Value() : *v;
      }
      case K::kList: {
        Value::List items;
        for (const NodePtr& c : n.children) {
          QF_ASSIGN_OR_RETURN(Value v, Eval(*c));
          items.push_back(std::move(v));
        }
        return Value::MakeList(std::move(items));
      }
      case K::kDict: {
        Value::Dict members;
        for (size_t i = 0; i + 1 < n.children.size(); i += 2) {
          QF_ASSIGN_OR_RETURN(Value key, Eval(*n.children[i]));
          if (!key.is_string()) return Error(*n.children[i], "dict keys must be strings");
          QF_ASSIGN_OR_RETURN(Value value, Eval(*n.children[i + 1]));
          auto it = std::find_if(members.begin(), members.end(),
                                 [&](const auto& m) { return m.first == key.string_value(); });
          if (it != members.end()) {
            it->second = std::move(value);
          } else {
            members.emplace_back(key.string_value(), std::move(value));
          }
        }
        return Value::MakeDict(std::move(members));
      }
      case K::kAttribute: {
        QF_ASSIGN_OR_RETURN(Value obj, Eval(*n.children[0]));
        if (obj.is_undefined()) return Error(n, absl::StrCat(Describe(*n.children[0]), " is undefined"));
        const Value* member = obj.Find(n.text);
        return member == nullptr ? Value() : *member;
      }
      case K::kSubscript: {
        QF_ASSIGN_OR_RETURN(Value obj, Eval(*n.children[0]));
        QF_ASSIGN_OR_RETURN(Value index, Eval(*n.children[1]));
        return Subscript(n, obj, index);
      }
      case K::kSlice: return EvalSlice(n);
      case K::kCall: return EvalCall(n);
      case K::kFilter: return EvalFilter(n);
      case K::kTest: {
        QF_ASSIGN_OR_RETURN(bool result, EvalTest(n));
        return Value::Bool(result != n.negated);
      }
      case K::kUnary: {
        QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
        if (n.text == "not") return Value::Bool(!v.Truthy());
        if (!v.is_number()) return Error(n, absl::StrCat("unary '", n.text, "' on a ", KindName(v.kind())));
        if (n.text == "+") return v;
        if (v.kind() == VK::kFloat) return Value::Float(-v.number_value());
        if (v.int_value() == INT64_MIN) return Error(n, "integer overflow");
        return Value::Int(-v.int_value());
      }
      case K::kBinary: return EvalBinary(n);
      case K::kCompare: {
        QF_ASSIGN_OR_RETURN(Value left, Eval(*n.children[0]));
        for (size_t i = 0; i < n.names.size(); ++i) {
          QF_ASSIGN_OR_RETURN(Value right, Eval(*n.children[i + 1]));
          QF_ASSIGN_OR_RETURN(bool holds, Compare(n, n.names[i], left, right));
          if (!holds) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case K::kConditional: {
        QF_ASSIGN_OR_RETURN(Value cond, Eval(*n.children[1]));
        if (cond.Truthy()) return Eval(*n.children[0]);
        if (n.children[2] == nullptr) return Value();
        return Eval(*n.children[2]);
      }
      default: return Error(n, "a statement where an expression was expected");
    }
  }

  absl::StatusOr<Value> Subscript(const Node& n, const Value& obj, const Value& index) {
    if (obj.is_undefined()) return Error(n, absl::StrCat(Describe(*n.children[0]), " is undefined"));
    if (obj.is_dict()) {
      if (!index.is_string()) return Value();
      const Value* member = obj.Find(index.string_value());
      return member == nullptr ? Value() : *member;
    }
    if ((obj.is_list() || obj.is_string()) && index.is_number() && index.kind() != VK::kFloat) {
      std::vector<std::string> cps;
      if (obj.is_string()) cps = CodePoints(obj.string_value());
      const int64_t size = obj.is_list() ? static_cast<int64_t>(obj.list().size()) : static_cast<int64_t>(cps.size());
      int64_t i = index.int_value();
      if (i < 0) i += size;
      if (i < 0 || i >= size) return Value();
      return obj.is_list() ? obj.list()[i] : Value::String(cps[i]);
    }
    return Value();
  }

  absl::StatusOr<Value> EvalSlice(const Node& n) {
    QF_ASSIGN_OR_RETURN(Value obj, Eval(*n.children[0]));
    int64_t bound[3] = {0, 0, 1};
    bool given[3] = {false, false, false};
    for (int k = 0; k < 3; ++k) {
      if (n.children[k + 1] == nullptr) continue;
      QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[k + 1]));
      if (v.is_none()) continue;
      if (!v.is_number() || v.kind() == VK::kFloat) return Error(n, "slice bounds must be integers");
      bound[k] = v.int_value();
      given[k] = true;
    }
    if (bound[2] == 0) return Error(n, "slice step cannot be zero");
    std::vector<std::string> cps;
    if (obj.is_string()) {
      cps = CodePoints(obj.string_value());
    } else if (!obj.is_list()) {
      return Error(n, absl::StrCat("cannot slice ", Describe(*n.children[0]), " (a ", KindName(obj.kind()), ")"));
    }
    const int64_t size = obj.is_list() ? static_cast<int64_t>(obj.list().size()) : static_cast<int64_t>(cps.size());
    const int64_t step = bound[2];
    // Python's slice.indices.
    auto clamp = [&](int64_t v, bool is_given, int64_t dflt) {
      if (!is_given) return dflt;
      if (v < 0) v += size;
      if (step > 0) return std::clamp<int64_t>(v, 0, size);
      return std::clamp<int64_t>(v, -1, size - 1);
    };
    const int64_t start = clamp(bound[0], given[0], step > 0 ? 0 : size - 1);
    const int64_t stop = clamp(bound[1], given[1], step > 0 ? size : -1);
    Value::List items;
    std::string text;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (obj.is_list()) {
        items.push_back(obj.list()[i]);
      } else {
        text += cps[i];
      }
    }
    return obj.is_list() ? Value::MakeList(std::move(items)) : Value::String(std::move(text));
  }

  struct Args {
    std::vector<Value> positional;
    std::vector<std::pair<std::string, Value>> keywords;
    const Value* Keyword(absl::string_view name) const {
      for (const auto& [k, v] : keywords) {
        if (k == name) return &v;
      }
      return nullptr;
    }
    // The argument at `index` or named `name`, else null.
    const Value* Get(size_t index, absl::string_view name) const {
      if (index < positional.size()) return &positional[index];
      return Keyword(name);
    }
  };

  // Arguments start at children[first].
  absl::StatusOr<Args> EvalArgs(const Node& n, size_t first) {
    Args args;
    const size_t positional_end = first + static_cast<size_t>(n.positional);
    for (size_t i = first; i < n.children.size(); ++i) {
      QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[i]));
      if (i < positional_end) {
        args.positional.push_back(std::move(v));
      } else {
        args.keywords.emplace_back(n.names[i - positional_end], std::move(v));
      }
    }
    return args;
  }

  absl::StatusOr<std::string> StringArg(const Node& n, const Args& args, size_t index, absl::string_view name,
                                        absl::string_view what) {
    const Value* v = args.Get(index, name);
    if (v == nullptr || !v->is_string()) return Error(n, absl::StrCat(what, ": argument ", name, " must be a string"));
    return v->string_value();
  }

  absl::StatusOr<Value> EvalCall(const Node& n) {
    const Node& callee = *n.children[0];
    if (callee.kind == K::kName && Lookup(callee.text) == nullptr) {
      QF_ASSIGN_OR_RETURN(Args args, EvalArgs(n, 1));
      return CallBuiltin(n, callee.text, args);
    }
    if (callee.kind == K::kAttribute) {
      QF_ASSIGN_OR_RETURN(Value obj, Eval(*callee.children[0]));
      if (obj.is_undefined()) return Error(callee, absl::StrCat(Describe(*callee.children[0]), " is undefined"));
      QF_ASSIGN_OR_RETURN(Args args, EvalArgs(n, 1));
      return CallMethod(n, obj, callee.text, args);
    }
    return Error(n, absl::StrCat(Describe(callee), " is not callable"));
  }

  absl::StatusOr<Value> CallBuiltin(const Node& n, const std::string& name, const Args& args) {
    if (name == "raise_exception") {
      const std::string message = args.positional.empty() ? "raise_exception called" : args.positional[0].ToString();
      return Error(n, message);
    }
    if (name == "range") {
      int64_t v[3] = {0, 0, 1};
      if (args.positional.empty() || args.positional.size() > 3) return Error(n, "range takes 1 to 3 integers");
      for (const Value& a : args.positional) {
        if (!a.is_number() || a.kind() == VK::kFloat) return Error(n, "range takes integers");
      }
      if (args.positional.size() == 1) {
        v[1] = args.positional[0].int_value();
      } else {
        v[0] = args.positional[0].int_value();
        v[1] = args.positional[1].int_value();
        if (args.positional.size() == 3) v[2] = args.positional[2].int_value();
      }
      if (v[2] == 0) return Error(n, "range step cannot be zero");
      Value::List items;
      for (int64_t i = v[0]; v[2] > 0 ? i < v[1] : i > v[1]; i += v[2]) {
        if (static_cast<int64_t>(items.size()) >= kMaxRangeLength) {
          return Error(n, absl::StrCat("range longer than ", kMaxRangeLength));
        }
        items.push_back(Value::Int(i));
        if ((v[2] > 0 && i > INT64_MAX - v[2]) || (v[2] < 0 && i < INT64_MIN - v[2])) break;
      }
      return Value::MakeList(std::move(items));
    }
    if (name == "namespace" || name == "dict") {
      Value::Dict members;
      if (!args.positional.empty()) {
        if (!args.positional[0].is_dict() || args.positional.size() > 1) {
          return Error(n, absl::StrCat(name, " takes one dict and keyword arguments"));
        }
        members = args.positional[0].dict();
      }
      for (const auto& [k, v] : args.keywords) members.emplace_back(k, v);
      return name == "dict" ? Value::MakeDict(std::move(members)) : Value::MakeNamespace(std::move(members));
    }
    return Error(n, absl::StrCat("'", name, "' is undefined (not a known function)"));
  }

  absl::StatusOr<Value> CallMethod(const Node& n, const Value& obj, const std::string& method, const Args& args) {
    if (obj.is_string()) {
      const std::string& s = obj.string_value();
      if (method == "strip" || method == "lstrip" || method == "rstrip") {
        const Value* chars = args.Get(0, "chars");
        const std::string* set = chars != nullptr && chars->is_string() ? &chars->string_value() : nullptr;
        return Value::String(Strip(s, method != "rstrip", method != "lstrip", set));
      }
      if (method == "upper") return Value::String(absl::AsciiStrToUpper(s));
      if (method == "lower") return Value::String(absl::AsciiStrToLower(s));
      if (method == "title") return Value::String(Title(s));
      if (method == "capitalize") return Value::String(Capitalize(s));
      if (method == "startswith" || method == "endswith") {
        const Value* arg = args.Get(0, "prefix");
        if (arg == nullptr) return Error(n, absl::StrCat(method, " needs an argument"));
        std::vector<Value> options = arg->is_list() ? arg->list() : std::vector<Value>{*arg};
        for (const Value& o : options) {
          if (!o.is_string()) return Error(n, absl::StrCat(method, " takes strings"));
          if (method == "startswith" ? s.starts_with(o.string_value()) : s.ends_with(o.string_value())) {
            return Value::Bool(true);
          }
        }
        return Value::Bool(false);
      }
      if (method == "split") {
        const Value* sep = args.Get(0, "sep");
        Value::List parts;
        if (sep == nullptr || sep->is_none()) {
          std::string word;
          for (char c : s) {
            if (IsAsciiSpace(c)) {
              if (!word.empty()) parts.push_back(Value::String(std::move(word)));
              word.clear();
            } else {
              word += c;
            }
          }
          if (!word.empty()) parts.push_back(Value::String(std::move(word)));
        } else {
          if (!sep->is_string() || sep->string_value().empty()) return Error(n, "split: separator must be a non-empty string");
          const std::string& d = sep->string_value();
          size_t start = 0;
          for (size_t at; (at = s.find(d, start)) != std::string::npos; start = at + d.size()) {
            parts.push_back(Value::String(s.substr(start, at - start)));
          }
          parts.push_back(Value::String(s.substr(start)));
        }
        return Value::MakeList(std::move(parts));
      }
      if (method == "replace") {
        QF_ASSIGN_OR_RETURN(std::string from, StringArg(n, args, 0, "old", "replace"));
        QF_ASSIGN_OR_RETURN(std::string to, StringArg(n, args, 1, "new", "replace"));
        return Replace(n, s, from, to);
      }
      if (method == "find") {
        QF_ASSIGN_OR_RETURN(std::string sub, StringArg(n, args, 0, "sub", "find"));
        const size_t at = s.find(sub);
        return Value::Int(at == std::string::npos ? -1 : static_cast<int64_t>(CodePoints(s.substr(0, at)).size()));
      }
    }
    if (obj.is_dict()) {
      if (method == "items") {
        Value::List items;
        for (const auto& [k, v] : obj.dict()) items.push_back(Value::MakeList({Value::String(k), v}));
        return Value::MakeList(std::move(items));
      }
      if (method == "keys" || method == "values") {
        Value::List items;
        for (const auto& [k, v] : obj.dict()) items.push_back(method == "keys" ? Value::String(k) : v);
        return Value::MakeList(std::move(items));
      }
      if (method == "get") {
        QF_ASSIGN_OR_RETURN(std::string key, StringArg(n, args, 0, "key", "get"));
        const Value* member = obj.Find(key);
        if (member != nullptr) return *member;
        const Value* fallback = args.Get(1, "default");
        return fallback != nullptr ? *fallback : Value::None();
      }
    }
    return Error(n, absl::StrCat("a ", KindName(obj.kind()), " has no method '", method, "'"));
  }

  absl::StatusOr<Value> Replace(const Node& n, const std::string& s, const std::string& from, const std::string& to) {
    std::string out;
    if (from.empty()) {  // Python inserts `to` around every code point
      for (const std::string& cp : CodePoints(s)) {
        out += to;
        out += cp;
        if (out.size() > kMaxRenderedBytes) return Error(n, "replace: result too large");
      }
      out += to;
      return Value::String(std::move(out));
    }
    size_t start = 0;
    for (size_t at; (at = s.find(from, start)) != std::string::npos; start = at + from.size()) {
      out.append(s, start, at - start);
      out += to;
      if (out.size() > kMaxRenderedBytes) return Error(n, "replace: result too large");
    }
    out.append(s, start, std::string::npos);
    return Value::String(std::move(out));
  }

  absl::StatusOr<Value> EvalFilter(const Node& n) {
    QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
    QF_ASSIGN_OR_RETURN(Args args, EvalArgs(n, 1));
    const std::string& f = n.text;
    auto need_string = [&]() -> absl::Status {
      if (!v.is_string()) return Error(n, absl::StrCat("filter '", f, "' needs a string, got a ", KindName(v.kind())));
      return absl::OkStatus();
    };
    if (f == "trim") {
      if (v.is_undefined()) return Value::String("");
      QF_RETURN_IF_ERROR(need_string());
      const Value* chars = args.Get(0, "chars");
      return Value::String(Strip(v.string_value(), true, true,
                                 chars != nullptr && chars->is_string() ? &chars->string_value() : nullptr));
    }
    if (f == "length" || f == "count") {
      if (v.is_string()) return Value::Int(static_cast<int64_t>(CodePoints(v.string_value()).size()));
      if (v.is_list()) return Value::Int(static_cast<int64_t>(v.list().size()));
      if (v.is_dict()) return Value::Int(static_cast<int64_t>(v.dict().size()));
      if (v.is_undefined()) return Value::Int(0);
      return Error(n, absl::StrCat("a ", KindName(v.kind()), " has no length"));
    }
    if (f == "upper" || f == "lower" || f == "title" || f == "capitalize") {
      QF_RETURN_IF_ERROR(need_string());
      return CallMethod(n, v, f, args);
    }
    if (f == "replace") {
      QF_RETURN_IF_ERROR(need_string());
      return CallMethod(n, v, f, args);
    }
    if (f == "default" || f == "d") {
      const Value* fallback = args.Get(0, "default_value");
      const Value* boolean = args.Get(1, "boolean");
      const bool use_fallback = v.is_undefined() || (boolean != nullptr && boolean->Truthy() && !v.Truthy());
      if (!use_fallback) return v;
      return fallback != nullptr ? *fallback : Value::String("");
    }
    if (f == "first" || f == "last") {
      QF_ASSIGN_OR_RETURN(std::vector<Value> items, Items(*n.children[0], v));
      if (items.empty()) return Value();
      return f == "first" ? items.front() : items.back();
    }
    if (f == "join") {
      QF_ASSIGN_OR_RETURN(std::vector<Value> items, Items(*n.children[0], v));
      const Value* sep = args.Get(0, "d");
      const std::string d = sep != nullptr ? sep->ToString() : "";
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += d;
        out += items[i].ToString();
        if (out.size() > kMaxRenderedBytes) return Error(n, "join: result too large");
      }
      return Value::String(std::move(out));
    }
    if (f == "string") return Value::String(v.ToString());
    if (f == "int") {
      if (v.is_number()) return Value::Int(v.kind() == VK::kFloat ? static_cast<int64_t>(std::trunc(std::clamp(v.number_value(), -9.2e18, 9.2e18))) : v.int_value());
      if (v.is_string()) {
        int64_t out = 0;
        if (absl::SimpleAtoi(absl::StripAsciiWhitespace(v.string_value()), &out)) return Value::Int(out);
      }
      const Value* fallback = args.Get(0, "default");
      return fallback != nullptr ? *fallback : Value::Int(0);
    }
    if (f == "float") {
      if (v.is_number()) return Value::Float(v.number_value());
      double out = 0;
      if (v.is_string() && absl::SimpleAtod(v.string_value(), &out)) return Value::Float(out);
      return Value::Float(0);
    }
    if (f == "list") {
      QF_ASSIGN_OR_RETURN(std::vector<Value> items, Items(*n.children[0], v));
      return Value::MakeList(std::move(items));
    }
    if (f == "reverse") {
      if (v.is_string()) {
        std::vector<std::string> cps = CodePoints(v.string_value());
        std::reverse(cps.begin(), cps.end());
        return Value::String(absl::StrJoin(cps, ""));
      }
      QF_ASSIGN_OR_RETURN(std::vector<Value> items, Items(*n.children[0], v));
      std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (f == "items") {
      if (v.is_undefined()) return Value::MakeList({});
      if (!v.is_dict()) return Error(n, absl::StrCat("filter 'items' needs a dict, got a ", KindName(v.kind())));
      return CallMethod(n, v, "items", args);
    }
    if (f == "tojson") {
      if (const Value* indent = args.Get(0, "indent"); indent != nullptr && !indent->is_none()) {
        return Error(n, "tojson: indent is not supported");  // rather than a layout that differs from Python's
      }
      std::string out;
      if (absl::Status s = ToJson(v, &out); !s.ok()) return Error(n, s.message());
      return Value::String(std::move(out));
    }
    if (f == "abs") {
      if (!v.is_number()) return Error(n, "filter 'abs' needs a number");
      if (v.kind() == VK::kFloat) return Value::Float(std::fabs(v.number_value()));
      if (v.int_value() == INT64_MIN) return Error(n, "integer overflow");
      return Value::Int(v.int_value() < 0 ? -v.int_value() : v.int_value());
    }
    return Error(n, absl::StrCat("unsupported filter '", f, "'"));
  }

  absl::StatusOr<bool> EvalTest(const Node& n) {
    const std::string& t = n.text;
    if (t == "defined" || t == "undefined") {
      QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
      return v.is_undefined() == (t == "undefined");
    }
    QF_ASSIGN_OR_RETURN(Value v, Eval(*n.children[0]));
    QF_ASSIGN_OR_RETURN(Args args, EvalArgs(n, 1));
    const Value* arg = args.Get(0, "value");
    auto need_arg = [&]() -> absl::Status {
      if (arg == nullptr) return Error(n, absl::StrCat("test '", t, "' needs an argument"));
      return absl::OkStatus();
    };
    if (t == "none") return v.is_none();
    if (t == "boolean") return v.is_bool();
    if (t == "true") return v.is_bool() && v.bool_value();
    if (t == "false") return v.is_bool() && !v.bool_value();
    if (t == "string") return v.is_string();
    if (t == "number") return v.is_number() && !v.is_bool();
    if (t == "integer") return v.is_int();
    if (t == "float") return v.kind() == VK::kFloat;
    if (t == "mapping") return v.is_dict();
    if (t == "iterable") return v.is_list() || v.is_dict() || v.is_string();
    if (t == "sequence") return v.is_list() || v.is_dict() || v.is_string();
    if (t == "lower" || t == "upper") {
      return v.is_string() && (t == "lower" ? absl::AsciiStrToLower(v.string_value()) : absl::AsciiStrToUpper(v.string_value())) == v.string_value();
    }
    if (t == "even" || t == "odd" || t == "divisibleby") {
      if (!v.is_number() || v.kind() == VK::kFloat) return Error(n, absl::StrCat("test '", t, "' needs an integer"));
      int64_t divisor = 2;
      if (t == "divisibleby") {
        QF_RETURN_IF_ERROR(need_arg());
        if (!arg->is_number() || arg->kind() == VK::kFloat || arg->int_value() == 0) {
          return Error(n, "divisibleby needs a non-zero integer");
        }
        divisor = arg->int_value();
      }
      const bool divisible = divisor == -1 || v.int_value() % divisor == 0;
      return t == "odd" ? !divisible : divisible;
    }
    if (t == "equalto" || t == "eq" || t == "sameas") {
      QF_RETURN_IF_ERROR(need_arg());
      return v == *arg;
    }
    if (t == "ne" || t == "lt" || t == "le" || t == "gt" || t == "ge" || t == "in") {
      QF_RETURN_IF_ERROR(need_arg());
      static const std::map<std::string, std::string> kOps = {{"ne", "!="}, {"lt", "<"}, {"le", "<="},
                                                             {"gt", ">"},  {"ge", ">="}, {"in", "in"}};
      return Compare(n, kOps.at(t), v, *arg);
    }
    return Error(n, absl::StrCat("unsupported test '", t, "'"));
  }

  absl::StatusOr<bool> Compare(const Node& n, const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return a == b;
    if (op == "!=") return !(a == b);
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.is_string()) {
        if (!a.is_string()) return Error(n, "'in <string>' needs a string on the left");
        found = b.string_value().find(a.string_value()) != std::string::npos;
      } else if (b.is_list()) {
        found = std::find(b.list().begin(), b.list().end(), a) != b.list().end();
      } else if (b.is_dict()) {
        found = a.is_string() && b.Find(a.string_value()) != nullptr;
      } else if (!b.is_undefined()) {
        return Error(n, absl::StrCat("'in' needs a string, list or dict on the right, got a ", KindName(b.kind())));
      }
      return op == "in" ? found : !found;
    }
    int order = 0;
    if (a.is_number() && b.is_number()) {
      order = a.number_value() < b.number_value() ? -1 : a.number_value() > b.number_value() ? 1 : 0;
    } else if (a.is_string() && b.is_string()) {
      order = a.string_value().compare(b.string_value());
    } else {
      return Error(n, absl::StrCat("cannot compare a ", KindName(a.kind()), " with a ", KindName(b.kind()), " by '", op, "'"));
    }
    if (op == "<") return order < 0;
    if (op == "<=") return order <= 0;
    if (op == ">") return order > 0;
    return order >= 0;
  }

  absl::StatusOr<Value> EvalBinary(const Node& n) {
    const std::string& op = n.text;
    QF_ASSIGN_OR_RETURN(Value a, Eval(*n.children[0]));
    if (op == "and") return a.Truthy() ? Eval(*n.children[1]) : a;
    if (op == "or") return a.Truthy() ? a : Eval(*n.children[1]);
    QF_ASSIGN_OR_RETURN(Value b, Eval(*n.children[1]));
    if (op == "~") {
      std::string s = a.ToString() + b.ToString();
      if (s.size() > kMaxRenderedBytes) return Error(n, "string too large");
      return Value::String(std::move(s));
    }
    auto type_error = [&]() {
      return Error(n, absl::StrCat("unsupported operand types for '", op, "': ", KindName(a.kind()), " and ", KindName(b.kind())));
    };
    if (a.is_undefined() || b.is_undefined()) {
      return Error(n, absl::StrCat(Describe(*n.children[a.is_undefined() ? 0 : 1]), " is undefined"));
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) {
        if (a.string_value().size() + b.string_value().size() > kMaxRenderedBytes) return Error(n, "string too large");
        return Value::String(a.string_value() + b.string_value());
      }
      if (a.is_list() && b.is_list()) {
        if (a.list().size() + b.list().size() > static_cast<size_t>(kMaxRangeLength)) return Error(n, "list too large");
        Value::List items = a.list();
        items.insert(items.end(), b.list().begin(), b.list().end());
        return Value::MakeList(std::move(items));
      }
    }
    if (op == "*" && ((a.is_string() || a.is_list()) != (b.is_string() || b.is_list()))) {
      const Value& seq = a.is_string() || a.is_list() ? a : b;
      const Value& times = a.is_string() || a.is_list() ? b : a;
      if (!times.is_number() || times.kind() == VK::kFloat) return type_error();
      const int64_t k = std::max<int64_t>(0, times.int_value());
      const size_t unit = seq.is_string() ? seq.string_value().size() : seq.list().size();
      const size_t limit = seq.is_string() ? kMaxRenderedBytes : static_cast<size_t>(kMaxRangeLength);
      if (unit > 0 && static_cast<uint64_t>(k) > limit / unit) return Error(n, "repetition too large");
      if (seq.is_string()) {
        std::string s;
        for (int64_t i = 0; i < k; ++i) s += seq.string_value();
        return Value::String(std::move(s));
      }
      Value::List items;
      for (int64_t i = 0; i < k; ++i) items.insert(items.end(), seq.list().begin(), seq.list().end());
      return Value::MakeList(std::move(items));
    }
    if (!a.is_number() || !b.is_number()) return type_error();
    const bool floats = a.kind() == VK::kFloat || b.kind() == VK::kFloat;
    if (op == "/") {
      if (b.number_value() == 0) return Error(n, "division by zero");
      return Value::Float(a.number_value() / b.number_value());
    }
    if (floats) {
      const double x = a.number_value(), y = b.number_value();
      if (op == "+") return Value::Float(x + y);
      if (op == "-") return Value::Float(x - y);
      if (op == "*") return Value::Float(x * y);
      if (op == "**") return Value::Float(std::pow(x, y));
      if (y == 0) return Error(n, "division by zero");
      if (op == "//") return Value::Float(std::floor(x / y));
      if (op == "%") return Value::Float(x - std::floor(x / y) * y);
      return type_error();
    }
    const int64_t x = a.int_value(), y = b.int_value();
    int64_t r = 0;
    if (op == "+") {
      if (__builtin_add_overflow(x, y, &r)) return Error(n, "integer overflow");
      return Value::Int(r);
    }
    if (op == "-") {
      if (__builtin_sub_overflow(x, y, &r)) return Error(n, "integer overflow");
      return Value::Int(r);
    }
    if (op == "*") {
      if (__builtin_mul_overflow(x, y, &r)) return Error(n, "integer overflow");
      return Value::Int(r);
    }
    if (op == "**") {
      if (y < 0) return Value::Float(std::pow(static_cast<double>(x), static_cast<double>(y)));
      r = 1;
      for (int64_t i = 0; i < y; ++i) {
        if (__builtin_mul_overflow(r, x, &r)) return Error(n, "integer overflow");
        if (r == 0 || r == 1) break;  // stays there (x is 0 or 1)
        if (r == -1 && x == -1) {
          r = (y % 2 == 0) ? 1 : -1;
          break;
        }
      }
      return Value::Int(r);
    }
    if (y == 0) return Error(n, "division by zero");
    if (x == INT64_MIN && y == -1) return Error(n, "integer overflow");
    // Python floors: the remainder takes the divisor's sign.
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      --q;
      m += y;
    }
    if (op == "//") return Value::Int(q);
    if (op == "%") return Value::Int(m);
    return type_error();
  }

  std::vector<std::map<std::string, Value>> scopes_;
  std::string out_;
  int64_t steps_ = 0;
};

}  // namespace

absl::StatusOr<std::string> RenderTemplate(const Node& root, const std::map<std::string, Value>& globals) {
  return Renderer(globals).Run(root);
}

}  // namespace internal
}  // namespace qforge::chat
