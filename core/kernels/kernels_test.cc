#include "core/kernels/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/ggml_kernels.h"
#include "core/kernels/int_dot.h"
#include "core/kernels/iq_grids.h"
#include "core/model/ggml_types.h"
#include "gtest/gtest.h"

namespace qforge::kernels {
namespace {

// Restores the detected ISA after each test so forcing one never leaks into another.
class IsaGuard {
 public:
  IsaGuard() : saved_(ActiveIsa()) {}
  ~IsaGuard() { SetIsa(saved_); }

 private:
  Isa saved_;
};

void PutHalf(std::vector<uint8_t>& b, size_t off, float v) {
  const uint16_t h = FloatToHalf(v);
  std::memcpy(b.data() + off, &h, 2);
}
void PutF32(std::vector<uint8_t>& b, size_t off, float v) { std::memcpy(b.data() + off, &v, 4); }

// spqr: random codes, second-level grids that decode to positive first-level scales, and f.outliers outliers
// at distinct random positions, CSR in row order with ascending columns.
void FillSpqr(const WeightFormat& f, int64_t rows, int64_t cols, std::mt19937& rng, std::vector<uint8_t>& b) {
  const SpqrLayout l = GetSpqrLayout(f, rows, cols).value();
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t e = 0; e < l.row_blocks * l.groups_per_row; ++e) {
    const size_t off = l.second_offset + 8 * static_cast<size_t>(e);
    PutHalf(b, off, 0.002f + 0.01f * u(rng));  // scale of the scales
    PutHalf(b, off + 2, -u(rng));              // zero of the scales <= 0: every decoded scale > 0
    PutHalf(b, off + 4, 0.1f + u(rng));        // scale of the zeros
    PutHalf(b, off + 6, 7.0f * u(rng) - 3.0f);
  }
  std::vector<std::pair<int64_t, int64_t>> pos;
  std::uniform_int_distribution<int64_t> row(0, rows - 1), col(0, cols - 1);
  while (static_cast<int64_t>(pos.size()) < f.outliers) {
    const std::pair<int64_t, int64_t> p{row(rng), col(rng)};
    if (std::find(pos.begin(), pos.end(), p) == pos.end()) pos.push_back(p);
  }
  std::sort(pos.begin(), pos.end());
  for (int64_t r = 0, p = 0; r <= rows; ++r) {
    while (p < f.outliers && pos[p].first < r) ++p;
    const uint32_t v = static_cast<uint32_t>(p);
    std::memcpy(b.data() + l.row_ptr_offset + 4 * r, &v, 4);
  }
  for (int64_t p = 0; p < f.outliers; ++p) {
    const uint32_t c = static_cast<uint32_t>(pos[p].second);
    std::memcpy(b.data() + l.col_index_offset + static_cast<size_t>(p) * l.index_bytes, &c, l.index_bytes);
    PutHalf(b, l.values_offset + 2 * p, normal(rng));
  }
}

// Where each newer ggml type keeps its f16 scales in a block, and how large they are made (mins may be
// negative): the rest of a block stays random bytes, every code pattern being valid.
struct HalfField {
  int offset;
  float lo, hi;
};
std::vector<HalfField> GgmlScaleFields(WeightType t) {
  switch (t) {
    case WeightType::kQ4_1:
    case WeightType::kQ5_1: return {{0, 0.01f, 0.2f}, {2, -0.5f, 0.5f}};
    case WeightType::kQ5_0:
    case WeightType::kIQ4_NL:
    case WeightType::kIQ4_XS:
    case WeightType::kIQ2_XXS:
    case WeightType::kIQ2_XS:
    case WeightType::kIQ2_S:
    case WeightType::kIQ3_XXS:
    case WeightType::kIQ3_S:
    case WeightType::kIQ1_S: return {{0, 0.001f, 0.02f}};
    case WeightType::kQ2_K: return {{80, 0.001f, 0.02f}, {82, 0.001f, 0.02f}};
    case WeightType::kQ3_K: return {{108, 0.001f, 0.02f}};
    case WeightType::kQ5_K: return {{0, 0.001f, 0.02f}, {2, 0.001f, 0.02f}};
    case WeightType::kQ6_K: return {{208, 0.0001f, 0.002f}};
    case WeightType::kTQ1_0: return {{52, 0.01f, 0.2f}};
    case WeightType::kTQ2_0: return {{64, 0.01f, 0.2f}};
    default: return {};
  }
}

// Sane scales in every block of a ggml-type tensor whose bytes are otherwise random (the older types' are
// set by RandomTensor's own cases).
void FillGgmlScales(const GgmlTypeTraits& g, std::vector<uint8_t>& b, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  for (size_t blk = 0; blk + g.block_bytes <= b.size(); blk += g.block_bytes) {
    for (const HalfField& h : GgmlScaleFields(g.type)) PutHalf(b, blk + h.offset, h.lo + (h.hi - h.lo) * u(rng));
    if (g.type == WeightType::kMXFP4) b[blk] = static_cast<uint8_t>(118 + rng() % 8);  // scale 2^-10 .. 2^-3
    if (g.type == WeightType::kIQ1_M) {
      // The f16 super-block scale is the top nibbles of the four u16 at byte 48, lowest nibble first.
      const uint16_t d = FloatToHalf(0.001f + 0.02f * u(rng));
      for (int k = 0; k < 4; ++k) {
        uint16_t sc;
        std::memcpy(&sc, &b[blk + 48 + 2 * k], 2);
        sc = static_cast<uint16_t>((sc & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12));
        std::memcpy(&b[blk + 48 + 2 * k], &sc, 2);
      }
    }
  }
}

// Random but well-formed bytes for any format: code bytes are uniform, scales are finite and positive.
Tensor RandomTensor(const WeightFormat& f, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.01f, 0.2f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t nbytes = EncodedBytes(f, rows, cols).value();
  std::vector<uint8_t> b(nbytes);
  for (auto& x : b) x = static_cast<uint8_t>(byte(rng));
  const size_t n = static_cast<size_t>(rows * cols);
  switch (f.type) {
    case WeightType::kF32:
      for (size_t i = 0; i < n; ++i) PutF32(b, 4 * i, normal(rng));
      break;
    case WeightType::kF16:
      for (size_t i = 0; i < n; ++i) PutHalf(b, 2 * i, normal(rng));
      break;
    case WeightType::kBF16:
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToBf16(normal(rng));
        std::memcpy(b.data() + 2 * i, &h, 2);
      }
      break;
    case WeightType::kQ8_0:
      for (size_t blk = 0; blk < n / 32; ++blk) PutHalf(b, blk * 34, scale(rng));
      break;
    case WeightType::kQ4_0:
      for (size_t blk = 0; blk < n / 32; ++blk) PutHalf(b, blk * 18, scale(rng));
      break;
    case WeightType::kQ4_K:
      for (size_t blk = 0; blk < n / 256; ++blk) {
        PutHalf(b, blk * 144, scale(rng) * 0.1f);
        PutHalf(b, blk * 144 + 2, scale(rng) * 0.1f);
      }
      break;
    case WeightType::kQInt: {
      const QIntLayout l = GetQIntLayout(f, rows, cols).value();
      const size_t groups = static_cast<size_t>(rows * l.groups_per_row);
      for (size_t g = 0; g < groups; ++g) PutHalf(b, l.scales_offset + 2 * g, scale(rng));
      if (!f.symmetric) {
        std::uniform_int_distribution<int> zero(0, (1 << f.bits) - 1);
        for (size_t g = 0; g < groups; ++g) b[l.zeros_offset + g] = static_cast<uint8_t>(zero(rng));
      }
      break;
    }
    case WeightType::kNF4: {
      const Nf4Layout l = GetNf4Layout(f, rows, cols).value();
      if (f.double_quant) {
        for (int64_t g = 0; g < l.dq_groups; ++g) PutF32(b, l.dq_scale_offset + 4 * g, scale(rng) * 0.01f);
        PutF32(b, l.dq_offset_offset, 1.5f);
      } else {
        for (int64_t k = 0; k < l.blocks; ++k) PutF32(b, l.absmax_offset + 4 * k, scale(rng) * 10);
      }
      break;
    }
    case WeightType::kW8A8: {
      // Codes stay uniform bytes, -128 included (the quantizer never writes it; the kernels must handle it).
      const W8A8Layout l = GetW8A8Layout(f, rows, cols).value();
      for (int64_t r = 0; r < rows; ++r) PutF32(b, l.scales_offset + 4 * r, scale(rng) * 0.1f);
      break;
    }
    case WeightType::kSpQR:
      FillSpqr(f, rows, cols, rng, b);
      break;
    default:
      if (const GgmlTypeTraits* g = FindGgmlType(f.type)) FillGgmlScales(*g, b, rng);
      break;
  }
  return Tensor::FromBytes("w", {rows, cols}, f, std::move(b));
}

struct Case {
  WeightFormat format;
  int64_t rows, cols;
};

// The ggml types added after Q8_0 / Q4_0 / Q4_K (decoded through the type table, no SIMD decoder yet).
constexpr WeightType kNewerGgmlTypes[] = {
    WeightType::kQ4_1,   WeightType::kQ5_0,   WeightType::kQ5_1,   WeightType::kQ2_K,    WeightType::kQ3_K,
    WeightType::kQ5_K,   WeightType::kQ6_K,   WeightType::kIQ4_NL, WeightType::kIQ4_XS,  WeightType::kTQ1_0,
    WeightType::kTQ2_0,  WeightType::kIQ2_XXS, WeightType::kIQ2_XS, WeightType::kIQ2_S, WeightType::kIQ3_XXS,
    WeightType::kIQ3_S,  WeightType::kIQ1_S,  WeightType::kIQ1_M,   WeightType::kMXFP4,
};

std::vector<Case> AllCases() {
  std::vector<Case> cases = {
      {WeightFormat::F32(), 7, 37},   {WeightFormat::F32(), 5, 300},  {WeightFormat::F16(), 7, 37},
      {WeightFormat::F16(), 5, 300},  {WeightFormat::BF16(), 7, 45},  {WeightFormat::BF16(), 3, 264},
      // 315 = 256 + 59: three whole vectors past the last 32 (AVX2) / 64 (AVX-512) columns, then a tail;
      // 1000: several chunks ending in a partial one.
      {WeightFormat::F32(), 3, 315},  {WeightFormat::BF16(), 3, 315}, {WeightFormat::F32(), 2, 1000},
      {WeightFormat::F16(), 2, 1000},
      {WeightFormat::Of(WeightType::kQ8_0), 7, 96},   {WeightFormat::Of(WeightType::kQ8_0), 5, 288},
      {WeightFormat::Of(WeightType::kQ4_0), 7, 96},   {WeightFormat::Of(WeightType::kQ4_0), 5, 288},
      {WeightFormat::Of(WeightType::kQ4_K), 3, 256},  {WeightFormat::Of(WeightType::kQ4_K), 5, 768},
      {WeightFormat::NF4(64, false), 5, 576},         {WeightFormat::NF4(64, true), 7, 320},
      {WeightFormat::NF4(32, true), 600, 96},  // > 256 blocks: several double-quant groups
      {WeightFormat::NF4(6, false), 5, 42},    // block not a multiple of 8: scalar fallback inside SIMD
  };
  // The newer ggml types (their scalar decoder on every ISA, the float matmul): one and three blocks of 256, or
  // three and nine of 32, and a row of several spans (1280 columns).
  for (WeightType t : kNewerGgmlTypes) {
    const int block = FindGgmlType(t)->block;
    cases.push_back({WeightFormat::Of(t), 3, block == 32 ? 96 : 256});
    cases.push_back({WeightFormat::Of(t), 5, block == 32 ? 288 : 768});
    cases.push_back({WeightFormat::Of(t), 2, 1280});
  }
  for (int bits = 2; bits <= 8; ++bits) {
    for (bool sym : {true, false}) {
      cases.push_back({WeightFormat::QInt(bits, 0, sym), 5, 40});
      cases.push_back({WeightFormat::QInt(bits, 32, sym), 7, 320});
      cases.push_back({WeightFormat::QInt(bits, 128, sym), 3, 384});
    }
  }
  cases.push_back({WeightFormat::QInt(4, 12, true), 3, 96});  // group not a multiple of 8
  cases.push_back({WeightFormat::QInt(4, 0, false), 3, 300});  // per-channel, 300 % 16 != 0
  // Rows padded to a whole byte: stories260K's 172-wide ffn_down at 3 bits (65 bytes a row), groups of 4, 5 bits x 13.
  cases.push_back({WeightFormat::QInt(3, 0, true), 5, 172});
  cases.push_back({WeightFormat::QInt(3, 4, false), 4, 172});
  cases.push_back({WeightFormat::QInt(5, 0, false), 6, 13});
  cases.push_back({WeightFormat::QInt(7, 0, true), 3, 301});
  // w8a8: whole 32-byte vectors only, a 12-column integer tail, a row shorter than one vector, several spans.
  const WeightFormat w8a8 = WeightFormat::Of(WeightType::kW8A8);
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{7, 96}, {5, 300}, {4, 31}, {3, 1000}, {9, 64}}) {
    cases.push_back({w8a8, rows, cols});
  }
  // spqr: no outliers, partial last row block (17 rows), 2/4 bits, several spans (1056 columns), an odd group,
  // u32 column indices (cols > 65536).
  cases.push_back({WeightFormat::SpQR(3, 16, 0), 5, 64});
  cases.push_back({WeightFormat::SpQR(3, 16, 40), 17, 160});
  cases.push_back({WeightFormat::SpQR(2, 16, 30), 7, 320});
  cases.push_back({WeightFormat::SpQR(4, 32, 100), 20, 1056});
  cases.push_back({WeightFormat::SpQR(3, 8, 5), 3, 24});
  cases.push_back({WeightFormat::SpQR(4, 16, 50), 2, 65552});
  return cases;
}

std::vector<float> RandomX(int64_t n, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * cols));
  for (auto& v : x) v = normal(rng);
  return x;
}

// Compares `isa` with the scalar reference: dequantization must be bit-identical, matmuls may differ
// only by summation order (bounded relative to sum |w*x|).
void CheckIsaAgainstScalar(Isa isa) {
  IsaGuard guard;
  uint32_t seed = 1;
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(absl::StrCat(FormatName(c.format), " ", c.rows, "x", c.cols, " isa=", IsaName(isa)));
    const Tensor w = RandomTensor(c.format, c.rows, c.cols, seed++);
    const size_t n_el = static_cast<size_t>(c.rows * c.cols);
    std::vector<float> ref(n_el), got(n_el);
    ASSERT_EQ(SetIsa(Isa::kScalar), Isa::kScalar);
    ASSERT_TRUE(DequantizeRows(w, 0, c.rows, ref.data()).ok());
    ASSERT_EQ(SetIsa(isa), isa);
    ASSERT_TRUE(DequantizeRows(w, 0, c.rows, got.data()).ok());
    for (size_t i = 0; i < n_el; ++i) {
      ASSERT_TRUE(std::isfinite(ref[i]));
      ASSERT_EQ(FloatBits(ref[i]), FloatBits(got[i])) << "element " << i << ": " << ref[i] << " vs " << got[i];
    }
    for (int64_t n : {1, 3, 5, 16}) {
      const std::vector<float> x = RandomX(n, c.cols, seed++);
      // Rows [1, rows) into a strided y, so row offsets and strides are exercised too.
      const int64_t stride = c.rows + 3;
      std::vector<float> y_ref(static_cast<size_t>(n * stride), -7.0f), y(y_ref);
      SetIsa(Isa::kScalar);
      ASSERT_TRUE(MatMulRows(w, 1, c.rows, x.data(), n, y_ref.data(), stride).ok());
      SetIsa(isa);
      ASSERT_TRUE(MatMulRows(w, 1, c.rows, x.data(), n, y.data(), stride).ok());
      for (int64_t t = 0; t < n; ++t) {
        EXPECT_EQ(y[t * stride], -7.0f) << "row 0 must not be written";
        for (int64_t r = 1; r < c.rows; ++r) {
          double mag = 0;
          for (int64_t k = 0; k < c.cols; ++k) mag += std::fabs(ref[r * c.cols + k] * x[t * c.cols + k]);
          ASSERT_NEAR(y[t * stride + r], y_ref[t * stride + r], 2e-6 * mag + 1e-30)
              << "n=" << n << " t=" << t << " r=" << r;
          if (c.format.type == WeightType::kW8A8) {
            ASSERT_EQ(FloatBits(y[t * stride + r]), FloatBits(y_ref[t * stride + r])) << "n=" << n << " r=" << r;
          }
        }
      }
    }
  }
}

TEST(KernelsTest, ScalarMatMulMatchesDequantizedDot) {
  IsaGuard guard;
  SetIsa(Isa::kScalar);
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(FormatName(c.format));
    const Tensor w = RandomTensor(c.format, c.rows, c.cols, 99);
    std::vector<float> dq(static_cast<size_t>(c.rows * c.cols));
    ASSERT_TRUE(DequantizeRows(w, 0, c.rows, dq.data()).ok());
    const std::vector<float> x = RandomX(2, c.cols, 5);
    std::vector<float> y(2 * c.rows);
    ASSERT_TRUE(MatMulRows(w, 0, c.rows, x.data(), 2, y.data(), c.rows).ok());
    for (int64_t t = 0; t < 2; ++t) {
      // w8a8 rounds x to the grid s_x = max|x|/127: each element moves by at most s_x / 2.
      double x_max = 0;
      for (int64_t k = 0; k < c.cols; ++k) x_max = std::max(x_max, std::fabs(static_cast<double>(x[t * c.cols + k])));
      const double half_step = c.format.type == WeightType::kW8A8 ? x_max / 127 / 2 : 0;
      for (int64_t r = 0; r < c.rows; ++r) {
        double want = 0, mag = 0, w_abs = 0;
        for (int64_t k = 0; k < c.cols; ++k) {
          want += static_cast<double>(dq[r * c.cols + k]) * x[t * c.cols + k];
          mag += std::fabs(dq[r * c.cols + k] * x[t * c.cols + k]);
          w_abs += std::fabs(dq[r * c.cols + k]);
        }
        EXPECT_NEAR(y[t * c.rows + r], want, 1e-6 * mag + half_step * w_abs * (1 + 1e-5) + 1e-30);
      }
    }
  }
}

TEST(KernelsTest, Avx2AgreesWithScalar) {
  if (DetectIsa() < Isa::kAvx2) GTEST_SKIP() << "CPU lacks AVX2/FMA/F16C";
  CheckIsaAgainstScalar(Isa::kAvx2);
}

TEST(KernelsTest, Avx512AgreesWithScalar) {
  if (DetectIsa() < Isa::kAvx512) GTEST_SKIP() << "CPU lacks AVX-512 (F/BW/DQ/VL)";
  CheckIsaAgainstScalar(Isa::kAvx512);
}

// Batch invariance: on every ISA, a token's outputs are the same bytes whether it is computed alone or
// among n tokens, at any position in the call (the serving engine batches unrelated sequences).
void CheckBatchInvariant(Isa isa) {
  IsaGuard guard;
  ASSERT_EQ(SetIsa(isa), isa);
  constexpr int64_t kTokens = 32;
  uint32_t seed = 1000;
  for (const Case& c : AllCases()) {
    SCOPED_TRACE(absl::StrCat(FormatName(c.format), " ", c.rows, "x", c.cols, " isa=", IsaName(isa)));
    const Tensor w = RandomTensor(c.format, c.rows, c.cols, seed++);
    const std::vector<float> x = RandomX(kTokens, c.cols, seed++);
    std::vector<float> alone(static_cast<size_t>(kTokens * c.rows));
    for (int64_t t = 0; t < kTokens; ++t) {
      ASSERT_TRUE(MatMulRows(w, 0, c.rows, &x[t * c.cols], 1, &alone[t * c.rows], c.rows).ok());
    }
    std::vector<int64_t> counts;
    for (int64_t n = 1; n <= 17; ++n) counts.push_back(n);
    counts.push_back(kTokens);
    for (int64_t n : counts) {
      // The first n tokens, and the last n (so token t also sits at position t - (kTokens - n)).
      for (int64_t first : {int64_t{0}, kTokens - n}) {
        std::vector<float> y(static_cast<size_t>(n * c.rows));
        ASSERT_TRUE(MatMulRows(w, 0, c.rows, &x[first * c.cols], n, y.data(), c.rows).ok());
        for (int64_t k = 0; k < n; ++k) {
          ASSERT_EQ(std::memcmp(&y[k * c.rows], &alone[(first + k) * c.rows], c.rows * sizeof(float)), 0)
              << "token " << first + k << " at position " << k << " of n=" << n;
        }
      }
    }
    // A row range (as a thread's share) changes nothing either.
    if (c.rows > 2) {
      std::vector<float> y(static_cast<size_t>(5 * c.rows), -1.0f);
      ASSERT_TRUE(MatMulRows(w, 1, c.rows - 1, &x[3 * c.cols], 5, y.data(), c.rows).ok());
      for (int64_t k = 0; k < 5; ++k) {
        ASSERT_EQ(std::memcmp(&y[k * c.rows + 1], &alone[(3 + k) * c.rows + 1], (c.rows - 2) * sizeof(float)), 0);
      }
    }
  }
}

TEST(KernelsTest, ScalarIsBatchInvariant) { CheckBatchInvariant(Isa::kScalar); }

TEST(KernelsTest, Avx2IsBatchInvariant) {
  if (DetectIsa() < Isa::kAvx2) GTEST_SKIP() << "CPU lacks AVX2/FMA/F16C";
  CheckBatchInvariant(Isa::kAvx2);
}

TEST(KernelsTest, Avx512IsBatchInvariant) {
  if (DetectIsa() < Isa::kAvx512) GTEST_SKIP() << "CPU lacks AVX-512 (F/BW/DQ/VL)";
  CheckBatchInvariant(Isa::kAvx512);
}

// A pinned ISA holds for every kernel family (the measured per-family choice applies only when nobody pinned one).
TEST(KernelsTest, PinnedIsaAppliesToEveryFamily) {
  IsaGuard guard;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (SetIsa(isa) != isa) continue;
    for (KernelFamily f : {KernelFamily::kFloatDot, KernelFamily::kIntDecode, KernelFamily::kIntPrompt}) {
      EXPECT_EQ(IsaFor(f), isa);
    }
  }
}

TEST(KernelsTest, SetIsaClampsToCpu) {
  IsaGuard guard;
  EXPECT_EQ(SetIsa(Isa::kAvx512), DetectIsa());
  EXPECT_EQ(ActiveIsa(), DetectIsa());
  EXPECT_EQ(SetIsa(Isa::kScalar), Isa::kScalar);
  EXPECT_EQ(ActiveIsa(), Isa::kScalar);
  EXPECT_STREQ(IsaName(Isa::kAvx2), "avx2");
}

// Runs `body` once per ISA this CPU supports.
template <typename F>
void ForEachIsa(F body) {
  IsaGuard guard;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (isa > DetectIsa()) continue;
    SetIsa(isa);
    SCOPED_TRACE(IsaName(isa));
    body();
  }
}

std::vector<float> Dequant(const Tensor& w) {
  std::vector<float> out(static_cast<size_t>(w.rows() * w.cols()));
  EXPECT_TRUE(DequantizeRows(w, 0, w.rows(), out.data()).ok());
  return out;
}

TEST(KernelsTest, HandComputedQ8_0) {
  std::vector<uint8_t> b(34);
  const uint16_t d = 0x3400;  // 0.25
  std::memcpy(b.data(), &d, 2);
  for (int j = 0; j < 32; ++j) b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(j - 16));
  const Tensor w = Tensor::FromBytes("q8", {1, 32}, WeightFormat::Of(WeightType::kQ8_0), b);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(out[j], 0.25f * (j - 16)) << j;
  });
}

TEST(KernelsTest, HandComputedQ4_0) {
  std::vector<uint8_t> b(18);
  const uint16_t d = 0x3800;  // 0.5
  std::memcpy(b.data(), &d, 2);
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  const Tensor w = Tensor::FromBytes("q4", {1, 32}, WeightFormat::Of(WeightType::kQ4_0), b);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int j = 0; j < 16; ++j) {
      EXPECT_EQ(out[j], 0.5f * (j - 8)) << j;             // low nibble: q = j
      EXPECT_EQ(out[j + 16], 0.5f * (7 - j)) << j + 16;  // high nibble: q = 15 - j
    }
    // sum_j w_j * 1 over the block: 0.5 * (sum_{j<16} (j-8) + sum_{j<16} (7-j)) = 0.5 * (-8 - 8) = -8.
    std::vector<float> ones(32, 1.0f);
    float y = 1;
    ASSERT_TRUE(MatMulRows(w, 0, 1, ones.data(), 1, &y, 1).ok());
    EXPECT_EQ(y, -8.0f);
  });
}

// Scales/mins {1,2,3,4,40,50,60,63} / {5,6,7,8,17,33,48,63} packed by hand into the 12 bytes.
constexpr uint8_t kHandScales[12] = {0x81, 0xC2, 0xC3, 0xC4, 0x45, 0x86, 0xC7, 0xC8, 0x18, 0x12, 0x0C, 0xFF};
constexpr int kHandSc[8] = {1, 2, 3, 4, 40, 50, 60, 63};
constexpr int kHandM[8] = {5, 6, 7, 8, 17, 33, 48, 63};

TEST(KernelsTest, GetScaleMinK4UnpacksHandPackedBytes) {
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    GetScaleMinK4(j, kHandScales, &sc, &m);
    EXPECT_EQ(sc, kHandSc[j]) << j;
    EXPECT_EQ(m, kHandM[j]) << j;
  }
}

TEST(KernelsTest, HandComputedQ4_K) {
  std::vector<uint8_t> b(144);
  const uint16_t d = 0x3C00, dmin = 0x3800;  // 1.0, 0.5
  std::memcpy(b.data(), &d, 2);
  std::memcpy(b.data() + 2, &dmin, 2);
  std::memcpy(b.data() + 4, kHandScales, 12);
  for (int k = 0; k < 4; ++k) {
    for (int l = 0; l < 32; ++l) b[16 + 32 * k + l] = static_cast<uint8_t>((l % 16) | (((l + k) % 16) << 4));
  }
  const Tensor w = Tensor::FromBytes("q4k", {1, 256}, WeightFormat::Of(WeightType::kQ4_K), b);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        EXPECT_EQ(out[64 * k + l], 1.0f * kHandSc[2 * k] * (l % 16) - 0.5f * kHandM[2 * k]);
        EXPECT_EQ(out[64 * k + 32 + l], 1.0f * kHandSc[2 * k + 1] * ((l + k) % 16) - 0.5f * kHandM[2 * k + 1]);
      }
    }
  });
}

// ---- The newer ggml types, one hand-made block each: every element against the type's formula (written out
// here from docs/encodings.md, not through the decoder), and a few elements worked out by hand. ----

// One block of `t` from `bytes`, decoded on every ISA; `want(e)` is element e's value, `literal` some by hand.
template <typename Want>
void ExpectBlock(WeightType t, const std::vector<uint8_t>& bytes, Want want,
                 std::vector<std::pair<int, float>> literal) {
  const GgmlTypeTraits* g = FindGgmlType(t);
  ASSERT_NE(g, nullptr);
  ASSERT_EQ(bytes.size(), static_cast<size_t>(g->block_bytes));
  const Tensor w = Tensor::FromBytes(g->name, {1, g->block}, WeightFormat::Of(t), bytes);
  SCOPED_TRACE(g->name);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int e = 0; e < g->block; ++e) ASSERT_EQ(FloatBits(out[e]), FloatBits(want(e))) << "element " << e;
    for (const auto& [e, v] : literal) EXPECT_EQ(out[e], v) << "element " << e;
    // The float matmul over the decoded block (x = 1): the sum of the elements.
    std::vector<float> ones(static_cast<size_t>(g->block), 1.0f);
    float y = 0;
    ASSERT_TRUE(MatMulRows(w, 0, 1, ones.data(), 1, &y, 1).ok());
    double sum = 0, mag = 0;
    for (int e = 0; e < g->block; ++e) sum += out[e], mag += std::fabs(out[e]);
    EXPECT_NEAR(y, sum, 1e-6 * mag + 1e-30);
  });
}

void PutU16(std::vector<uint8_t>& b, size_t off, uint16_t v) { std::memcpy(b.data() + off, &v, 2); }
void PutU32(std::vector<uint8_t>& b, size_t off, uint32_t v) { std::memcpy(b.data() + off, &v, 4); }
float GridAt(uint64_t entry, int j) { return static_cast<float>(GridByte(entry, j)); }

TEST(KernelsTest, HandComputedQ4_1) {
  std::vector<uint8_t> b(20);
  PutHalf(b, 0, 0.5f);   // d
  PutHalf(b, 2, -1.0f);  // m
  for (int j = 0; j < 16; ++j) b[4 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  ExpectBlock(WeightType::kQ4_1, b, [](int e) { return 0.5f * (e < 16 ? e : 31 - e) + -1.0f; },
              {{0, -1.0f}, {3, 0.5f}, {16, 6.5f}, {31, -1.0f}});
}

// qh = bits 0 and 31: element 0's and element 31's fifth bits.
TEST(KernelsTest, HandComputedQ5_0AndQ5_1) {
  auto q5 = [](int e) {  // qs[j] = j | j << 4, so the low nibble of element e is e % 16
    const int fifth = (e == 0 || e == 31) ? 16 : 0;
    return (e % 16) | fifth;
  };
  std::vector<uint8_t> b(22);
  PutHalf(b, 0, 0.25f);
  PutU32(b, 2, 0x80000001u);
  for (int j = 0; j < 16; ++j) b[6 + j] = static_cast<uint8_t>(j | (j << 4));
  ExpectBlock(WeightType::kQ5_0, b, [&](int e) { return static_cast<float>(q5(e) - 16) * 0.25f; },
              {{0, 0.0f}, {1, -3.75f}, {16, -4.0f}, {31, 3.75f}});
  std::vector<uint8_t> b1(24);
  PutHalf(b1, 0, 0.5f);
  PutHalf(b1, 2, 1.0f);
  PutU32(b1, 4, 0x80000001u);
  for (int j = 0; j < 16; ++j) b1[8 + j] = static_cast<uint8_t>(j | (j << 4));
  ExpectBlock(WeightType::kQ5_1, b1, [&](int e) { return static_cast<float>(q5(e)) * 0.5f + 1.0f; },
              {{0, 9.0f}, {1, 1.5f}, {16, 1.0f}, {31, 16.5f}});
}

// Every qs byte 0xE4 = codes 0, 1, 2, 3 from the low bits up, so element e's 2-bit code is (e % 128) / 32.
TEST(KernelsTest, HandComputedQ2_K) {
  std::vector<uint8_t> b(84);
  for (int k = 0; k < 16; ++k) b[k] = static_cast<uint8_t>(k | (1 << 4));  // scale k, min 1
  for (int i = 0; i < 64; ++i) b[16 + i] = 0xE4;
  PutHalf(b, 80, 1.0f);  // d
  PutHalf(b, 82, 0.5f);  // dmin
  ExpectBlock(WeightType::kQ2_K, b,
              [](int e) { return 1.0f * static_cast<float>(e / 16) * static_cast<float>((e % 128) / 32) - 0.5f; },
              {{0, -0.5f}, {40, 1.5f}, {200, 23.5f}, {255, 44.5f}});
}

// Scales 24 + k stored (k - 8 after the bias), codes as Q2_K's test; hmask bytes 0x0F for the first 16, 0xF0 for
// the last 16: element e's high bit is bit e / 32 of hmask[e % 32], and a clear bit subtracts 4.
TEST(KernelsTest, HandComputedQ3_K) {
  std::vector<uint8_t> b(110, 0);
  for (int l = 0; l < 32; ++l) b[l] = l < 16 ? 0x0F : 0xF0;
  for (int i = 0; i < 64; ++i) b[32 + i] = 0xE4;
  uint8_t* sc = b.data() + 96;
  for (int k = 0; k < 16; ++k) {
    const int s = 24 + k;
    sc[k % 8] |= static_cast<uint8_t>((s & 0xF) << (k < 8 ? 0 : 4));
    sc[8 + k % 4] |= static_cast<uint8_t>((s >> 4) << (2 * (k / 4)));
  }
  PutHalf(b, 108, 0.5f);
  auto want = [](int e) {
    const bool high = (e % 32 < 16) ? (e / 32 < 4) : (e / 32 >= 4);
    const int q = (e % 128) / 32 - (high ? 0 : 4);
    return 0.5f * static_cast<float>(e / 16 - 8) * static_cast<float>(q);
  };
  ExpectBlock(WeightType::kQ3_K, b, want, {{0, 0.0f}, {16, 14.0f}, {200, -4.0f}, {255, 10.5f}});
}

// Q4_K's hand scales and code pattern, plus fifth bits: qh[l] = 0x55 (even l: the first half of every chunk gets
// +16) or 0xAA (odd l: the second half does).
TEST(KernelsTest, HandComputedQ5_K) {
  std::vector<uint8_t> b(176);
  PutHalf(b, 0, 1.0f);
  PutHalf(b, 2, 0.5f);
  std::memcpy(b.data() + 4, kHandScales, 12);
  for (int l = 0; l < 32; ++l) b[16 + l] = l % 2 == 0 ? 0x55 : 0xAA;
  for (int k = 0; k < 4; ++k) {
    for (int l = 0; l < 32; ++l) b[48 + 32 * k + l] = static_cast<uint8_t>((l % 16) | (((l + k) % 16) << 4));
  }
  auto want = [](int e) {
    const int chunk = e / 64, l = e % 32;
    const bool second = e % 64 >= 32;
    const int v = second ? ((l + chunk) % 16) + (l % 2 == 1 ? 16 : 0) : (l % 16) + (l % 2 == 0 ? 16 : 0);
    const int sub = 2 * chunk + (second ? 1 : 0);
    return 1.0f * static_cast<float>(kHandSc[sub]) * static_cast<float>(v) - 0.5f * static_cast<float>(kHandM[sub]);
  };
  ExpectBlock(WeightType::kQ5_K, b, want, {{0, 13.5f}, {33, 31.0f}, {255, 1102.5f}});
}

// ql[i] = (i % 16) | (15 - i % 16) << 4, qh bytes 0xE4 (high bits k for the k-th 32 of each half), int8 scales k - 8.
TEST(KernelsTest, HandComputedQ6_K) {
  std::vector<uint8_t> b(210);
  for (int i = 0; i < 128; ++i) b[i] = static_cast<uint8_t>((i % 16) | ((15 - i % 16) << 4));
  for (int i = 0; i < 64; ++i) b[128 + i] = 0xE4;
  for (int k = 0; k < 16; ++k) b[192 + k] = static_cast<uint8_t>(static_cast<int8_t>(k - 8));
  PutHalf(b, 208, 0.5f);
  auto want = [](int e) {
    const int half = e / 128, k = (e % 128) / 32, l = e % 32;
    const int ql = 64 * half + l + 32 * (k % 2);
    const int nib = k < 2 ? ql % 16 : 15 - ql % 16;
    const int q = (nib | (k << 4)) - 32;
    return 0.5f * static_cast<float>(8 * half + 2 * k + l / 16 - 8) * static_cast<float>(q);
  };
  ExpectBlock(WeightType::kQ6_K, b, want, {{0, 128.0f}, {100, -27.0f}, {255, 56.0f}});
}

TEST(KernelsTest, HandComputedIQ4_NLAndIQ4_XS) {
  std::vector<uint8_t> b(18);
  PutHalf(b, 0, 0.5f);
  for (int j = 0; j < 16; ++j) b[2 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  ExpectBlock(WeightType::kIQ4_NL, b,
              [](int e) { return 0.5f * static_cast<float>(kIq4nlValues[e < 16 ? e : 31 - e]); },
              {{0, -63.5f}, {8, 0.5f}, {16, 56.5f}});
  // IQ4_XS: sub-block ib has the 6-bit scale 28 + ib (ib - 4 after the bias), its codes as IQ4_NL's block.
  std::vector<uint8_t> x(136, 0);
  PutHalf(x, 0, 0.25f);
  uint16_t scales_h = 0;
  for (int ib = 0; ib < 8; ++ib) {
    const int ls = 28 + ib;
    x[4 + ib / 2] |= static_cast<uint8_t>((ls & 0xF) << (4 * (ib % 2)));
    scales_h |= static_cast<uint16_t>((ls >> 4) << (2 * ib));
    for (int j = 0; j < 16; ++j) x[8 + 16 * ib + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  }
  PutU16(x, 2, scales_h);
  ExpectBlock(WeightType::kIQ4_XS, x,
              [](int e) {
                const int ib = e / 32, j = e % 32;
                return 0.25f * static_cast<float>(ib - 4) * static_cast<float>(kIq4nlValues[j < 16 ? j : 31 - j]);
              },
              {{0, 127.0f}, {255, -95.25f}});
}

// TQ1_0 encoded here as ggml's quantizer does: five trits t0..t4 of one byte are the base-3 number t0 t1 t2 t3 t4
// (t0 most significant) scaled to a byte with ceil(v * 256 / 243); qh bytes hold four trits and a zero digit.
// Weight e's trit is (e * 7 + e / 5) % 3; w = d * (t - 1).
TEST(KernelsTest, HandComputedTQ1_0) {
  auto trit = [](int e) { return (e * 7 + e / 5) % 3; };
  std::vector<uint8_t> b(54);
  auto pack = [](const int* t, int n) {
    int v = 0;
    for (int k = 0; k < 5; ++k) v = v * 3 + (k < n ? t[k] : 0);
    return static_cast<uint8_t>((v * 256 + 242) / 243);
  };
  for (int m = 0; m < 32; ++m) {  // weight 32 n + m
    int t[5];
    for (int n = 0; n < 5; ++n) t[n] = trit(32 * n + m);
    b[m] = pack(t, 5);
  }
  for (int m = 0; m < 16; ++m) {  // weight 160 + 16 n + m
    int t[5];
    for (int n = 0; n < 5; ++n) t[n] = trit(160 + 16 * n + m);
    b[32 + m] = pack(t, 5);
  }
  for (int m = 0; m < 4; ++m) {  // weight 240 + 4 n + m
    int t[4];
    for (int n = 0; n < 4; ++n) t[n] = trit(240 + 4 * n + m);
    b[48 + m] = pack(t, 4);
  }
  PutHalf(b, 52, 2.0f);
  ExpectBlock(WeightType::kTQ1_0, b, [&](int e) { return static_cast<float>(trit(e) - 1) * 2.0f; },
              {{0, -2.0f}, {1, 0.0f}, {2, 2.0f}, {255, static_cast<float>(trit(255) - 1) * 2.0f}});
}

// TQ2_0: weight 128 h + 32 l + m is bits [2l, 2l + 2) of qs[32 h + m]; code e % 4 (3 decodes as +2 too).
TEST(KernelsTest, HandComputedTQ2_0) {
  std::vector<uint8_t> b(66, 0);
  for (int e = 0; e < 256; ++e) {
    const int h = e / 128, l = (e % 128) / 32, m = e % 32;
    b[32 * h + m] |= static_cast<uint8_t>((e % 4) << (2 * l));
  }
  PutHalf(b, 64, 0.5f);
  ExpectBlock(WeightType::kTQ2_0, b, [](int e) { return static_cast<float>(e % 4 - 1) * 0.5f; },
              {{0, -0.5f}, {1, 0.0f}, {2, 0.5f}, {3, 1.0f}});
}

// The sign masks of the IQ2 / IQ3 types: seven stored bits, the eighth making the count of minus signs even.
TEST(KernelsTest, IqSignsAndGrids) {
  EXPECT_EQ(EvenSigns(0), 0);
  EXPECT_EQ(EvenSigns(1), 129);
  EXPECT_EQ(EvenSigns(3), 3);
  EXPECT_EQ(EvenSigns(127), 255);
  EXPECT_EQ(EvenSigns(126), 126);
  for (uint32_t s = 0; s < 128; ++s) EXPECT_EQ(__builtin_popcount(EvenSigns(s)) % 2, 0) << s;
  // Spot entries of the generated grids (ggml-common.h) and their value sets.
  EXPECT_EQ(kIq2xxsGrid[1], 0x080808080808082bu);
  EXPECT_EQ(kIq2sGrid[257], 0x0819081919192b08u);
  EXPECT_EQ(kIq3xxsGrid[255], 0x3e341c04u);
  EXPECT_EQ(kIq3sGrid[511], 0x0f0f0101u);
  EXPECT_EQ(kIq1sGrid[2047], 0x0101010101010101u);
  auto bytes_in = [](uint64_t v, int n, std::initializer_list<int> set) {
    for (int j = 0; j < n; ++j) {
      const int b = GridByte(v, j);
      if (std::find(set.begin(), set.end(), b) == set.end()) return false;
    }
    return true;
  };
  for (uint64_t v : kIq2xxsGrid) EXPECT_TRUE(bytes_in(v, 8, {8, 25, 43}));
  for (uint64_t v : kIq2xsGrid) EXPECT_TRUE(bytes_in(v, 8, {8, 25, 43}));
  for (uint64_t v : kIq2sGrid) EXPECT_TRUE(bytes_in(v, 8, {8, 25, 43}));
  for (uint32_t v : kIq3xxsGrid) EXPECT_TRUE(bytes_in(v, 4, {4, 12, 20, 28, 36, 44, 52, 62}));
  for (uint32_t v : kIq3sGrid) EXPECT_TRUE(bytes_in(v, 4, {1, 3, 5, 7, 9, 11, 13, 15}));
  for (uint64_t v : kIq1sGrid) EXPECT_TRUE(bytes_in(v, 8, {0xFF, 0, 1}));
}

// IQ2_XXS: group 0 = indices {0, 1, 255, 0}, sign fields {0, 1, 127, 0} and scale 3 (db = (0.5 + 3) / 4); the
// other groups all zero (index 0, no signs, db = 0.5 / 4).
TEST(KernelsTest, HandComputedIQ2_XXS) {
  std::vector<uint8_t> b(66, 0);
  PutHalf(b, 0, 1.0f);
  b[2] = 0, b[3] = 1, b[4] = 255, b[5] = 0;
  PutU32(b, 6, (3u << 28) | (127u << 14) | (1u << 7));
  auto want = [](int e) {
    const int ib = e / 32, l = (e % 32) / 8, j = e % 8;
    const uint8_t idx[4] = {0, 1, 255, 0};
    const uint32_t signs[4] = {0, 1, 127, 0};
    const float db = ib == 0 ? 1.0f * (0.5f + 3.0f) * 0.25f : 1.0f * 0.5f * 0.25f;
    const float w = db * GridAt(kIq2xxsGrid[ib == 0 ? idx[l] : 0], j);
    return ib == 0 && (EvenSigns(signs[l]) >> j & 1) ? -w : w;
  };
  ExpectBlock(WeightType::kIQ2_XXS, b, want,
              {{0, 7.0f}, {8, -37.625f}, {9, 7.0f}, {15, -7.0f}, {16, -7.0f}, {21, -37.625f}, {32, 1.0f}});
}

// IQ2_XS: the first u16 = grid index 300 with sign field 1; scales[0] = 0x53 (3 for weights 0..15, 5 for 16..31).
TEST(KernelsTest, HandComputedIQ2_XS) {
  std::vector<uint8_t> b(74, 0);
  PutHalf(b, 0, 1.0f);
  PutU16(b, 2, static_cast<uint16_t>(300 | (1 << 9)));
  PutU16(b, 2 + 2 * 2, 1);  // weights 16..23: index 1
  b[66] = 0x53;
  auto want = [](int e) {
    const int ib = e / 32, l = (e % 32) / 8, j = e % 8;
    const int scale = ib == 0 ? (l < 2 ? 3 : 5) : 0;
    const float db = 1.0f * (0.5f + static_cast<float>(scale)) * 0.25f;
    const int index = ib == 0 && l == 0 ? 300 : ib == 0 && l == 2 ? 1 : 0;
    const float w = db * GridAt(kIq2xsGrid[index], j);
    return ib == 0 && l == 0 && (j == 0 || j == 7) ? -w : w;
  };
  // Grid 300 is {8, 25, 25, 8, 8, 25, 8, 25}; grid 1 {43, 8, ...}.
  ExpectBlock(WeightType::kIQ2_XS, b, want, {{0, -7.0f}, {1, 21.875f}, {7, -21.875f}, {16, 59.125f}, {17, 11.0f}});
}

// IQ2_S: the first point's index is 257 (qs[0] = 1, qh[0] bits 0-1 = 1), explicit signs 0x03 (weights 0, 1
// negative); scales[0] = 0x21.
TEST(KernelsTest, HandComputedIQ2_S) {
  std::vector<uint8_t> b(82, 0);
  PutHalf(b, 0, 0.5f);
  b[2] = 1;         // qs[0]
  b[2 + 1] = 2;     // qs[1]: index 2
  b[2 + 32] = 0x03; // signs of point 0
  b[66] = 1;        // qh[0]
  b[74] = 0x21;     // scales[0]
  auto want = [](int e) {
    const int ib = e / 32, l = (e % 32) / 8, j = e % 8;
    const int scale = ib == 0 ? (l < 2 ? 1 : 2) : 0;
    const float db = 0.5f * (0.5f + static_cast<float>(scale)) * 0.25f;
    const int index = ib == 0 && l == 0 ? 257 : ib == 0 && l == 1 ? 2 : 0;
    const float w = db * GridAt(kIq2sGrid[index], j);
    return ib == 0 && l == 0 && j < 2 ? -w : w;
  };
  // db = 0.1875 for weights 0..15: grid 257 is {8, 43, 25, ...}, grid 2 {25, 25, 8, ...}.
  ExpectBlock(WeightType::kIQ2_S, b, want, {{0, -1.5f}, {1, -8.0625f}, {2, 4.6875f}, {8, 4.6875f}, {10, 1.5f}});
}

// IQ3_XXS: group 0's first two indices 0 and 1, sign field 1 (weights 0 and 7 negative), scale 2 (db = 1.25).
TEST(KernelsTest, HandComputedIQ3_XXS) {
  std::vector<uint8_t> b(98, 0);
  PutHalf(b, 0, 1.0f);
  b[2 + 1] = 1;
  PutU32(b, 2 + 64, (2u << 28) | 1u);
  auto want = [](int e) {
    const int ib = e / 32, j = e % 8;
    const float db = 1.0f * (0.5f + (ib == 0 ? 2.0f : 0.0f)) * 0.5f;
    const float w = db * GridAt(kIq3xxsGrid[e == 4 ? 1 : 0], j % 4);
    return ib == 0 && e % 32 < 8 && (j == 0 || j == 7) ? -w : w;
  };
  ExpectBlock(WeightType::kIQ3_XXS, b, want, {{0, -5.0f}, {1, 5.0f}, {4, 25.0f}, {7, -5.0f}, {8, 5.0f}, {32, 1.0f}});
}

// IQ3_S: group 0's first indices 257 (qs[0] = 1, qh[0] bit 0) and 2, signs[0] = 0x10 (weight 4 negative);
// scales[0] = 0x21 (db = 0.5 * 3 for group 0, 0.5 * 5 for group 1).
TEST(KernelsTest, HandComputedIQ3_S) {
  std::vector<uint8_t> b(110, 0);
  PutHalf(b, 0, 0.5f);
  b[2] = 1, b[3] = 2;
  b[66] = 1;         // qh[0]
  b[74] = 0x10;      // signs[0]
  b[106] = 0x21;     // scales[0]
  auto want = [](int e) {
    const int ib = e / 32;
    const int s = ib == 0 ? 1 : ib == 1 ? 2 : 0;
    const float db = 0.5f * static_cast<float>(1 + 2 * s);
    const int index = e < 4 ? 257 : e < 8 ? 2 : 0;
    const float w = db * GridAt(kIq3sGrid[index], e % 4);
    return e == 4 ? -w : w;
  };
  // Grid 257 = {5, 7, 9, 5}, grid 2 = {5, 1, 1, 1}, grid 0 = {1, 1, 1, 1}.
  ExpectBlock(WeightType::kIQ3_S, b, want, {{0, 7.5f}, {2, 13.5f}, {4, -7.5f}, {5, 1.5f}, {32, 2.5f}, {64, 0.5f}});
}

// IQ1_S: group 0 has scale 2 (dl = 5), a negative delta, point 0 index 5 * 256 + 7 and point 1 index 1.
TEST(KernelsTest, HandComputedIQ1_S) {
  std::vector<uint8_t> b(50, 0);
  PutHalf(b, 0, 1.0f);
  b[2] = 7, b[3] = 1;
  PutU16(b, 34, static_cast<uint16_t>(0x8000 | (2 << 12) | 5));
  auto want = [](int e) {
    const int ib = e / 32, l = (e % 32) / 8;
    const float dl = 1.0f * static_cast<float>(ib == 0 ? 5 : 1);
    const float delta = ib == 0 ? -kIq1Delta : kIq1Delta;
    const int index = ib == 0 && l == 0 ? 5 * 256 + 7 : ib == 0 && l == 1 ? 1 : 0;
    const float g = static_cast<float>(static_cast<int8_t>(GridByte(kIq1sGrid[index], e % 8)));
    return dl * (g + delta);
  };
  // Grid 1287 = {1, -1, 1, 0, -1, 0, 1, 0}; grid 1 = {1, -1, ...}; grid 0 all -1.
  ExpectBlock(WeightType::kIQ1_S, b, want, {{0, 4.375f}, {1, -5.625f}, {3, -0.625f}, {8, 4.375f}, {32, -0.875f}});
}

// IQ1_M: d = 0.5 spread over the scales' top nibbles; group 0's 3-bit scales 1 and 2 (dl 1.5 and 2.5); point 0
// index 0 with a negative delta (qh[0] bit 3), point 2 index 256 + 9 (qh[1] low nibble 1).
TEST(KernelsTest, HandComputedIQ1_M) {
  std::vector<uint8_t> b(56, 0);
  b[2] = 9;      // qs[2]
  b[32] = 0x08;  // qh[0]: point 0 index bits 0, negative delta; point 1 positive
  b[33] = 0x01;  // qh[1]: point 2 index bits 1
  const uint16_t d = FloatToHalf(0.5f);
  for (int k = 0; k < 4; ++k) PutU16(b, 48 + 2 * k, static_cast<uint16_t>(((d >> (4 * k)) & 0xF) << 12));
  uint16_t sc0;
  std::memcpy(&sc0, &b[48], 2);
  PutU16(b, 48, static_cast<uint16_t>(sc0 | 1 | (2 << 3)));
  auto want = [](int e) {
    const int ib = e / 32, l = (e % 32) / 8;
    const int s = ib == 0 ? (l < 2 ? 1 : 2) : 0;
    const float dl = 0.5f * static_cast<float>(2 * s + 1);
    const float delta = e < 8 ? -kIq1Delta : kIq1Delta;
    const int index = e >= 16 && e < 24 ? 256 + 9 : 0;
    const float g = static_cast<float>(static_cast<int8_t>(GridByte(kIq1sGrid[index], e % 8)));
    return dl * (g + delta);
  };
  // Grid 265 = {0, 1, -1, -1, -1, 0, 0, -1}.
  ExpectBlock(WeightType::kIQ1_M, b, want,
              {{0, -1.6875f}, {8, -1.3125f}, {16, 0.3125f}, {17, 2.8125f}, {18, -2.1875f}, {32, -0.4375f}});
}

// MXFP4: e = 130 (d = 2^(130 - 128) = 4 with the doubled FP4 values), codes laid out as Q4_0; a second block with
// e = 0 (d = 2^-128, a subnormal scale) and e = 1.
TEST(KernelsTest, HandComputedMXFP4) {
  std::vector<uint8_t> b(17);
  b[0] = 130;
  for (int j = 0; j < 16; ++j) b[1 + j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  ExpectBlock(WeightType::kMXFP4, b, [](int e) { return static_cast<float>(kFp4Values[e < 16 ? e : 31 - e]) * 4.0f; },
              {{0, 0.0f}, {5, 24.0f}, {7, 48.0f}, {15, -48.0f}, {16, -48.0f}, {31, 0.0f}});
  b[0] = 0;
  ExpectBlock(WeightType::kMXFP4, b, [](int e) { return static_cast<float>(kFp4Values[e < 16 ? e : 31 - e]) * std::ldexp(1.0f, -128); },
              {{1, std::ldexp(1.0f, -128)}, {7, std::ldexp(12.0f, -128)}});
  b[0] = 1;
  ExpectBlock(WeightType::kMXFP4, b, [](int e) { return static_cast<float>(kFp4Values[e < 16 ? e : 31 - e]) * std::ldexp(1.0f, -127); },
              {{1, std::ldexp(1.0f, -127)}});
}

// The two type tables have the same rows in the same order, every block struct has the table's size, and each
// ISA slot decodes as the scalar reference (checked per format in the agreement tests).
TEST(KernelsTest, GgmlTablesAgree) {
  const auto types = GgmlTypes();
  const auto kernels = GgmlKernelTable();
  ASSERT_EQ(types.size(), kernels.size());
  for (size_t i = 0; i < types.size(); ++i) {
    EXPECT_EQ(types[i].type, kernels[i].type) << types[i].name;
    EXPECT_NE(kernels[i].dequantize, nullptr) << types[i].name;
    EXPECT_EQ(FindGgmlKernels(types[i].type), &kernels[i]);
  }
  const std::pair<WeightType, size_t> sizes[] = {
      {WeightType::kQ8_0, sizeof(block_q8_0)},       {WeightType::kQ4_0, sizeof(block_q4_0)},
      {WeightType::kQ4_K, sizeof(block_q4_K)},       {WeightType::kQ4_1, sizeof(block_q4_1)},
      {WeightType::kQ5_0, sizeof(block_q5_0)},       {WeightType::kQ5_1, sizeof(block_q5_1)},
      {WeightType::kQ2_K, sizeof(block_q2_K)},       {WeightType::kQ3_K, sizeof(block_q3_K)},
      {WeightType::kQ5_K, sizeof(block_q5_K)},       {WeightType::kQ6_K, sizeof(block_q6_K)},
      {WeightType::kIQ4_NL, sizeof(block_iq4_nl)},   {WeightType::kIQ4_XS, sizeof(block_iq4_xs)},
      {WeightType::kTQ1_0, sizeof(block_tq1_0)},     {WeightType::kTQ2_0, sizeof(block_tq2_0)},
      {WeightType::kIQ2_XXS, sizeof(block_iq2_xxs)}, {WeightType::kIQ2_XS, sizeof(block_iq2_xs)},
      {WeightType::kIQ2_S, sizeof(block_iq2_s)},     {WeightType::kIQ3_XXS, sizeof(block_iq3_xxs)},
      {WeightType::kIQ3_S, sizeof(block_iq3_s)},     {WeightType::kIQ1_S, sizeof(block_iq1_s)},
      {WeightType::kIQ1_M, sizeof(block_iq1_m)},     {WeightType::kMXFP4, sizeof(block_mxfp4)},
  };
  for (const auto& [t, size] : sizes) EXPECT_EQ(FindGgmlType(t)->block_bytes, static_cast<int>(size)) << FindGgmlType(t)->name;
  EXPECT_EQ(FindGgmlKernels(WeightType::kQInt), nullptr);
}

TEST(KernelsTest, HandComputedQInt3Asymmetric) {
  // 8 codes 0..7 at 3 bits each, LSB-first: sum i << 3i = 0xFAC688 -> bytes 88 C6 FA.
  std::vector<uint8_t> b = {0x88, 0xC6, 0xFA, 0x00, 0x38, 3};  // codes, f16 scale 0.5, zero 3
  const Tensor w = Tensor::FromBytes("q3", {1, 8}, WeightFormat::QInt(3, 0, false), b);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i], 0.5f * (i - 3)) << i;
  });
}

TEST(KernelsTest, HandComputedQInt4Symmetric) {
  // 2 rows x 16, group 8: element c in the low nibble of byte c/2 when even. Codes = c, zero = 8.
  std::vector<uint8_t> b(2 * 8 + 2 * 2 * 2);
  for (int r = 0; r < 2; ++r) {
    for (int i = 0; i < 8; ++i) b[8 * r + i] = static_cast<uint8_t>((2 * i) | ((2 * i + 1) << 4));
  }
  const float scales[4] = {1.0f, 2.0f, 0.5f, 0.25f};
  for (int g = 0; g < 4; ++g) {
    const uint16_t h = FloatToHalf(scales[g]);
    std::memcpy(b.data() + 16 + 2 * g, &h, 2);
  }
  const Tensor w = Tensor::FromBytes("q4", {2, 16}, WeightFormat::QInt(4, 8, true), b);
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int r = 0; r < 2; ++r) {
      for (int c = 0; c < 16; ++c) EXPECT_EQ(out[16 * r + c], scales[2 * r + c / 8] * (c - 8)) << r << "," << c;
    }
  });
}

TEST(KernelsTest, HandComputedNf4) {
  // Codes 0, 7, 8, 15 -> levels -1, 0, 0.0796..., 1.
  const float absmax = 2.0f;
  std::vector<uint8_t> plain = {0x70, 0xF8, 0, 0, 0, 0};
  std::memcpy(plain.data() + 2, &absmax, 4);
  const Tensor w = Tensor::FromBytes("nf4", {1, 4}, WeightFormat::NF4(4, false), plain);
  // Double quant: q = 100, dq_scale = 0.01, offset 1.0 -> absmax = 0.01 * 100 + 1.
  std::vector<uint8_t> dq = {0x70, 0xF8, 100};
  dq.resize(3 + 8);
  const float dq_scale = 0.01f, dq_offset = 1.0f;
  std::memcpy(dq.data() + 3, &dq_scale, 4);
  std::memcpy(dq.data() + 7, &dq_offset, 4);
  const Tensor wdq = Tensor::FromBytes("nf4dq", {1, 4}, WeightFormat::NF4(4, true), dq);
  const float dq_absmax = dq_scale * 100.0f + dq_offset;
  ForEachIsa([&] {
    auto out = Dequant(w);
    EXPECT_EQ(out[0], -2.0f);
    EXPECT_EQ(out[1], 0.0f);
    EXPECT_EQ(out[2], 2.0f * kNf4Levels[8]);
    EXPECT_EQ(out[3], 2.0f);
    out = Dequant(wdq);
    EXPECT_EQ(out[0], -dq_absmax);
    EXPECT_EQ(out[3], dq_absmax);
    EXPECT_NEAR(dq_absmax, 2.0f, 1e-6);
  });
}

TEST(KernelsTest, HandComputedF16AndBf16) {
  const uint16_t halves[4] = {0x3C00, 0xC000, 0x0001, 0x7BFF};  // 1, -2, smallest subnormal, 65504
  std::vector<uint8_t> b(8);
  std::memcpy(b.data(), halves, 8);
  const Tensor f16 = Tensor::FromBytes("h", {1, 4}, WeightFormat::F16(), b);
  const uint16_t bf[2] = {0x3F80, 0xC0A0};  // 1, -5
  std::vector<uint8_t> bb(4);
  std::memcpy(bb.data(), bf, 4);
  const Tensor bf16 = Tensor::FromBytes("b", {1, 2}, WeightFormat::BF16(), bb);
  ForEachIsa([&] {
    auto out = Dequant(f16);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -2.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
    EXPECT_EQ(out[3], 65504.0f);
    out = Dequant(bf16);
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -5.0f);
  });
}

// spqr by hand: 2 rows x 16, group 8 (two first-level groups), 3-bit codes c % 8, one row block. Second level:
// scales = 0.25 * (code - 0) with scale codes {1, 2 | 3, 4}; zeros = 1 * (code - 0) with zero codes {3, 4 | 0, 7}.
// Outliers: (0, 5) += 10, (1, 0) += -2.5, (1, 15) += 0.5.
TEST(KernelsTest, HandComputedSpqr) {
  const WeightFormat f = WeightFormat::SpQR(3, 8, 3);
  const SpqrLayout l = GetSpqrLayout(f, 2, 16).value();
  std::vector<uint8_t> b(EncodedBytes(f, 2, 16).value(), 0);
  auto put3 = [&](size_t plane, int i, int code) {
    for (int k = 0; k < 3; ++k) {
      if (code >> k & 1) b[plane + (3 * i + k) / 8] |= static_cast<uint8_t>(1u << ((3 * i + k) % 8));
    }
  };
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 16; ++c) put3(l.codes_offset + r * l.row_code_bytes, c, c % 8);
  }
  const int scale_codes[4] = {1, 2, 3, 4}, zero_codes[4] = {3, 4, 0, 7};
  for (int i = 0; i < 4; ++i) {
    put3(l.scale_codes_offset, i, scale_codes[i]);
    put3(l.zero_codes_offset, i, zero_codes[i]);
  }
  for (int k = 0; k < 2; ++k) {
    PutHalf(b, l.second_offset + 8 * k, 0.25f);
    PutHalf(b, l.second_offset + 8 * k + 4, 1.0f);  // zero_s and zero_z stay 0
  }
  const uint32_t row_ptr[3] = {0, 1, 3};
  std::memcpy(b.data() + l.row_ptr_offset, row_ptr, 12);
  const uint16_t cols[3] = {5, 0, 15};
  std::memcpy(b.data() + l.col_index_offset, cols, 6);
  PutHalf(b, l.values_offset, 10.0f);
  PutHalf(b, l.values_offset + 2, -2.5f);
  PutHalf(b, l.values_offset + 4, 0.5f);
  const Tensor w = Tensor::FromBytes("spqr", {2, 16}, f, b);
  float want[32];
  for (int r = 0; r < 2; ++r) {
    for (int c = 0; c < 16; ++c) {
      const int i = 2 * r + c / 8;
      want[16 * r + c] = 0.25f * scale_codes[i] * (c % 8 - zero_codes[i]);
    }
  }
  want[5] += 10.0f;
  want[16] += -2.5f;
  want[31] += 0.5f;
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int i = 0; i < 32; ++i) EXPECT_EQ(out[i], want[i]) << i;
    std::vector<float> ones(16, 1.0f);
    float y[2];
    ASSERT_TRUE(MatMulRows(w, 0, 2, ones.data(), 1, y, 2).ok());
    for (int r = 0; r < 2; ++r) {
      float sum = 0;
      for (int c = 0; c < 16; ++c) sum += want[16 * r + c];
      EXPECT_NEAR(y[r], sum, 1e-5) << r;
    }
  });
  // A column index past the row, or row pointers past the outlier count, are refused, not read.
  std::vector<uint8_t> bad = b;
  const uint16_t far = 16;
  std::memcpy(bad.data() + l.col_index_offset + 2, &far, 2);
  std::vector<float> out(32), ones(16, 1.0f);
  float y[2];
  const Tensor wbad = Tensor::FromBytes("spqr", {2, 16}, f, bad);
  EXPECT_EQ(DequantizeRows(wbad, 0, 2, out.data()).code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(MatMulRows(wbad, 1, 2, ones.data(), 1, y, 2).code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(DequantizeRows(wbad, 0, 1, out.data()).ok());  // row 0 is intact
  bad = b;
  const uint32_t past = 4;
  std::memcpy(bad.data() + l.row_ptr_offset + 4, &past, 4);
  EXPECT_EQ(DequantizeRows(Tensor::FromBytes("spqr", {2, 16}, f, bad), 0, 1, out.data()).code(),
            absl::StatusCode::kDataLoss);
}

// The W8A8 matmul against the definition written out here: per-token symmetric int8 activations (round half to
// even, clamp ±127), an exact integer dot, y = (s_x * s_w) * dot. Every ISA must give exactly these bits.
TEST(KernelsTest, W8A8MatchesIntegerReference) {
  const WeightFormat f = WeightFormat::Of(WeightType::kW8A8);
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{6, 200}, {3, 64}, {2, 7}}) {
    SCOPED_TRACE(testing::Message() << rows << "x" << cols);
    const Tensor w = RandomTensor(f, rows, cols, static_cast<uint32_t>(rows * cols));
    const W8A8Layout l = GetW8A8Layout(f, rows, cols).value();
    const int64_t n = 6;
    std::vector<float> x = RandomX(n, cols, 17);
    for (int64_t c = 0; c < cols; ++c) x[2 * cols + c] = 0.0f;  // an all-zero token: y must be exactly 0
    for (int64_t c = 0; c < cols; c += 5) x[4 * cols + c] *= 50.0f;  // outliers flatten the grid of the rest
    std::vector<double> want(static_cast<size_t>(n * rows));
    for (int64_t t = 0; t < n; ++t) {
      float amax = 0;
      for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(x[t * cols + c]));
      const float sx = amax / 127.0f;
      std::vector<int> q(static_cast<size_t>(cols), 0);
      if (amax > 0) {
        for (int64_t c = 0; c < cols; ++c) {
          q[c] = static_cast<int>(std::clamp(std::nearbyint(x[t * cols + c] / sx), -127.0f, 127.0f));
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        int64_t dot = 0;
        for (int64_t c = 0; c < cols; ++c) {
          dot += static_cast<int64_t>(static_cast<int8_t>(w.data[r * cols + c])) * q[c];
        }
        float sw;
        std::memcpy(&sw, w.data + l.scales_offset + 4 * r, 4);
        want[t * rows + r] = (sx * sw) * static_cast<float>(dot);
      }
    }
    ForEachIsa([&] {
      std::vector<float> y(static_cast<size_t>(n * rows), -1.0f);
      ASSERT_TRUE(MatMulRows(w, 0, rows, x.data(), n, y.data(), rows).ok());
      for (int64_t i = 0; i < n * rows; ++i) {
        EXPECT_EQ(FloatBits(y[i]), FloatBits(static_cast<float>(want[i]))) << i << ": " << y[i] << " vs " << want[i];
      }
      for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(y[2 * rows + r], 0.0f);
    });
  }
}

// By hand: max |x| = 127 makes s_x = 1, so x's codes are its values rounded half to even; the weight row holds
// -128, the code the quantizer never writes but the format allows.
TEST(KernelsTest, HandComputedW8A8) {
  const float x[8] = {127.0f, 2.5f, 3.5f, -2.5f, -0.5f, 0.5f, 1.5f, -126.6f};
  // codes: 127, 2, 4, -2, -0, 0, 2, -127
  const int8_t wc[8] = {1, 10, 100, -3, 5, 7, -128, 2};
  std::vector<uint8_t> b(8 + 4);
  std::memcpy(b.data(), wc, 8);
  const float scale = 0.25f;
  std::memcpy(b.data() + 8, &scale, 4);
  const Tensor w = Tensor::FromBytes("w8a8", {1, 8}, WeightFormat::Of(WeightType::kW8A8), b);
  const int dot = 1 * 127 + 10 * 2 + 100 * 4 + -3 * -2 + 0 + 0 + -128 * 2 + 2 * -127;  // 43
  ForEachIsa([&] {
    const auto out = Dequant(w);
    for (int j = 0; j < 8; ++j) EXPECT_EQ(out[j], 0.25f * wc[j]) << j;
    float y = 0;
    ASSERT_TRUE(MatMulRows(w, 0, 1, x, 1, &y, 1).ok());
    EXPECT_EQ(y, 0.25f * static_cast<float>(dot));
  });
}

TEST(KernelsTest, W8A8Layout) {
  const WeightFormat f = WeightFormat::Of(WeightType::kW8A8);
  EXPECT_EQ(FormatName(f), "w8a8");
  EXPECT_EQ(ParseFormatName("w8a8").value(), f);
  EXPECT_EQ(EncodedBytes(f, 3, 10).value(), 3u * 10 + 3 * 4);
  EXPECT_EQ(PlaneSizes(f, 3, 10).value(), (std::vector<size_t>{30, 12}));
  EXPECT_FALSE(EncodedBytes(f, 1, kW8A8MaxCols + 1).ok());
}

TEST(KernelsTest, RejectsBadArguments) {
  const Tensor w = RandomTensor(WeightFormat::Of(WeightType::kQ4_0), 4, 64, 3);
  std::vector<float> out(4 * 64), x(64), y(8);
  EXPECT_EQ(DequantizeRows(w, 2, 5, out.data()).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(MatMulRows(w, -1, 2, x.data(), 1, y.data(), 4).code(), absl::StatusCode::kOutOfRange);
  Tensor broken = w;
  broken.nbytes -= 1;
  EXPECT_FALSE(DequantizeRows(broken, 0, 1, out.data()).ok());
}

// ---- Integer dot products (int_dot.h): activations quantized per matmul, integer sums per block. ----

namespace int_dot {

struct IntCase {
  WeightType type;
  int64_t rows, cols;
};
// Row counts around the 8- and 16-row groups (1, 7, 8, 9, 17; Q4_K's 26 and 41 rows, which with the first row
// cut off are 16 + 8 + 1 and 16 + 16 + 8) and several blocks per row.
std::vector<IntCase> IntCases() {
  std::vector<IntCase> cases;
  for (WeightType t : {WeightType::kQ8_0, WeightType::kQ4_0}) {
    for (int64_t rows : {1, 7, 9, 17}) cases.push_back({t, rows, 32 * static_cast<int64_t>(rows % 5 + 1)});
    cases.push_back({t, 24, 1024});
  }
  for (int64_t rows : {1, 8, 9, 13, 26, 41}) cases.push_back({WeightType::kQ4_K, rows, 256 * (rows % 3 + 1)});
  return cases;
}

std::vector<float> RunInt(const Tensor& w, int64_t r0, int64_t r1, const std::vector<float>& x, int64_t n,
                          int64_t stride) {
  MatMulInput in;
  EXPECT_TRUE(PrepareInput(w, x.data(), n, ActivationMode::kInt8, &in).ok());
  EXPECT_TRUE(in.quantized());
  std::vector<float> y(static_cast<size_t>(n * stride), -7.0f);
  EXPECT_TRUE(MatMulRows(w, r0, r1, in, y.data(), stride).ok());
  return y;
}

// Every ISA gives the scalar reference's bits, for whole matrices and for row ranges that cut 8-row groups.
TEST(IntDotTest, EveryIsaEqualsTheScalarReferenceBitForBit) {
  IsaGuard guard;
  uint32_t seed = 500;
  for (const IntCase& c : IntCases()) {
    const Tensor w = RandomTensor(WeightFormat::Of(c.type), c.rows, c.cols, seed++);
    // 11 = 8 + 2 + 1 and 37 = 16 + 16 + 4 + 1: every token tile, the 8- and 16-token row-lane kernels included.
    for (int64_t n : {1, 2, 4, 5, 11, 37}) {
      const std::vector<float> x = RandomX(n, c.cols, seed++);
      const int64_t r0 = c.rows > 3 ? 1 : 0, stride = c.rows + 2;
      SetIsa(Isa::kScalar);
      const std::vector<float> want = RunInt(w, r0, c.rows, x, n, stride);
      for (Isa isa : {Isa::kAvx2, Isa::kAvx512}) {
        if (SetIsa(isa) != isa) continue;
        SCOPED_TRACE(absl::StrCat(FormatName(WeightFormat::Of(c.type)), " ", c.rows, "x", c.cols, " n=", n, " ",
                                  IsaName(isa)));
        const std::vector<float> got = RunInt(w, r0, c.rows, x, n, stride);
        ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0);
      }
    }
  }
}

// The quantized activations themselves are the same bytes from the scalar and the SIMD quantizer, and follow
// ggml's rules: Q8_0 d = fp16(max|x| / 127), codes round(x * 127 / max|x|); Q8_K codes of the largest-|x|
// element are -127.
TEST(IntDotTest, ActivationQuantizationIsGgmlsAndIsaIndependent) {
  IsaGuard guard;
  std::vector<float> x = RandomX(1, 512, 77);
  x[5] = 9.0f;     // the Q8_0 block 0 maximum, and the Q8_K block 0 maximum
  x[300] = -6.0f;  // block 1 of Q8_K: a negative maximum
  for (WeightType t : {WeightType::kQ8_0, WeightType::kQ4_K}) {
    const Tensor w = RandomTensor(WeightFormat::Of(t), 1, 512, 3);
    SetIsa(Isa::kScalar);
    const std::vector<float> ref = RunInt(w, 0, 1, x, 1, 1);
    if (SetIsa(Isa::kAvx2) == Isa::kAvx2) {
      EXPECT_EQ(FloatBits(RunInt(w, 0, 1, x, 1, 1)[0]), FloatBits(ref[0]));
    }
  }
  // A one-block row with a unit weight at column 5 reads back the quantized x[5]: Q8_0 gives d * 127 = x[5]
  // rounded through fp16.
  std::vector<uint8_t> b(34, 0);
  PutHalf(b, 0, 1.0f);
  b[2 + 5] = 1;
  const Tensor unit = Tensor::FromBytes("w", {1, 32}, WeightFormat::Of(WeightType::kQ8_0), b);
  std::vector<float> x32(x.begin(), x.begin() + 32);
  SetIsa(Isa::kScalar);
  const float got = RunInt(unit, 0, 1, x32, 1, 1)[0];
  EXPECT_EQ(got, HalfToFloat(FloatToHalf(9.0f / 127.0f)) * 127.0f);
}

// The SIMD quantizers choose each block's largest |x| as the scalar one does where that is delicate: a tie of
// magnitudes with opposite signs (the first decides the scale's sign), NaNs (skipped: the scale is the largest
// finite |x|'s), a block of zeros (and a -0), one of only NaNs, the maximum last. (What a NaN x itself becomes
// differs between them; such a row carries no information either way.)
TEST(IntDotTest, Q8_KActivationsMatchTheScalarQuantizerOnTiesAndNaNs) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) GTEST_SKIP() << "no AVX2";
  using internal::ActType;
  const int64_t blocks = 5, cols = blocks * 256;
  std::vector<float> x = RandomX(1, cols, 91);
  x[10] = -7.5f;  // block 0: -7.5 first, then +7.5
  x[200] = 7.5f;
  x[256 + 3] = std::nanf("");  // block 1: NaNs around a maximum that is not first
  x[256 + 40] = 6.0f;
  x[256 + 41] = std::nanf("");
  x[256 + 90] = -6.0f;
  std::fill(x.begin() + 512, x.begin() + 768, 0.0f);  // block 2: zeros and a -0
  x[512 + 5] = -0.0f;
  std::fill(x.begin() + 768, x.begin() + 1024, std::nanf(""));  // block 3: only NaNs
  x[1024 + 255] = 8.0f;                                           // block 4: the maximum last
  const internal::ActRowLayout l = internal::GetActRowLayout(ActType::kQ8_K, cols);
  std::vector<uint8_t> scalar(l.bytes), simd(l.bytes);
  internal::QuantizeActScalar(ActType::kQ8_K, x.data(), cols, scalar.data());
  internal::QuantizeActAvx2(ActType::kQ8_K, x.data(), cols, simd.data());
  const auto codes = [&](const std::vector<uint8_t>& row) {
    return reinterpret_cast<const int8_t*>(row.data() + l.codes);
  };
  const auto scales = [&](const std::vector<uint8_t>& row) {
    return reinterpret_cast<const float*>(row.data() + l.scales);
  };
  for (int64_t b = 0; b < blocks; ++b) EXPECT_EQ(FloatBits(scales(simd)[b]), FloatBits(scales(scalar)[b])) << b;
  for (int64_t c = 0; c < cols; ++c) {
    if (!std::isnan(x[c])) {
      EXPECT_EQ(codes(simd)[c], codes(scalar)[c]) << c;
    }
  }
  EXPECT_EQ(codes(scalar)[10], -127);  // the first of the tied magnitudes sets the scale's sign
  EXPECT_EQ(codes(scalar)[200], 127);
  EXPECT_EQ(codes(scalar)[256 + 40], -127);
  EXPECT_EQ(scales(scalar)[2], 0.0f);
  EXPECT_EQ(scales(scalar)[3], 0.0f);
  EXPECT_EQ(codes(scalar)[1024 + 255], -127);
}

// Against plain arithmetic: dequantized weights times dequantized activations, in double, is what the integer
// kernel computes up to fp32 rounding; and against fp32 activations the error is the activation grid's.
TEST(IntDotTest, MatchesDequantizedArithmetic) {
  IsaGuard guard;
  SetIsa(Isa::kScalar);
  for (const IntCase& c : IntCases()) {
    SCOPED_TRACE(FormatName(WeightFormat::Of(c.type)));
    const Tensor w = RandomTensor(WeightFormat::Of(c.type), c.rows, c.cols, 9);
    std::vector<float> dq(static_cast<size_t>(c.rows * c.cols));
    ASSERT_TRUE(DequantizeRows(w, 0, c.rows, dq.data()).ok());
    const std::vector<float> x = RandomX(1, c.cols, 10);
    const std::vector<float> y = RunInt(w, 0, c.rows, x, 1, c.rows);
    // The activations as the kernel sees them: each block on its grid (ggml's Q8_0 or Q8_K rule).
    const int block = c.type == WeightType::kQ4_K ? 256 : 32;
    std::vector<double> xq(x.size());
    for (int64_t b0 = 0; b0 < c.cols; b0 += block) {
      float amax = 0, vmax = 0;
      for (int j = 0; j < block; ++j) {
        if (std::fabs(x[b0 + j]) > amax) amax = std::fabs(x[b0 + j]), vmax = x[b0 + j];
      }
      for (int j = 0; j < block; ++j) {
        if (block == 32) {
          xq[b0 + j] = std::nearbyint(x[b0 + j] * (127.0f / amax)) * HalfToFloat(FloatToHalf(amax / 127.0f));
        } else {
          const float iscale = -127.0f / vmax;
          xq[b0 + j] = std::min(127.0f, std::nearbyint(iscale * x[b0 + j])) / iscale;
        }
      }
    }
    for (int64_t r = 0; r < c.rows; ++r) {
      double want = 0, exact = 0, mag = 0;
      for (int64_t k = 0; k < c.cols; ++k) {
        want += static_cast<double>(dq[r * c.cols + k]) * xq[k];
        exact += static_cast<double>(dq[r * c.cols + k]) * x[k];
        mag += std::fabs(static_cast<double>(dq[r * c.cols + k]) * x[k]);
      }
      EXPECT_NEAR(y[r], want, 1e-4 * mag) << "row " << r;
      EXPECT_NEAR(y[r], exact, 2e-2 * mag) << "row " << r;  // activation rounding: about 1/254 per element
    }
  }
}

// Batch invariance with quantized activations: a token's outputs are the same bytes alone or at any position
// among others, on every ISA.
TEST(IntDotTest, BatchInvariantOnEveryIsa) {
  IsaGuard guard;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
    if (SetIsa(isa) != isa) continue;
    for (const IntCase& c : IntCases()) {
      SCOPED_TRACE(absl::StrCat(FormatName(WeightFormat::Of(c.type)), " ", IsaName(isa)));
      const Tensor w = RandomTensor(WeightFormat::Of(c.type), c.rows, c.cols, 21);
      constexpr int64_t kN = 21;  // tiles of 16, 4 and 1
      const std::vector<float> x = RandomX(kN, c.cols, 22);
      const std::vector<float> all = RunInt(w, 0, c.rows, x, kN, c.rows);
      for (int64_t t = 0; t < kN; ++t) {
        const std::vector<float> one(x.begin() + t * c.cols, x.begin() + (t + 1) * c.cols);
        const std::vector<float> alone = RunInt(w, 0, c.rows, one, 1, c.rows);
        ASSERT_EQ(std::memcmp(alone.data(), &all[t * c.rows], c.rows * sizeof(float)), 0) << "token " << t;
      }
    }
  }
}

TEST(IntDotTest, FloatModeAndOtherFormatsKeepFloats) {
  const Tensor q = RandomTensor(WeightFormat::Of(WeightType::kQ4_0), 4, 64, 1);
  const Tensor f = RandomTensor(WeightFormat::F32(), 4, 64, 1);
  const std::vector<float> x = RandomX(1, 64, 2);
  MatMulInput in;
  ASSERT_TRUE(PrepareInput(q, x.data(), 1, ActivationMode::kFloat, &in).ok());
  EXPECT_FALSE(in.quantized());
  ASSERT_TRUE(PrepareInput(f, x.data(), 1, ActivationMode::kInt8, &in).ok());
  EXPECT_FALSE(in.quantized());
  EXPECT_TRUE(HasIntegerKernel(WeightType::kQ4_K));
  EXPECT_FALSE(HasIntegerKernel(WeightType::kNF4));
  // x_unchanged keeps an input prepared from the same x for the same activation type (Q4_0 and Q8_0 share Q8_0
  // blocks), and prepares it again for another (Q4_K's Q8_K), so the products stay right either way.
  const Tensor q8 = RandomTensor(WeightFormat::Of(WeightType::kQ8_0), 4, 64, 2);
  ASSERT_TRUE(PrepareInput(q, x.data(), 1, ActivationMode::kInt8, &in).ok());
  ASSERT_TRUE(PrepareInput(q8, x.data(), 1, ActivationMode::kInt8, &in, /*x_unchanged=*/true).ok());
  MatMulInput fresh;
  ASSERT_TRUE(PrepareInput(q8, x.data(), 1, ActivationMode::kInt8, &fresh).ok());
  std::vector<float> reused(4), again(4);
  ASSERT_TRUE(MatMulRows(q8, 0, 4, in, reused.data(), 4).ok());
  ASSERT_TRUE(MatMulRows(q8, 0, 4, fresh, again.data(), 4).ok());
  EXPECT_EQ(reused, again);
  // An input prepared for one weight is refused by another.
  ASSERT_TRUE(PrepareInput(q, x.data(), 1, ActivationMode::kInt8, &in).ok());
  const Tensor qk = RandomTensor(WeightFormat::Of(WeightType::kQ4_K), 4, 256, 1);
  std::vector<float> y(4);
  EXPECT_FALSE(MatMulRows(qk, 0, 4, in, y.data(), 4).ok());
}

}  // namespace int_dot

// The quantize report's row error: the same doubles on every ISA, for every length (full groups of eight and
// tails).
TEST(KernelsTest, RowErrorSumsEqualScalarOnEveryIsa) {
  std::mt19937 rng(21);
  std::normal_distribution<float> g(0, 1);
  const Isa before = ActiveIsa();
  for (int64_t cols : {0, 1, 7, 8, 9, 31, 256, 4099}) {
    std::vector<float> ref(static_cast<size_t>(cols)), row(static_cast<size_t>(cols));
    for (int64_t c = 0; c < cols; ++c) {
      ref[c] = g(rng) * 1e3f;
      row[c] = ref[c] + g(rng);
    }
    double err = -1, norm = -1;
    RowErrorSumsScalar(ref.data(), row.data(), cols, &err, &norm);
    double want_err = 0, want_norm = 0;  // the same sums in plain order: near, not equal
    for (int64_t c = 0; c < cols; ++c) {
      want_err += (double{ref[c]} - row[c]) * (double{ref[c]} - row[c]);
      want_norm += double{ref[c]} * ref[c];
    }
    EXPECT_NEAR(err, want_err, 1e-12 * want_err + 1e-300) << cols;
    EXPECT_NEAR(norm, want_norm, 1e-12 * want_norm) << cols;
    for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512}) {
      if (SetIsa(isa) != isa) continue;
      double e = -1, n = -1;
      RowErrorSums(ref.data(), row.data(), cols, &e, &n);
      EXPECT_EQ(e, err) << IsaName(isa) << " " << cols;
      EXPECT_EQ(n, norm) << IsaName(isa) << " " << cols;
    }
  }
  SetIsa(before);
}

}  // namespace
}  // namespace qforge::kernels
