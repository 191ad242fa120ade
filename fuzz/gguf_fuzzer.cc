// GGUF reader on arbitrary bytes, as a model and as an importance matrix (llama-imatrix's file). Oracles: a model
// that parses re-serialises and parses to the same tensors; an importance matrix that parses re-serialises to bytes
// that parse to the same entries and serialise to the same bytes again. f16 / bf16 norms come back as the same
// values in f32.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <span>

#include "core/base/half.h"
#include "core/formats/parsers.h"

namespace {

// The writer stores f16 / bf16 norms as f32 (llama.cpp reads norms as f32): the same values, exactly.
bool SameHalfAsF32(const qforge::Tensor& half, const qforge::Tensor& f32) {
  using qforge::WeightType;
  if ((half.format.type != WeightType::kF16 && half.format.type != WeightType::kBF16) ||
      f32.format.type != WeightType::kF32 || f32.nbytes != 2 * half.nbytes) {
    return false;
  }
  for (size_t k = 0; k < half.nbytes / 2; ++k) {
    uint16_t h;
    float x;
    std::memcpy(&h, half.data + 2 * k, 2);
    std::memcpy(&x, f32.data + 4 * k, 4);
    const float want = half.format.type == WeightType::kF16 ? qforge::HalfToFloat(h) : qforge::Bf16ToFloat(h);
    if (std::memcmp(&want, &x, 4) != 0) std::abort();
  }
  return true;
}

void CheckImatrix(std::span<const uint8_t> data) {
  auto m = qforge::formats::ParseImatrixGguf(data);
  if (!m.ok()) return;
  auto bytes = qforge::formats::SerializeImatrixGguf(*m);
  if (!bytes.ok()) std::abort();
  auto again = qforge::formats::ParseImatrixGguf(*bytes);
  if (!again.ok() || again->entries.size() != m->entries.size() || again->datasets != m->datasets) std::abort();
  for (const auto& [name, e] : m->entries) {
    auto it = again->entries.find(name);
    if (it == again->entries.end() || it->second.cols != e.cols || it->second.experts != e.experts ||
        it->second.sum_squares != e.sum_squares || it->second.tokens != e.tokens) {
      std::abort();
    }
  }
  auto twice = qforge::formats::SerializeImatrixGguf(*again);
  if (!twice.ok() || *twice != *bytes) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  CheckImatrix(std::span(data, size));
  auto m = qforge::formats::ParseGguf(std::span(data, size), nullptr);
  if (!m.ok()) return 0;
  auto bytes = qforge::formats::SerializeGguf(*m);
  if (!bytes.ok()) std::abort();
  auto again = qforge::formats::ParseGguf(*bytes, nullptr);
  if (!again.ok() || again->tensors.size() != m->tensors.size() || !(again->config == m->config)) std::abort();
  for (const auto& [name, t] : m->tensors) {
    const qforge::Tensor* u = again->Find(name);
    if (u == nullptr) std::abort();
    if (SameHalfAsF32(t, *u)) continue;
    if (u->nbytes != t.nbytes || std::memcmp(u->data, t.data, t.nbytes) != 0) std::abort();
  }
  return 0;
}
