// Minimal command-line parsing for the qforge CLI: `--name value`, `--name=value`, boolean `--flag`,
// and positional arguments. Unknown flags are errors, so typos never pass silently. Every error Flags
// returns is a UsageError.
#pragma once

#include <signal.h>

#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qforge::cli {

// A usage error (unknown command or flag, a bad flag value, a missing argument): exit code 2 rather than 1.
absl::Status UsageError(const std::string& message);
bool IsUsageError(const absl::Status& status);

// Prints `program: error: message` as one line on stderr (newlines flattened) and returns `code`: how every qforge
// binary reports a fatal error.
int PrintError(const std::string& program, absl::string_view message, int code);

// SIGINT / SIGTERM for a server's main thread: construct it before any thread starts (the signals are then blocked
// in every thread), and Wait() returns the signal once one arrives.
class StopSignals {
 public:
  StopSignals();
  int Wait();

 private:
  sigset_t set_;
};

class Flags {
 public:
  // `value_flags` take a value; `bool_flags` do not. Names without the leading "--".
  static absl::StatusOr<Flags> Parse(const std::vector<std::string>& args, const std::set<std::string>& value_flags,
                                     const std::set<std::string>& bool_flags);

  bool Has(const std::string& name) const { return values_.count(name) > 0 || bools_.count(name) > 0; }
  std::string Get(const std::string& name, const std::string& fallback = "") const;
  absl::StatusOr<int> GetInt(const std::string& name, int fallback, int min, int max) const;
  absl::StatusOr<double> GetDouble(const std::string& name, double fallback, double min, double max) const;
  absl::StatusOr<uint64_t> GetSeed(const std::string& name, uint64_t fallback) const;
  bool GetBool(const std::string& name) const { return bools_.count(name) > 0; }
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  std::map<std::string, std::string> values_;
  std::set<std::string> bools_;
  std::vector<std::string> positional_;
};

}  // namespace qforge::cli
