// The parsed form of a chat template, shared by the parser and the renderer (not part of the public API).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "serving/chat_template/chat_template.h"

namespace qforge::chat::internal {

// Bounds that keep a hostile template from exhausting the stack, memory or time.
inline constexpr int kMaxNodeDepth = 100;                 // nesting of statements and expressions
inline constexpr size_t kMaxRenderedBytes = 16u << 20;    // output and any string built while rendering
inline constexpr int64_t kMaxRenderSteps = 2'000'000;     // node evaluations per render
inline constexpr int64_t kMaxRangeLength = 1'000'000;     // elements of range(...) and of repeated lists

struct Node;
using NodePtr = std::shared_ptr<const Node>;

struct Node {
  enum class Kind {
    // Statements.
    kSequence,    // children: statements in order
    kText,        // text
    kOutput,      // children[0]: the expression printed
    kIf,          // children: cond, body, cond, body, ..., [else body when has_else]
    kFor,         // names: targets; children: iterable, filter (or null), body, else body (or null)
    kSet,         // text: variable; attribute: namespace member (or ""); children[0]: value
    kSetBlock,    // text: variable; children[0]: body
    kBreak,
    kContinue,
    // Expressions.
    kLiteral,     // value
    kName,        // text
    kList,        // children: items
    kDict,        // children: key, value, key, value, ...
    kAttribute,   // children[0]: object; text: attribute
    kSubscript,   // children: object, index
    kSlice,       // children: object, start, stop, step (each may be null)
    kCall,        // children[0]: callee, then positional arguments, then keyword values; names: keywords
    kFilter,      // children[0]: operand, then arguments as kCall; text: filter; names: keywords
    kTest,        // children[0]: operand, then arguments; text: test; negated
    kUnary,       // text: "-", "+" or "not"; children[0]
    kBinary,      // text: operator (+ - * / // % ** ~ and or); children: left, right
    kCompare,     // children: operands; names: operators between them (== != < <= > >= in "not in")
    kConditional, // children: value, condition, else value (or null)
  };

  Kind kind = Kind::kSequence;
  int line = 0, column = 0;  // where the construct starts in the template source (1-based)
  int depth = 1;             // 1 + the largest depth of the children
  std::string text;
  std::string attribute;
  Value value;
  std::vector<NodePtr> children;
  std::vector<std::string> names;
  int positional = 0;        // kCall / kFilter / kTest: how many of the arguments are positional
  bool has_else = false;     // kIf
  bool negated = false;      // kTest
};

// Parses `source` into a kSequence.
absl::StatusOr<NodePtr> ParseTemplate(std::string_view source, const TemplateOptions& options);

// Renders `root` with `globals` as the outermost scope.
absl::StatusOr<std::string> RenderTemplate(const Node& root, const std::map<std::string, Value>& globals);

// "chat template: line L, column C: what".
absl::Status ErrorAt(int line, int column, absl::string_view what);

}  // namespace qforge::chat::internal
