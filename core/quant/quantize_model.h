// Model-level quantization: applies one method to a model's weight matrices, falls back per tensor when
// a matrix's row length does not fit the method's blocks, and measures what was lost.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/base/thread_pool.h"
#include "core/model/model.h"
#include "core/quant/quant_method.h"

namespace qforge::quant {

// One per-layer rule: tensors whose canonical name matches `pattern` (an fnmatch(3) glob, flags 0) get `method`
// with `params`. Same meaning as scheduler::JobRecipe::layers, so a recipe quantizes alike in one process and
// through the scheduler; defined here because core must not depend on scheduler/.
struct LayerRule {
  std::string pattern;
  std::string method;
  std::optional<QuantParams> params;  // absent: the method's DefaultParams()
  bool operator==(const LayerRule&) const = default;
};

// The index of the first rule whose pattern matches `tensor_name`; -1: none (the recipe's default applies).
int MatchLayerRule(const std::vector<LayerRule>& rules, std::string_view tensor_name);

// Rules as text, ';'-separated "GLOB=METHOD[:bits=B,group=G,sym|asym,dq|no-dq[,act-order][,static-groups]
// [,damp=D]]". Params are written in full so the text means the same whatever the methods' defaults become.
std::string LayerRulesToString(const std::vector<LayerRule>& rules);
// Parses the text above (the params list may be partial: unnamed fields keep the method's DefaultParams()).
// Only the syntax is checked here; methods and params are validated by QuantizeModel. Errors name `rules[i]`.
absl::StatusOr<std::vector<LayerRule>> ParseLayerRules(const std::string& text);

struct QuantRecipe {
  std::string method = "q8_0";
  std::optional<QuantParams> params;  // absent: the method's DefaultParams()
  // Also quantize token_embd.weight and output.weight; by default only LinearWeightNames are touched.
  bool quantize_embeddings = false;
  // Statistics of each matrix's inputs (core/calib CollectCalibration), keyed by tensor name; not owned.
  // Required by methods that NeedsCalibration() (gptq). When present, every tensor with statistics also gets
  // its layer-output error in the report, whatever the method.
  const calib::CalibrationStats* calibration = nullptr;
  // Per-tensor overrides, first match wins; unmatched tensors use method/params above. Each rule is validated
  // up front (errors name layers[i]); a matched tensor still follows its own method's fallback chain.
  std::vector<LayerRule> layers = {};
  // Only the matrices of this block (the sequential calibration chain quantizes block by block); the others are
  // copied unchanged. nullopt: every target.
  std::optional<int> only_block = std::nullopt;
};

// The one model transform (QuantMethod::PrepareModel) a recipe runs after calibration: the default method's if it
// has one, else the first layer rule's. PrepareModel rewrites the whole model, so two different transforms (or one
// with two parameter sets) are an INVALID_ARGUMENT naming the second (`default_field` / `layers_field`[i]).
// nullopt: none.
absl::StatusOr<std::optional<std::pair<const QuantMethod*, QuantParams>>> ModelTransformOf(
    const std::string& method, const std::optional<QuantParams>& params, const std::vector<LayerRule>& layers,
    const std::string& default_field, const std::string& layers_field);

// The model transform restricted to block `layer`, from that block's statistics alone: the per-block calibrate
// task's half of PrepareModel. AWQ's and SmoothQuant's folds work block by block (a block's scales read only its
// own statistics and change only its norms and matrices), so running this for every block changes the same
// tensors to the same bits as PrepareModel on the whole model. Rewrites the block's tensors of `model` and its
// entries of `stats` in place; tensors and statistics of other blocks are neither read nor changed.
absl::Status PrepareBlock(const QuantMethod& method, Model& model, int layer, calib::CalibrationStats& stats,
                          const QuantParams& params);

struct TensorQuantReport {
  std::string name;
  int64_t rows = 0, cols = 0;
  std::string method;  // the method actually used (differs from the rule's/recipe's after a fallback)
  int rule = -1;       // index into QuantRecipe::layers that chose the method; -1: the recipe's default
  std::string format;  // FormatName of the output
  bool fell_back = false;
  std::string fallback_reason;  // why the recipe's method did not fit
  double bits_per_weight = 0;   // everything stored: codes, scales, zeros, second-level scales
  size_t bytes_f32 = 0, bytes_f16 = 0, bytes_after = 0;
  double rmse = 0;          // sqrt(mean (w - w_hat)^2)
  double rel_error = 0;     // ||W - W_hat||_F / ||W||_F
  // sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) = ||(W - Ŵ)X|| / ||WX|| over the calibration inputs; -1 without them.
  double output_rel_error = -1;
  // The calibration behind a method that read it: tokens, and how many of them stand for the layer's pool (an
  // expert routed fewer tokens than its inputs, calib/collect.h). 0, 0 when no statistics were used.
  int64_t calib_tokens = 0, calib_pooled_tokens = 0;
};

struct QuantReport {
  std::string method;
  QuantParams params;
  std::vector<TensorQuantReport> tensors;  // quantized tensors, in LinearWeightNames order (+ embeddings)
  std::vector<std::string> fallbacks;      // names of tensors that fell back
  // Totals over the quantized tensors.
  int64_t weights = 0;
  size_t bytes_f32 = 0, bytes_f16 = 0, bytes_after = 0;
  double bits_per_weight = 0, rmse = 0, rel_error = 0;
  // Every tensor of the model (norms and untouched matrices included), before and after.
  size_t model_bytes_before = 0, model_bytes_after = 0;
};

struct QuantizeResult {
  Model model;
  QuantReport report;
};

// Quantizes the selected matrices of `in`; everything else (norms, vocab, config) is carried over
// unchanged. Metadata gains quant.method / quant.params / quant.fallbacks, plus quant.layers
// (LayerRulesToString) only when the recipe has rules, so rule-free outputs are unchanged. `pool` may be null.
// FAILED_PRECONDITION when the method needs calibration and a target tensor has no statistics.
// The output bytes do not depend on the pool's size.
absl::StatusOr<QuantizeResult> QuantizeModel(const Model& in, const QuantRecipe& recipe, ThreadPool* pool);

// Quantizes one fp32 matrix with `method` (following its fallback chain when the shape does not fit) and
// fills `report` (may be null) including the reconstruction error measured with the kernels.
// `calib` (may be null) is passed to the method and, with a report, measures the layer-output error.
absl::StatusOr<Tensor> QuantizeTensor(const Tensor& in, const QuantMethod& method, const QuantParams& params,
                                      ThreadPool* pool, TensorQuantReport* report,
                                      const calib::LayerStats* calib = nullptr);

// A fixed-width text table of the report for the CLI.
std::string FormatReport(const QuantReport& report);

}  // namespace qforge::quant
