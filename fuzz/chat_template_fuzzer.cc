// The chat-template parser and renderer on arbitrary template text. Oracles: every error is INVALID_ARGUMENT
// naming a position; a template that parses renders the same conversation to the same result twice (no state
// leaks between renders), with and without a generation prompt.
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "serving/chat_template/chat_template.h"

namespace {

void CheckError(const absl::Status& s) {
  if (s.code() != absl::StatusCode::kInvalidArgument) std::abort();
  if (std::string(s.message()).rfind("chat template: line ", 0) != 0) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The first byte picks trim_blocks / lstrip_blocks, the rest is the template.
  if (size == 0) return 0;
  qforge::chat::TemplateOptions options{.trim_blocks = (data[0] & 1) != 0, .lstrip_blocks = (data[0] & 2) != 0};
  const std::string source(reinterpret_cast<const char*>(data + 1), size - 1);
  auto t = qforge::chat::ChatTemplate::Parse(source, options);
  if (!t.ok()) {
    CheckError(t.status());
    return 0;
  }
  static const std::vector<qforge::chat::ChatMessage> kChat = {
      {"system", "You are terse."}, {"user", "Hi"}, {"assistant", "  Hello  "}, {"user", "Bye"}};
  for (bool add_generation_prompt : {false, true}) {
    auto first = t->Apply(kChat, "<s>", "</s>", add_generation_prompt);
    auto second = t->Apply(kChat, "<s>", "</s>", add_generation_prompt);
    if (first.ok() != second.ok()) std::abort();
    if (first.ok() && *first != *second) std::abort();
    if (!first.ok()) {
      CheckError(first.status());
      if (first.status().message() != second.status().message()) std::abort();
    }
  }
  return 0;
}
