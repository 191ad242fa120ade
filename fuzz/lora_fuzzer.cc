// The LoRA adapter parsers (core/lora) on arbitrary bytes, against the seed config (fuzz/seed_config.h). Byte 0
// chooses the format: even is a GGUF LoRA (the rest of the input); odd is PEFT, where bytes 1-2 give the length L of
// adapter_config.json, the next L bytes are it and the rest is adapter_model.safetensors. Oracles: every error is
// INVALID_ARGUMENT or UNIMPLEMENTED; an adapter that parses is written back by its format's writer and parses back
// to the same layers, targets, ranks and bit-identical A and B.
#include <cstdint>
#include <cstdlib>
#include <span>
#include <string>

#include "core/lora/lora.h"
#include "fuzz/seed_config.h"

namespace {

void CheckError(const absl::Status& s) {
  if (s.code() != absl::StatusCode::kInvalidArgument && s.code() != absl::StatusCode::kUnimplemented) std::abort();
}

void CheckSame(const qforge::lora::LoraAdapter& x, const qforge::lora::LoraAdapter& y) {
  if (x.matrices.size() != y.matrices.size()) std::abort();
  for (size_t i = 0; i < x.matrices.size(); ++i) {
    const auto &a = x.matrices[i], &b = y.matrices[i];
    if (a.layer != b.layer || a.target != b.target || a.rank != b.rank || a.a != b.a || a.b != b.b) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const qforge::ModelConfig config = qforge::fuzz::SeedConfig();
  if (data[0] % 2 == 0) {
    auto a = qforge::lora::ParseGgufAdapter(std::span(data + 1, size - 1), config);
    if (!a.ok()) {
      CheckError(a.status());
      return 0;
    }
    auto bytes = qforge::lora::SerializeGgufAdapter(*a);
    if (!bytes.ok()) std::abort();
    auto back = qforge::lora::ParseGgufAdapter(*bytes, config);
    if (!back.ok()) std::abort();
    CheckSame(*a, *back);
    return 0;
  }
  if (size < 3) return 0;
  const size_t config_len = std::min<size_t>(data[1] | (data[2] << 8), size - 3);
  const std::string config_json(reinterpret_cast<const char*>(data + 3), config_len);
  auto a = qforge::lora::ParsePeftAdapter(std::span(data + 3 + config_len, size - 3 - config_len), config_json, config);
  if (!a.ok()) {
    CheckError(a.status());
    return 0;
  }
  auto files = qforge::lora::SerializePeftAdapter(*a, config);
  if (!files.ok()) std::abort();
  auto back = qforge::lora::ParsePeftAdapter(files->safetensors, files->config_json, config);
  if (!back.ok()) std::abort();
  CheckSame(*a, *back);
  return 0;
}
