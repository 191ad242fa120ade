#include "services/cli/flags.h"

#include <iostream>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"

namespace qforge::cli {

namespace {
constexpr char kUsagePayload[] = "qforge/usage";
}  // namespace

absl::Status UsageError(const std::string& message) {
  absl::Status s = absl::InvalidArgumentError(message);
  s.SetPayload(kUsagePayload, absl::Cord("1"));
  return s;
}

bool IsUsageError(const absl::Status& status) { return status.GetPayload(kUsagePayload).has_value(); }

int PrintError(const std::string& program, absl::string_view message, int code) {
  std::string line(message);
  for (char& c : line) {
    if (c == '\n') c = ' ';
  }
  std::cerr << program << ": error: " << line << "\n";
  return code;
}

StopSignals::StopSignals() {
  sigemptyset(&set_);
  sigaddset(&set_, SIGTERM);
  sigaddset(&set_, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set_, nullptr);
}

int StopSignals::Wait() {
  int sig = 0;
  sigwait(&set_, &sig);
  return sig;
}

absl::StatusOr<Flags> Flags::Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                   const std::set<std::string>& bool_flags) {
  Flags f;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    if (a.size() < 3 || a.compare(0, 2, "--") != 0) {
      f.positional_.push_back(a);
      continue;
    }
    std::string name = a.substr(2);
    std::string value;
    bool has_inline_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_inline_value = true;
    }
    if (bool_flags.count(name)) {
      if (has_inline_value) return UsageError(absl::StrCat("--", name, " takes no value"));
      f.bools_.insert(name);
    } else if (value_flags.count(name)) {
      if (!has_inline_value) {
        if (i + 1 >= args.size()) return UsageError(absl::StrCat("--", name, " needs a value"));
        value = args[++i];
      }
      f.values_[name] = value;
    } else {
      return UsageError(absl::StrCat("unknown flag --", name));
    }
  }
  return f;
}

std::string Flags::Get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

absl::StatusOr<int> Flags::GetInt(const std::string& name, int fallback, int min, int max) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  int v = 0;
  if (!absl::SimpleAtoi(it->second, &v) || v < min || v > max) {
    return UsageError(
        absl::StrCat("--", name, " must be an integer in [", min, ", ", max, "], got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<double> Flags::GetDouble(const std::string& name, double fallback, double min, double max) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  double v = 0;
  if (!absl::SimpleAtod(it->second, &v) || !(v >= min && v <= max)) {
    return UsageError(
        absl::StrCat("--", name, " must be a number in [", min, ", ", max, "], got '", it->second, "'"));
  }
  return v;
}

absl::StatusOr<uint64_t> Flags::GetSeed(const std::string& name, uint64_t fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  uint64_t v = 0;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return UsageError(absl::StrCat("--", name, " must be a non-negative integer, got '", it->second, "'"));
  }
  return v;
}

}  // namespace qforge::cli
