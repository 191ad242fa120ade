// LoRA adapters for a Llama base model: parsing PEFT (adapter_model.safetensors + adapter_config.json) and
// llama.cpp GGUF LoRA files into one in-memory form, checking them against the base model's shape, writing both
// formats back (tests, fuzz seeds), and merging an adapter into an fp32 copy of the base (the reference the
// unmerged runtime path is tested against).
//
// The runtime applies an adapter unmerged beside each targeted matmul (core/runtime, core/kernels/lora_delta.h):
//   y = W·x + scale · B (A x),  scale = alpha / r  (rsLoRA: alpha / sqrt(r)),  in fp32.
//
// Layouts. Every matrix is kept row-major in fp32 as PyTorch holds it: A [r, in], B [out, r].
//  - PEFT: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` [r, in] and `...lora_B.weight`
//    [out, r]. HF stores q_proj / k_proj rows in rotate-half order; qforge keeps them in interleaved-pair RoPE
//    order (core/formats qk_permute), so the rows of q/k's B are permuted the same way (A's rows index the rank,
//    its columns the hidden state, neither of which moves).
//  - GGUF (llama.cpp's convert_lora_to_gguf.py): `blk.N.attn_q.weight.lora_a` with ggml ne = [in, r] and
//    `.lora_b` with ne = [r, out]. ggml's ne[0] is the contiguous axis, so the bytes are the same row-major
//    A [r, in] / B [out, r] as PyTorch's; llama.cpp checks model ne[0] == a.ne[0], model ne[1] == b.ne[1] and
//    a.ne[1] == b.ne[0]. The converter pushes B through the model's own q/k permutation, so GGUF B rows are
//    already in qforge's order. Metadata: general.type = "adapter", adapter.type = "lora",
//    adapter.lora.alpha (f32; absent or 0 means scale 1, as llama.cpp does). Tensors in any ggml type the kernels
//    decode (the converter writes f32, f16, bf16 or q8_0) are decoded to fp32.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"

namespace qforge::lora {

// The linear layers an adapter may target, in the order of a layer's forward pass.
enum class LoraTarget : int { kAttnQ = 0, kAttnK, kAttnV, kAttnOutput, kFfnGate, kFfnUp, kFfnDown };
inline constexpr int kNumTargets = 7;
// "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj".
const char* PeftModuleName(LoraTarget t);
// "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down".
const char* GgufStem(LoraTarget t);

// One targeted linear's low-rank update.
struct LoraMatrix {
  int layer = 0;
  LoraTarget target = LoraTarget::kAttnQ;
  int rank = 0;
  int64_t in = 0, out = 0;  // the base weight is [out, in]
  float scale = 1.0f;       // alpha / rank (or what the file's convention says; see the header comment)
  std::vector<float> a;     // [rank, in], row-major
  std::vector<float> b;     // [out, rank], row-major, q/k rows in qforge's interleaved-pair order
  std::vector<float> b_t;   // B transposed, [rank, out]: the runtime kernel's layout; LoraAdapter::Index fills it
};

// What an adapter was built for, so that the runtime can refuse it on another model in O(1).
struct AdapterShape {
  int n_layers = 0, dim = 0, kv_dim = 0, hidden_dim = 0;
  bool operator==(const AdapterShape&) const = default;
};
AdapterShape ShapeOf(const ModelConfig& c);

struct LoraAdapter {
  std::string format;  // "peft" or "gguf": where it was read from
  float alpha = 0;     // as the file states it (0 when a GGUF file has none)
  AdapterShape shape;
  std::vector<LoraMatrix> matrices;  // sorted by (layer, target)

  // The matrix for (layer, target), or nullptr when the adapter leaves that linear alone.
  const LoraMatrix* Find(int layer, LoraTarget t) const;
  int max_rank() const;
  size_t bytes() const;  // memory held by A, B and B's transpose
  // Builds the (layer, target) lookup and each B's transpose; Parse* and Make* call it (again after changing B).
  // Fails on duplicates, out-of-range layers or sizes that do not match the shape.
  absl::Status Index();

 private:
  std::vector<int> index_;  // [layer * kNumTargets + target] -> position in matrices, -1 when absent
};

// INVALID_ARGUMENT unless `adapter` was built for a model of `base`'s shape; UNIMPLEMENTED for FFN targets on a
// Mixture-of-Experts model (its experts have no single gate/up/down).
absl::Status CheckAdapterFits(const LoraAdapter& adapter, const ModelConfig& base);

// PEFT: the bytes of adapter_model.safetensors and the text of adapter_config.json. Errors name the tensor or the
// config field: INVALID_ARGUMENT for bad names, shapes, missing halves, a rank that disagrees with `r`, modules not
// in target_modules; UNIMPLEMENTED for DoRA, fan_in_fan_out, bias training, rank/alpha patterns, embedding or
// lm_head adapters, dtypes other than F32/F16/BF16.
absl::StatusOr<LoraAdapter> ParsePeftAdapter(std::span<const uint8_t> safetensors, const std::string& config_json,
                                             const ModelConfig& base);
// GGUF v2/v3 LoRA. Errors name the key or the tensor as above.
absl::StatusOr<LoraAdapter> ParseGgufAdapter(std::span<const uint8_t> gguf, const ModelConfig& base);

// An adapter's files as read, before parsing: what the artifact store keeps of a stored adapter (byte for byte,
// so a stored adapter parses exactly as its files do).
struct AdapterFiles {
  std::string format;            // "gguf" (a GGUF LoRA file) or "peft"
  std::vector<uint8_t> weights;  // the .gguf file, or adapter_model.safetensors
  std::string config_json;       // PEFT's adapter_config.json; empty for GGUF
  std::string where;             // named in parse errors (a path, or the store version); may be empty
};
// Reads a .gguf file, a PEFT directory (adapter_config.json + adapter_model.safetensors), or an
// adapter_model.safetensors with adapter_config.json beside it.
absl::StatusOr<AdapterFiles> ReadAdapterFiles(const std::string& path);
// ParseGgufAdapter or ParsePeftAdapter by `files.format`; errors are prefixed with `files.where`.
absl::StatusOr<LoraAdapter> ParseAdapterFiles(const AdapterFiles& files, const ModelConfig& base);
// ParseAdapterFiles(ReadAdapterFiles(path)).
absl::StatusOr<LoraAdapter> LoadAdapter(const std::string& path, const ModelConfig& base);

// A random adapter for tests and fuzz seeds: every listed target in every layer, A and B uniform in
// [-amplitude, amplitude] from `seed`.
absl::StatusOr<LoraAdapter> MakeRandomAdapter(const ModelConfig& base, const std::vector<LoraTarget>& targets,
                                              int rank, float alpha, uint64_t seed, float amplitude = 0.05f);

// Writers, the inverse of the parsers (fp32 tensors). PEFT: q/k B rows back in HF order; `config_json` gets
// r, lora_alpha, target_modules, peft_type. GGUF: v3 with the metadata above.
struct PeftFiles {
  std::vector<uint8_t> safetensors;
  std::string config_json;
};
absl::StatusOr<PeftFiles> SerializePeftAdapter(const LoraAdapter& adapter, const ModelConfig& base);
absl::StatusOr<std::vector<uint8_t>> SerializeGgufAdapter(const LoraAdapter& adapter);

// `base` with every targeted weight replaced by the fp32 W + scale · B A (W decoded from its encoding); the
// other tensors are shared views. The merged-model reference for the unmerged path.
absl::StatusOr<Model> MergeAdapter(const Model& base, const LoraAdapter& adapter);

}  // namespace qforge::lora
