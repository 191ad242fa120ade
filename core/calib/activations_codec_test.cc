// The activation artifact codec: exact round trips per format, rounding as RoundActivations, malformed bytes.
#include "core/calib/activations_codec.h"

#include <cmath>
#include <limits>

#include "gtest/gtest.h"

namespace qforge::calib {
namespace {

BlockActivations Sample() {
  BlockActivations a;
  a.dim = 3;
  a.windows = {2, 1};
  a.values = {1.0f, -2.5f, 0.1f, 1e-3f, 300.25f, -7.0f, 3.14159f, 0.0f, -0.0f};
  return a;
}

TEST(ActivationsCodecTest, RoundTripsEachFormatAsRoundActivations) {
  for (ActivationFormat f : {ActivationFormat::kF32, ActivationFormat::kF16, ActivationFormat::kBF16}) {
    const BlockActivations a = Sample();
    auto bytes = EncodeActivations(a, f);
    ASSERT_TRUE(bytes.ok()) << bytes.status();
    EXPECT_EQ(bytes->size(), 8 + 4 + 8 + 8 + 4 * 2 + a.values.size() * (f == ActivationFormat::kF32 ? 4 : 2));
    EXPECT_EQ(bytes->size(), EncodedActivationsBytes(f, a.dim, 2, 3));
    EXPECT_EQ(*ParseActivationFormat(ActivationFormatName(f)), f);
    auto back = DecodeActivations({reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size()}, "t");
    ASSERT_TRUE(back.ok()) << back.status();
    BlockActivations rounded = a;
    ASSERT_TRUE(RoundActivations(rounded, f).ok());
    EXPECT_EQ(back->dim, a.dim);
    EXPECT_EQ(back->windows, a.windows);
    EXPECT_EQ(back->values, rounded.values) << ActivationFormatName(f);
    if (f == ActivationFormat::kF32) {
      EXPECT_EQ(back->values, a.values);
    } else {
      EXPECT_NE(back->values, a.values);  // 0.1 is not exact in 16 bits
    }
    auto again = EncodeActivations(*back, f);
    ASSERT_TRUE(again.ok());
    EXPECT_EQ(*again, *bytes);
  }
}

TEST(ActivationsCodecTest, OverflowAndBadShapesAreRefused) {
  BlockActivations a = Sample();
  a.values[4] = 1e6f;  // past fp16's 65504, fine in bf16
  EXPECT_EQ(EncodeActivations(a, ActivationFormat::kF16).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RoundActivations(a, ActivationFormat::kF16).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(EncodeActivations(a, ActivationFormat::kBF16).ok());
  BlockActivations b = Sample();
  b.windows = {2, 2};
  EXPECT_EQ(EncodeActivations(b, ActivationFormat::kF16).status().code(), absl::StatusCode::kInvalidArgument);
  b.windows = {};
  EXPECT_FALSE(EncodeActivations(b, ActivationFormat::kF16).ok());
}

TEST(ActivationsCodecTest, MalformedBytesAreDataLoss) {
  EXPECT_EQ(ParseActivationFormat("fp8").status().code(), absl::StatusCode::kInvalidArgument);
  const std::string good = *EncodeActivations(Sample(), ActivationFormat::kF16);
  auto decode = [](std::string s) {
    return DecodeActivations({reinterpret_cast<const uint8_t*>(s.data()), s.size()}, "blk.3 output").status();
  };
  EXPECT_TRUE(decode(good).ok());
  EXPECT_EQ(decode(good.substr(0, good.size() - 1)).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(decode(good + "xx").code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(decode("").code(), absl::StatusCode::kDataLoss);
  std::string magic = good;
  magic[0] = 'X';
  EXPECT_EQ(decode(magic).code(), absl::StatusCode::kDataLoss);
  std::string format = good;
  format[8] = 9;
  EXPECT_EQ(decode(format).code(), absl::StatusCode::kDataLoss);
  std::string window = good;
  window[28] = 0;  // first window: 0 tokens
  window[29] = window[30] = window[31] = 0;
  EXPECT_EQ(decode(window).code(), absl::StatusCode::kDataLoss);
  std::string windows = good;
  windows[20] = 127;  // a huge window count
  EXPECT_EQ(decode(windows).code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(std::string(decode(magic).message()).find("blk.3 output"), std::string::npos);
}

}  // namespace
}  // namespace qforge::calib
