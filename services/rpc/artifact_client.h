// Reading a stored model version over ArtifactService: the manifest, then every chunk, each checked against its
// content hash on arrival, so a damaged transfer is DATA_LOSS rather than a wrong model.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/model/model.h"
#include "qforge/v1/artifacts.grpc.pb.h"
#include "storage/model_ref.h"

namespace qforge::rpc {

absl::StatusOr<qforge::v1::Manifest> FetchManifest(qforge::v1::ArtifactService::Stub& artifacts,
                                                   const storage::ModelRef& ref);
absl::StatusOr<std::vector<uint8_t>> FetchChunk(qforge::v1::ArtifactService::Stub& artifacts,
                                                const std::string& chunk_id);
// The whole version as a Model (tensors own their bytes), like storage::LoadModel on the scheduler's store.
absl::StatusOr<Model> FetchModel(qforge::v1::ArtifactService::Stub& artifacts, const storage::ModelRef& ref);

}  // namespace qforge::rpc
