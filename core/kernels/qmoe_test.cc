// The QMoE codec: the Tunstall dictionary, exact round trips of ternary rows, its size against the trits'
// entropy, the Q8_0 and Q4_K tiles the matmul runs on and the single-token dots (every decoder, fp32 and int8
// activations, batch invariance), and corrupt bytes refused with DATA_LOSS.
#include "core/kernels/qmoe.h"

#include <cmath>
#include <cstring>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/int_dot.h"
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

// The rows as an independent Q8_0 tensor: block d = the row's scale, q = code - 1.
Tensor AsQ8_0(const Rows& r, int64_t rows, int64_t cols) {
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * cols / 32) * sizeof(block_q8_0));
  auto* blocks = reinterpret_cast<block_q8_0*>(bytes.data());
  for (int64_t i = 0; i < rows * cols / 32; ++i) {
    blocks[i].d = r.scales[i / (cols / 32)];
    for (int j = 0; j < 32; ++j) blocks[i].qs[j] = static_cast<int8_t>(r.codes[i * 32 + j] - 1);
  }
  return Tensor::FromBytes("experts.w.q8_0", {rows, cols}, WeightFormat::Of(WeightType::kQ8_0), std::move(bytes));
}

// The rows as an independent Q4_K tensor: d = dmin = the row's scale, every sub-block's 6-bit scale and min 1
// (ggml's packing: bytes 0-3 the scales of sub-blocks 0-3, 4-7 their mins, 8-11 sub-blocks 4-7's low nibbles),
// q = code (trit + 1), columns 64p.. in the low nibbles of qs[32p..] and 64p + 32.. in the high ones.
Tensor AsQ4_K(const Rows& r, int64_t rows, int64_t cols) {
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * cols / 256) * sizeof(block_q4_K));
  auto* blocks = reinterpret_cast<block_q4_K*>(bytes.data());
  for (int64_t i = 0; i < rows * cols / 256; ++i) {
    block_q4_K& b = blocks[i];
    b.d = b.dmin = r.scales[i / (cols / 256)];
    const uint8_t unit[12] = {1, 1, 1, 1, 1, 1, 1, 1, 0x11, 0x11, 0x11, 0x11};
    std::memcpy(b.scales, unit, 12);
    const uint8_t* code = r.codes.data() + 256 * i;
    for (int p = 0; p < 4; ++p) {
      for (int l = 0; l < 32; ++l) {
        b.qs[32 * p + l] = static_cast<uint8_t>(code[64 * p + l] | code[64 * p + 32 + l] << 4);
      }
    }
  }
  return Tensor::FromBytes("experts.w.q4_k", {rows, cols}, WeightFormat::Of(WeightType::kQ4_K), std::move(bytes));
}

TEST(QmoeTest, TilesHoldTheRowsExactlyOnEveryDecoder) {
  // Q8_0: 4 full tiles and a part, words crossing the 32-column blocks; Q4_K: rows of three 256-column blocks.
  for (auto [type, cols] : {std::pair<WeightType, int64_t>{WeightType::kQ8_0, 288}, {WeightType::kQ4_K, 768}}) {
    const int64_t rows = 70;
    const Rows r = RandomRows(rows, cols, 0.88, 9);
    const Tensor t = EncodeTensor(r, rows, cols);
    const Tensor q = type == WeightType::kQ8_0 ? AsQ8_0(r, rows, cols) : AsQ4_K(r, rows, cols);
    const size_t row_bytes = q.nbytes / rows;
    for (bool bitwise : {true, false}) {
      SCOPED_TRACE(testing::Message() << FormatName(q.format) << " bitwise " << bitwise);
      for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, rows}, {7, 67}, {33, 34}}) {
        int64_t next = begin;
        ASSERT_TRUE(qmoe::ForEachTile(t, begin, end, type, bitwise, [&](const Tensor& tile, int64_t first) {
                      EXPECT_EQ(first, next);
                      next = first + tile.rows();
                      EXPECT_TRUE(next == end || next % qmoe::kTileRows == 0) << next;
                      EXPECT_EQ(tile.format.type, type);
                      EXPECT_EQ(tile.nbytes, row_bytes * static_cast<size_t>(tile.rows()));
                      EXPECT_EQ(std::memcmp(tile.data, q.data + row_bytes * static_cast<size_t>(first), tile.nbytes), 0)
                          << "rows from " << first;
                      return absl::OkStatus();
                    }).ok());
        EXPECT_EQ(next, end);
      }
    }
  }
  // No tile for rows of no multiple of the tile's block, nor of another type.
  const Tensor odd = EncodeTensor(RandomRows(3, 300, 0.88, 10), 3, 300);
  const Tensor q8_0_only = EncodeTensor(RandomRows(3, 288, 0.88, 10), 3, 288);
  auto tiles = [](const Tensor& t, WeightType type) {
    return qmoe::ForEachTile(t, 0, 3, type, false, [](const Tensor&, int64_t) { return absl::OkStatus(); }).code();
  };
  EXPECT_EQ(tiles(odd, WeightType::kQ8_0), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tiles(q8_0_only, WeightType::kQ4_K), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tiles(q8_0_only, WeightType::kQ4_0), absl::StatusCode::kInvalidArgument);
}

// fp32 activations: the Q8_0 tiles' product (near the exact one). int8 activations: bit for bit the integer
// product of the same rows as a Q4_K tensor, on every ISA, for a token alone or a few (the words' masks select
// each token's activations; at 768 columns words cross the blocks) or more (Q4_K tiles), the rows cut anywhere.
TEST(QmoeTest, MatMulIsTheTilesProductAndBatchInvariant) {
  static_assert(qmoe::kSelectTokens >= 3 && qmoe::kSelectTokens < 9);
  for (const auto& [cols, n] : {std::pair<int64_t, int64_t>{256, 3}, {768, 3}, {256, 9}, {768, 9}}) {
    SCOPED_TRACE(testing::Message() << cols << " columns, " << n << " tokens");
    const int64_t rows = 80;
    const Rows r = RandomRows(rows, cols, 0.85, 5);
    const Tensor t = EncodeTensor(r, rows, cols);
    const Tensor q = AsQ8_0(r, rows, cols), q4 = AsQ4_K(r, rows, cols);
    std::mt19937 rng(6);
    std::normal_distribution<float> g(0, 1);
    std::vector<float> x(static_cast<size_t>(n * cols));
    for (float& v : x) v = g(rng);
    std::vector<float> w(rows * cols);
    ASSERT_TRUE(DequantizeRows(t, 0, rows, w.data()).ok());
    const Isa before = ActiveIsa();
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (SetIsa(isa) != isa) continue;  // not on this CPU
      SCOPED_TRACE(IsaName(isa));
      // fp32 activations: the reference on the scalar ISA, Q8_0 tiles otherwise; both near the exact product.
      std::vector<float> y(n * rows);
      ASSERT_TRUE(MatMulRows(t, 0, rows, x.data(), n, y.data(), rows).ok());
      for (int64_t i = 0; i < n * rows; ++i) {
        const int64_t tok = i / rows, row = i % rows;
        double exact = 0, mag = 0;
        for (int64_t c = 0; c < cols; ++c) {
          exact += double{w[row * cols + c]} * x[tok * cols + c];
          mag += std::fabs(double{w[row * cols + c]} * x[tok * cols + c]);
        }
        ASSERT_NEAR(y[i], exact, (isa == Isa::kScalar ? 1e-6 : 1e-5) * mag + 1e-12) << i;
      }
      if (isa != Isa::kScalar) {
        std::vector<float> yq(n * rows);
        ASSERT_TRUE(MatMulRows(q, 0, rows, x.data(), n, yq.data(), rows).ok());
        EXPECT_EQ(y, yq) << "the Q8_0 product of the same weights";
      }
      // int8 activations: the Q4_K tensor's integer product of the same quantized activations, and near the
      // exact product (Q8_K's error: ~1 % of a row's magnitude at most).
      MatMulInput in, in_q;
      ASSERT_TRUE(PrepareInput(t, x.data(), n, ActivationMode::kInt8, &in).ok());
      ASSERT_TRUE(in.quantized());
      ASSERT_TRUE(PrepareInput(q4, x.data(), n, ActivationMode::kInt8, &in_q).ok());
      std::vector<float> yi(n * rows), yiq(n * rows);
      ASSERT_TRUE(MatMulRows(t, 0, rows, in, yi.data(), rows).ok());
      ASSERT_TRUE(MatMulRows(q4, 0, rows, in_q, yiq.data(), rows).ok());
      EXPECT_EQ(yi, yiq);
      for (int64_t i = 0; i < n * rows; ++i) {
        double mag = 0;
        for (int64_t c = 0; c < cols; ++c) mag += std::fabs(double{w[i % rows * cols + c]} * x[i / rows * cols + c]);
        ASSERT_NEAR(yi[i], y[i], 0.02 * mag + 1e-9) << i;
      }
      for (int64_t tok = 0; tok < n; ++tok) {
        std::vector<float> alone(rows), alone_i(rows), alone_q(rows);
        ASSERT_TRUE(MatMulRows(t, 0, 17, x.data() + tok * cols, 1, alone.data(), rows).ok());
        ASSERT_TRUE(MatMulRows(t, 17, rows, x.data() + tok * cols, 1, alone.data(), rows).ok());
        MatMulInput one, one_q;
        ASSERT_TRUE(PrepareInput(t, x.data() + tok * cols, 1, ActivationMode::kInt8, &one).ok());
        ASSERT_TRUE(MatMulRows(t, 0, 23, one, alone_i.data(), rows).ok());
        ASSERT_TRUE(MatMulRows(t, 23, rows, one, alone_i.data(), rows).ok());
        ASSERT_TRUE(PrepareInput(q4, x.data() + tok * cols, 1, ActivationMode::kInt8, &one_q).ok());
        ASSERT_TRUE(MatMulRows(q4, 0, rows, one_q, alone_q.data(), rows).ok());
        for (int64_t row = 0; row < rows; ++row) {
          ASSERT_EQ(alone[row], y[tok * rows + row]) << tok << " " << row;
          ASSERT_EQ(alone_i[row], yi[tok * rows + row]) << tok << " " << row;
          ASSERT_EQ(alone_i[row], alone_q[row]) << tok << " " << row;
        }
      }
    }
    SetIsa(before);
  }
}

// DotRowsQ8_K on more tokens than a pass takes (9: passes of four, four and one) gives each token the bits of the
// reference dot and of that token alone, the rows cut anywhere; rows of one block and of two.
TEST(QmoeTest, FewTokenDotIsEachTokensDotInPasses) {
  const int64_t rows = 40, tokens = 9;
  for (const int64_t cols : {256, 512}) {
    SCOPED_TRACE(cols);
    const Tensor t = EncodeTensor(RandomRows(rows, cols, 0.88, 12), rows, cols);
    const internal::ActRowLayout l = internal::GetActRowLayout(internal::ActType::kQ8_K, cols);
    std::mt19937 rng(13);
    std::normal_distribution<float> g(0, 1);
    std::vector<float> x(static_cast<size_t>(cols));
    std::vector<uint8_t> act(l.bytes * tokens);
    for (int64_t tok = 0; tok < tokens; ++tok) {
      for (float& v : x) v = g(rng);
      internal::QuantizeActScalar(internal::ActType::kQ8_K, x.data(), cols, act.data() + tok * l.bytes);
    }
    auto tokens_from = [&](int64_t first, int64_t count) {
      const uint8_t* row = act.data() + first * l.bytes;
      return qmoe::Q8_KActivations{reinterpret_cast<const int8_t*>(row + l.codes),
                                   reinterpret_cast<const float*>(row + l.scales),
                                   reinterpret_cast<const int32_t*>(row + l.sums), count,
                                   static_cast<int64_t>(l.bytes)};
    };
    std::vector<float> reference(rows * tokens), together(rows * tokens);
    ASSERT_TRUE(qmoe::DotRowsQ8_K(t, 0, rows, tokens_from(0, tokens), reference.data(), rows, true).ok());
    ASSERT_TRUE(qmoe::DotRowsQ8_K(t, 0, 21, tokens_from(0, tokens), together.data(), rows, false).ok());
    ASSERT_TRUE(qmoe::DotRowsQ8_K(t, 21, rows, tokens_from(0, tokens), together.data(), rows, false).ok());
    EXPECT_EQ(together, reference);
    for (int64_t tok = 0; tok < tokens; ++tok) {
      std::vector<float> alone(rows);
      ASSERT_TRUE(qmoe::DotRowsQ8_K(t, 0, rows, tokens_from(tok, 1), alone.data(), rows, false).ok());
      for (int64_t r = 0; r < rows; ++r) ASSERT_EQ(alone[r], reference[tok * rows + r]) << tok << " " << r;
    }
  }
}

// Every reader of the bytes (dequantization, both tile types, the single-token dots) refuses exactly the same
// corruptions with DATA_LOSS; rows of one 256-column block and of two (words that cross a block's end).
class QmoeCorruptTest : public testing::TestWithParam<int64_t> {};

TEST_P(QmoeCorruptTest, CorruptBytesAreDataLoss) {
  const int64_t rows = 66, cols = GetParam();
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
  // One token's Q8_K activations for the single-token dots.
  std::vector<int8_t> codes(cols);
  std::vector<float> scales(cols / 256, 0.01f);
  std::vector<int32_t> code_sums(cols / 32, 0);
  for (int64_t c = 0; c < cols; ++c) {
    codes[c] = static_cast<int8_t>((c * 37) % 255 - 127);
    code_sums[c / 32] += codes[c];
  }
  const qmoe::Q8_KActivations a{codes.data(), scales.data(), code_sums.data()};
  // The code every path gives; the AVX-512 decoders must refuse exactly what the bitwise ones refuse, and
  // agree on the bits of what they accept.
  auto code_of = [&](const Tensor& t) {
    const absl::StatusCode dequantized = DequantizeRows(t, 0, rows, out.data()).code();
    for (bool bitwise : {true, false}) {
      std::vector<float> y(rows), y_bitwise(rows);
      const absl::StatusCode dotted = qmoe::DotRowsQ8_K(t, 0, rows, a, y.data(), rows, bitwise).code();
      EXPECT_EQ(dotted, dequantized) << "DotRowsQ8_K, bitwise " << bitwise;
      if (dotted == absl::StatusCode::kOk && !bitwise) {
        EXPECT_TRUE(qmoe::DotRowsQ8_K(t, 0, rows, a, y_bitwise.data(), rows, true).ok());
        EXPECT_EQ(y, y_bitwise);
      }
      for (WeightType type : {WeightType::kQ8_0, WeightType::kQ4_K}) {
        const absl::StatusCode tiled =
            qmoe::ForEachTile(t, 0, rows, type, bitwise, [](const Tensor&, int64_t) { return absl::OkStatus(); })
                .code();
        EXPECT_EQ(tiled, dequantized) << "ForEachTile " << static_cast<int>(type) << ", bitwise " << bitwise;
      }
    }
    return dequantized;
  };
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

INSTANTIATE_TEST_SUITE_P(Columns, QmoeCorruptTest, testing::Values(256, 512));

}  // namespace
}  // namespace qforge::kernels
