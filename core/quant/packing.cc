#include "core/quant/packing.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/kernels.h"

namespace qforge::quant {
namespace {

using kernels::block_q4_0;
using kernels::block_q4_K;
using kernels::block_q8_0;

// ggml's nearest_int: round half to even (the default FP rounding mode), as lrintf does.
// Round half to even, as lrintf in the default rounding mode, without a library call: adding 1.5 * 2^23 leaves
// the rounded integer in the low mantissa bits (exact for |v| < 2^22, the range every caller stays in).
inline int NearestInt(float v) {
  if (!(std::fabs(v) < 4194304.0f)) return static_cast<int>(std::lrintf(v));
  const float shifted = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  return (bits & 0x007fffff) - 0x00400000;
}

void StoreHalf(uint16_t* dst, float v) { *dst = FloatToHalf(v); }

// ggml's make_qkx2_quants: fits x ~ scale * L + min (min <= 0) over n elements with per-element
// weights, trying nstep+1 candidate scales around nmax/(max-min) and keeping the least weighted squared
// error of a least-squares refit. Returns the scale; *neg_min receives -min.
float FitScaleMin(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* neg_min, uint8_t* Laux,
                  float rmin, float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    min = std::min(min, x[i]);
    max = std::max(max, x[i]);
    sum_w += weights[i];
    sum_x += weights[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    std::fill(L, L + n, 0);
    *neg_min = -min;
    return 0.0f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(std::clamp(NearestInt(iscale * (x[i] - min)), 0, nmax));
    const float diff = scale * L[i] + min - x[i];
    best_error += weights[i] * (diff * diff);
  }
  for (int step = 0; step <= nstep; ++step) {
    iscale = (rmin + rdelta * step + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::clamp(NearestInt(iscale * (x[i] - min)), 0, nmax);
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * l;
      sum_l2 += w * l * l;
      sum_xl += w * l * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float error = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * Laux[i] + this_min - x[i];
        error += weights[i] * (diff * diff);
      }
      if (error < best_error) {
        std::copy(Laux, Laux + n, L);
        best_error = error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *neg_min = -min;
  return scale;
}

}  // namespace

namespace {

// QuantizeRowQ8_0 with AVX2: the same bytes (max by vector max, x * id as one multiply, roundf's half-away-from-
// zero rebuilt from the hardware's half-to-even by fixing exact ties).
__attribute__((target("avx2,f16c"))) void QuantizeRowQ8_0Avx2(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q8_0*>(out);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  for (int64_t b = 0; b < n / kernels::kQK8_0; ++b, x += kernels::kQK8_0) {
    __m256 v[4];
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      m = _mm256_max_ps(m, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const float d = amax / 127;
    const __m256 id = _mm256_set1_ps(d != 0 ? 1.0f / d : 0.0f);
    block_q8_0 blk;
    StoreHalf(&blk.d, d);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      const __m256 y = _mm256_mul_ps(v[i], id);
      __m256 r = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      // A tie rounded toward zero (2.5 -> 2, -2.5 -> -2) moves one step away from it.
      const __m256 diff = _mm256_sub_ps(y, r);  // exact: |y| <= 127
      const __m256 zero = _mm256_setzero_ps();
      const __m256 up = _mm256_and_ps(_mm256_cmp_ps(diff, half, _CMP_EQ_OQ), _mm256_cmp_ps(y, zero, _CMP_GT_OQ));
      const __m256 down = _mm256_and_ps(_mm256_cmp_ps(diff, _mm256_sub_ps(zero, half), _CMP_EQ_OQ),
                                        _mm256_cmp_ps(y, zero, _CMP_LT_OQ));
      r = _mm256_sub_ps(_mm256_add_ps(r, _mm256_and_ps(up, one)), _mm256_and_ps(down, one));
      q[i] = _mm256_cvtps_epi32(r);
    }
    const __m256i p = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(blk.qs), p);
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

}  // namespace

void QuantizeRowQ8_0(const float* x, int64_t n, uint8_t* out) {
  if (kernels::DetectIsa() >= kernels::Isa::kAvx2) return QuantizeRowQ8_0Avx2(x, n, out);
  QuantizeRowQ8_0Scalar(x, n, out);
}

void QuantizeRowQ8_0Scalar(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q8_0*>(out);
  for (int64_t b = 0; b < n / kernels::kQK8_0; ++b, x += kernels::kQK8_0) {
    float amax = 0;
    for (int j = 0; j < kernels::kQK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q8_0 blk;
    StoreHalf(&blk.d, d);
    for (int j = 0; j < kernels::kQK8_0; ++j) blk.qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

void QuantizeRowQ4_0(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q4_0*>(out);
  constexpr int kHalf = kernels::kQK4_0 / 2;
  for (int64_t b = 0; b < n / kernels::kQK4_0; ++b, x += kernels::kQK4_0) {
    // The signed value of largest magnitude maps to code 0 (q = -8), so its sign picks d's sign.
    float amax = 0, max = 0;
    for (int j = 0; j < kernels::kQK4_0; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q4_0 blk;
    StoreHalf(&blk.d, d);
    for (int j = 0; j < kHalf; ++j) {
      // Truncation of (v + 8.5) is ggml's rounding; v >= -8 keeps the sum non-negative.
      const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
      const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + kHalf] * id + 8.5f)));
      blk.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

void QuantizeRowQ4_K(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q4_K*>(out);
  uint8_t L[kernels::kQK_K];
  uint8_t Laux[32];
  float weights[32];
  float mins[8], scales[8];
  for (int64_t b = 0; b < n / kernels::kQK_K; ++b, x += kernels::kQK_K) {
    block_q4_K blk;
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
      const float* xs = x + 32 * j;
      // Weights favour large magnitudes: av_x (the sub-block's RMS) + |x|.
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
      const float av_x = std::sqrt(sum_x2 / 32);
      for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
      scales[j] = FitScaleMin(32, 15, xs, weights, L + 32 * j, &mins[j], Laux, -1.0f, 0.1f, 20);
      max_scale = std::max(max_scale, scales[j]);
      max_min = std::max(max_min, mins[j]);
    }
    // 6-bit scales and mins relative to the super-block's d and dmin.
    const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
    const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
    for (int j = 0; j < 8; ++j) {
      uint8_t ls = static_cast<uint8_t>(NearestInt(inv_scale * scales[j]));
      uint8_t lm = static_cast<uint8_t>(NearestInt(inv_min * mins[j]));
      ls = std::min<uint8_t>(63, ls);
      lm = std::min<uint8_t>(63, lm);
      if (j < 4) {
        blk.scales[j] = ls;
        blk.scales[j + 4] = lm;
      } else {
        blk.scales[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
        blk.scales[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
        blk.scales[j] |= static_cast<uint8_t>((lm >> 4) << 6);
      }
    }
    StoreHalf(&blk.d, max_scale / 63.0f);
    StoreHalf(&blk.dmin, max_min / 63.0f);
    // Requantize against the scales actually stored.
    const float d_stored = HalfToFloat(blk.d);
    const float dmin_stored = HalfToFloat(blk.dmin);
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      kernels::GetScaleMinK4(j, blk.scales, &sc, &m);
      const float d = d_stored * sc;
      if (d == 0) continue;
      const float dm = dmin_stored * m;
      for (int l = 0; l < 32; ++l) {
        L[32 * j + l] = static_cast<uint8_t>(std::clamp(NearestInt((x[32 * j + l] + dm) / d), 0, 15));
      }
    }
    for (int chunk = 0; chunk < 4; ++chunk) {
      for (int l = 0; l < 32; ++l) {
        blk.qs[32 * chunk + l] = static_cast<uint8_t>(L[64 * chunk + l] | (L[64 * chunk + 32 + l] << 4));
      }
    }
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

QIntGrid ChooseQIntGrid(const float* xg, int64_t n, int bits, bool symmetric) {
  const int levels = (1 << bits) - 1;
  constexpr float kMaxHalf = 65504.0f;  // scales beyond f16 range saturate instead of becoming inf
  float range_min = 0;
  float scale_f32;
  if (symmetric) {
    float amax = 0;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(xg[i]));
    scale_f32 = amax / static_cast<float>((1 << (bits - 1)) - 1);
  } else {
    float mx = 0;  // the range always contains 0, so the zero point fits in [0, 2^bits - 1]
    for (int64_t i = 0; i < n; ++i) {
      range_min = std::min(range_min, xg[i]);
      mx = std::max(mx, xg[i]);
    }
    scale_f32 = (mx - range_min) / static_cast<float>(levels);
  }
  QIntGrid g;
  g.max_code = levels;
  g.scale_half = FloatToHalf(std::min(scale_f32, kMaxHalf));
  g.scale = HalfToFloat(g.scale_half);
  g.zero = symmetric     ? 1 << (bits - 1)
           : g.scale > 0 ? std::clamp(static_cast<int>(std::nearbyint(-range_min / g.scale)), 0, levels)
                         : 0;
  return g;
}

namespace {
inline void PutCode(uint8_t* row_codes, int64_t c, int bits, uint32_t code) {
  const int64_t bit = c * bits;
  const uint32_t shifted = code << (bit & 7);
  row_codes[bit >> 3] |= static_cast<uint8_t>(shifted);
  if ((bit & 7) + bits > 8) row_codes[(bit >> 3) + 1] |= static_cast<uint8_t>(shifted >> 8);
}
}  // namespace

void QuantizeRowQInt(const float* x, int64_t r, int64_t cols, const WeightFormat& f, const QIntLayout& l,
                     uint8_t* tensor_bytes) {
  const int bits = f.bits;
  uint8_t* codes = tensor_bytes + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
  uint8_t* scales = tensor_bytes + l.scales_offset + 2 * static_cast<size_t>(r * l.groups_per_row);
  uint8_t* zeros = f.symmetric ? nullptr : tensor_bytes + l.zeros_offset + static_cast<size_t>(r * l.groups_per_row);
  for (int64_t g = 0; g < l.groups_per_row; ++g) {
    const float* xg = x + g * l.group;
    const QIntGrid grid = ChooseQIntGrid(xg, l.group, bits, f.symmetric);
    std::memcpy(scales + 2 * g, &grid.scale_half, 2);
    if (zeros) zeros[g] = static_cast<uint8_t>(grid.zero);
    const float s = grid.scale;
    for (int64_t i = 0; i < l.group; ++i) {
      const int q = s > 0 ? static_cast<int>(std::nearbyint(xg[i] / s)) + grid.zero : grid.zero;
      PutCode(codes, g * l.group + i, bits, static_cast<uint32_t>(std::clamp(q, 0, grid.max_code)));
    }
  }
}

void PackQInt(const uint8_t* codes, const uint16_t* scales, const uint8_t* zeros, int64_t rows, int64_t cols,
              const WeightFormat& f, const QIntLayout& l, uint8_t* tensor_bytes) {
  const size_t groups = static_cast<size_t>(rows * l.groups_per_row);
  std::memcpy(tensor_bytes + l.scales_offset, scales, 2 * groups);
  if (!f.symmetric) std::memcpy(tensor_bytes + l.zeros_offset, zeros, groups);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row_codes = tensor_bytes + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
    for (int64_t c = 0; c < cols; ++c) PutCode(row_codes, c, f.bits, codes[r * cols + c]);
  }
}

int Nf4NearestCode(float v) {
  // Levels ascend, so the nearest one is found by comparing against the midpoints between neighbours.
  int code = 0;
  for (int k = 1; k < 16; ++k) {
    if (v > 0.5f * (kNf4Levels[k - 1] + kNf4Levels[k])) code = k;
  }
  return code;
}

void EncodeNf4Block(const float* x, int64_t n, float scale, uint8_t* codes) {
  constexpr int kZeroCode = 7;
  for (int64_t i = 0; i < n; i += 2) {
    const int lo = scale != 0 ? Nf4NearestCode(x[i] / scale) : kZeroCode;
    const int hi = scale != 0 ? Nf4NearestCode(x[i + 1] / scale) : kZeroCode;
    codes[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
  }
}

void DoubleQuantizeAbsmax(const float* absmax, int64_t blocks, int8_t* q, float* dq_scale, float* dq_offset) {
  double sum = 0;
  for (int64_t b = 0; b < blocks; ++b) sum += absmax[b];
  const float offset = blocks > 0 ? static_cast<float>(sum / static_cast<double>(blocks)) : 0.0f;
  *dq_offset = offset;
  for (int64_t g0 = 0, gi = 0; g0 < blocks; g0 += kNf4DoubleQuantGroup, ++gi) {
    const int64_t g1 = std::min<int64_t>(blocks, g0 + kNf4DoubleQuantGroup);
    float m = 0;
    for (int64_t b = g0; b < g1; ++b) m = std::max(m, std::fabs(absmax[b] - offset));
    const float scale = m / 127.0f;
    dq_scale[gi] = scale;
    for (int64_t b = g0; b < g1; ++b) {
      const int v = scale > 0 ? static_cast<int>(std::nearbyint((absmax[b] - offset) / scale)) : 0;
      q[b] = static_cast<int8_t>(std::clamp(v, -127, 127));
    }
  }
}

}  // namespace qforge::quant
