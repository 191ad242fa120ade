// The calibrate chain's activation artifact reader (core/calib/activations_codec.h) on arbitrary bytes: a
// calibrate task decodes what another worker uploaded. Oracles: whatever decodes re-encodes, in the format its
// header names, to the very same bytes (decoding is exact and encoding the decoded values rounds nothing away);
// anything else is DATA_LOSS, never a crash.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/calib/activations_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto decoded = qforge::calib::DecodeActivations({data, size}, "fuzz");
  if (!decoded.ok()) {
    if (decoded.status().code() != absl::StatusCode::kDataLoss) std::abort();
    return 0;
  }
  uint32_t format;
  std::memcpy(&format, data + 8, sizeof(format));
  // A NaN of f16/bf16 decodes to a float NaN and is refused on the way back (not finite): that is the encoder's rule.
  const auto again = qforge::calib::EncodeActivations(*decoded, static_cast<qforge::calib::ActivationFormat>(format));
  if (!again.ok()) {
    if (again.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
    return 0;
  }
  if (again->size() != size || std::memcmp(again->data(), data, size) != 0) std::abort();
  return 0;
}
