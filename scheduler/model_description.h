// A model as the scheduler sees it: configuration, MoE shape and one record per tensor (name, shape, format,
// source bytes), with no weights. Tensor names live in one arena so 10^5-10^6 tensors stay compact.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "core/model/tensor.h"

namespace qforge::scheduler {

inline constexpr uint64_t kUnknownOffset = ~uint64_t{0};

struct TensorDesc {
  uint64_t source_offset = kUnknownOffset;  // byte offset in the source file, when a header reader knows it
  uint64_t source_bytes = 0;                // encoded bytes in the source
  int64_t rows = 0, cols = 0;               // a vector is rows = 1; N-D shapes collapse leading dims into rows
  uint32_t name_begin = 0, name_size = 0;   // into ModelDescription::name_arena
  WeightFormat format;
  int32_t layer = -1;   // block index from "blk.N.", -1 for token_embd / output / output_norm
  int32_t expert = -1;  // expert index from "blk.N.ffn_gate.E.weight", -1 for dense tensors
  uint8_t ndim = 2;
};

struct ModelDescription {
  std::string source_uri;   // empty for described-only models
  std::string file_format;  // "gguf", "safetensors", "llama2.c" or "described"
  // The file carries a vocabulary (known at DescribeModel time only: not part of a serialized plan).
  bool has_vocab = false;
  ModelConfig config;
  int n_experts = 0;          // experts per MoE layer, 0 = dense
  int expert_hidden_dim = 0;  // FFN width of one expert
  std::vector<TensorDesc> tensors;
  std::string name_arena;

  std::string_view name(size_t i) const {
    return std::string_view(name_arena).substr(tensors[i].name_begin, tensors[i].name_size);
  }
  // Appends a tensor; layer and expert are parsed from the canonical name.
  void AddTensor(std::string_view name, int64_t rows, int64_t cols, int ndim, WeightFormat format,
                 uint64_t source_bytes, uint64_t source_offset = kUnknownOffset);
  int64_t ParameterCount() const;
  uint64_t SourceBytes() const;
  size_t MemoryBytes() const;
};

// "blk.12.ffn_up.7.weight" -> layer 12, expert 7; "blk.3.attn_q.weight" -> 3, -1; "output.weight" -> -1, -1.
void ParseTensorName(std::string_view name, int32_t* layer, int32_t* expert);

// Describes a model file without reading its weights.
// TODO(header-only formats API): this goes through formats::LoadModel, which memory-maps the file and so
// touches no weight page, except the safetensors reader's q/k permutation, which copies those two tensors per
// layer. A header-only formats entry point would also give true source offsets (kUnknownOffset for now).
absl::StatusOr<ModelDescription> DescribeModel(const std::string& path);

// A SwitchTransformer-class MoE described with no data at all. Every block is MoE: attention (q, k, v, output),
// a router `blk.N.ffn_gate_inp.weight` [n_experts, dim] and per expert E three matrices named GGUF-style but
// split per expert: blk.N.ffn_gate.E.weight [hidden, dim], blk.N.ffn_up.E.weight [hidden, dim],
// blk.N.ffn_down.E.weight [dim, hidden]. The defaults give 1.62e12 parameters (2048 experts x 21 blocks).
struct MoEShape {
  int n_layers = 21;
  int dim = 2048;
  int n_heads = 16;
  int expert_hidden_dim = 6144;
  int n_experts = 2048;
  int vocab_size = 32128;
  WeightFormat source_format = WeightFormat::BF16();
};
absl::StatusOr<ModelDescription> DescribeSyntheticMoE(const MoEShape& shape);

}  // namespace qforge::scheduler
