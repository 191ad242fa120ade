// Lexer and recursive-descent parser of the chat-template Jinja subset (chat_template.h lists it). The
// lexer applies whitespace control (`-`, trim_blocks, lstrip_blocks) while it cuts the text, so the parser
// and the renderer only ever see the text that is printed.
#include <algorithm>
#include <cstdlib>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "serving/chat_template/template_ast.h"

namespace qforge::chat::internal {

absl::Status ErrorAt(int line, int column, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("chat template: line ", line, ", column ", column, ": ", what));
}

namespace {

struct Token {
  enum class Kind { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };
  Kind kind = Kind::kEof;
  std::string text;  // text, name, operator, or the string literal's value
  int64_t int_value = 0;
  double float_value = 0;
  int line = 1, column = 1;
};

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool IsNameStart(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_'; }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

class Lexer {
 public:
  Lexer(std::string_view src, const TemplateOptions& options) : src_(src), options_(options) {
    line_starts_.push_back(0);
    for (size_t i = 0; i < src_.size(); ++i) {
      if (src_[i] == '\n') line_starts_.push_back(i + 1);
    }
  }

  absl::StatusOr<std::vector<Token>> Run() {
    size_t pos = 0;
    bool strip_leading = false;  // the previous tag ended with "-"
    bool trim_newline = false;   // the previous tag was a block or comment tag (trim_blocks)
    while (pos <= src_.size()) {
      size_t tag = pos;
      while (tag + 1 < src_.size() &&
             !(src_[tag] == '{' && (src_[tag + 1] == '{' || src_[tag + 1] == '%' || src_[tag + 1] == '#'))) {
        ++tag;
      }
      if (tag + 1 >= src_.size()) tag = src_.size();
      std::string text(src_.substr(pos, tag - pos));
      if (strip_leading) {
        size_t k = 0;
        while (k < text.size() && IsSpace(text[k])) ++k;
        text.erase(0, k);
      } else if (trim_newline) {
        if (text.starts_with("\r\n")) {
          text.erase(0, 2);
        } else if (text.starts_with("\n")) {
          text.erase(0, 1);
        }
      }
      if (tag == src_.size()) {
        Emit(Token::Kind::kText, std::move(text), pos);
        break;
      }
      const char type = src_[tag + 1];
      size_t inner = tag + 2;
      const bool open_minus = inner < src_.size() && src_[inner] == '-';
      const bool open_plus = inner < src_.size() && src_[inner] == '+';
      if (open_minus || open_plus) ++inner;
      if (open_minus) {
        while (!text.empty() && IsSpace(text.back())) text.pop_back();
      } else if (options_.lstrip_blocks && type != '{' && !open_plus) {
        // Only whitespace between the start of the line and the tag is removed.
        size_t k = tag;
        while (k > pos && (src_[k - 1] == ' ' || src_[k - 1] == '\t')) --k;
        if (k == 0 || src_[k - 1] == '\n') {
          size_t n = tag - k;
          while (n > 0 && !text.empty() && (text.back() == ' ' || text.back() == '\t')) {
            text.pop_back();
            --n;
          }
        }
      }
      Emit(Token::Kind::kText, std::move(text), pos);
      if (type == '#') {
        const size_t end = src_.find("#}", inner);
        if (end == std::string_view::npos) return Error(tag, "unclosed comment (no '#}')");
        strip_leading = end > inner && src_[end - 1] == '-';
        trim_newline = options_.trim_blocks && !strip_leading;
        pos = end + 2;
        continue;
      }
      bool close_minus = false;
      QF_ASSIGN_OR_RETURN(pos, LexTag(tag, inner, type == '{', &close_minus));
      strip_leading = close_minus;
      trim_newline = options_.trim_blocks && type == '%' && !close_minus;
    }
    Token eof;
    eof.kind = Token::Kind::kEof;
    Locate(src_.size(), &eof);
    tokens_.push_back(std::move(eof));
    return std::move(tokens_);
  }

 private:
  void Locate(size_t offset, Token* t) const {
    const auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), offset);
    t->line = static_cast<int>(it - line_starts_.begin());
    t->column = static_cast<int>(offset - *(it - 1)) + 1;
  }
  absl::Status Error(size_t offset, absl::string_view what) const {
    Token t;
    Locate(offset, &t);
    return ErrorAt(t.line, t.column, what);
  }
  void Emit(Token::Kind kind, std::string text, size_t offset) {
    if (kind == Token::Kind::kText && text.empty()) return;
    Token t;
    t.kind = kind;
    t.text = std::move(text);
    Locate(offset, &t);
    tokens_.push_back(std::move(t));
  }

  // The tokens of one {{ }} or {% %} tag from `p` (after the opening delimiter) to its end; returns the
  // offset after the closing delimiter.
  absl::StatusOr<size_t> LexTag(size_t tag, size_t p, bool is_var, bool* close_minus) {
    Emit(is_var ? Token::Kind::kVarBegin : Token::Kind::kBlockBegin, is_var ? "{{" : "{%", tag);
    const char closer = is_var ? '}' : '%';
    int braces = 0;  // '{' open inside the tag, so that "}}" of a dict literal does not end it
    while (p < src_.size()) {
      const char c = src_[p];
      if (IsSpace(c)) {
        ++p;
        continue;
      }
      if (braces == 0 || !is_var) {
        if (c == '-' && p + 2 < src_.size() && src_[p + 1] == closer && src_[p + 2] == '}') {
          *close_minus = true;
          Emit(is_var ? Token::Kind::kVarEnd : Token::Kind::kBlockEnd, "", p);
          return p + 3;
        }
        if (c == closer && p + 1 < src_.size() && src_[p + 1] == '}') {
          Emit(is_var ? Token::Kind::kVarEnd : Token::Kind::kBlockEnd, "", p);
          return p + 2;
        }
      }
      if (IsNameStart(c)) {
        size_t e = p;
        while (e < src_.size() && (IsNameStart(src_[e]) || IsDigit(src_[e]))) ++e;
        Emit(Token::Kind::kName, std::string(src_.substr(p, e - p)), p);
        p = e;
        continue;
      }
      if (IsDigit(c)) {
        QF_ASSIGN_OR_RETURN(p, LexNumber(p));
        continue;
      }
      if (c == '\'' || c == '"') {
        QF_ASSIGN_OR_RETURN(p, LexString(p));
        continue;
      }
      static constexpr std::string_view kTwoCharOps[] = {"**", "//", "==", "!=", "<=", ">="};
      std::string op;
      for (std::string_view two : kTwoCharOps) {
        if (src_.substr(p, 2) == two) op = std::string(two);
      }
      if (op.empty()) {
        if (std::string_view("+-*/%~<>=()[]{}.,:|").find(c) == std::string_view::npos) {
          return Error(p, absl::StrCat("unexpected character '", std::string(1, c), "'"));
        }
        op = std::string(1, c);
      }
      if (op == "{") ++braces;
      if (op == "}") --braces;
      Emit(Token::Kind::kOp, op, p);
      p += op.size();
    }
    return Error(tag, is_var ? "unclosed '{{' (no '}}')" : "unclosed '{%' (no '%}')");
  }

  absl::StatusOr<size_t> LexNumber(size_t p) {
    size_t e = p;
    while (e < src_.size() && (IsDigit(src_[e]) || src_[e] == '_')) ++e;
    bool is_float = false;
    if (e + 1 < src_.size() && src_[e] == '.' && IsDigit(src_[e + 1])) {
      is_float = true;
      ++e;
      while (e < src_.size() && IsDigit(src_[e])) ++e;
    }
    if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t x = e + 1;
      if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
      if (x < src_.size() && IsDigit(src_[x])) {
        is_float = true;
        e = x;
        while (e < src_.size() && IsDigit(src_[e])) ++e;
      }
    }
    std::string digits;
    for (size_t i = p; i < e; ++i) {
      if (src_[i] != '_') digits += src_[i];
    }
    Token t;
    Locate(p, &t);
    if (is_float) {
      t.kind = Token::Kind::kFloat;
      t.float_value = std::strtod(digits.c_str(), nullptr);
    } else {
      t.kind = Token::Kind::kInt;
      errno = 0;
      const long long v = std::strtoll(digits.c_str(), nullptr, 10);
      if (errno == ERANGE) return Error(p, "integer literal out of range");
      t.int_value = v;
    }
    tokens_.push_back(std::move(t));
    return e;
  }

  absl::StatusOr<size_t> LexString(size_t p) {
    const char quote = src_[p];
    std::string value;
    size_t i = p + 1;
    for (;; ++i) {
      if (i >= src_.size()) return Error(p, "unterminated string literal");
      const char c = src_[i];
      if (c == quote) break;
      if (c != '\\') {
        value += c;
        continue;
      }
      if (++i >= src_.size()) return Error(p, "unterminated string literal");
      switch (src_[i]) {
        case 'n': value += '\n'; break;
        case 't': value += '\t'; break;
        case 'r': value += '\r'; break;
        case '0': value += '\0'; break;
        case '\\': value += '\\'; break;
        case '\'': value += '\''; break;
        case '"': value += '"'; break;
        case '\n': break;  // a backslash at the end of a line joins the lines
        case 'u':
        case 'x': {
          const size_t n = src_[i] == 'u' ? 4 : 2;
          if (i + n >= src_.size()) return Error(i, "truncated escape in string literal");
          uint32_t cp = 0;
          for (size_t k = 1; k <= n; ++k) {
            const char h = src_[i + k];
            const int d = IsDigit(h) ? h - '0' : (h >= 'a' && h <= 'f') ? h - 'a' + 10 : (h >= 'A' && h <= 'F') ? h - 'A' + 10 : -1;
            if (d < 0) return Error(i, "bad hex digit in escape");
            cp = cp * 16 + static_cast<uint32_t>(d);
          }
          if (cp >= 0xD800 && cp <= 0xDFFF) return Error(i, "surrogate code point in escape");
          AppendUtf8(cp, &value);
          i += n;
          break;
        }
        default:  // Python keeps unknown escapes as they are
          value += '\\';
          value += src_[i];
      }
    }
    Token t;
    t.kind = Token::Kind::kString;
    t.text = std::move(value);
    Locate(p, &t);
    tokens_.push_back(std::move(t));
    return i + 1;
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      *out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      *out += static_cast<char>(0xC0 | (cp >> 6));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      *out += static_cast<char>(0xE0 | (cp >> 12));
      *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  std::string_view src_;
  TemplateOptions options_;
  std::vector<size_t> line_starts_;
  std::vector<Token> tokens_;
};

// Test names that take one argument without parentheses (`x is divisibleby 3`, `x is sameas none`).
const std::set<std::string, std::less<>> kTestsWithArgument = {"divisibleby", "equalto", "eq", "ne", "sameas",
                                                                "lt", "le", "gt", "ge", "in"};
// Names that end an expression rather than start an argument.
const std::set<std::string, std::less<>> kKeywords = {"and", "or", "not", "if", "else", "in", "is"};

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  absl::StatusOr<NodePtr> ParseAll() {
    std::string end;
    QF_ASSIGN_OR_RETURN(NodePtr body, ParseBody({}, &end));
    return body;
  }

 private:
  using K = Token::Kind;
  const Token& Peek(size_t ahead = 0) const { return t_[std::min(i_ + ahead, t_.size() - 1)]; }
  const Token& Next() {
    const Token& t = t_[i_];
    if (i_ + 1 < t_.size()) ++i_;
    return t;
  }
  bool IsOp(absl::string_view op, size_t ahead = 0) const {
    return Peek(ahead).kind == K::kOp && Peek(ahead).text == op;
  }
  bool IsName(absl::string_view name, size_t ahead = 0) const {
    return Peek(ahead).kind == K::kName && Peek(ahead).text == name;
  }
  absl::Status ErrorHere(absl::string_view what) const { return ErrorAt(Peek().line, Peek().column, what); }
  static std::string Describe(const Token& t) {
    switch (t.kind) {
      case K::kEof: return "the end of the template";
      case K::kVarEnd: return "'}}'";
      case K::kBlockEnd: return "'%}'";
      case K::kString: return "a string";
      case K::kInt:
      case K::kFloat: return "a number";
      case K::kText: return "text";
      default: return absl::StrCat("'", t.text, "'");
    }
  }
  absl::Status Expect(absl::string_view op) {
    if (!IsOp(op)) return ErrorHere(absl::StrCat("expected '", op, "', found ", Describe(Peek())));
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectKind(K kind, absl::string_view what) {
    if (Peek().kind != kind) return ErrorHere(absl::StrCat("expected ", what, ", found ", Describe(Peek())));
    Next();
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName(absl::string_view what) {
    if (Peek().kind != K::kName) return ErrorHere(absl::StrCat("expected ", what, ", found ", Describe(Peek())));
    return Next().text;
  }

  // A node at `at`'s position; its depth is checked once its children are in place (Finish).
  static std::shared_ptr<Node> Make(Node::Kind kind, const Token& at) {
    auto n = std::make_shared<Node>();
    n->kind = kind;
    n->line = at.line;
    n->column = at.column;
    return n;
  }
  absl::StatusOr<NodePtr> Finish(std::shared_ptr<Node> n) {
    int depth = 0;
    for (const NodePtr& c : n->children) {
      if (c != nullptr) depth = std::max(depth, c->depth);
    }
    n->depth = depth + 1;
    if (n->depth > kMaxNodeDepth) {
      return ErrorAt(n->line, n->column, absl::StrCat("nested deeper than ", kMaxNodeDepth, " levels"));
    }
    return NodePtr(std::move(n));
  }

  // Statements until a block tag named in `stops` (read through its name, which goes to *end) or the end of input
  // (an error when `stops` is not empty).
  absl::StatusOr<NodePtr> ParseBody(const std::set<std::string, std::less<>>& stops, std::string* end) {
    auto seq = Make(Node::Kind::kSequence, Peek());
    if (++body_depth_ > kMaxNodeDepth) return ErrorHere(absl::StrCat("nested deeper than ", kMaxNodeDepth, " levels"));
    for (;;) {
      const Token& t = Peek();
      if (t.kind == K::kEof) {
        if (!stops.empty()) {
          return ErrorHere(absl::StrCat("missing {% ", *stops.rbegin(), " %} before the end of the template"));
        }
        break;
      }
      if (t.kind == K::kText) {
        auto text = Make(Node::Kind::kText, t);
        text->text = Next().text;
        seq->children.push_back(std::move(text));
        continue;
      }
      if (t.kind == K::kVarBegin) {
        auto out = Make(Node::Kind::kOutput, Next());
        QF_ASSIGN_OR_RETURN(NodePtr e, ParseExpression());
        out->children.push_back(std::move(e));
        QF_RETURN_IF_ERROR(ExpectKind(K::kVarEnd, "'}}'"));
        QF_ASSIGN_OR_RETURN(NodePtr done, Finish(std::move(out)));
        seq->children.push_back(std::move(done));
        continue;
      }
      if (t.kind != K::kBlockBegin) return ErrorHere(absl::StrCat("unexpected ", Describe(t)));
      const Token& name = Peek(1);
      if (name.kind == K::kName && stops.count(name.text)) {
        *end = name.text;
        Next();
        Next();
        break;
      }
      Next();
      QF_ASSIGN_OR_RETURN(NodePtr stmt, ParseStatement());
      if (stmt != nullptr) seq->children.push_back(std::move(stmt));
    }
    --body_depth_;
    return Finish(std::move(seq));
  }

  // After "{%": one statement through its closing tag.
  absl::StatusOr<NodePtr> ParseStatement() {
    const Token& at = Peek();
    QF_ASSIGN_OR_RETURN(const std::string tag, ExpectName("a tag name"));
    if (tag == "if") return ParseIf(at);
    if (tag == "for") return ParseFor(at);
    if (tag == "set") return ParseSet(at);
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) return ErrorAt(at.line, at.column, absl::StrCat("'", tag, "' outside a for loop"));
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      return Finish(Make(tag == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, at));
    }
    if (tag == "elif" || tag == "else" || tag.starts_with("end")) {
      return ErrorAt(at.line, at.column, absl::StrCat("unexpected {% ", tag, " %} (nothing open that it closes)"));
    }
    if (tag == "generation") {  // transformers' marker of assistant text: rendered as its body
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      std::string end;
      QF_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"endgeneration"}, &end));
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      return body;
    }
    return ErrorAt(at.line, at.column, absl::StrCat("unsupported tag '", tag, "'"));
  }

  absl::StatusOr<NodePtr> ParseIf(const Token& at) {
    auto node = Make(Node::Kind::kIf, at);
    for (;;) {
      QF_ASSIGN_OR_RETURN(NodePtr cond, ParseExpression());
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      std::string end;
      QF_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"elif", "else", "endif"}, &end));
      node->children.push_back(std::move(cond));
      node->children.push_back(std::move(body));
      if (end == "elif") continue;
      if (end == "else") {
        QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
        QF_ASSIGN_OR_RETURN(NodePtr else_body, ParseBody({"endif"}, &end));
        node->children.push_back(std::move(else_body));
        node->has_else = true;
      }
      break;
    }
    QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
    return Finish(std::move(node));
  }

  absl::StatusOr<NodePtr> ParseFor(const Token& at) {
    auto node = Make(Node::Kind::kFor, at);
    do {
      QF_ASSIGN_OR_RETURN(std::string target, ExpectName("a loop variable"));
      node->names.push_back(std::move(target));
    } while (IsOp(",") && (Next(), true));
    if (!IsName("in")) return ErrorHere(absl::StrCat("expected 'in', found ", Describe(Peek())));
    Next();
    // The iterable is read without a conditional expression: a trailing `if` filters the items.
    QF_ASSIGN_OR_RETURN(NodePtr iterable, ParseOr());
    NodePtr filter;
    if (IsName("if")) {
      Next();
      QF_ASSIGN_OR_RETURN(filter, ParseExpression());
    }
    if (IsName("recursive")) return ErrorHere("recursive loops are not supported");
    QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
    ++loop_depth_;
    std::string end;
    QF_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"else", "endfor"}, &end));
    --loop_depth_;
    NodePtr else_body;
    if (end == "else") {
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      QF_ASSIGN_OR_RETURN(else_body, ParseBody({"endfor"}, &end));
    }
    QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
    node->children = {std::move(iterable), std::move(filter), std::move(body), std::move(else_body)};
    return Finish(std::move(node));
  }

  absl::StatusOr<NodePtr> ParseSet(const Token& at) {
    QF_ASSIGN_OR_RETURN(std::string target, ExpectName("a variable name"));
    std::string attribute;
    if (IsOp(".")) {
      Next();
      QF_ASSIGN_OR_RETURN(attribute, ExpectName("an attribute name"));
    }
    if (IsOp("=")) {
      Next();
      auto node = Make(Node::Kind::kSet, at);
      node->text = std::move(target);
      node->attribute = std::move(attribute);
      QF_ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
      node->children.push_back(std::move(value));
      QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
      return Finish(std::move(node));
    }
    if (!attribute.empty()) return ErrorHere("a block set assigns a plain variable");
    QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'=' or '%}'"));
    auto node = Make(Node::Kind::kSetBlock, at);
    node->text = std::move(target);
    std::string end;
    QF_ASSIGN_OR_RETURN(NodePtr body, ParseBody({"endset"}, &end));
    QF_RETURN_IF_ERROR(ExpectKind(K::kBlockEnd, "'%}'"));
    node->children.push_back(std::move(body));
    return Finish(std::move(node));
  }

  // --- expressions, lowest precedence first (Jinja's order) ----------------------------------------------
  absl::StatusOr<NodePtr> ParseExpression() {
    const Token& at = Peek();
    QF_ASSIGN_OR_RETURN(NodePtr value, ParseOr());
    while (IsName("if")) {
      Next();
      auto node = Make(Node::Kind::kConditional, at);
      QF_ASSIGN_OR_RETURN(NodePtr cond, ParseOr());
      NodePtr otherwise;
      if (IsName("else")) {
        Next();
        QF_ASSIGN_OR_RETURN(otherwise, ParseExpression());
      }
      node->children = {std::move(value), std::move(cond), std::move(otherwise)};
      QF_ASSIGN_OR_RETURN(value, Finish(std::move(node)));
    }
    return value;
  }

  absl::StatusOr<NodePtr> Binary(const Token& at, std::string op, NodePtr l, NodePtr r) {
    auto node = Make(Node::Kind::kBinary, at);
    node->text = std::move(op);
    node->children = {std::move(l), std::move(r)};
    return Finish(std::move(node));
  }

  absl::StatusOr<NodePtr> ParseOr() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParseAnd());
    while (IsName("or")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParseAnd());
      QF_ASSIGN_OR_RETURN(l, Binary(at, "or", std::move(l), std::move(r)));
    }
    return l;
  }
  absl::StatusOr<NodePtr> ParseAnd() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParseNot());
    while (IsName("and")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParseNot());
      QF_ASSIGN_OR_RETURN(l, Binary(at, "and", std::move(l), std::move(r)));
    }
    return l;
  }
  absl::StatusOr<NodePtr> ParseNot() {
    if (IsName("not")) {
      auto node = Make(Node::Kind::kUnary, Next());
      node->text = "not";
      if (++expr_depth_ > kMaxNodeDepth) return ErrorHere("expression nested too deeply");
      QF_ASSIGN_OR_RETURN(NodePtr operand, ParseNot());
      --expr_depth_;
      node->children.push_back(std::move(operand));
      return Finish(std::move(node));
    }
    return ParseCompare();
  }
  absl::StatusOr<NodePtr> ParseCompare() {
    const Token& at = Peek();
    QF_ASSIGN_OR_RETURN(NodePtr first, ParseMath1());
    auto node = Make(Node::Kind::kCompare, at);
    node->children.push_back(std::move(first));
    for (;;) {
      std::string op;
      if (Peek().kind == K::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" || Peek().text == "<=" ||
           Peek().text == ">" || Peek().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        Next();
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        Next();
        Next();
        op = "not in";
      } else {
        break;
      }
      QF_ASSIGN_OR_RETURN(NodePtr operand, ParseMath1());
      node->names.push_back(std::move(op));
      node->children.push_back(std::move(operand));
    }
    if (node->names.empty()) return node->children[0];
    return Finish(std::move(node));
  }
  absl::StatusOr<NodePtr> ParseMath1() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParseConcat());
      QF_ASSIGN_OR_RETURN(l, Binary(at, at.text, std::move(l), std::move(r)));
    }
    return l;
  }
  absl::StatusOr<NodePtr> ParseConcat() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParseMath2());
    while (IsOp("~")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParseMath2());
      QF_ASSIGN_OR_RETURN(l, Binary(at, "~", std::move(l), std::move(r)));
    }
    return l;
  }
  absl::StatusOr<NodePtr> ParseMath2() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParsePow());
      QF_ASSIGN_OR_RETURN(l, Binary(at, at.text, std::move(l), std::move(r)));
    }
    return l;
  }
  absl::StatusOr<NodePtr> ParsePow() {
    QF_ASSIGN_OR_RETURN(NodePtr l, ParseUnary(true));
    while (IsOp("**")) {
      const Token& at = Next();
      QF_ASSIGN_OR_RETURN(NodePtr r, ParseUnary(true));
      QF_ASSIGN_OR_RETURN(l, Binary(at, "**", std::move(l), std::move(r)));
    }
    return l;
  }

  absl::StatusOr<NodePtr> ParseUnary(bool with_filters) {
    if (++expr_depth_ > kMaxNodeDepth) return ErrorHere("expression nested too deeply");
    NodePtr node;
    if (IsOp("-") || IsOp("+")) {
      auto unary = Make(Node::Kind::kUnary, Peek());
      unary->text = Next().text;
      QF_ASSIGN_OR_RETURN(NodePtr operand, ParseUnary(false));
      unary->children.push_back(std::move(operand));
      QF_ASSIGN_OR_RETURN(node, Finish(std::move(unary)));
    } else {
      QF_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    QF_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filters) {
      QF_ASSIGN_OR_RETURN(node, ParseFiltersAndTests(std::move(node)));
    }
    --expr_depth_;
    return node;
  }

  absl::StatusOr<NodePtr> ParsePrimary() {
    const Token& t = Peek();
    switch (t.kind) {
      case K::kName: {
        Next();
        auto lit = Make(Node::Kind::kLiteral, t);
        if (t.text == "true" || t.text == "True") {
          lit->value = Value::Bool(true);
        } else if (t.text == "false" || t.text == "False") {
          lit->value = Value::Bool(false);
        } else if (t.text == "none" || t.text == "None") {
          lit->value = Value::None();
        } else {
          auto name = Make(Node::Kind::kName, t);
          name->text = t.text;
          return Finish(std::move(name));
        }
        return Finish(std::move(lit));
      }
      case K::kString: {
        auto lit = Make(Node::Kind::kLiteral, t);
        std::string s = Next().text;
        while (Peek().kind == K::kString) s += Next().text;  // adjacent literals join, as in Python
        lit->value = Value::String(std::move(s));
        return Finish(std::move(lit));
      }
      case K::kInt: {
        auto lit = Make(Node::Kind::kLiteral, t);
        lit->value = Value::Int(Next().int_value);
        return Finish(std::move(lit));
      }
      case K::kFloat: {
        auto lit = Make(Node::Kind::kLiteral, t);
        lit->value = Value::Float(Next().float_value);
        return Finish(std::move(lit));
      }
      case K::kOp:
        if (t.text == "(") {
          Next();
          QF_ASSIGN_OR_RETURN(NodePtr inner, ParseExpression());
          if (IsOp(",")) {  // a tuple: a list here
            auto list = Make(Node::Kind::kList, t);
            list->children.push_back(std::move(inner));
            while (IsOp(",")) {
              Next();
              if (IsOp(")")) break;
              QF_ASSIGN_OR_RETURN(NodePtr item, ParseExpression());
              list->children.push_back(std::move(item));
            }
            QF_RETURN_IF_ERROR(Expect(")"));
            return Finish(std::move(list));
          }
          QF_RETURN_IF_ERROR(Expect(")"));
          return inner;
        }
        if (t.text == "[") {
          Next();
          auto list = Make(Node::Kind::kList, t);
          while (!IsOp("]")) {
            QF_ASSIGN_OR_RETURN(NodePtr item, ParseExpression());
            list->children.push_back(std::move(item));
            if (!IsOp(",")) break;
            Next();
          }
          QF_RETURN_IF_ERROR(Expect("]"));
          return Finish(std::move(list));
        }
        if (t.text == "{") {
          Next();
          auto dict = Make(Node::Kind::kDict, t);
          while (!IsOp("}")) {
            QF_ASSIGN_OR_RETURN(NodePtr key, ParseExpression());
            QF_RETURN_IF_ERROR(Expect(":"));
            QF_ASSIGN_OR_RETURN(NodePtr value, ParseExpression());
            dict->children.push_back(std::move(key));
            dict->children.push_back(std::move(value));
            if (!IsOp(",")) break;
            Next();
          }
          QF_RETURN_IF_ERROR(Expect("}"));
          return Finish(std::move(dict));
        }
        break;
      default: break;
    }
    return ErrorHere(absl::StrCat("expected an expression, found ", Describe(t)));
  }

  absl::StatusOr<NodePtr> ParsePostfix(NodePtr node) {
    for (;;) {
      if (IsOp(".")) {
        const Token& at = Next();
        auto attr = Make(Node::Kind::kAttribute, at);
        if (Peek().kind == K::kInt) {  // foo.0 is foo[0]
          auto index = Make(Node::Kind::kLiteral, Peek());
          index->value = Value::Int(Next().int_value);
          auto sub = Make(Node::Kind::kSubscript, at);
          sub->children = {std::move(node), std::move(index)};
          QF_ASSIGN_OR_RETURN(node, Finish(std::move(sub)));
          continue;
        }
        QF_ASSIGN_OR_RETURN(attr->text, ExpectName("an attribute name"));
        attr->children.push_back(std::move(node));
        QF_ASSIGN_OR_RETURN(node, Finish(std::move(attr)));
      } else if (IsOp("[")) {
        const Token& at = Next();
        NodePtr parts[3];
        int colons = 0;
        for (;;) {
          if (IsOp("]")) break;
          if (IsOp(":")) {
            if (++colons > 2) return ErrorHere("a slice has at most two ':'");
            Next();
            continue;
          }
          if (parts[colons] != nullptr) return ErrorHere(absl::StrCat("expected ':' or ']', found ", Describe(Peek())));
          QF_ASSIGN_OR_RETURN(parts[colons], ParseExpression());
        }
        QF_RETURN_IF_ERROR(Expect("]"));
        if (colons == 0) {
          if (parts[0] == nullptr) return ErrorAt(at.line, at.column, "empty subscript");
          auto sub = Make(Node::Kind::kSubscript, at);
          sub->children = {std::move(node), std::move(parts[0])};
          QF_ASSIGN_OR_RETURN(node, Finish(std::move(sub)));
        } else {
          auto slice = Make(Node::Kind::kSlice, at);
          slice->children = {std::move(node), std::move(parts[0]), std::move(parts[1]), std::move(parts[2])};
          QF_ASSIGN_OR_RETURN(node, Finish(std::move(slice)));
        }
      } else if (IsOp("(")) {
        auto call = Make(Node::Kind::kCall, Peek());
        call->line = node->line;  // errors of a call (raise_exception's) point at the callee
        call->column = node->column;
        call->children.push_back(std::move(node));
        QF_RETURN_IF_ERROR(ParseArguments(call.get()));
        QF_ASSIGN_OR_RETURN(node, Finish(std::move(call)));
      } else {
        return node;
      }
    }
  }

  // "(" positional..., name=value... ")" into node's children (after those already there) and names.
  absl::Status ParseArguments(Node* node) {
    QF_RETURN_IF_ERROR(Expect("("));
    while (!IsOp(")")) {
      if (Peek().kind == K::kName && IsOp("=", 1)) {
        node->names.push_back(Next().text);
        Next();
      } else if (!node->names.empty()) {
        return ErrorHere("a positional argument after a keyword argument");
      } else {
        ++node->positional;
      }
      QF_ASSIGN_OR_RETURN(NodePtr arg, ParseExpression());
      node->children.push_back(std::move(arg));
      if (!IsOp(",")) break;
      Next();
    }
    return Expect(")");
  }

  absl::StatusOr<NodePtr> ParseFiltersAndTests(NodePtr node) {
    for (;;) {
      if (IsOp("|")) {
        const Token& at = Next();
        auto filter = Make(Node::Kind::kFilter, at);
        QF_ASSIGN_OR_RETURN(filter->text, ExpectName("a filter name"));
        while (IsOp(".")) {  // dotted filter names are one name
          Next();
          QF_ASSIGN_OR_RETURN(std::string part, ExpectName("a filter name"));
          filter->text += "." + part;
        }
        filter->children.push_back(std::move(node));
        if (IsOp("(")) QF_RETURN_IF_ERROR(ParseArguments(filter.get()));
        QF_ASSIGN_OR_RETURN(node, Finish(std::move(filter)));
      } else if (IsName("is")) {
        const Token& at = Next();
        auto test = Make(Node::Kind::kTest, at);
        if (IsName("not")) {
          Next();
          test->negated = true;
        }
        QF_ASSIGN_OR_RETURN(test->text, ExpectName("a test name"));
        test->children.push_back(std::move(node));
        if (IsOp("(")) {
          QF_RETURN_IF_ERROR(ParseArguments(test.get()));
        } else if (kTestsWithArgument.count(test->text) &&
                   (Peek().kind == K::kString || Peek().kind == K::kInt || Peek().kind == K::kFloat ||
                    (Peek().kind == K::kName && !kKeywords.count(Peek().text)) || IsOp("[") || IsOp("{") ||
                    IsOp("-"))) {
          QF_ASSIGN_OR_RETURN(NodePtr arg, ParseUnary(false));
          test->children.push_back(std::move(arg));
          test->positional = 1;
        }
        QF_ASSIGN_OR_RETURN(node, Finish(std::move(test)));
      } else {
        return node;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int loop_depth_ = 0;
  int body_depth_ = 0;
  int expr_depth_ = 0;
};

}  // namespace

absl::StatusOr<NodePtr> ParseTemplate(std::string_view source, const TemplateOptions& options) {
  QF_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lexer(source, options).Run());
  return Parser(std::move(tokens)).ParseAll();
}

}  // namespace qforge::chat::internal
