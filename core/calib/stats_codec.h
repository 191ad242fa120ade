// LayerStats as bytes, so a calibrate task on one worker can hand its statistics to the quantize tasks on others
// (through the artifact store). Little-endian, fixed layout, exact: the fp64 values round-trip bit for bit, so a
// tensor quantized from decoded statistics gets the same bytes as from the originals.
//
//   "QFLSTAT1" | cols i64 | tokens i64 | hessian f64[cols*cols] | mean_abs f64[cols] | max_abs f64[cols]
//   "QFLSTAT2" | cols i64 | tokens i64 | pooled_tokens i64 | the same arrays
// Statistics without pooled tokens are written as version 1, so their bytes are those of before version 2.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/statusor.h"
#include "core/calib/stats.h"

namespace qforge::calib {

// Bytes EncodeLayerStats gives for `cols` inputs: version 1, and version 2 (8 more, with pooled tokens).
uint64_t EncodedLayerStatsBytes(int64_t cols);
uint64_t EncodedPooledLayerStatsBytes(int64_t cols);
// INVALID_ARGUMENT when the vectors do not have the sizes `cols` asks for.
absl::StatusOr<std::string> EncodeLayerStats(const LayerStats& s);
// DATA_LOSS naming `what` for a bad magic, a size that does not match cols, or a non-positive cols.
absl::StatusOr<LayerStats> DecodeLayerStats(std::span<const uint8_t> bytes, const std::string& what);

}  // namespace qforge::calib
