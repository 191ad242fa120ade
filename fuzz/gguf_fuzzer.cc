// GGUF reader on arbitrary bytes. Oracle: a file that parses re-serialises and parses to the same tensors.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "core/formats/parsers.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto m = qforge::formats::ParseGguf(std::span(data, size), nullptr);
  if (!m.ok()) return 0;
  auto bytes = qforge::formats::SerializeGguf(*m);
  if (!bytes.ok()) std::abort();
  auto again = qforge::formats::ParseGguf(*bytes, nullptr);
  if (!again.ok() || again->tensors.size() != m->tensors.size() || !(again->config == m->config)) std::abort();
  for (const auto& [name, t] : m->tensors) {
    const qforge::Tensor* u = again->Find(name);
    if (u == nullptr || u->nbytes != t.nbytes || std::memcmp(u->data, t.data, t.nbytes) != 0) std::abort();
  }
  return 0;
}
