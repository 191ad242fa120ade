#include "core/quant/sequential.h"

#include <utility>

#include "core/base/status_macros.h"
#include "core/calib/block_chain.h"

namespace qforge::quant {

absl::StatusOr<SequentialCalibration> CalibrateSequentially(
    const Model& model, const std::vector<std::vector<int>>& streams, const QuantRecipe& recipe,
    const std::optional<std::pair<const QuantMethod*, QuantParams>>& transform, const calib::CalibrationOptions& options,
    ThreadPool* pool) {
  const calib::ActivationFormat format = options.block_chain.value_or(calib::kChainActivationFormat);
  SequentialCalibration out;
  out.model = model;
  QF_ASSIGN_OR_RETURN(calib::BlockActivations x, calib::EmbedCalibrationTokens(model, streams, options));
  for (int l = 0; l < model.config.n_layers; ++l) {
    QF_ASSIGN_OR_RETURN(calib::CalibrationStats block, calib::CalibrateBlock(out.model, l, x, options, nullptr));
    if (transform) QF_RETURN_IF_ERROR(PrepareBlock(*transform->first, out.model, l, block, transform->second));
    QuantRecipe only = recipe;
    only.calibration = &block;
    only.only_block = l;
    QF_ASSIGN_OR_RETURN(QuantizeResult quantized, QuantizeModel(out.model, only, pool));
    calib::BlockActivations next;
    QF_RETURN_IF_ERROR(calib::RunBlock(quantized.model, l, x, options.threads, &next));
    QF_RETURN_IF_ERROR(calib::RoundActivations(next, format));
    x = std::move(next);
    out.stats.merge(block);
  }
  return out;
}

}  // namespace qforge::quant
