#include "storage/chunk_codec.h"

#include "gtest/gtest.h"
#include "storage/test_util.h"
#include "xxhash.h"

namespace qforge::storage {
namespace {

using testing::RandomBytes;

TEST(ChunkCodec, IdIsCanonicalXxh3_128OfTheBytes) {
  // XXH3-128 of the empty input, high 64 bits first (xxhash's canonical form).
  EXPECT_EQ(ChunkIdOf({}), "99aa06d3014798d86001c324468d497f");
  const auto bytes = RandomBytes(1000, 1);
  const XXH128_hash_t h = XXH3_128bits(bytes.data(), bytes.size());
  char expected[33];
  std::snprintf(expected, sizeof(expected), "%016llx%016llx", static_cast<unsigned long long>(h.high64),
                static_cast<unsigned long long>(h.low64));
  EXPECT_EQ(ChunkIdOf(bytes), expected);
  EXPECT_TRUE(ValidateChunkId(ChunkIdOf(bytes)).ok());
}

TEST(ChunkCodec, ValidateChunkIdRejectsMalformedIds) {
  EXPECT_EQ(ValidateChunkId("").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateChunkId(std::string(31, 'a')).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateChunkId(std::string(33, 'a')).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateChunkId(std::string(32, 'A')).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ValidateChunkId(std::string(31, 'a') + "g").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(ValidateChunkId(std::string(32, 'f')).ok());
}

TEST(ChunkCodec, RoundTripsEmptySmallAndCompressible) {
  std::vector<std::vector<uint8_t>> inputs = {{}, {42}, RandomBytes(100000, 2), std::vector<uint8_t>(1 << 20, 7)};
  for (const auto& in : inputs) {
    const std::string id = ChunkIdOf(in);
    auto value = EncodeChunkValue(in, 3);
    ASSERT_TRUE(value.ok()) << value.status();
    auto out = DecodeChunkValue(id, testing::Bytes(*value));
    ASSERT_TRUE(out.ok()) << out.status();
    EXPECT_EQ(*out, in);
  }
  // Repetitive data is stored compressed.
  auto value = EncodeChunkValue(std::vector<uint8_t>(1 << 20, 7), 3);
  ASSERT_TRUE(value.ok());
  EXPECT_LT(value->size(), 4096u);
}

TEST(ChunkCodec, EveryFlippedByteIsDataLossNamingTheChunk) {
  const auto in = RandomBytes(300, 3);
  const std::string id = ChunkIdOf(in);
  auto value = EncodeChunkValue(in, 3);
  ASSERT_TRUE(value.ok());
  for (size_t pos = 0; pos < value->size(); ++pos) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
      std::string bad = *value;
      bad[pos] = static_cast<char>(bad[pos] ^ mask);
      auto out = DecodeChunkValue(id, testing::Bytes(bad));
      ASSERT_FALSE(out.ok()) << "flip at " << pos << " returned bytes";
      EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss) << pos;
      EXPECT_NE(out.status().message().find(id), std::string::npos) << out.status();
    }
  }
}

TEST(ChunkCodec, TruncationsAndForeignValuesAreDataLoss) {
  const auto in = RandomBytes(500, 4);
  const std::string id = ChunkIdOf(in);
  auto value = EncodeChunkValue(in, 3);
  ASSERT_TRUE(value.ok());
  for (size_t len = 0; len < value->size(); ++len) {
    auto out = DecodeChunkValue(id, testing::Bytes(value->substr(0, len)));
    ASSERT_FALSE(out.ok()) << len;
    EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss);
  }
  // Extra bytes after the frame.
  EXPECT_EQ(DecodeChunkValue(id, testing::Bytes(*value + "x")).status().code(), absl::StatusCode::kDataLoss);
  // A valid value of another chunk read under this id.
  const auto other = RandomBytes(500, 5);
  auto other_value = EncodeChunkValue(other, 3);
  ASSERT_TRUE(other_value.ok());
  auto out = DecodeChunkValue(id, testing::Bytes(*other_value));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(out.status().message().find(id), std::string::npos);
}

TEST(ChunkCodec, HeaderClaimingAHugeSizeIsRefusedBeforeAllocating) {
  const auto in = RandomBytes(64, 6);
  const std::string id = ChunkIdOf(in);
  auto value = EncodeChunkValue(in, 3);
  ASSERT_TRUE(value.ok());
  std::string bad = *value;
  for (int i = 4; i < 12; ++i) bad[i] = static_cast<char>(0xff);
  auto out = DecodeChunkValue(id, testing::Bytes(bad));
  EXPECT_EQ(out.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(out.status().message().find("over the chunk limit"), std::string::npos) << out.status();
}

TEST(ChunkCodec, EncodeRefusesOversizedChunks) {
  std::vector<uint8_t> big(kMaxChunkBytes + 1);
  EXPECT_EQ(EncodeChunkValue(big, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::storage
