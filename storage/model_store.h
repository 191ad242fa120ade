// Whole models in the artifact store: PutModel writes every tensor as chunks plus the vocabulary and config,
// then commits one manifest; LoadModel reassembles a byte-identical Model from verified chunks.
//
// Manifest encoding (qforge.v1.Manifest): config_json is HF config.json text (formats::HfConfigJson) with one
// extra member, "qforge_metadata", holding Model::metadata; each ManifestTensor carries the qforge encoding
// name (FormatName), the shape, the byte count and the ordered chunk ids whose concatenation is the tensor's
// bytes; vocab_chunk_id names one chunk holding the vocabulary in the binary layout documented in
// docs/storage.md.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "qforge/v1/common.pb.h"
#include "storage/artifact_store.h"
#include "storage/chunk_codec.h"
#include "storage/model_ref.h"

namespace qforge::storage {

struct PutModelOptions {
  qforge::v1::Recipe recipe;  // how the model was made (empty for a source model)
  std::string source_uri;
  const StateBatch* also = nullptr;  // job/task writes committed atomically with the version
};

// Validates `model` (ValidateModel), stores its chunks and commits the next version of `name`.
// INVALID_ARGUMENT if the model is invalid or a metadata string is not UTF-8 (JSON could not carry it).
absl::StatusOr<uint64_t> PutModel(ArtifactStore& store, const Model& model, const std::string& name,
                                  const PutModelOptions& options = {});

// Loads a version; every chunk is verified (DATA_LOSS naming it on corruption). Tensors own their bytes.
absl::StatusOr<Model> LoadModel(ArtifactStore& store, const ModelRef& ref);
absl::StatusOr<Model> LoadModel(ArtifactStore& store, const std::string& ref_text);

enum class ExportFormat { kGguf, kSafetensors };
// Loads `ref` and writes it with core/formats (GGUF v3, or .safetensors + config.json beside it).
absl::Status ExportModel(ArtifactStore& store, const ModelRef& ref, const std::string& path, ExportFormat format);

}  // namespace qforge::storage
