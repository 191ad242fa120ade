#include "storage/model_ref.h"

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

namespace qforge::storage {
namespace {

bool IsNameChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
}

// Names are echoed in errors; cap what is quoted so a hostile string cannot flood a log line.
std::string Quote(const std::string& s) { return absl::StrCat("'", s.substr(0, 80), s.size() > 80 ? "...'" : "'"); }

}  // namespace

absl::Status ValidateModelName(const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("model name is empty");
  if (name.size() > kMaxModelNameChars) {
    return absl::InvalidArgumentError(
        absl::StrCat("model name ", Quote(name), " is ", name.size(), " characters, over the limit of ",
                     kMaxModelNameChars));
  }
  for (char c : name) {
    if (!IsNameChar(c)) {
      return absl::InvalidArgumentError(
          absl::StrCat("model name ", Quote(name), " may only hold [a-z0-9._-]"));
    }
  }
  const char first = name[0];
  if (first == '.' || first == '_' || first == '-') {
    return absl::InvalidArgumentError(absl::StrCat("model name ", Quote(name), " must start with a letter or digit"));
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelRef> ParseModelRef(const std::string& text) {
  const size_t at = text.find('@');
  ModelRef ref;
  ref.name = text.substr(0, at);
  if (at != std::string::npos && text.find('@', at + 1) != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("model reference ", Quote(text), " has more than one '@'"));
  }
  if (ref.name.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model reference ", Quote(text), " has no model name"));
  }
  if (absl::Status s = ValidateModelName(ref.name); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("model reference ", Quote(text), ": ", s.message()));
  }
  if (at == std::string::npos) return ref;  // bare name: latest
  const std::string version = text.substr(at + 1);
  if (version.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("model reference ", Quote(text), " has an empty version after '@'"));
  }
  if (version == "latest") return ref;
  // Strict decimal: the text form of a version is unique, so "llama@01" cannot alias "llama@1".
  bool digits = version[0] >= '1' && version[0] <= '9';
  uint64_t v = 0;
  for (char c : version) {
    digits = digits && c >= '0' && c <= '9';
    if (!digits) break;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) {  // overflow
      digits = false;
      break;
    }
    v = v * 10 + d;
  }
  if (!digits) {
    return absl::InvalidArgumentError(absl::StrCat("model reference ", Quote(text), ": version ", Quote(version),
                                                   " is neither 'latest' nor a positive integer"));
  }
  ref.version = v;
  return ref;
}

std::string FormatModelRef(const ModelRef& ref) {
  return ref.version ? FormatModelRef(ref.name, *ref.version) : absl::StrCat(ref.name, "@latest");
}

std::string FormatModelRef(const std::string& name, uint64_t version) { return absl::StrCat(name, "@", version); }

}  // namespace qforge::storage
