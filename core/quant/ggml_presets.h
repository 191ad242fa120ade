// llama-quantize's file types (its "presets": Q4_K_M, Q3_K_S, ...) as qforge recipes. A preset is not a method:
// it picks a ggml type per tensor, the way llama.cpp's llama_tensor_get_type does, and expands to a QuantRecipe
// whose default method is the preset's base type and whose layer rules name every tensor that differs, so the
// ordinary recipe machinery (QuantizeModel, per-tensor fallback chains) writes the file. docs/quantizers.md has
// the table of rules.
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/quant/quantize_model.h"

namespace qforge::quant {

enum class GgmlPresetId {
  kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0,
  kQ2_K, kQ3_K_S, kQ3_K_M, kQ3_K_L, kQ4_K_S, kQ4_K_M, kQ5_K_S, kQ5_K_M, kQ6_K,
  kIQ4_NL, kIQ4_XS,
};

struct GgmlPreset {
  GgmlPresetId id;
  const char* name;         // qforge's name: llama-quantize's in lower case ("q4_k_m")
  const char* base_method;  // the type of every tensor no rule raises (llama.cpp's default_type)
  const char* description;
};

std::span<const GgmlPreset> GgmlPresets();
// nullptr when `name` is no preset.
const GgmlPreset* FindGgmlPreset(std::string_view name);

// The method (ggml type name) llama.cpp's rules give tensor `name` of a model with `config` (before any
// shape fallback, which the method's own chain then applies; except output.weight / a tied token_embd, which
// llama.cpp sends to q8_0 when its rows do not fit the base type's block). `cols` is the tensor's row length;
// `has_output`: the model has its own output.weight (otherwise token_embd doubles as the output). `has_imatrix`:
// an importance matrix weights the fits, which changes llama.cpp's choice for the first eighth of ffn_down in
// Q4_0 / Q5_0 (raised to q4_1 / q5_1) and IQ4_NL / IQ4_XS (q5_k only without one).
std::string GgmlPresetTensorMethod(const GgmlPreset& preset, const ModelConfig& config, std::string_view name,
                                   int64_t cols, bool has_output, bool has_imatrix = false);

// The recipe of `preset` for `model`: base method, embeddings quantized (llama-quantize quantizes every 2-D
// weight except MoE routers), one exact-name rule per tensor whose method differs from the base.
absl::StatusOr<QuantRecipe> GgmlPresetRecipe(const GgmlPreset& preset, const Model& model, bool has_imatrix = false);

// The GPTQ form of a ggml recipe (qforge quantize --method gptq --ggml-type q4_k_m): the default method and every
// rule's whose type has a GPTQ method (gptq_<type>) become it, with that method's bits and group and `gptq`'s
// damping and act order; other types (q8_0, f16, fallbacks) stay. The token embeddings of a model with its own
// output tensor keep the plain type: they are a lookup, which calibration never sees (llama.cpp's imatrix neither).
QuantRecipe GptqOfGgmlRecipe(QuantRecipe recipe, const Model& model, const QuantParams& gptq);

}  // namespace qforge::quant
