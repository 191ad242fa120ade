// The planner: (model description, recipe) -> a DAG of tasks. Tasks are 32-byte records and edges are one CSR
// array, so a plan of 10^6 tasks costs tens of MiB, not per-task heap objects.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/quant/quant_method.h"
#include "scheduler/model_description.h"

namespace qforge::scheduler {

// Per-layer override (mixed precision): tensors whose canonical name matches `pattern` (fnmatch glob, e.g.
// "blk.*.ffn_down.*") use this method and params. The first matching rule wins.
struct LayerRule {
  std::string pattern;
  std::string method;
  std::optional<quant::QuantParams> params;  // absent: the method's DefaultParams()
};

struct JobRecipe {
  std::string method = "q8_0";
  std::optional<quant::QuantParams> params;  // absent: the method's DefaultParams()
  std::vector<LayerRule> layers;
  bool quantize_embeddings = false;           // also token_embd.weight and output.weight
  // true (QuantizeModel's behaviour): a tensor whose row length does not fit the method follows the method's
  // fallback chain; false: such a tensor is an INVALID_ARGUMENT at planning time.
  bool allow_fallback = true;
  // Calibration input of a job with a method that NeedsCalibration() or HasModelTransform(): this text file, or
  // when empty, streams sampled from the source model (defaults: qforge quantize's --calib-* flags).
  std::string calibration_text_uri;
  int calibration_samples = 64;
  int calibration_length = 256;
  uint64_t calibration_seed = 1000;
  // Block i calibrated on the output of the quantized blocks < i: calibrate(i) also waits for block i-1's quantize
  // tasks (needs calibrate_per_block and a calibrated method).
  bool sequential_calibration = false;
  // Non-empty: `evaluation_tasks` evaluate tasks after assemble, each comparing the version with the source on
  // one share of the text's windows (window tokens per window, 0: the context; the first `evaluation_chunks`
  // windows, 0: all).
  std::string evaluation_text_uri;
  int evaluation_window = 0;
  int evaluation_chunks = 0;
  int evaluation_tasks = 1;
  // > 0 (instead of a text): evaluate tasks on this many streams sampled from the source model, `eval_stream_length`
  // tokens each (0: resolved at submit to the smaller of 256 and the context), seed `eval_seed`.
  int eval_streams = 0;
  int eval_stream_length = 0;
  uint64_t eval_seed = 1;

  bool evaluates() const { return !evaluation_text_uri.empty() || eval_streams > 0; }
};

// The index into recipe.layers of the first rule whose pattern matches `tensor_name`; -1: the recipe's default.
int MatchLayerRule(const JobRecipe& recipe, std::string_view tensor_name);

struct PlanOptions {
  uint64_t max_task_input_bytes = uint64_t{256} << 20;  // row slices keep every quantize task under this
  // One calibrate task per block, chained (docs/distributed.md: the target). false: one calibrate task for the
  // whole job (layer -1), first in the plan, which every quantize task depends on: what workers run today.
  bool calibrate_per_block = false;
};

// At most this many evaluate tasks per job (recipe.evaluation_tasks).
inline constexpr int kMaxEvaluationTasks = 1024;

enum class TaskKind : uint8_t { kCalibrate = 1, kQuantize = 2, kAssemble = 3, kEvaluate = 4 };
const char* TaskKindName(TaskKind k);

// The method, parameters and output encoding a quantize task applies (after fallback resolution).
struct QuantConfig {
  std::string method;
  quant::QuantParams params;
  WeightFormat format;
};

inline constexpr uint32_t kNoTensor = ~uint32_t{0};

struct PlanTask {
  uint64_t input_bytes = 0;      // source bytes read (quantize), 0 otherwise
  uint32_t tensor = kNoTensor;   // quantize: index into ModelDescription::tensors
  uint32_t row_begin = 0, row_end = 0;  // evaluate: share row_begin of row_end (EvaluationSpec.part / parts)
  int32_t layer = -1;            // calibrate: the block (-1: every block, one task per job)
  uint16_t config = 0;           // quantize: index into Plan::configs
  TaskKind kind = TaskKind::kQuantize;
};

struct Plan {
  ModelDescription model;
  std::vector<QuantConfig> configs;
  std::vector<PlanTask> tasks;
  // Task t depends on deps[dep_offsets[t] .. dep_offsets[t+1]); every dependency has a lower index, which
  // makes the graph acyclic by construction.
  std::vector<uint32_t> dep_offsets;
  std::vector<uint32_t> deps;
  uint64_t total_input_bytes = 0;
  uint64_t total_output_bytes = 0;
  // Opaque bytes the service layer attaches and gets back after recovery (the job's serialized request), so a
  // job's identity is persisted in the same write as its plan.
  std::string attachment;

  std::span<const uint32_t> DepsOf(uint32_t t) const {
    return {deps.data() + dep_offsets[t], deps.data() + dep_offsets[t + 1]};
  }
  // "quantize blk.0.attn_q.weight rows [0, 64)", "calibrate block 3", "assemble".
  std::string Describe(uint32_t t) const;
  size_t MemoryBytes() const;
};

// INVALID_ARGUMENT naming the recipe field (recipe.method, recipe.params: ..bits.., or a tensor that does not fit
// with allow_fallback = false).
absl::StatusOr<Plan> PlanJob(ModelDescription model, const JobRecipe& recipe, const PlanOptions& options = {});

// Checks indices, ranges and dependency order (what a plan read back from storage must satisfy).
absl::Status ValidatePlan(const Plan& plan);

// A versioned little-endian binary form for the state store; Deserialize validates what it reads.
std::string SerializePlan(const Plan& plan);
absl::StatusOr<Plan> DeserializePlan(const std::string& bytes);

}  // namespace qforge::scheduler
