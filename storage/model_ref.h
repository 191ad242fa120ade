// Model names and `name@version` references for the artifact store.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge::storage {

inline constexpr size_t kMaxModelNameChars = 128;

// A model name is 1..128 characters from [a-z0-9._-], starting with a letter or digit (so names are safe as
// file and key components: no '@', separators, NUL or leading dots). INVALID_ARGUMENT names the problem.
absl::Status ValidateModelName(const std::string& name);

// `name@version`: version is a positive integer; nullopt means the `latest` alias.
struct ModelRef {
  std::string name;
  std::optional<uint64_t> version;

  bool is_latest() const { return !version.has_value(); }
  bool operator==(const ModelRef&) const = default;
};

// Parses "llama@3", "llama@latest" and "llama" (= latest). Rejects an empty name or version, a version that is
// not a positive decimal integer (no sign, no leading zeros), more than one '@', and invalid names.
absl::StatusOr<ModelRef> ParseModelRef(const std::string& text);

// "llama@3" or "llama@latest".
std::string FormatModelRef(const ModelRef& ref);
std::string FormatModelRef(const std::string& name, uint64_t version);

}  // namespace qforge::storage
