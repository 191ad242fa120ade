// llama2.c checkpoint reader on arbitrary bytes.
#include <cstdint>
#include <span>

#include "core/formats/parsers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  (void)qforge::formats::ParseLlama2c(std::span(data, size), nullptr);
  return 0;
}
