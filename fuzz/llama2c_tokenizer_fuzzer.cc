// llama2.c tokenizer.bin reader. The first two bytes choose vocab_size, the rest is the file.
#include <cstdint>
#include <span>

#include "core/formats/parsers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const int vocab_size = static_cast<int>(data[0] | (data[1] << 8)) - 1;  // -1 .. 65534, bad values included
  (void)qforge::formats::ParseLlama2cTokenizer(std::span(data + 2, size - 2), vocab_size);
  return 0;
}
