// The calibrated half of a job on a worker (docs/distributed.md, "Calibrated jobs"): the calibrate task, which
// runs the source model over the calibration tokens, collects every linear input's statistics, applies the
// method's model transform (AWQ's scale fold) and uploads both as artifacts; and, for quantize tasks, reading
// those artifacts back. TaskExecutor::Calibrate is defined in calibrate_task.cc.
#pragma once

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "core/calib/stats.h"
#include "core/model/model.h"
#include "qforge/v1/worker.pb.h"
#include "workers/task_executor.h"

namespace qforge::workers {

// The statistics a quantize task carries (nullopt when it carries none), fetched and decoded. Errors name the
// tensor: FAILED_PRECONDITION without a ChunkSource, DATA_LOSS for bytes that do not decode or add up.
absl::StatusOr<std::optional<calib::LayerStats>> FetchTaskStats(const qforge::v1::Task& task, ChunkSource* artifacts);

// The transformed fp32 weights a quantize task carries, as a tensor owning its bytes (nullopt: none; the task
// then reads the source). `source` is the tensor of the same name in the source model: shape must match.
absl::StatusOr<std::optional<Tensor>> FetchTaskWeights(const qforge::v1::Task& task, const Tensor& source,
                                                       ChunkSource* artifacts);

}  // namespace qforge::workers
