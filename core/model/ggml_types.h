// The ggml tensor types qforge stores, as one table of layout facts: for each type its qforge WeightType, its
// ggml type id (enum ggml_type in ggml.h, the number a GGUF tensor info carries), its name, how many elements a
// block holds and how many bytes it takes. These are facts of the formats, shared by every reader, writer and
// kernel: EncodedBytes, FormatName and ParseFormatName answer from this table for these types, the GGUF reader
// and writer map ggml ids through it, and the kernels size rows with it.
//
// The decoders live in a second table with the same rows, core/kernels/ggml_kernels.h (function pointers do
// not belong in core/model, which knows nothing of kernels). Adding a ggml type is: a WeightType value
// (tensor.h), a row here, its dequantize function and a row in ggml_kernels.cc, and its byte layout in
// docs/encodings.md; the tests check that the two tables have the same rows.
//
// The plain floats are rows too (a block of one element), so that every ggml type qforge reads is here; the
// quantized ones group elements along a row only, so a [rows, cols] matrix is rows * cols / block blocks,
// each row a contiguous run of cols / block blocks.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "core/model/tensor.h"

namespace qforge {

struct GgmlTypeTraits {
  WeightType type;
  uint32_t ggml_id;      // enum ggml_type
  const char* name;      // qforge's FormatName: ggml's type name in lower case ("q4_k" for ggml's "q4_K")
  int block;             // elements per block (1 for f32 / f16 / bf16)
  int block_bytes;       // bytes per block
  uint32_t llama_ftype;  // general.file_type (enum llama_ftype) of a file whose weights are mostly this type
};

// Every row, in ggml id order.
std::span<const GgmlTypeTraits> GgmlTypes();

// The row of `t`, of ggml id `id`, of name `name`; nullptr where there is none (qforge's own encodings, ggml
// types qforge does not read).
const GgmlTypeTraits* FindGgmlType(WeightType t);
const GgmlTypeTraits* FindGgmlTypeById(uint32_t id);
const GgmlTypeTraits* FindGgmlTypeByName(std::string_view name);

inline bool IsGgmlType(WeightType t) { return FindGgmlType(t) != nullptr; }

}  // namespace qforge
