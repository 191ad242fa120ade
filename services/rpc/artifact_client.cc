#include "services/rpc/artifact_client.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "services/rpc/rpc_util.h"
#include "storage/chunk_codec.h"
#include "storage/model_store.h"

namespace qforge::rpc {

absl::StatusOr<qforge::v1::Manifest> FetchManifest(qforge::v1::ArtifactService::Stub& artifacts,
                                                   const storage::ModelRef& ref) {
  qforge::v1::GetManifestRequest req;
  req.mutable_model()->set_name(ref.name);
  req.mutable_model()->set_version(ref.version ? absl::StrCat(*ref.version) : "latest");
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  qforge::v1::Manifest manifest;
  QF_RETURN_IF_ERROR(FromGrpc(artifacts.GetManifest(&ctx, req, &manifest)));
  return manifest;
}

absl::StatusOr<std::vector<uint8_t>> FetchChunk(qforge::v1::ArtifactService::Stub& artifacts,
                                                const std::string& chunk_id) {
  qforge::v1::GetChunkRequest req;
  req.set_chunk_id(chunk_id);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(300));
  auto reader = artifacts.GetChunk(&ctx, req);
  std::vector<uint8_t> bytes;
  qforge::v1::ChunkData piece;
  bool overflow = false;
  while (reader->Read(&piece)) {
    if (piece.offset() != bytes.size() || bytes.size() + piece.data().size() > storage::kMaxChunkBytes) {
      overflow = true;
      ctx.TryCancel();
      break;
    }
    bytes.insert(bytes.end(), piece.data().begin(), piece.data().end());
  }
  const grpc::Status s = reader->Finish();
  if (overflow) return absl::DataLossError(absl::StrCat("chunk ", chunk_id, ": pieces out of order or too large"));
  QF_RETURN_IF_ERROR(FromGrpc(s));
  if (storage::ChunkIdOf(bytes) != chunk_id) {
    return absl::DataLossError(absl::StrCat("chunk ", chunk_id, ": received bytes do not match its content hash"));
  }
  return bytes;
}

absl::StatusOr<Model> FetchModel(qforge::v1::ArtifactService::Stub& artifacts, const storage::ModelRef& ref) {
  QF_ASSIGN_OR_RETURN(const qforge::v1::Manifest manifest, FetchManifest(artifacts, ref));
  return storage::ModelFromManifest(manifest,
                                    [&artifacts](const std::string& id) { return FetchChunk(artifacts, id); });
}

}  // namespace qforge::rpc
