#include <iostream>
#include <string>
#include <vector>

#include "services/cli/commands.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const absl::Status status = qforge::cli::RunCommand(args, std::cout);
  std::cout.flush();
  if (status.ok()) return 0;
  return qforge::cli::PrintError("qforge", status.message(), qforge::cli::IsUsageError(status) ? 2 : 1);
}
