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
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/lora/lora.h"
#include "core/model/model.h"
#include "qforge/v1/artifacts.pb.h"
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

// The manifest's config_json for `model`: HF config.json text plus the "qforge_metadata" member.
// INVALID_ARGUMENT if a metadata string is not UTF-8 (JSON could not carry it unchanged).
absl::StatusOr<std::string> ManifestConfigJson(const Model& model);
// The vocabulary chunk's bytes (the layout in docs/storage.md).
std::string EncodeVocabChunk(const Vocab& vocab);

// Rebuilds a model from a manifest, fetching chunks through `get_chunk` (which must verify them, as
// ArtifactStore::GetChunk does). Shapes, encodings and byte counts are checked before anything of that size is
// allocated. LoadModel is this over the local store; a remote client passes a fetch over ArtifactService.
using ChunkFetcher = std::function<absl::StatusOr<std::vector<uint8_t>>(const std::string& chunk_id)>;
absl::StatusOr<Model> ModelFromManifest(const qforge::v1::Manifest& manifest, const ChunkFetcher& get_chunk);
// One tensor of a manifest, owning its bytes, checked the same way; errors name `where` and the tensor.
absl::StatusOr<Tensor> TensorFromManifest(const qforge::v1::ManifestTensor& tensor, const ChunkFetcher& get_chunk,
                                          const std::string& where);
absl::StatusOr<Model> LoadModel(ArtifactStore& store, const std::string& ref_text);

enum class ExportFormat { kGguf, kSafetensors };
// Loads `ref` and writes it with core/formats (GGUF v3, or .safetensors + config.json beside it).
absl::Status ExportModel(ArtifactStore& store, const ModelRef& ref, const std::string& path, ExportFormat format);

// --- LoRA adapters, stored as versions of their base ------------------------------------------------------------
// An adapter is a version of its own name whose manifest names the base version it adapts (Manifest.adapter_of)
// and holds the adapter's files byte for byte (lora::AdapterFiles: one tensor "adapter" of format "gguf-lora" or
// "peft-safetensors", PEFT's adapter_config.json as config_json), so that loading it gives exactly what loading
// the files gives. ModelFromManifest refuses such a manifest (FAILED_PRECONDITION naming its base).

// The base model's configuration, without its tensors. DATA_LOSS when config_json does not parse.
absl::StatusOr<ModelConfig> ConfigFromManifest(const qforge::v1::Manifest& manifest);

struct StoredAdapter {
  uint64_t version = 0;
  qforge::v1::ModelRef base;  // the concrete base version
  lora::LoraAdapter adapter;  // as parsed against the base, when it was stored
};
// Parses `files` against `base`'s configuration (resolving `latest`) and commits them as the next version of
// `name`; the chunks are pinned until the commit, as PutModel's. INVALID_ARGUMENT naming the field for a bad name
// (or one equal to the base's) and for files that are not an adapter of the base (the parser's message);
// NOT_FOUND for a missing base; FAILED_PRECONDITION when the base is itself an adapter or `name` holds models.
absl::StatusOr<StoredAdapter> PutAdapter(ArtifactStore& store, const std::string& name, const ModelRef& base,
                                         const lora::AdapterFiles& files, const std::string& source_uri);
// The files an adapter version holds, verified chunk by chunk (`where` = its name@version). FAILED_PRECONDITION
// for a manifest that is not an adapter's, DATA_LOSS for a malformed one.
absl::StatusOr<lora::AdapterFiles> AdapterFilesFromManifest(const qforge::v1::Manifest& manifest,
                                                            const ChunkFetcher& get_chunk);

}  // namespace qforge::storage
