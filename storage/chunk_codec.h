// Content-addressed chunk encoding: the pure functions behind ArtifactStore's chunk column family, kept apart
// from RocksDB so the value format can be tested (and fuzzed) on its own.
//
// A chunk id is the lowercase hex of XXH3-128 over the chunk's uncompressed bytes, high 64 bits first
// (xxhash's canonical big-endian form): 32 characters. The stored value is
//
//   offset size  field
//   0      4     magic "QFC1" (the trailing digit is the value format version)
//   4      8     uncompressed size, u64 little-endian
//   12     16    XXH3-128 of the uncompressed bytes, canonical (big-endian) form
//   28     ...   one zstd frame holding the bytes, with the content size recorded in the frame header
//
// Decoding checks every field against the id the value was read under and against the decompressed bytes:
// a value that is truncated, carries a foreign header, fails to decompress or decompresses to bytes with a
// different hash is reported as DATA_LOSS naming the chunk, so corrupted bytes are never returned.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qforge::storage {

// Hard bound on one chunk's uncompressed size. Decoding refuses headers that claim more, so a corrupted size
// field can never trigger a huge allocation. Large tensors are split into chunks well below this.
inline constexpr size_t kMaxChunkBytes = size_t{64} << 20;
inline constexpr size_t kChunkHeaderBytes = 28;
inline constexpr size_t kChunkIdChars = 32;

// Hex XXH3-128 of `bytes`: the chunk id.
std::string ChunkIdOf(std::span<const uint8_t> bytes);

// OK when `id` has the shape of a chunk id (32 lowercase hex digits); INVALID_ARGUMENT otherwise.
absl::Status ValidateChunkId(const std::string& id);

// The stored value for `bytes` (header + zstd frame). INVALID_ARGUMENT if bytes exceed kMaxChunkBytes.
absl::StatusOr<std::string> EncodeChunkValue(std::span<const uint8_t> bytes, int zstd_level);

// Decodes and verifies a stored value read under key `id`. DATA_LOSS (message names `id`) on any mismatch.
absl::StatusOr<std::vector<uint8_t>> DecodeChunkValue(const std::string& id, std::span<const uint8_t> value);

}  // namespace qforge::storage
