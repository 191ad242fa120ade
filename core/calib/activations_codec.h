// A block's hidden states as bytes, so the calibrate task of block i on one worker can hand its output to the
// calibrate task of block i+1 on another (through the artifact store). Little-endian, fixed layout:
//
//   "QFACTS01" | format u32 | dim i64 | windows i64 | tokens of each window i32[windows] | values
//
// values: [sum of the windows' tokens, dim] row-major in `format` (f16 or bf16: 2 bytes each; f32: 4). Encoding
// rounds to the format (round to nearest even); decoding is exact, so Encode(Decode(Encode(a))) == Encode(a).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge::calib {

enum class ActivationFormat : uint32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
const char* ActivationFormatName(ActivationFormat f);  // "f32", "f16", "bf16"

// The hidden states entering (or leaving) one block for every calibration window. Each window runs from
// position 0 with its own KV cache, as CollectCalibration's windows do.
struct BlockActivations {
  int64_t dim = 0;
  std::vector<int32_t> windows;  // tokens per window, each >= 1
  std::vector<float> values;     // [sum(windows), dim], row-major
  int64_t tokens() const { return dim > 0 ? static_cast<int64_t>(values.size()) / dim : 0; }
};

// Bytes EncodeActivations gives for `windows` windows of `tokens` rows in all, `dim` values each.
uint64_t EncodedActivationsBytes(ActivationFormat format, int64_t dim, int64_t windows, int64_t tokens);
// The format named by ActivationFormatName; INVALID_ARGUMENT for another name.
absl::StatusOr<ActivationFormat> ParseActivationFormat(const std::string& name);

// Rounds every value to `format` and back, in place: what storing and reading them does. FAILED_PRECONDITION
// naming the value when one is not finite in that format (an fp16 overflow: bf16 keeps fp32's range).
absl::Status RoundActivations(BlockActivations& a, ActivationFormat format);

// INVALID_ARGUMENT for inconsistent sizes (windows not adding up to values / dim) or values the format cannot
// hold (RoundActivations' rule).
absl::StatusOr<std::string> EncodeActivations(const BlockActivations& a, ActivationFormat format);
// DATA_LOSS naming `what` for a bad magic or format, a non-positive dim or window, or a size that does not
// match the header.
absl::StatusOr<BlockActivations> DecodeActivations(std::span<const uint8_t> bytes, const std::string& what);

}  // namespace qforge::calib
