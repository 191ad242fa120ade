#include "storage/chunk_codec.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "xxhash.h"
#include "zstd.h"

namespace qforge::storage {
namespace {

constexpr char kMagic[4] = {'Q', 'F', 'C', '1'};

void CanonicalHash(std::span<const uint8_t> bytes, uint8_t out[16]) {
  const XXH128_hash_t h = XXH3_128bits(bytes.data(), bytes.size());
  XXH128_canonical_t c;
  XXH128_canonicalFromHash(&c, h);
  std::memcpy(out, c.digest, 16);
}

std::string Hex(const uint8_t* p, size_t n) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    s[2 * i] = kDigits[p[i] >> 4];
    s[2 * i + 1] = kDigits[p[i] & 15];
  }
  return s;
}

absl::Status Loss(const std::string& id, const std::string& what) {
  return absl::DataLossError(absl::StrCat("chunk ", id, ": ", what));
}

}  // namespace

std::string ChunkIdOf(std::span<const uint8_t> bytes) {
  uint8_t digest[16];
  CanonicalHash(bytes, digest);
  return Hex(digest, 16);
}

absl::Status ValidateChunkId(const std::string& id) {
  bool ok = id.size() == kChunkIdChars;
  for (char c : id) ok = ok && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid chunk id '", id.substr(0, 80), "': expected 32 lowercase hex digits"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> EncodeChunkValue(std::span<const uint8_t> bytes, int zstd_level) {
  if (bytes.size() > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk of ", bytes.size(), " bytes exceeds the limit of ", kMaxChunkBytes));
  }
  const size_t bound = ZSTD_compressBound(bytes.size());
  std::string value(kChunkHeaderBytes + bound, '\0');
  char* p = value.data();
  std::memcpy(p, kMagic, 4);
  const uint64_t size = bytes.size();
  for (int i = 0; i < 8; ++i) p[4 + i] = static_cast<char>((size >> (8 * i)) & 0xff);
  CanonicalHash(bytes, reinterpret_cast<uint8_t*>(p + 12));
  const size_t n = ZSTD_compress(p + kChunkHeaderBytes, bound, bytes.data(), bytes.size(), zstd_level);
  if (ZSTD_isError(n)) return absl::InternalError(absl::StrCat("zstd compression failed: ", ZSTD_getErrorName(n)));
  value.resize(kChunkHeaderBytes + n);
  return value;
}

absl::StatusOr<std::vector<uint8_t>> DecodeChunkValue(const std::string& id, std::span<const uint8_t> value) {
  if (value.size() < kChunkHeaderBytes) {
    return Loss(id, absl::StrCat("stored value is ", value.size(), " bytes, shorter than the chunk header"));
  }
  if (std::memcmp(value.data(), kMagic, 4) != 0) return Loss(id, "stored value has a bad magic/format version");
  uint64_t size = 0;
  for (int i = 0; i < 8; ++i) size |= uint64_t{value[4 + i]} << (8 * i);
  if (size > kMaxChunkBytes) return Loss(id, absl::StrCat("header claims ", size, " bytes, over the chunk limit"));
  if (Hex(value.data() + 12, 16) != id) return Loss(id, "header hash does not match the chunk id");

  const std::span<const uint8_t> frame = value.subspan(kChunkHeaderBytes);
  const unsigned long long frame_size = ZSTD_getFrameContentSize(frame.data(), frame.size());
  if (frame_size == ZSTD_CONTENTSIZE_ERROR || frame_size == ZSTD_CONTENTSIZE_UNKNOWN || frame_size != size) {
    return Loss(id, "zstd frame header is invalid or disagrees with the chunk header");
  }
  std::vector<uint8_t> out(size);
  const size_t n = ZSTD_decompress(out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(n)) return Loss(id, absl::StrCat("zstd decompression failed: ", ZSTD_getErrorName(n)));
  if (n != size) return Loss(id, absl::StrCat("decompressed to ", n, " bytes, header says ", size));
  if (ChunkIdOf(out) != id) return Loss(id, "content hash mismatch (the stored bytes are corrupt)");
  return out;
}

}  // namespace qforge::storage
