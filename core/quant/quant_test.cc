#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/thread_pool.h"
#include "core/kernels/blocks.h"
#include "core/kernels/ggml_kernels.h"
#include "core/kernels/kernels.h"
#include "core/model/ggml_types.h"
#include "core/model/synthetic.h"
#include "core/quant/packing.h"
#include "core/quant/quant_method.h"
#include "core/quant/quantize_model.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qforge::quant {
namespace {

using ::testing::HasSubstr;

std::vector<float> Gaussian(int64_t n, uint32_t seed, float mean = 0.0f, float stddev = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(mean, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = d(rng);
  return v;
}

const QuantMethod& Method(const std::string& name) {
  const QuantMethod* m = FindMethod(name);
  EXPECT_NE(m, nullptr) << name;
  return *m;
}

struct Encoded {
  Tensor tensor;
  std::vector<float> decoded;
};

Encoded Encode(const std::string& method, const QuantParams& p, const std::vector<float>& w, int64_t rows,
               int64_t cols, ThreadPool* pool = nullptr) {
  const QuantMethod& m = Method(method);
  auto format = m.OutputFormat(p, rows, cols);
  EXPECT_TRUE(format.ok()) << format.status();
  auto bytes = m.Quantize(w.data(), rows, cols, p, pool);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  Encoded e{Tensor::FromBytes("w", {rows, cols}, *format, std::move(*bytes)), {}};
  EXPECT_TRUE(ValidateTensor(e.tensor).ok());
  e.decoded.resize(static_cast<size_t>(rows * cols));
  EXPECT_TRUE(kernels::DequantizeRows(e.tensor, 0, rows, e.decoded.data()).ok());
  return e;
}

double RelError(const std::vector<float>& w, const std::vector<float>& q) {
  double e = 0, n = 0;
  for (size_t i = 0; i < w.size(); ++i) {
    e += (static_cast<double>(w[i]) - q[i]) * (static_cast<double>(w[i]) - q[i]);
    n += static_cast<double>(w[i]) * w[i];
  }
  return std::sqrt(e / n);
}

TEST(RegistryTest, ListsEveryMethodOnce) {
  std::vector<std::string> names;
  for (const QuantMethod* m : ListMethods()) {
    names.push_back(m->name());
    EXPECT_EQ(FindMethod(m->name()), m);
    EXPECT_FALSE(m->description().empty());
    EXPECT_TRUE(m->Validate(m->DefaultParams()).ok()) << m->name();
  }
  EXPECT_THAT(names, ::testing::UnorderedElementsAre("rtn", "nf4", "q8_0", "q4_0", "q4_k", "q4_1", "q5_0", "q5_1",
                                                    "q2_k", "q3_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs", "gptq",
                                                    "gptq_q4_0", "gptq_q2_k", "gptq_q3_k", "gptq_q4_k",
                                                    "gptq_q5_k", "gptq_q6_k", "awq", "smoothquant", "quip", "spqr", "ternary",
                                                    "bitnet", "qmoe", "billm", "f16"));
  EXPECT_EQ(FindMethod("gptq-not-yet"), nullptr);
}

TEST(ValidationTest, ErrorsNameTheField) {
  const QuantMethod& rtn = Method("rtn");
  auto s = rtn.Validate({9, 128, true, false});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("bits"));
  EXPECT_THAT(std::string(rtn.Validate({1, 128, true, false}).message()), HasSubstr("bits"));
  EXPECT_THAT(std::string(rtn.Validate({4, -32, true, false}).message()), HasSubstr("group"));
  auto f = rtn.OutputFormat({4, 48, true, false}, 4, 128);
  EXPECT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("group 48"));
  f = rtn.OutputFormat({3, 0, true, false}, 4, 12);  // 36 bits per row: padded to 5 bytes, not refused
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(*f, WeightFormat::QInt(3, 0, true));
  const QuantMethod& nf4 = Method("nf4");
  EXPECT_THAT(std::string(nf4.Validate({4, 63, true, true}).message()), HasSubstr("group"));
  EXPECT_THAT(std::string(nf4.Validate({4, 0, true, true}).message()), HasSubstr("group"));
  f = Method("q4_k").OutputFormat(Method("q4_k").DefaultParams(), 4, 64);
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("256"));
  EXPECT_FALSE(Method("q8_0").Quantize(nullptr, 0, 32, {}, nullptr).ok());
}

// RTN: every element within half a step of its (stored, f16) scale for symmetric; asymmetric may lose up to one
// step at the range ends because the zero point is rounded to an integer.
TEST(RtnTest, RoundTripWithinHalfStep) {
  const int64_t rows = 5, cols = 256;
  const std::vector<float> w = Gaussian(rows * cols, 7);
  for (int bits = 2; bits <= 8; ++bits) {
    for (int group : {0, 32, 64, 128}) {
      for (bool sym : {true, false}) {
        SCOPED_TRACE(absl::StrCat("bits=", bits, " group=", group, " sym=", sym));
        const QuantParams p{bits, group, sym, false};
        const Encoded e = Encode("rtn", p, w, rows, cols);
        const QIntLayout l = GetQIntLayout(e.tensor.format, rows, cols).value();
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            const float s = kernels::LoadHalf(e.tensor.data + l.scales_offset + 2 * (r * l.groups_per_row + c / l.group));
            const float bound = (sym ? 0.5f : 1.0f) * s + 1e-6f * std::fabs(w[r * cols + c]);
            ASSERT_LE(std::fabs(w[r * cols + c] - e.decoded[r * cols + c]), bound) << r << "," << c;
          }
        }
      }
    }
  }
}

TEST(RtnTest, MoreBitsLowerError) {
  const std::vector<float> w = Gaussian(8 * 512, 11);
  for (bool sym : {true, false}) {
    double prev = 1e9;
    for (int bits = 2; bits <= 8; ++bits) {
      const double err = RelError(w, Encode("rtn", {bits, 64, sym, false}, w, 8, 512).decoded);
      EXPECT_LT(err, prev) << "bits=" << bits;
      prev = err;
    }
    EXPECT_LT(prev, 0.01);
  }
  // Smaller groups adapt better.
  EXPECT_LT(RelError(w, Encode("rtn", {4, 32, true, false}, w, 8, 512).decoded),
            RelError(w, Encode("rtn", {4, 0, true, false}, w, 8, 512).decoded));
}

TEST(RtnTest, AsymmetricBeatsSymmetricOnShiftedData) {
  const std::vector<float> w = Gaussian(8 * 256, 3, /*mean=*/3.0f);
  const double sym = RelError(w, Encode("rtn", {4, 64, true, false}, w, 8, 256).decoded);
  const double asym = RelError(w, Encode("rtn", {4, 64, false, false}, w, 8, 256).decoded);
  EXPECT_LT(asym, 0.6 * sym);
}

TEST(RtnTest, ZeroRowsStayZero) {
  const std::vector<float> w(4 * 64, 0.0f);
  for (bool sym : {true, false}) {
    const Encoded e = Encode("rtn", {4, 32, sym, false}, w, 4, 64);
    for (float v : e.decoded) EXPECT_EQ(v, 0.0f);
  }
}

TEST(GgmlTest, Q8_0RelativeErrorSmall) {
  const std::vector<float> w = Gaussian(16 * 256, 5);
  const Encoded e = Encode("q8_0", Method("q8_0").DefaultParams(), w, 16, 256);
  EXPECT_LT(RelError(w, e.decoded), 0.006);
  EXPECT_EQ(e.tensor.nbytes, 16u * 256 / 32 * 34);
}

TEST(GgmlTest, Q4_0ErrorWithinOneStep) {
  const std::vector<float> w = Gaussian(4 * 256, 9);
  const Encoded e = Encode("q4_0", Method("q4_0").DefaultParams(), w, 4, 256);
  for (size_t b = 0; b < w.size() / 32; ++b) {
    const float d = std::fabs(kernels::LoadHalf(e.tensor.data + 18 * b));
    for (size_t j = 0; j < 32; ++j) {
      const size_t i = 32 * b + j;
      // Half a step inside the range; a full step for the +8 side, which is clamped at code 15 (= +7).
      ASSERT_LE(std::fabs(w[i] - e.decoded[i]), d * (1 + 1e-3f)) << i;
    }
  }
  EXPECT_LT(RelError(w, e.decoded), 0.15);
}

TEST(GgmlTest, Q4_KBeatsQ4_0OnGaussian) {
  const std::vector<float> w = Gaussian(32 * 1024, 21);
  const double q4_0 = RelError(w, Encode("q4_0", {}, w, 32, 1024).decoded);
  const double q4_k = RelError(w, Encode("q4_k", {}, w, 32, 1024).decoded);
  EXPECT_LE(q4_k, q4_0);
  EXPECT_LT(q4_k, 0.12);
}

// Encodings derived by hand from ggml's reference rounding rules.
TEST(GgmlTest, Q8_0HandComputedBlocks) {
  std::vector<float> x(64);
  for (int j = 0; j < 32; ++j) x[j] = 0.3f;     // constant: amax 0.3, every q = 127
  for (int j = 0; j < 32; ++j) x[32 + j] = j - 16;  // linear: amax 16, q = round(x * 127/16)
  std::vector<uint8_t> out(68);
  QuantizeRowQ8_0(x.data(), 64, out.data());
  kernels::block_q8_0 b[2];
  std::memcpy(b, out.data(), 68);
  EXPECT_EQ(b[0].d, FloatToHalf(0.3f / 127));
  for (int j = 0; j < 32; ++j) EXPECT_EQ(b[0].qs[j], 127);
  EXPECT_EQ(b[1].d, FloatToHalf(16.0f / 127));
  EXPECT_EQ(b[1].qs[0], -127);  // -16 * 127/16
  EXPECT_EQ(b[1].qs[16], 0);
  EXPECT_EQ(b[1].qs[31], 119);  // 15 * 7.9375 = 119.06
  EXPECT_EQ(b[1].qs[17], 8);    // 1 * 7.9375 = 7.94
}

// The AVX2 Q8_0 encoder writes the reference's bytes, exact ties (x * id = k + 1/2, which roundf takes away from
// zero and the hardware's rounding to even) included.
TEST(GgmlTest, Q8_0Avx2EqualsScalar) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(32 * 400);
  for (float& v : x) v = normal(rng);
  for (int b = 0; b < 40; ++b) {  // blocks whose max is 127: x * id = x exactly, so half-integers are ties
    x[32 * b] = 127.0f;
    for (int j = 1; j < 32; ++j) x[32 * b + j] = static_cast<float>((j * 37 % 254) - 127) + 0.5f * (j % 2 ? 1 : -1);
  }
  std::vector<uint8_t> a(34 * 400), b(34 * 400);
  QuantizeRowQ8_0Scalar(x.data(), static_cast<int64_t>(x.size()), a.data());
  QuantizeRowQ8_0(x.data(), static_cast<int64_t>(x.size()), b.data());
  EXPECT_EQ(a, b);
}

// The K-quant scale/min fits (Q2_K, Q4_K, Q5_K) run eight sub-blocks per AVX2 pass where the kernels run AVX2 or
// better; their bytes must be the one-at-a-time scalar fits', on ordinary and awkward blocks alike.
TEST(GgmlTest, KQuantFitsOnEveryIsaEqualScalar) {
  std::mt19937 rng(12);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::cauchy_distribution<float> heavy(0.0f, 0.01f);
  std::uniform_int_distribution<int> lattice(-15, 15);
  constexpr int kSuperBlocks = 96;
  std::vector<float> x(256 * kSuperBlocks);
  for (int b = 0; b < kSuperBlocks; ++b) {
    float* s = x.data() + 256 * b;
    for (int j = 0; j < 256; ++j) {
      const int sub = j / 16;  // awkward cases by 16-wide sub-block, so 32-wide ones mix two of them
      switch ((b + sub) % 8) {
        case 0: s[j] = normal(rng); break;
        case 1: s[j] = std::fabs(normal(rng)) + 2.0f; break;   // all positive: min clamps to 0
        case 2: s[j] = -std::fabs(normal(rng)) - 1.0f; break;  // all negative
        case 3: s[j] = sub % 2 ? 0.0f : 0.25f; break;          // constant (flat) and zero sub-blocks
        case 4: s[j] = heavy(rng); break;                       // a few huge values
        case 5: s[j] = static_cast<float>(lattice(rng)) / 15.0f; break;  // ties on the code grid
        case 6: s[j] = normal(rng) * 1e-30f; break;            // subnormal products
        default: s[j] = j % 16 == 3 ? 100.0f : normal(rng) * 0.01f; break;  // one outlier
      }
    }
  }
  struct Encoder {
    const char* name;
    size_t block_bytes;
    void (*quantize)(const float*, int64_t, uint8_t*);
  };
  const Encoder encoders[] = {{"q2_k", sizeof(kernels::block_q2_K), kernels::QuantizeRowQ2_K},
                              {"q4_k", sizeof(kernels::block_q4_K), kernels::QuantizeRowQ4_K},
                              {"q5_k", sizeof(kernels::block_q5_K), kernels::QuantizeRowQ5_K}};
  const kernels::Isa before = kernels::ActiveIsa();
  for (const Encoder& e : encoders) {
    SCOPED_TRACE(e.name);
    auto encode = [&](kernels::Isa isa) {
      std::vector<uint8_t> out(e.block_bytes * kSuperBlocks);
      kernels::SetIsa(isa);
      e.quantize(x.data(), static_cast<int64_t>(x.size()), out.data());
      return out;
    };
    const std::vector<uint8_t> scalar = encode(kernels::Isa::kScalar);
    for (kernels::Isa isa : {kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
      if (kernels::SetIsa(isa) != isa) continue;  // not on this CPU
      const std::vector<uint8_t> simd = encode(isa);
      for (int b = 0; b < kSuperBlocks; ++b) {
        ASSERT_TRUE(std::equal(scalar.begin() + b * e.block_bytes, scalar.begin() + (b + 1) * e.block_bytes,
                               simd.begin() + b * e.block_bytes))
            << kernels::IsaName(isa) << " super-block " << b;
      }
    }
  }
  kernels::SetIsa(before);
}

// The importance-weighted K-quant encoders (GgmlKernelTraits::fit_header / set_codes): every decoded weight is
// exactly its sub-block grid's level for the code SubBlockGridCode picks (so the header, the grids handed to GPTQ
// and the code packing agree with the type's dequantizer), the bytes are the same on every ISA, and where a few
// weights matter 100x more than the rest, their importance-weighted error is well below the reference encoder's.
TEST(GgmlTest, WeightedKQuantsDecodeAsTheirGridsAndFavourImportantWeights) {
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::exponential_distribution<float> spread(1.0f);
  constexpr int kSuperBlocks = 48, kN = 256 * kSuperBlocks;
  std::vector<float> x(kN), importance(kN);
  for (int i = 0; i < kN; ++i) {
    const int b = i / 256;
    x[i] = b % 8 == 3 ? (i % 32 < 16 ? 0.0f : 0.5f) : b % 8 == 5 ? std::fabs(normal(rng)) + 1.0f : normal(rng);
    importance[i] = spread(rng) * (i % 64 < 8 ? 100.0f : 1.0f);
    if (b % 8 == 6 && i % 16 == 0) importance[i] = 0.0f;  // dead inputs
  }
  const kernels::Isa before = kernels::ActiveIsa();
  int rows_checked = 0;
  for (const kernels::GgmlKernelTraits& k : kernels::GgmlKernelTable()) {
    if (k.fit_header == nullptr) continue;
    ++rows_checked;
    const std::string name = FindGgmlType(k.type)->name;
    SCOPED_TRACE(name);
    const size_t block_bytes = static_cast<size_t>(FindGgmlType(k.type)->block_bytes);
    kernels::SetIsa(kernels::Isa::kScalar);
    std::vector<uint8_t> weighted(block_bytes * kSuperBlocks), plain(block_bytes * kSuperBlocks);
    kernels::QuantizeRowWeighted(k, x.data(), importance.data(), kN, weighted.data());
    k.quantize(x.data(), kN, plain.data());
    for (kernels::Isa isa : {kernels::Isa::kAvx2, kernels::Isa::kAvx512}) {
      if (kernels::SetIsa(isa) != isa) continue;
      std::vector<uint8_t> simd(weighted.size());
      kernels::QuantizeRowWeighted(k, x.data(), importance.data(), kN, simd.data());
      EXPECT_EQ(simd, weighted) << kernels::IsaName(isa);
    }
    kernels::SetIsa(before);
    std::vector<float> decoded(kN), decoded_plain(kN);
    k.dequantize(weighted.data(), kSuperBlocks, decoded.data());
    k.dequantize(plain.data(), kSuperBlocks, decoded_plain.data());
    double err = 0, err_plain = 0;
    for (int b = 0; b < kSuperBlocks; ++b) {
      std::vector<uint8_t> header(block_bytes);
      kernels::SubBlockGrid grids[16];
      k.fit_header(x.data() + 256 * b, importance.data() + 256 * b, header.data(), grids);
      for (int e = 0; e < 256; ++e) {
        const int i = 256 * b + e;
        const kernels::SubBlockGrid& g = grids[e / k.sub_block];
        const int code = kernels::SubBlockGridCode(x[i], g);
        ASSERT_GE(code, 0);
        ASSERT_LE(code, g.max_code);
        ASSERT_EQ(decoded[i], g.scale * static_cast<float>(code - g.zero) - g.offset) << "super-block " << b << " " << e;
        err += importance[i] * (decoded[i] - x[i]) * (decoded[i] - x[i]);
        err_plain += importance[i] * (decoded_plain[i] - x[i]) * (decoded_plain[i] - x[i]);
      }
    }
    // Measured 0.48 (q4_k) to 0.63 (q6_k).
    EXPECT_LT(err, 0.8 * err_plain) << "weighted " << err << " reference " << err_plain;
  }
  EXPECT_EQ(rows_checked, 5);
}

TEST(GgmlTest, Q4_0HandComputedBlocks) {
  std::vector<float> x(64, 0.0f);
  // Block 0 linear: the largest magnitude is -16, so d = -16 / -8 = 2 and q = trunc((j-16)/2 + 8.5) = (j+1)/2.
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16);
  std::vector<uint8_t> out(36);
  QuantizeRowQ4_0(x.data(), 64, out.data());
  kernels::block_q4_0 b[2];
  std::memcpy(b, out.data(), 36);
  EXPECT_EQ(b[0].d, 0x4000);  // 2.0
  for (int j = 0; j < 16; ++j) {
    const int lo = (j + 1) / 2, hi = std::min(15, (j + 16 + 1) / 2);
    EXPECT_EQ(b[0].qs[j], lo | (hi << 4)) << j;
  }
  // Block 1 all zero: d = 0.0f / -8 = -0.0 (f16 0x8000, as ggml stores it) and every code is trunc(0 + 8.5) = 8.
  EXPECT_EQ(b[1].d, 0x8000);
  for (int j = 0; j < 16; ++j) EXPECT_EQ(b[1].qs[j], 0x88);
}

TEST(GgmlTest, Q4_KHandComputedBlocks) {
  std::vector<float> x(512, 0.0f);
  for (int j = 0; j < 256; ++j) x[j] = 1.0f;
  std::vector<uint8_t> out(288);
  QuantizeRowQ4_K(x.data(), 512, out.data());
  kernels::block_q4_K b[2];
  std::memcpy(b, out.data(), 288);
  // Constant 1: each sub-block fits scale 1/15, min 0 (L = 15); the search cannot improve on an exact fit.
  // Sub-block scales quantize to 63 against d = (1/15)/63; mins are all 0 so dmin = 0.
  EXPECT_EQ(b[0].d, FloatToHalf((1.0f / 15) / 63));
  EXPECT_EQ(b[0].dmin, 0);
  const uint8_t want_scales[12] = {0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0, 0x0F, 0x0F, 0x0F, 0x0F};
  for (int i = 0; i < 12; ++i) EXPECT_EQ(b[0].scales[i], want_scales[i]) << i;
  for (int i = 0; i < 128; ++i) EXPECT_EQ(b[0].qs[i], 0xFF) << i;
  // All zero: everything zero.
  EXPECT_EQ(b[1].d, 0);
  EXPECT_EQ(b[1].dmin, 0);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(b[1].scales[i], 0);
  for (int i = 0; i < 128; ++i) EXPECT_EQ(b[1].qs[i], 0);
}

TEST(GgmlTest, Q4_KShiftedDataUsesMins) {
  // All-positive data away from zero: the min (stored negated) must carry the offset.
  const std::vector<float> w = Gaussian(4 * 256, 17, /*mean=*/-2.0f, 0.2f);
  const Encoded e = Encode("q4_k", {}, w, 4, 256);
  EXPECT_LT(RelError(w, e.decoded), 0.02);
}

// Reads block b's absmax as the kernels reconstruct it.
float StoredNf4Scale(const Tensor& t, const Nf4Layout& l, int64_t b) {
  if (!t.format.double_quant) return kernels::LoadF32(t.data + l.absmax_offset + 4 * b);
  const float s = kernels::LoadF32(t.data + l.dq_scale_offset + 4 * (b / kNf4DoubleQuantGroup));
  const float off = kernels::LoadF32(t.data + l.dq_offset_offset);
  return s * static_cast<float>(static_cast<int8_t>(t.data[l.absmax_offset + b])) + off;
}

TEST(Nf4Test, CodesAreNearestLevel) {
  const int64_t rows = 6, cols = 256;
  const std::vector<float> w = Gaussian(rows * cols, 13);
  for (bool dq : {false, true}) {
    SCOPED_TRACE(dq);
    const Encoded e = Encode("nf4", {4, 64, true, dq}, w, rows, cols);
    const Nf4Layout l = GetNf4Layout(e.tensor.format, rows, cols).value();
    for (int64_t i = 0; i < rows * cols; ++i) {
      const float s = StoredNf4Scale(e.tensor, l, i / 64);
      const uint8_t byte = e.tensor.data[i / 2];
      const int code = (i & 1) ? byte >> 4 : byte & 0xF;
      const float v = w[i] / s;
      for (int k = 0; k < 16; ++k) {
        ASSERT_LE(std::fabs(v - kNf4Levels[code]), std::fabs(v - kNf4Levels[k]) + 1e-6f) << i << " code " << code;
      }
      ASSERT_EQ(e.decoded[i], s * kNf4Levels[code]);
    }
  }
}

TEST(Nf4Test, DoubleQuantBitsPerWeightAndAbsmaxError) {
  const int64_t rows = 1024, cols = 1024;
  const std::vector<float> w = Gaussian(rows * cols, 19);
  const Encoded dq = Encode("nf4", Method("nf4").DefaultParams(), w, rows, cols);
  const double bpw = 8.0 * dq.tensor.nbytes / (rows * cols);
  // 4 + 8/64 + 32/(64*256) + 32/n
  EXPECT_NEAR(bpw, 4.127, 5e-4);
  const Encoded plain = Encode("nf4", {4, 64, true, false}, w, rows, cols);
  EXPECT_DOUBLE_EQ(8.0 * plain.tensor.nbytes / (rows * cols), 4.5);
  const Nf4Layout l = GetNf4Layout(dq.tensor.format, rows, cols).value();
  double max_rel = 0;
  for (int64_t b = 0; b < l.blocks; ++b) {
    float amax = 0;
    for (int64_t i = 0; i < 64; ++i) amax = std::max(amax, std::fabs(w[b * 64 + i]));
    max_rel = std::max(max_rel, std::fabs(StoredNf4Scale(dq.tensor, l, b) - amax) / static_cast<double>(amax));
  }
  EXPECT_LT(max_rel, 0.01);
  // Double quantization barely moves the weight error.
  EXPECT_LT(RelError(w, dq.decoded), RelError(w, plain.decoded) * 1.01);
  EXPECT_LT(RelError(w, dq.decoded), 0.11);
}

TEST(DeterminismTest, SameBytesForAnyThreadCount) {
  const int64_t rows = 301, cols = 256;
  const std::vector<float> w = Gaussian(rows * cols, 23);
  ThreadPool one(1), three(3);
  // Calibration statistics for the methods that need them (the others ignore them).
  calib::StatsAccumulator acc(cols);
  const std::vector<float> x = Gaussian(512 * cols, 24);
  acc.Add(x.data(), 512);
  const calib::LayerStats stats = acc.Finish();
  for (const QuantMethod* m : ListMethods()) {
    SCOPED_TRACE(m->name());
    const QuantParams p = m->DefaultParams();
    auto a = m->Quantize(w.data(), rows, cols, p, nullptr, &stats);
    auto b = m->Quantize(w.data(), rows, cols, p, &one, &stats);
    auto c = m->Quantize(w.data(), rows, cols, p, &three, &stats);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    EXPECT_EQ(*a, *b);
    EXPECT_EQ(*a, *c);
  }
}

TEST(QuantizeModelTest, TinyModelFallsBackFromQ4_K) {
  const Model in = MakeSyntheticModel(TinyTestConfig(), 1);
  ThreadPool pool(2);
  auto r = QuantizeModel(in, {"q4_k", std::nullopt, false}, &pool);
  ASSERT_TRUE(r.ok()) << r.status();
  const auto names = LinearWeightNames(in.config);
  ASSERT_EQ(r->report.tensors.size(), names.size());
  EXPECT_EQ(r->report.fallbacks.size(), names.size());  // dim 64 and hidden 160 are not multiples of 256
  for (const TensorQuantReport& t : r->report.tensors) {
    EXPECT_TRUE(t.fell_back);
    // llama-quantize's fallback for Q4_K: Q5_0 (rows of 64 and 160 are multiples of its 32).
    EXPECT_EQ(t.format, "q5_0");
    EXPECT_THAT(t.fallback_reason, HasSubstr("256"));
    EXPECT_EQ(r->model.tensors.at(t.name).format.type, WeightType::kQ5_0);
    EXPECT_DOUBLE_EQ(t.bits_per_weight, 5.5);
    EXPECT_GT(t.rel_error, 0.0);
    EXPECT_LT(t.rel_error, 0.2);
  }
  EXPECT_EQ(r->model.tensors.at(names::kTokenEmbd).format.type, WeightType::kF32);
  EXPECT_EQ(r->model.tensors.at(names::AttnNorm(0)).format.type, WeightType::kF32);
  EXPECT_EQ(r->model.metadata.at("quant.method"), "q4_k");
  EXPECT_TRUE(ValidateModel(r->model).ok());
  const std::string text = FormatReport(r->report);
  EXPECT_THAT(text, HasSubstr("blk.0.attn_q.weight"));
  EXPECT_THAT(text, HasSubstr("fallback"));
}

// An expert whose statistics were completed from its layer's pool (calib/collect.h) says so in the report.
TEST(QuantizeModelTest, PooledExpertCalibrationIsReported) {
  const int64_t rows = 8, cols = 32;
  std::vector<float> w(static_cast<size_t>(rows * cols));
  for (size_t i = 0; i < w.size(); ++i) w[i] = std::sin(0.37 * static_cast<double>(i));
  calib::LayerStats stats;
  stats.cols = cols;
  stats.tokens = cols;
  stats.pooled_tokens = cols - 5;
  stats.hessian.assign(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) stats.hessian[i * cols + i] = 1.0 + 0.1 * static_cast<double>(i);
  stats.mean_abs.assign(static_cast<size_t>(cols), 1.0);
  stats.max_abs.assign(static_cast<size_t>(cols), 2.0);
  const Tensor t = Tensor::FromFloats("blk.0.ffn_down.3.weight", {rows, cols}, w);
  QuantReport report;
  report.tensors.resize(2);
  ASSERT_TRUE(QuantizeTensor(t, *FindMethod("gptq"), QuantParams{4, 32, true, false}, nullptr, &report.tensors[0],
                             &stats)
                  .ok());
  EXPECT_EQ(report.tensors[0].calib_tokens, cols);
  EXPECT_EQ(report.tensors[0].calib_pooled_tokens, cols - 5);
  stats.pooled_tokens = cols;  // no token routed at all
  ASSERT_TRUE(QuantizeTensor(Tensor::FromFloats("blk.0.ffn_down.4.weight", {rows, cols}, w), *FindMethod("gptq"),
                             QuantParams{4, 32, true, false}, nullptr, &report.tensors[1], &stats)
                  .ok());
  const std::string text = FormatReport(report);
  EXPECT_THAT(text, HasSubstr("pooled calibration: blk.0.ffn_down.3.weight: 5 of 32 tokens routed to it"));
  EXPECT_THAT(text, HasSubstr("pooled calibration: blk.0.ffn_down.4.weight: no token was routed to it"));
  // A method that reads no statistics reports none.
  TensorQuantReport rtn;
  ASSERT_TRUE(QuantizeTensor(t, *FindMethod("rtn"), QuantParams{4, 32, true, false}, nullptr, &rtn, &stats).ok());
  EXPECT_EQ(rtn.calib_pooled_tokens, 0);
}

TEST(QuantizeModelTest, RtnGroupFallsBackToPerChannel) {
  const Model in = MakeSyntheticModel(TinyTestConfig(), 2);
  auto r = QuantizeModel(in, {"rtn", QuantParams{4, 128, false, false}, false}, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const TensorQuantReport& t : r->report.tensors) {
    EXPECT_EQ(t.format, "qint4_pc_asym") << t.name;
    EXPECT_THAT(t.fallback_reason, HasSubstr("group 128"));
  }
  // group 32 divides 64 and 160: no fallback.
  r = QuantizeModel(in, {"rtn", QuantParams{4, 32, true, false}, false}, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->report.fallbacks.empty());
  EXPECT_EQ(r->report.tensors[0].format, "qint4_g32_sym");
}

TEST(QuantizeModelTest, Q4kModelQuantizesEverythingIncludingEmbeddings) {
  const Model in = MakeSyntheticModel(Q4kTestConfig(), 3);
  ThreadPool pool(2);
  auto r = QuantizeModel(in, {"q4_k", std::nullopt, true}, &pool);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->report.fallbacks.empty());
  EXPECT_EQ(r->report.tensors.size(), LinearWeightNames(in.config).size() + (in.Find(names::kOutput) ? 2 : 1));
  for (const TensorQuantReport& t : r->report.tensors) {
    EXPECT_EQ(t.format, "q4_k") << t.name;
    EXPECT_DOUBLE_EQ(t.bits_per_weight, 4.5);
    EXPECT_LT(t.rel_error, 0.12);
    EXPECT_EQ(t.bytes_f32, 2 * t.bytes_f16);
  }
  EXPECT_EQ(r->model.tensors.at(names::kTokenEmbd).format.type, WeightType::kQ4_K);
  EXPECT_DOUBLE_EQ(r->report.bits_per_weight, 4.5);
  EXPECT_LT(r->report.model_bytes_after, r->report.model_bytes_before / 6);
  EXPECT_GT(r->report.rmse, 0.0);
}

TEST(QuantizeModelTest, DeterministicAcrossThreadCounts) {
  const Model in = MakeSyntheticModel(Q4kTestConfig(), 4);
  ThreadPool three(3);
  for (const std::string method : {"nf4", "q4_k", "rtn"}) {
    auto a = QuantizeModel(in, {method, std::nullopt, false}, nullptr);
    auto b = QuantizeModel(in, {method, std::nullopt, false}, &three);
    ASSERT_TRUE(a.ok() && b.ok());
    for (const auto& [name, t] : a->model.tensors) {
      const Tensor& u = b->model.tensors.at(name);
      ASSERT_EQ(t.nbytes, u.nbytes) << name;
      EXPECT_EQ(std::memcmp(t.data, u.data, t.nbytes), 0) << method << " " << name;
    }
    EXPECT_EQ(a->report.rmse, b->report.rmse);
  }
}

TEST(QuantizeModelTest, Nf4ReportCountsSecondLevelScales) {
  const Model in = MakeSyntheticModel(Q4kTestConfig(), 5);
  auto r = QuantizeModel(in, {"nf4", std::nullopt, false}, nullptr);
  ASSERT_TRUE(r.ok()) << r.status();
  for (const TensorQuantReport& t : r->report.tensors) {
    EXPECT_EQ(t.format, "nf4_b64_dq");
    // 4 + 8/64 + 32*ceil(blocks/256)/n + 32/n: above 4.125 by the f32 second-level scales.
    EXPECT_GT(t.bits_per_weight, 4.125);
    EXPECT_LT(t.bits_per_weight, 4.14);
  }
  EXPECT_EQ(r->model.metadata.at("quant.params"), "bits=4 group=64 sym dq");
}

TEST(QuantizeModelTest, RejectsUnknownMethodAndBadParams) {
  const Model in = MakeSyntheticModel(TinyTestConfig(), 6);
  auto r = QuantizeModel(in, {"awq-someday", std::nullopt, false}, nullptr);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("unknown quantization method"));
  r = QuantizeModel(in, {"rtn", QuantParams{9, 32, true, false}, false}, nullptr);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("bits"));
}

}  // namespace
}  // namespace qforge::quant
