#include <iostream>
#include <string>
#include <vector>

#include "services/cli/commands.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  const absl::Status status = qforge::cli::RunCommand(args, std::cout);
  std::cout.flush();
  if (status.ok()) return 0;
  // One line, whatever the message holds.
  std::string msg(status.message());
  for (char& c : msg) {
    if (c == '\n') c = ' ';
  }
  std::cerr << "qforge: error: " << msg << "\n";
  return qforge::cli::IsUsageError(status) ? 2 : 1;
}
