// The QMoE codec: the Tunstall dictionary, exact round trips of ternary rows, its size against the trits'
// entropy, the fused sparse matmul against the decoded reference (and batch invariance), and corrupt bytes
// refused with DATA_LOSS.
#include "core/kernels/qmoe.h"

#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/base/half.h"
#include "core/kernels/kernels.h"
#include "gtest/gtest.h"

namespace qforge::kernels {
namespace {

// Ternary codes (0, 1, 2 = -1, 0, +1) with P(zero) = p0 and per-row f16 scales.
struct Rows {
  std::vector<uint8_t> codes;
  std::vector<uint16_t> scales;
};
Rows RandomRows(int64_t rows, int64_t cols, double p0, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  Rows r;
  for (int64_t i = 0; i < rows * cols; ++i) {
    const double v = u(rng);
    r.codes.push_back(v < p0 ? 1 : (v < p0 + (1 - p0) / 2 ? 2 : 0));
  }
  for (int64_t i = 0; i < rows; ++i) r.scales.push_back(FloatToHalf(0.01f * static_cast<float>(i + 1)));
  return r;
}

Tensor EncodeTensor(const Rows& r, int64_t rows, int64_t cols) {
  auto e = qmoe::Encode(r.codes.data(), r.scales.data(), rows, cols);
  EXPECT_TRUE(e.ok()) << e.status();
  return Tensor::FromBytes("experts.w", {rows, cols}, e->format, std::move(e->bytes));
}

TEST(QmoeTest, DictionaryIsACompleteTunstallCode) {
  for (int zero_code : {0, 128, 230, 255}) {
    const qmoe::Dictionary& d = qmoe::DictionaryFor(zero_code);
    EXPECT_EQ(&d, &qmoe::DictionaryFor(zero_code)) << "built once";
    EXPECT_EQ(d.words, qmoe::kMaxWords);
    const double p0 = (zero_code + 0.5) / 256.0;
    // A complete prefix-free code: the leaves' probabilities sum to one (Kraft with equality).
    double total = 0;
    std::set<std::pair<uint8_t, std::pair<uint64_t, uint64_t>>> distinct;
    for (int w = 0; w < d.words; ++w) {
      ASSERT_GE(d.length[w], 1);
      ASSERT_LE(d.length[w], qmoe::kMaxWordTrits);
      const int nz = __builtin_popcountll(d.nonzero[w]);
      total += std::pow(p0, d.length[w] - nz) * std::pow((1 - p0) / 2, nz);
      ASSERT_EQ(d.negative[w] & ~d.nonzero[w], uint64_t{0});
      distinct.insert({d.length[w], {d.nonzero[w], d.negative[w]}});
    }
    EXPECT_NEAR(total, 1.0, 1e-9) << "zero_code " << zero_code;
    EXPECT_EQ(distinct.size(), static_cast<size_t>(d.words));
  }
  // Mostly-zero trits get long words: the all-zero string of the 230 code is many trits long.
  const qmoe::Dictionary& sparse = qmoe::DictionaryFor(230);
  int longest = 0;
  for (int w = 0; w < sparse.words; ++w) {
    if (sparse.nonzero[w] == 0) longest = std::max<int>(longest, sparse.length[w]);
  }
  EXPECT_GE(longest, 20);
}

TEST(QmoeTest, RowsRoundTripExactlyAndCostNearTheirEntropy) {
  const int64_t rows = 70, cols = 300;  // a second group of 64 rows; a row length of no block size
  for (double p0 : {0.5, 0.85, 0.95}) {
    SCOPED_TRACE(p0);
    const Rows r = RandomRows(rows, cols, p0, 3);
    const Tensor t = EncodeTensor(r, rows, cols);
    EXPECT_EQ(FormatName(t.format), "qmoe_c" + std::to_string(t.format.codewords));
    EXPECT_EQ(*ParseFormatName(FormatName(t.format)), t.format);
    ASSERT_TRUE(qmoe::Validate(t).ok()) << qmoe::Validate(t);
    std::vector<float> out(static_cast<size_t>(rows * cols));
    ASSERT_TRUE(DequantizeRows(t, 0, rows, out.data()).ok());
    for (int64_t i = 0; i < rows * cols; ++i) {
      ASSERT_EQ(out[i], (static_cast<float>(r.codes[i]) - 1.0f) * HalfToFloat(r.scales[i / cols])) << i;
    }
    // A range starting inside a group decodes the same rows.
    std::vector<float> part(static_cast<size_t>(60 * cols));
    ASSERT_TRUE(DequantizeRows(t, 7, 67, part.data()).ok());
    EXPECT_TRUE(std::equal(part.begin(), part.end(), out.begin() + 7 * cols));
    // Words cost 16 bits for ~16 / H trits on average: a few per cent above the entropy (more when the 56-trit
    // cap binds, at 95 % zeros), plus the row overhead.
    const double entropy = -p0 * std::log2(p0) - (1 - p0) * std::log2((1 - p0) / 2);
    const double word_bits = 16.0 * static_cast<double>(t.format.codewords) / static_cast<double>(rows * cols);
    std::cout << "p0 " << p0 << " entropy " << entropy << " word bits " << word_bits << "\n";
    EXPECT_LT(word_bits, entropy * 1.15 + 16.0 / cols) << "entropy " << entropy;
    EXPECT_GT(word_bits, entropy * 0.95);
  }
  // The point of the codec: 88 % zeros in 256-wide rows fit below one bit per weight, everything counted.
  const Rows sparse = RandomRows(256, 256, 0.88, 4);
  const Tensor t = EncodeTensor(sparse, 256, 256);
  EXPECT_LT(8.0 * static_cast<double>(t.nbytes) / (256 * 256), 1.0) << t.nbytes << " bytes";
}

TEST(QmoeTest, FusedMatMulMatchesTheReferenceAndIsBatchInvariant) {
  const int64_t rows = 80, cols = 256, n = 5;
  const Rows r = RandomRows(rows, cols, 0.85, 5);
  const Tensor t = EncodeTensor(r, rows, cols);
  std::mt19937 rng(6);
  std::normal_distribution<float> g(0, 1);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (float& v : x) v = g(rng);
  std::vector<float> fused(n * rows), reference(n * rows);
  ASSERT_TRUE(qmoe::MatMulRows(t, 0, rows, x.data(), n, fused.data(), rows, false).ok());
  ASSERT_TRUE(qmoe::MatMulRows(t, 0, rows, x.data(), n, reference.data(), rows, true).ok());
  std::vector<float> w(rows * cols);
  ASSERT_TRUE(DequantizeRows(t, 0, rows, w.data()).ok());
  for (int64_t i = 0; i < n * rows; ++i) {
    const int64_t tok = i / rows, row = i % rows;
    double exact = 0, mag = 0;
    for (int64_t c = 0; c < cols; ++c) {
      exact += double{w[row * cols + c]} * x[tok * cols + c];
      mag += std::fabs(double{w[row * cols + c]} * x[tok * cols + c]);
    }
    EXPECT_NEAR(reference[i], exact, 1e-6 * mag + 1e-12);
    EXPECT_NEAR(fused[i], exact, 1e-5 * mag + 1e-12);
  }
  // Each token alone, over row ranges cut anywhere: the same bits as in the batch.
  for (int64_t tok = 0; tok < n; ++tok) {
    std::vector<float> alone(rows);
    ASSERT_TRUE(qmoe::MatMulRows(t, 0, 17, x.data() + tok * cols, 1, alone.data(), rows, false).ok());
    ASSERT_TRUE(qmoe::MatMulRows(t, 17, rows, x.data() + tok * cols, 1, alone.data(), rows, false).ok());
    for (int64_t row = 0; row < rows; ++row) ASSERT_EQ(alone[row], fused[tok * rows + row]) << tok << " " << row;
  }
  // kernels::MatMulRows routes the format: the reference on the scalar ISA, the fused kernel otherwise.
  const Isa before = SetIsa(Isa::kScalar);
  std::vector<float> routed(n * rows);
  ASSERT_TRUE(MatMulRows(t, 0, rows, x.data(), n, routed.data(), rows).ok());
  EXPECT_EQ(routed, reference);
  SetIsa(Isa::kAvx2);
  ASSERT_TRUE(MatMulRows(t, 0, rows, x.data(), n, routed.data(), rows).ok());
  EXPECT_EQ(routed, fused);
  SetIsa(before);
}

TEST(QmoeTest, CorruptBytesAreDataLoss) {
  const int64_t rows = 66, cols = 64;
  const Rows r = RandomRows(rows, cols, 0.8, 7);
  const Tensor good = EncodeTensor(r, rows, cols);
  const std::vector<uint8_t> bytes(good.data, good.data + good.nbytes);
  const QmoeLayout l = *GetQmoeLayout(good.format, rows, cols);
  auto with = [&](auto edit) {
    std::vector<uint8_t> b = bytes;
    edit(b);
    return Tensor::FromBytes("experts.w", {rows, cols}, good.format, std::move(b));
  };
  std::vector<float> out(rows * cols);
  auto code_of = [&](const Tensor& t) { return DequantizeRows(t, 0, rows, out.data()).code(); };
  EXPECT_EQ(code_of(with([](std::vector<uint8_t>& b) { b[0] ^= 1; })), absl::StatusCode::kDataLoss);  // magic
  EXPECT_EQ(code_of(with([](std::vector<uint8_t>& b) { b[4] = 9; })), absl::StatusCode::kDataLoss);   // version
  EXPECT_EQ(code_of(with([&](std::vector<uint8_t>& b) { b[l.counts_offset] += 1; })), absl::StatusCode::kDataLoss);
  EXPECT_EQ(code_of(with([&](std::vector<uint8_t>& b) { b[l.starts_offset + 4] += 1; })),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(code_of(with([&](std::vector<uint8_t>& b) {
              b[l.words_offset] = 0xff;  // codeword 65535: the dictionary has 65535 words
              b[l.words_offset + 1] = 0xff;
            })),
            absl::StatusCode::kDataLoss);
  // Random damage anywhere: refused or decoded, never read out of bounds (the fuzzer does this at scale).
  std::mt19937 rng(8);
  for (int trial = 0; trial < 300; ++trial) {
    const Tensor t = with([&](std::vector<uint8_t>& b) { b[rng() % b.size()] = static_cast<uint8_t>(rng()); });
    const absl::StatusCode c = code_of(t);
    EXPECT_TRUE(c == absl::StatusCode::kOk || c == absl::StatusCode::kDataLoss) << static_cast<int>(c);
  }
  EXPECT_FALSE(qmoe::Encode(r.codes.data(), r.scales.data(), 1, kQmoeMaxCols + 1).ok());
}

}  // namespace
}  // namespace qforge::kernels
