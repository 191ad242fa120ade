// JSON parser and the config.json reader. Oracle: a parsed document dumps to JSON that parses and dumps
// to the same text.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/formats/json.h"
#include "core/formats/parsers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto j = qforge::formats::ParseJson(text);
  if (j.ok()) {
    const std::string dumped = j->Dump();
    auto again = qforge::formats::ParseJson(dumped);
    if (!again.ok() || again->Dump() != dumped) std::abort();
  }
  (void)qforge::formats::ParseHfConfig(text);
  return 0;
}
