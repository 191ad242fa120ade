// Scalar reference of the integer dot products (int_dot.h): the definition every SIMD path reproduces bit for
// bit. Plain loops over the documented formulas.
#include <cmath>
#include <cstring>

#include "core/base/half.h"
#include "core/kernels/ggml_kernels.h"
#include "core/kernels/int_dot.h"
#include "core/kernels/kernels_internal.h"

namespace qforge::kernels::internal {
namespace {

size_t Align32(size_t n) { return (n + 31) / 32 * 32; }

// Round half to even, as _mm256_round_ps(.., _MM_FROUND_TO_NEAREST_INT) and ggml's nearest_int do.
int RoundEven(float v) { return static_cast<int>(std::nearbyint(v)); }

void QuantizeQ8_0Block(const float* x, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int j = 0; j < kQK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
  *d = HalfToFloat(FloatToHalf(amax / 127.0f));
  const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
  for (int j = 0; j < kQK8_0; ++j) q[j] = static_cast<int8_t>(RoundEven(x[j] * id));
}

void QuantizeQ8_KBlock(const float* x, int8_t* q, float* d) {
  const float vmax = SignedAbsMax(x, kQK_K);
  if (vmax == 0.0f) {
    std::memset(q, 0, kQK_K);
    *d = 0.0f;
    return;
  }
  const float iscale = -127.0f / vmax;
  for (int j = 0; j < kQK_K; ++j) q[j] = static_cast<int8_t>(std::min(127, RoundEven(iscale * x[j])));
  *d = 1.0f / iscale;
}

// The 4-bit code of element j (0..31) of a Q4_0 block: j in the low nibble of qs[j], j + 16 in the high one.
int Q4_0Code(const block_q4_0& b, int j) { return j < 16 ? b.qs[j] & 0xF : b.qs[j - 16] >> 4; }

}  // namespace

ActRowLayout GetActRowLayout(ActType t, int64_t cols) {
  ActRowLayout l;
  l.codes = 0;
  l.scales = Align32(static_cast<size_t>(cols));
  l.sums = l.scales + Align32(sizeof(float) * static_cast<size_t>(cols / ActBlock(t)));
  l.bytes = l.sums + Align32(sizeof(int32_t) * static_cast<size_t>(cols / 32));
  return l;
}

void QuantizeActScalar(ActType t, const float* x, int64_t cols, uint8_t* row) {
  const ActRowLayout l = GetActRowLayout(t, cols);
  auto* q = reinterpret_cast<int8_t*>(row + l.codes);
  auto* d = reinterpret_cast<float*>(row + l.scales);
  auto* sums = reinterpret_cast<int32_t*>(row + l.sums);
  const int block = ActBlock(t);
  for (int64_t b = 0; b < cols / block; ++b) {
    if (t == ActType::kQ8_0) QuantizeQ8_0Block(x + b * block, q + b * block, d + b);
    else QuantizeQ8_KBlock(x + b * block, q + b * block, d + b);
  }
  for (int64_t b = 0; b < cols / 32; ++b) {
    int32_t s = 0;
    for (int j = 0; j < 32; ++j) s += q[32 * b + j];
    sums[b] = s;
  }
}

void IntMatMulScalar(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                     int64_t y_stride) {
  for (int64_t t = 0; t < n; ++t) {
    const uint8_t* arow = a.data + static_cast<size_t>(t) * a.row_bytes;
    const auto* aq = reinterpret_cast<const int8_t*>(arow + a.layout.codes);
    const auto* ad = reinterpret_cast<const float*>(arow + a.layout.scales);
    const auto* asum = reinterpret_cast<const int32_t*>(arow + a.layout.sums);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = w.data + static_cast<size_t>(r) * w.row_bytes;
      float acc = 0.0f;
      switch (w.format.type) {
        case WeightType::kQ8_0: {
          const auto* blocks = reinterpret_cast<const block_q8_0*>(row);
          for (int64_t b = 0; b < w.cols / kQK8_0; ++b) {
            int32_t s = 0;
            for (int j = 0; j < kQK8_0; ++j) s += blocks[b].qs[j] * aq[kQK8_0 * b + j];
            acc = std::fma(LoadHalf(&blocks[b].d) * ad[b], static_cast<float>(s), acc);
          }
          break;
        }
        case WeightType::kQ4_0: {
          const auto* blocks = reinterpret_cast<const block_q4_0*>(row);
          for (int64_t b = 0; b < w.cols / kQK4_0; ++b) {
            int32_t s = 0;
            for (int j = 0; j < kQK4_0; ++j) s += Q4_0Code(blocks[b], j) * aq[kQK4_0 * b + j];
            s -= 8 * asum[b];
            acc = std::fma(LoadHalf(&blocks[b].d) * ad[b], static_cast<float>(s), acc);
          }
          break;
        }
        case WeightType::kQ4_K: {
          const auto* blocks = reinterpret_cast<const block_q4_K*>(row);
          for (int64_t b = 0; b < w.cols / kQK_K; ++b) {
            const block_q4_K& k = blocks[b];
            const int8_t* x = aq + kQK_K * b;
            int32_t t1 = 0, t2 = 0;
            for (int j = 0; j < 8; ++j) {
              uint8_t sc, m;
              GetScaleMinK4(j, k.scales, &sc, &m);
              const uint8_t* q = k.qs + 32 * (j / 2);
              int32_t s = 0;
              for (int l = 0; l < 32; ++l) s += ((j % 2 == 0) ? (q[l] & 0xF) : (q[l] >> 4)) * x[32 * j + l];
              t1 += sc * s;
              t2 += m * asum[8 * b + j];
            }
            const float dd = LoadHalf(&k.d) * ad[b];
            const float dm = -(LoadHalf(&k.dmin) * ad[b]);
            acc = std::fma(dm, static_cast<float>(t2), std::fma(dd, static_cast<float>(t1), acc));
          }
          break;
        }
        default:
          break;  // HasIntDot() keeps every other type off this path
      }
      y[t * y_stride + r] = acc;
    }
  }
}

}  // namespace qforge::kernels::internal
