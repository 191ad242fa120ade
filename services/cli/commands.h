// The qforge CLI's subcommands. Each returns an absl::Status; main() turns it into one line on stderr and
// an exit code (2 for usage errors, 1 for failures).
#pragma once

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "services/cli/flags.h"  // UsageError, IsUsageError

namespace qforge::cli {

// Runs `qforge <args...>` writing results to `out`.
absl::Status RunCommand(const std::vector<std::string>& args, std::ostream& out);

// The text `qforge help` prints.
std::string HelpText();

}  // namespace qforge::cli
