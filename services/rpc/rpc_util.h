// Pieces every gRPC endpoint of qforge shares: absl::Status <-> grpc::Status, the channel and server limits,
// task ids, and the conversions between the qforge.v1 recipe messages and core/quant's parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/quant/quant_method.h"
#include "grpcpp/grpcpp.h"
#include "qforge/v1/common.pb.h"
#include "scheduler/plan.h"
#include "scheduler/state_store.h"  // JobId

namespace qforge::rpc {

// gRPC messages may carry up to this many bytes: a 64 MiB chunk is streamed in pieces, but a manifest of a
// 10^5-tensor model (about 100 bytes a tensor) or an assemble completion can exceed gRPC's 4 MiB default.
inline constexpr int kMaxMessageBytes = 256 << 20;
// Chunks travel in pieces of this size (UploadChunk, GetChunk).
inline constexpr size_t kChunkPieceBytes = size_t{1} << 20;

grpc::Status ToGrpc(const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

// A channel to `address` ("host:port") with qforge's message limits, plaintext (the cluster network is
// trusted; TLS terminates at the ingress).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);
// Applies the message limits to a server.
void ConfigureServer(grpc::ServerBuilder& builder);

// "HOST:PORT" -> (HOST, PORT), PORT in 0..65535 (0: pick a free one). INVALID_ARGUMENT naming `flag`.
absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address, const std::string& flag);

// Task ids on the wire: "<job id>/<task index>".
std::string FormatTaskId(scheduler::JobId job, uint32_t task);
absl::StatusOr<std::pair<scheduler::JobId, uint32_t>> ParseTaskId(const std::string& id);
std::string FormatJobId(scheduler::JobId job);
absl::StatusOr<scheduler::JobId> ParseJobId(const std::string& id);

// realpath(path), which must lie under one of `roots` (already realpath'd; empty = anywhere) on a path-component
// boundary. Errors name `field`: INVALID_ARGUMENT (empty, or a URI with a scheme such as s3://), NOT_FOUND
// (missing), PERMISSION_DENIED (outside).
absl::StatusOr<std::string> ResolveUnderRoots(const std::string& path, const std::vector<std::string>& roots,
                                              const std::string& field);
// The realpath of each root; INVALID_ARGUMENT naming a root that does not exist.
absl::StatusOr<std::vector<std::string>> ResolveRoots(const std::vector<std::string>& roots);

// The method's defaults with the message's set fields applied. INVALID_ARGUMENT naming `field` when the
// method is unknown; the values themselves are checked by the method's Validate (the planner does that).
absl::StatusOr<std::pair<const quant::QuantMethod*, quant::QuantParams>> ParamsFromProto(
    const qforge::v1::QuantParams& p, const std::string& field);
// Every field set, so the receiver needs no defaults.
qforge::v1::QuantParams ParamsToProto(const std::string& method, const quant::QuantParams& p);

// recipe -> the planner's recipe; errors name the field ("recipe.defaults.method: ...").
absl::StatusOr<scheduler::JobRecipe> RecipeFromProto(const qforge::v1::Recipe& recipe);

}  // namespace qforge::rpc
