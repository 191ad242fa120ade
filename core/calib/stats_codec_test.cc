#include "core/calib/stats_codec.h"

#include <cstring>

#include "gtest/gtest.h"

namespace qforge::calib {
namespace {

LayerStats Sample(int64_t cols) {
  StatsAccumulator acc(cols);
  std::vector<float> x(static_cast<size_t>(cols * 5));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 37 % 11)) * 0.37f - 1.3f;
  acc.Add(x.data(), 5);
  return acc.Finish();
}

// Bit-exact round trip: a quantizer fed decoded statistics must give the bytes it gives on the originals.
TEST(StatsCodecTest, RoundTripsBitForBit) {
  const LayerStats s = Sample(7);
  auto bytes = EncodeLayerStats(s);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(bytes->size(), EncodedLayerStatsBytes(7));
  auto back = DecodeLayerStats({reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()}, "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->cols, 7);
  EXPECT_EQ(back->tokens, 5);
  ASSERT_EQ(back->hessian.size(), s.hessian.size());
  EXPECT_EQ(std::memcmp(back->hessian.data(), s.hessian.data(), 8 * s.hessian.size()), 0);
  EXPECT_EQ(back->mean_abs, s.mean_abs);
  EXPECT_EQ(back->max_abs, s.max_abs);
}

// Pooled statistics (a sparse expert's, calib/collect.h) are version 2: 8 more bytes, pooled_tokens kept; more
// pooled tokens than tokens is refused.
TEST(StatsCodecTest, PooledTokensTravelInVersion2) {
  LayerStats s = Sample(6);
  s.tokens = 6;
  s.pooled_tokens = 1;
  auto bytes = EncodeLayerStats(s);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(bytes->size(), EncodedPooledLayerStatsBytes(6));
  EXPECT_EQ(bytes->substr(0, 8), "QFLSTAT2");
  auto back = DecodeLayerStats({reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()}, "x");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->tokens, 6);
  EXPECT_EQ(back->pooled_tokens, 1);
  EXPECT_EQ(back->hessian, s.hessian);
  EXPECT_EQ(back->max_abs, s.max_abs);
  std::string more_pooled_than_seen = *bytes;
  const int64_t seven = 7;
  std::memcpy(more_pooled_than_seen.data() + 24, &seven, 8);
  EXPECT_EQ(DecodeLayerStats({reinterpret_cast<const uint8_t*>(more_pooled_than_seen.data()),
                              more_pooled_than_seen.size()},
                             "x")
                .status()
                .code(),
            absl::StatusCode::kDataLoss);
  // Without pooled tokens the bytes are version 1's, as before version 2 existed.
  s.pooled_tokens = 0;
  EXPECT_EQ(EncodeLayerStats(s)->substr(0, 8), "QFLSTAT1");
}

TEST(StatsCodecTest, RejectsMalformedBytes) {
  auto bytes = EncodeLayerStats(Sample(4));
  ASSERT_TRUE(bytes.ok());
  std::string b = *bytes;
  auto decode = [](const std::string& v) {
    return DecodeLayerStats({reinterpret_cast<const uint8_t*>(v.data()), v.size()}, "stats of blk.0.attn_q.weight");
  };
  absl::Status s = decode(b.substr(0, b.size() - 8)).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(s.message().find("blk.0.attn_q.weight"), std::string::npos) << s;
  std::string bad_magic = b;
  bad_magic[0] = 'X';
  EXPECT_EQ(decode(bad_magic).status().code(), absl::StatusCode::kDataLoss);
  std::string huge_cols = b;
  const int64_t cols = int64_t{1} << 40;
  std::memcpy(huge_cols.data() + 8, &cols, 8);
  EXPECT_EQ(decode(huge_cols).status().code(), absl::StatusCode::kDataLoss);
  LayerStats inconsistent = Sample(4);
  inconsistent.mean_abs.pop_back();
  EXPECT_EQ(EncodeLayerStats(inconsistent).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qforge::calib
