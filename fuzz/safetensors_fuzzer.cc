// safetensors parsing on arbitrary bytes, then model assembly (HF names, qforge encodings, q/k permutation)
// against the small config the seeds were written with. Oracle: an assembled model re-serialises and reads
// back to the same bytes.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "core/formats/parsers.h"
#include "fuzz/seed_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = qforge::formats::ParseSafetensorsFile(std::span(data, size));
  if (!file.ok()) return 0;
  for (bool tied : {false, true}) {
    qforge::ModelConfig c = qforge::fuzz::SeedConfig();
    c.tied_embeddings = tied;
    auto m = qforge::formats::ModelFromSafetensors(c, {*file}, {nullptr});
    if (!m.ok()) continue;
    auto bytes = qforge::formats::SerializeSafetensors(*m);
    if (!bytes.ok()) std::abort();
    auto again_file = qforge::formats::ParseSafetensorsFile(*bytes);
    if (!again_file.ok()) std::abort();
    auto again = qforge::formats::ModelFromSafetensors(c, {*again_file}, {nullptr});
    if (!again.ok() || again->tensors.size() != m->tensors.size()) std::abort();
    for (const auto& [name, t] : m->tensors) {
      const qforge::Tensor* u = again->Find(name);
      if (u == nullptr || !(u->format == t.format) || u->nbytes != t.nbytes ||
          std::memcmp(u->data, t.data, t.nbytes) != 0) {
        std::abort();
      }
    }
  }
  return 0;
}
