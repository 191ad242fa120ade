// The ggml encoders: fp32 rows into ggml blocks, bit-exact with ggml's reference quantizers (ggml_kernels.h).
#include "core/kernels/ggml_kernels.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/iq_grids.h"
#include "core/kernels/kernels.h"
#include "core/model/ggml_types.h"

namespace qforge::kernels {
namespace {

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
// use_mad: the error is the weighted absolute difference instead of the squared one (Q2_K's choice).
float FitScaleMin(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* neg_min, uint8_t* Laux,
                  float rmin, float rdelta, int nstep, bool use_mad = false) {
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
    best_error += weights[i] * (use_mad ? std::fabs(diff) : diff * diff);
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
        error += weights[i] * (use_mad ? std::fabs(diff) : diff * diff);
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

// Q4_K / Q5_K's importance of each weight in its sub-block's fit: the sub-block's RMS plus |x|.
void RmsPlusAbsWeights(const float* x, int n, float* weights) {
  float sum_x2 = 0;
  for (int l = 0; l < n; ++l) sum_x2 += x[l] * x[l];
  const float rms = std::sqrt(sum_x2 / static_cast<float>(n));
  for (int l = 0; l < n; ++l) weights[l] = rms + std::fabs(x[l]);
}

// FitScaleMin8Avx2's per-element steps: the code clamp(NearestInt(iscale * (x - min)), 0, nmax) as a float
// (NearestInt's rounding is the hardware's, half to even, for every value a fit produces), and w * |diff| or
// w * diff².
__attribute__((target("avx2"), always_inline)) inline __m256 FitCode8(__m256 iscale, __m256 x, __m256 min,
                                                                      __m256i code_max) {
  const __m256i l = _mm256_cvtps_epi32(_mm256_mul_ps(iscale, _mm256_sub_ps(x, min)));
  return _mm256_cvtepi32_ps(_mm256_min_epi32(_mm256_max_epi32(l, _mm256_setzero_si256()), code_max));
}
__attribute__((target("avx2"), always_inline)) inline __m256 FitWeighted8(__m256 diff, __m256 w, bool use_mad) {
  return _mm256_mul_ps(w, use_mad ? _mm256_andnot_ps(_mm256_set1_ps(-0.0f), diff) : _mm256_mul_ps(diff, diff));
}

// Eight FitScaleMin fits at once, fit k in lane k of AVX2 vectors: xs[k] and ws[k] are its n <= 32 values and
// weights (ws == nullptr: RmsPlusAbsWeights of its values), and it returns scale[k], neg_min[k] and L[k][0, n).
// Each lane runs the scalar function's float operations in its order (no FMA: the library is built without
// contraction), so every fit's bytes are the scalar ones; the candidates' sums cost one pass for eight sub-blocks
// instead of eight. Lanes past `count` repeat fit 0 and are dropped.
__attribute__((target("avx2"))) void FitScaleMin8Avx2(int count, int n, int nmax, const float* const* xs,
                                                       const float* const* ws, uint8_t* const* L, float* scale_out,
                                                       float* neg_min_out, float rmin, float rdelta, int nstep,
                                                       bool use_mad) {
  __m256 x[32], w[32];
  for (int i = 0; i < n; ++i) {
    alignas(32) float t[8];
    for (int k = 0; k < 8; ++k) t[k] = xs[k < count ? k : 0][i];
    x[i] = _mm256_load_ps(t);
    if (ws != nullptr) {
      for (int k = 0; k < 8; ++k) t[k] = ws[k < count ? k : 0][i];
      w[i] = _mm256_load_ps(t);
    }
  }
  if (ws == nullptr) {  // RmsPlusAbsWeights, lane by lane
    __m256 sum_x2 = _mm256_mul_ps(x[0], x[0]);
    for (int i = 1; i < n; ++i) sum_x2 = _mm256_add_ps(sum_x2, _mm256_mul_ps(x[i], x[i]));
    const __m256 rms = _mm256_sqrt_ps(_mm256_div_ps(sum_x2, _mm256_set1_ps(static_cast<float>(n))));
    for (int i = 0; i < n; ++i) w[i] = _mm256_add_ps(rms, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x[i]));
  }
  // std::min(a, b) is (b < a ? b : a), which minps(b, a) is; the same for max.
  __m256 min = x[0], max = x[0], sum_w = w[0], sum_x = _mm256_mul_ps(w[0], x[0]);
  for (int i = 1; i < n; ++i) {
    min = _mm256_min_ps(x[i], min);
    max = _mm256_max_ps(x[i], max);
    sum_w = _mm256_add_ps(sum_w, w[i]);
    sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(w[i], x[i]));
  }
  const __m256 zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
  min = _mm256_blendv_ps(min, zero, _mm256_cmp_ps(min, zero, _CMP_GT_OQ));
  const __m256 flat = _mm256_cmp_ps(max, min, _CMP_EQ_OQ);
  const __m256i code_max = _mm256_set1_epi32(nmax);
  __m256 iscale = _mm256_div_ps(_mm256_set1_ps(static_cast<float>(nmax)), _mm256_sub_ps(max, min));
  __m256 scale = _mm256_div_ps(_mm256_set1_ps(1.0f), iscale);
  __m256 best[32], aux[32];
  __m256 best_error = zero;
  for (int i = 0; i < n; ++i) {
    best[i] = FitCode8(iscale, x[i], min, code_max);
    const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, best[i]), min), x[i]);
    best_error = _mm256_add_ps(best_error, FitWeighted8(diff, w[i], use_mad));
  }
  for (int step = 0; step <= nstep; ++step) {
    // The scalar function's candidate, (rmin + rdelta * step + nmax) / (max - min), with min as updated so far.
    const float numerator = rmin + rdelta * static_cast<float>(step) + static_cast<float>(nmax);
    iscale = _mm256_div_ps(_mm256_set1_ps(numerator), _mm256_sub_ps(max, min));
    __m256 sum_l = zero, sum_l2 = zero, sum_xl = zero;
    for (int i = 0; i < n; ++i) {
      aux[i] = FitCode8(iscale, x[i], min, code_max);
      const __m256 wl = _mm256_mul_ps(w[i], aux[i]);
      sum_l = _mm256_add_ps(sum_l, wl);
      sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, aux[i]));
      sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, x[i]));
    }
    const __m256 D = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
    const __m256 solvable = _mm256_andnot_ps(flat, _mm256_cmp_ps(D, zero, _CMP_GT_OQ));
    if (_mm256_movemask_ps(solvable) == 0) continue;
    __m256 this_scale = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)), D);
    __m256 this_min = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)), D);
    const __m256 positive_min = _mm256_cmp_ps(this_min, zero, _CMP_GT_OQ);
    this_min = _mm256_blendv_ps(this_min, zero, positive_min);
    this_scale = _mm256_blendv_ps(this_scale, _mm256_div_ps(sum_xl, sum_l2), positive_min);
    __m256 error = zero;
    for (int i = 0; i < n; ++i) {
      const __m256 diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale, aux[i]), this_min), x[i]);
      error = _mm256_add_ps(error, FitWeighted8(diff, w[i], use_mad));
    }
    const __m256 better = _mm256_and_ps(solvable, _mm256_cmp_ps(error, best_error, _CMP_LT_OQ));
    if (_mm256_movemask_ps(better) == 0) continue;
    best_error = _mm256_blendv_ps(best_error, error, better);
    scale = _mm256_blendv_ps(scale, this_scale, better);
    min = _mm256_blendv_ps(min, this_min, better);
    for (int i = 0; i < n; ++i) best[i] = _mm256_blendv_ps(best[i], aux[i], better);
  }
  // A flat fit (max == min) has all codes 0 and scale 0; -min flips the sign bit, as the scalar negation does.
  scale = _mm256_andnot_ps(flat, scale);
  alignas(32) float scales[8], neg_mins[8], codes[32][8];
  _mm256_store_ps(scales, scale);
  _mm256_store_ps(neg_mins, _mm256_xor_ps(min, sign));
  for (int i = 0; i < n; ++i) _mm256_store_ps(codes[i], _mm256_andnot_ps(flat, best[i]));
  for (int k = 0; k < count; ++k) {
    scale_out[k] = scales[k];
    neg_min_out[k] = neg_mins[k];
    for (int i = 0; i < n; ++i) L[k][i] = static_cast<uint8_t>(codes[i][k]);
  }
}

// `count` FitScaleMin fits (count <= 8, n <= 32): with AVX2 where the kernels run it, else one by one; the same
// bytes. ws == nullptr: each fit's weights are RmsPlusAbsWeights of its values.
void FitScaleMinMany(int count, int n, int nmax, const float* const* xs, const float* const* ws, uint8_t* const* L,
                     float* scale, float* neg_min, float rmin, float rdelta, int nstep, bool use_mad = false) {
  if (ActiveIsa() >= Isa::kAvx2) {
    FitScaleMin8Avx2(count, n, nmax, xs, ws, L, scale, neg_min, rmin, rdelta, nstep, use_mad);
    return;
  }
  uint8_t aux[32];
  float weights[32];
  for (int k = 0; k < count; ++k) {
    const float* w = ws != nullptr ? ws[k] : weights;
    if (ws == nullptr) RmsPlusAbsWeights(xs[k], n, weights);
    scale[k] = FitScaleMin(n, nmax, xs[k], w, L[k], &neg_min[k], aux, rmin, rdelta, nstep, use_mad);
  }
}

// clamp(NearestInt((x[i] + dm) / d), 0, nmax) for i < 32: a sub-block's codes against its stored scale and min.
void RequantizeSubBlock(const float* x, float d, float dm, int nmax, uint8_t* L) {
  for (int l = 0; l < 32; ++l) L[l] = static_cast<uint8_t>(std::clamp(NearestInt((x[l] + dm) / d), 0, nmax));
}

// RequantizeSubBlock with AVX2: the same sums and one correctly rounded division per element.
__attribute__((target("avx2"))) void RequantizeSubBlockAvx2(const float* x, float d, float dm, int nmax, uint8_t* L) {
  const __m256 dv = _mm256_set1_ps(d), dmv = _mm256_set1_ps(dm);
  const __m256i code_max = _mm256_set1_epi32(nmax);
  alignas(32) int32_t codes[32];
  for (int l = 0; l < 32; l += 8) {
    const __m256i c = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_add_ps(_mm256_loadu_ps(x + l), dmv), dv));
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes + l),
                       _mm256_min_epi32(_mm256_max_epi32(c, _mm256_setzero_si256()), code_max));
  }
  for (int l = 0; l < 32; ++l) L[l] = static_cast<uint8_t>(codes[l]);
}

}  // namespace

void PackScaleMinK4(int j, uint8_t ls, uint8_t lm, uint8_t* scales) {
  if (j < 4) {
    scales[j] = ls;
    scales[j + 4] = lm;
  } else {
    scales[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    scales[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
    scales[j] |= static_cast<uint8_t>((lm >> 4) << 6);
  }
}

namespace {

// QuantizeRowQ8_0 with AVX2: the same bytes (max by vector max, x * id as one multiply, roundf's half-away-from-
// zero rebuilt from the hardware's half-to-even by fixing exact ties).
__attribute__((target("avx2,f16c"))) void QuantizeRowQ8_0Avx2(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q8_0*>(out);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  for (int64_t b = 0; b < n / kQK8_0; ++b, x += kQK8_0) {
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
  if (DetectIsa() >= Isa::kAvx2) return QuantizeRowQ8_0Avx2(x, n, out);
  QuantizeRowQ8_0Scalar(x, n, out);
}

void QuantizeRowQ8_0Scalar(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q8_0*>(out);
  for (int64_t b = 0; b < n / kQK8_0; ++b, x += kQK8_0) {
    float amax = 0;
    for (int j = 0; j < kQK8_0; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q8_0 blk;
    StoreHalf(&blk.d, d);
    for (int j = 0; j < kQK8_0; ++j) blk.qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

void QuantizeRowQ4_0(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q4_0*>(out);
  constexpr int kHalf = kQK4_0 / 2;
  for (int64_t b = 0; b < n / kQK4_0; ++b, x += kQK4_0) {
    // The signed value of largest magnitude maps to code 0 (q = -8), so its sign picks d's sign.
    const float d = SignedAbsMax(x, kQK4_0) / -8;
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

namespace {

// The K-quant code layout shared by Q2_K and Q3_K (2 bits of each element): element j + 32 k of each 128-element
// half lands in bits [2k, 2k+2) of qs[32 * half + j].
void PackTwoBitK(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < kQK_K; h += 128) {
    for (int l = 0; l < 32; ++l) {
      qs[h / 4 + l] = static_cast<uint8_t>(L[h + l] | (L[h + l + 32] << 2) | (L[h + l + 64] << 4) | (L[h + l + 96] << 6));
    }
  }
}

}  // namespace

// The code layouts of the K-quants: 256 codes (0..2^bits - 1, element order) into a block whose header is already
// written. Shared by the reference encoders and the importance-weighted ones (GgmlKernelTraits::set_codes).
void SetCodesQ2_K(const uint8_t* L, uint8_t* block) { PackTwoBitK(L, reinterpret_cast<block_q2_K*>(block)->qs); }
// The high bit of element e is bit e / 32 of hmask[e % 32]; the low two bits go as Q2_K's.
void SetCodesQ3_K(const uint8_t* L, uint8_t* block) {
  auto* blk = reinterpret_cast<block_q3_K*>(block);
  uint8_t low[kQK_K];
  std::fill(blk->hmask, blk->hmask + 32, 0);
  for (int e = 0; e < kQK_K; ++e) {
    low[e] = L[e] & 3;
    if (L[e] > 3) blk->hmask[e % 32] |= static_cast<uint8_t>(1 << (e / 32));
  }
  PackTwoBitK(low, blk->qs);
}
// Each 64-element chunk c: elements j and j + 32 share qs[32 c + j], low nibble first.
void SetCodesQ4_K(const uint8_t* L, uint8_t* block) {
  auto* blk = reinterpret_cast<block_q4_K*>(block);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) blk->qs[32 * c + l] = static_cast<uint8_t>(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
  }
}
// Q4_K's nibbles, and the fifth bits of elements j and j + 32 of chunk c as bits 2c and 2c + 1 of qh[j].
void SetCodesQ5_K(const uint8_t* L, uint8_t* block) {
  auto* blk = reinterpret_cast<block_q5_K*>(block);
  std::fill(blk->qh, blk->qh + 32, 0);
  for (int c = 0; c < 4; ++c) {
    for (int j = 0; j < 32; ++j) {
      const int l1 = L[64 * c + j], l2 = L[64 * c + 32 + j];
      blk->qh[j] |= static_cast<uint8_t>(((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1)));
      blk->qs[32 * c + j] = static_cast<uint8_t>((l1 & 0xF) | ((l2 & 0xF) << 4));
    }
  }
}
// Each 128-element half: elements l, l+32, l+64, l+96 share ql[l] / ql[l+32] (low nibbles: l and l+64 in ql[l],
// l+32 and l+96 in ql[l+32]) and qh[l] (their top two bits at 0, 2, 4, 6).
void SetCodesQ6_K(const uint8_t* L, uint8_t* block) {
  auto* blk = reinterpret_cast<block_q6_K*>(block);
  for (int h = 0; h < 2; ++h) {
    const uint8_t* Lh = L + 128 * h;
    uint8_t* ql = blk->ql + 64 * h;
    uint8_t* qh = blk->qh + 32 * h;
    for (int l = 0; l < 32; ++l) {
      ql[l] = static_cast<uint8_t>((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                   ((Lh[l + 96] >> 4) << 6));
    }
  }
}

namespace {

// Q3_K's 6-bit sub-block scales, biased by 32: low 4 bits in byte j % 8 (low nibble for j < 8), high 2 bits at
// bit 2 (j / 4) of byte 8 + j % 4. Packed in order j = 0..15 into zeroed bytes; Q3KScale (blocks.h) reads one back
// unbiased.
void PackScaleQ3_K(int j, uint8_t l, uint8_t* scales) {
  if (j < 8) {
    scales[j] = static_cast<uint8_t>(l & 0xF);
  } else {
    scales[j - 8] |= static_cast<uint8_t>((l & 0xF) << 4);
  }
  scales[j % 4 + 8] |= static_cast<uint8_t>((l >> 4) << (2 * (j / 4)));
}

// The super-block fit Q4_K and Q5_K share (ggml's make_qkx2_quants per 32 weights, weighted by the sub-block's RMS
// + |x|): eight scales and mins packed as 6-bit values relative to d and dmin, then every weight's code
// (0..nmax) requantized against the scales actually stored. Fills blk->d, blk->dmin, blk->scales and L[256].
template <typename Block>
void FitSuperBlockK4(const float* x, int nmax, float rmin, int nstep, Block* blk, uint8_t* L) {
  float mins[8], scales[8];
  const float* xs[8];
  uint8_t* Ls[8];
  for (int j = 0; j < 8; ++j) {
    xs[j] = x + 32 * j;
    Ls[j] = L + 32 * j;
  }
  FitScaleMinMany(8, 32, nmax, xs, /*ws=*/nullptr, Ls, scales, mins, rmin, 0.1f, nstep);
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    max_scale = std::max(max_scale, scales[j]);
    max_min = std::max(max_min, mins[j]);
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  for (int j = 0; j < 8; ++j) {
    const uint8_t ls = static_cast<uint8_t>(NearestInt(inv_scale * scales[j]));
    const uint8_t lm = static_cast<uint8_t>(NearestInt(inv_min * mins[j]));
    PackScaleMinK4(j, std::min<uint8_t>(63, ls), std::min<uint8_t>(63, lm), blk->scales);
  }
  StoreHalf(&blk->d, max_scale / 63.0f);
  StoreHalf(&blk->dmin, max_min / 63.0f);
  const float d_stored = HalfToFloat(blk->d), dmin_stored = HalfToFloat(blk->dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    GetScaleMinK4(j, blk->scales, &sc, &m);
    const float d = d_stored * sc;
    if (d == 0) continue;
    const float dm = dmin_stored * m;
    if (ActiveIsa() >= Isa::kAvx2) {
      RequantizeSubBlockAvx2(x + 32 * j, d, dm, nmax, L + 32 * j);
    } else {
      RequantizeSubBlock(x + 32 * j, d, dm, nmax, L + 32 * j);
    }
  }
}

}  // namespace

void QuantizeRowQ4_K(const float* x, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q4_K*>(out);
  uint8_t L[kQK_K];
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    block_q4_K blk;
    FitSuperBlockK4(x, 15, -1.0f, 20, &blk, L);
    SetCodesQ4_K(L, reinterpret_cast<uint8_t*>(&blk));
    std::memcpy(&blocks[b], &blk, sizeof(blk));
  }
}

namespace {

// ggml's GROUP_MAX_EPS: a group whose largest magnitude is below it is all zero.
constexpr float kGroupMaxEps = 1e-15f;

// The min / max of a 32-weight block, as Q4_1 and Q5_1 take them (max starts at -FLT_MAX: an all-negative block
// keeps its true max).
void BlockMinMax(const float* x, int n, float* min, float* max) {
  *min = std::numeric_limits<float>::max();
  *max = -std::numeric_limits<float>::max();
  for (int j = 0; j < n; ++j) {
    *min = std::min(*min, x[j]);
    *max = std::max(*max, x[j]);
  }
}

}  // namespace

// Q4_0, Q5_0 and the symmetric K-quant fits map it to the most negative code, so its sign picks the scale's sign.
float SignedAbsMax(const float* x, int n) {
  float amax = 0, max = 0;
  for (int j = 0; j < n; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  return max;
}

namespace {

// ggml's make_qx_quants (rmse_type 1): a symmetric fit x ~ scale * (L - nmax), L in [0, 2 nmax), each element
// weighted by qw (nullptr: by x^2), trying 18 scales around nmax / max and keeping the one of least weighted
// squared error (largest sumlx^2 / suml2) with its least-squares scale.
float FitSymmetricScale(int n, int nmax, const float* x, uint8_t* L, const float* qw = nullptr) {
  const float max = SignedAbsMax(x, n);
  if (std::fabs(max) < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  auto code = [nmax](float v) { return std::clamp(NearestInt(v), -nmax, nmax - 1); };
  float iscale = static_cast<float>(-nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = code(iscale * x[i]);
    L[i] = static_cast<uint8_t>(l + nmax);
    const float w = qw != nullptr ? qw[i] : x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = code(iscale * x[i]);
      const float w = qw != nullptr ? qw[i] : x[i] * x[i];
      sumlx += w * x[i] * static_cast<float>(l);
      suml2 += w * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(code(iscale * x[i]) + nmax);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// ggml's make_q3_quants with do_rmse: the symmetric 3-bit fit of Q3_K. Starts from rounding against nmax / max,
// then up to five passes move single codes to the value the others' least-squares scale asks for when that
// lowers the x^2-weighted error. L receives codes biased by nmax.
float FitQ3Scale(int n, int nmax, const float* x, uint8_t* L) {
  const float max = SignedAbsMax(x, n);
  if (std::fabs(max) < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  const float iscale = static_cast<float>(-nmax) / max;
  int l_signed[kQK_K];
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::clamp(NearestInt(iscale * x[i]), -nmax, nmax - 1);
    l_signed[i] = l;
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      const float li = static_cast<float>(l_signed[i]);
      float slx = sumlx - w * x[i] * li;
      if (!(slx > 0)) continue;
      float sl2 = suml2 - w * li * li;
      const int new_l = std::clamp(NearestInt(x[i] * sl2 / slx), -nmax, nmax - 1);
      if (new_l == l_signed[i]) continue;
      slx += w * x[i] * static_cast<float>(new_l);
      sl2 += w * static_cast<float>(new_l) * static_cast<float>(new_l);
      if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
        l_signed[i] = new_l;
        sumlx = slx;
        suml2 = sl2;
        ++changed;
      }
    }
    if (changed == 0) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(l_signed[i] + nmax);
  return sumlx / suml2;
}

// The Q5_0 / Q5_1 split of 32 five-bit codes: low nibbles as Q4_0 (element j low, j + 16 high), bit 4 of element j
// into bit j of the little-endian qh.
void PackFiveBit(const uint8_t* q, uint8_t* qs, uint8_t* qh_bytes) {
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    qs[j] = static_cast<uint8_t>((q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4));
    qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
    qh |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) qh_bytes[k] = static_cast<uint8_t>(qh >> (8 * k));
}

// The mean of x² over n: sigma² of the importance-weighted fits.
float MeanSquare(const float* x, int n) {
  float sum = 0;
  for (int i = 0; i < n; ++i) sum += x[i] * x[i];
  return sum / static_cast<float>(n);
}

// The fit weights of a sub-block of n: importance * sqrt(sigma2 + x^2), and their sum.
float ImportanceWeights(const float* x, const float* importance, int n, float sigma2, float* w) {
  float sum = 0;
  for (int l = 0; l < n; ++l) {
    w[l] = importance[l] * std::sqrt(sigma2 + x[l] * x[l]);
    sum += w[l];
  }
  return sum;
}

// ggml's best_index_int8: the index of the IQ4_NL level nearest to v (the lower one on ties), by bisection.
int NearestIq4nlIndex(float v) {
  const int8_t* values = kIq4nlValues;
  if (v <= values[0]) return 0;
  if (v >= values[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (v < values[mid]) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return v - values[hi - 1] < values[hi] - v ? hi - 1 : hi;
}

// ggml's quantize_row_iq4_nl_impl (ntry 7): each 32-weight sub-block gets the scale, among 15 candidates around
// max / values[0], of least weighted squared error (weights x^2, or with importance[super_block] importance *
// sqrt(sigma² + x²), sigma² twice the super-block's mean square); with several sub-blocks
// (IQ4_XS) those scales become 6-bit multiples of a super-block d = -max_scale / 32 and every index is chosen
// again against the stored scale. Writes *d_out (f16), the 4-bit indices as Q4_0 packs them, and for IQ4_XS the
// 6-bit scales (biased by 32: low nibbles in scales_l, high 2 bits in scales_h).
void QuantizeIq4Blocks(const float* x, const float* importance, int super_block, uint16_t* d_out, uint8_t* qs,
                       uint16_t* scales_h, uint8_t* scales_l) {
  constexpr int kNtry = 7;
  const int8_t* values = kIq4nlValues;
  const int nsub = super_block / 32;
  uint8_t L[kQK_K] = {};
  float scales[kQK_K / 32] = {};
  float weight[32];
  std::fill(qs, qs + super_block / 2, 0);
  *d_out = FloatToHalf(0.0f);
  // With importance, sigma² is twice the super-block's mean square (not the row's, as for Q4_0).
  float sigma2 = 0;
  if (importance != nullptr) {
    for (int j = 0; j < super_block; ++j) sigma2 += x[j] * x[j];
    sigma2 *= 2.0f / static_cast<float>(super_block);
  }
  float max_scale = 0, amax_scale = 0;
  for (int ib = 0; ib < nsub; ++ib) {
    const float* xb = x + 32 * ib;
    uint8_t* Lb = L + 32 * ib;
    if (importance != nullptr) {
      ImportanceWeights(xb, importance + 32 * ib, 32, sigma2, weight);
    } else {
      for (int j = 0; j < 32; ++j) weight[j] = xb[j] * xb[j];
    }
    float amax = 0, max = 0;
    for (int j = 0; j < 32; ++j) {
      if (std::fabs(xb[j]) > amax) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    if (amax < kGroupMaxEps) {
      scales[ib] = 0;
      continue;
    }
    float d = -max / values[0];
    float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const int l = NearestIq4nlIndex(id * xb[j]);
      Lb[j] = static_cast<uint8_t>(l);
      const float q = values[l];
      sumqx += weight[j] * q * xb[j];
      sumq2 += weight[j] * q * q;
    }
    d = sumq2 > 0 ? sumqx / sumq2 : 0.0f;  // an importance of zero over the whole sub-block
    float best = d * sumqx;
    for (int itry = -kNtry; itry <= kNtry; ++itry) {
      id = static_cast<float>(itry + values[0]) / max;
      sumqx = sumq2 = 0;
      for (int j = 0; j < 32; ++j) {
        const float q = values[NearestIq4nlIndex(id * xb[j])];
        sumqx += weight[j] * q * xb[j];
        sumq2 += weight[j] * q * q;
      }
      if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
        d = sumqx / sumq2;
        best = d * sumqx;
      }
    }
    scales[ib] = d;
    if (std::fabs(d) > amax_scale) {
      amax_scale = std::fabs(d);
      max_scale = d;
    }
  }
  if (nsub > 1) {
    *scales_h = 0;
    const float d = -max_scale / 32;
    *d_out = FloatToHalf(d);
    const float id = d != 0 ? 1 / d : 0.0f;
    for (int ib = 0; ib < nsub; ++ib) {
      int l = std::clamp(NearestInt(id * scales[ib]), -32, 31);
      const float dl = d * static_cast<float>(l);
      const float idl = dl != 0 ? 1 / dl : 0.0f;
      for (int j = 0; j < 32; ++j) L[32 * ib + j] = static_cast<uint8_t>(NearestIq4nlIndex(idl * x[32 * ib + j]));
      l += 32;
      if (ib % 2 == 0) {
        scales_l[ib / 2] = static_cast<uint8_t>(l & 0xF);
      } else {
        scales_l[ib / 2] |= static_cast<uint8_t>((l & 0xF) << 4);
      }
      *scales_h |= static_cast<uint16_t>((l >> 4) << (2 * (ib % 8)));
    }
  } else {
    *d_out = FloatToHalf(scales[0]);
    const float id = scales[0] != 0 ? 1 / scales[0] : 0.0f;
    for (int j = 0; j < super_block; ++j) L[j] = static_cast<uint8_t>(NearestIq4nlIndex(id * x[j]));
  }
  for (int i = 0; i < super_block / 32; ++i) {
    for (int j = 0; j < 16; ++j) qs[16 * i + j] = static_cast<uint8_t>(L[32 * i + j] | (L[32 * i + 16 + j] << 4));
  }
}

}  // namespace

void QuantizeRowQ4_1(const float* x, int64_t n, uint8_t* out) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32) {
    float min, max;
    BlockMinMax(x, 32, &min, &max);
    const float d = (max - min) / 15;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q4_1 blk;
    StoreHalf(&blk.d, d);
    StoreHalf(&blk.m, min);
    for (int j = 0; j < 16; ++j) {
      // Truncation of (v + 0.5) toward zero is ggml's rounding here; v >= 0 up to float error.
      const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j] - min) * id + 0.5f)));
      const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>((x[j + 16] - min) * id + 0.5f)));
      blk.qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeRowQ5_0(const float* x, int64_t n, uint8_t* out) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32) {
    const float d = SignedAbsMax(x, 32) / -16;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q5_0 blk;
    StoreHalf(&blk.d, d);
    uint8_t q[32];
    for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>(std::min(31, static_cast<int>(static_cast<int8_t>(x[j] * id + 16.5f))));
    PackFiveBit(q, blk.qs, blk.qh);
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeRowQ5_1(const float* x, int64_t n, uint8_t* out) {
  for (int64_t b = 0; b < n / 32; ++b, x += 32) {
    float min, max;
    BlockMinMax(x, 32, &min, &max);
    const float d = (max - min) / 31;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    block_q5_1 blk;
    StoreHalf(&blk.d, d);
    StoreHalf(&blk.m, min);
    // ggml truncates to uint8_t without a clamp: (max - min) * id + 0.5 stays below 32 in float.
    uint8_t q[32];
    for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>((x[j] - min) * id + 0.5f);
    PackFiveBit(q, blk.qs, blk.qh);
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeRowQ2_K(const float* x, int64_t n, uint8_t* out) {
  constexpr float kQ4Scale = 15.0f;
  uint8_t L[kQK_K];
  float weights[16][16], mins[16], scales[16];
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    block_q2_K blk;
    const float* xs[16];
    const float* ws[16];
    uint8_t* Ls[16];
    for (int j = 0; j < 16; ++j) {
      for (int l = 0; l < 16; ++l) weights[j][l] = std::fabs(x[16 * j + l]);
      xs[j] = x + 16 * j;
      ws[j] = weights[j];
      Ls[j] = L + 16 * j;
    }
    for (int j = 0; j < 16; j += 8) {
      FitScaleMinMany(8, 16, 3, xs + j, ws + j, Ls + j, scales + j, mins + j, -0.5f, 0.1f, 15, true);
    }
    float max_scale = 0, max_min = 0;
    for (int j = 0; j < 16; ++j) {
      max_scale = std::max(max_scale, scales[j]);
      max_min = std::max(max_min, mins[j]);
    }
    // 4-bit scales (low nibble) and mins (high nibble) relative to d and dmin.
    if (max_scale > 0) {
      const float iscale = kQ4Scale / max_scale;
      for (int j = 0; j < 16; ++j) blk.scales[j] = static_cast<uint8_t>(NearestInt(iscale * scales[j]));
      StoreHalf(&blk.d, max_scale / kQ4Scale);
    } else {
      std::fill(blk.scales, blk.scales + 16, 0);
      StoreHalf(&blk.d, 0.0f);
    }
    if (max_min > 0) {
      const float iscale = kQ4Scale / max_min;
      for (int j = 0; j < 16; ++j) blk.scales[j] |= static_cast<uint8_t>(NearestInt(iscale * mins[j]) << 4);
      StoreHalf(&blk.dmin, max_min / kQ4Scale);
    } else {
      StoreHalf(&blk.dmin, 0.0f);
    }
    // Requantize against the stored scales; a sub-block whose scale rounded to 0 keeps its fitted codes.
    const float d_stored = HalfToFloat(blk.d), dmin_stored = HalfToFloat(blk.dmin);
    for (int j = 0; j < 16; ++j) {
      const float d = d_stored * static_cast<float>(blk.scales[j] & 0xF);
      if (d == 0) continue;
      const float dm = dmin_stored * static_cast<float>(blk.scales[j] >> 4);
      for (int l = 0; l < 16; ++l) {
        L[16 * j + l] = static_cast<uint8_t>(std::clamp(NearestInt((x[16 * j + l] + dm) / d), 0, 3));
      }
    }
    PackTwoBitK(L, blk.qs);
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeRowQ3_K(const float* x, int64_t n, uint8_t* out) {
  uint8_t L[kQK_K];
  float scales[16];
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    block_q3_K blk;
    float max_scale = 0, amax = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitQ3Scale(16, 4, x + 16 * j, L + 16 * j);
      if (std::fabs(scales[j]) > amax) {
        amax = std::fabs(scales[j]);
        max_scale = scales[j];
      }
    }
    std::fill(blk.scales, blk.scales + 12, 0);
    if (max_scale != 0) {
      const float iscale = -32.0f / max_scale;
      for (int j = 0; j < 16; ++j) {
        PackScaleQ3_K(j, static_cast<uint8_t>(std::clamp(NearestInt(iscale * scales[j]), -32, 31) + 32), blk.scales);
      }
      StoreHalf(&blk.d, 1 / iscale);
    } else {
      StoreHalf(&blk.d, 0.0f);
    }
    const float d_stored = HalfToFloat(blk.d);
    for (int j = 0; j < 16; ++j) {
      const float d = d_stored * static_cast<float>(Q3KScale(blk.scales, j));
      if (d == 0) continue;
      for (int l = 0; l < 16; ++l) {
        L[16 * j + l] = static_cast<uint8_t>(std::clamp(NearestInt(x[16 * j + l] / d), -4, 3) + 4);
      }
    }
    SetCodesQ3_K(L, reinterpret_cast<uint8_t*>(&blk));
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeRowQ5_K(const float* x, int64_t n, uint8_t* out) {
  uint8_t L[kQK_K];
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    block_q5_K blk;
    FitSuperBlockK4(x, 31, -0.5f, 15, &blk, L);
    SetCodesQ5_K(L, reinterpret_cast<uint8_t*>(&blk));
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

namespace {

// Q6_K's header: a symmetric fit per 16 weights (each weight's error weighted by qw, nullptr: by x^2), then int8
// sub-block scales against d = (the scale of largest magnitude) / -128, which takes -128. Fills L with the fits'
// codes; false (and a zeroed block) when every scale is below GROUP_MAX_EPS.
bool FitHeaderQ6_KInto(const float* x, const float* qw, block_q6_K* blk, uint8_t* L) {
  float scales[16];
  float max_scale = 0, max_abs_scale = 0;
  for (int ib = 0; ib < 16; ++ib) {
    scales[ib] = FitSymmetricScale(16, 32, x + 16 * ib, L + 16 * ib, qw != nullptr ? qw + 16 * ib : nullptr);
    if (std::fabs(scales[ib]) > max_abs_scale) {
      max_abs_scale = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  if (max_abs_scale < kGroupMaxEps) {
    std::memset(blk, 0, sizeof(*blk));
    return false;
  }
  const float iscale = -128.0f / max_scale;
  StoreHalf(&blk->d, 1 / iscale);
  for (int ib = 0; ib < 16; ++ib) blk->scales[ib] = static_cast<int8_t>(std::min(127, NearestInt(iscale * scales[ib])));
  return true;
}

}  // namespace

void QuantizeRowQ6_K(const float* x, int64_t n, uint8_t* out) {
  uint8_t L[kQK_K];
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K) {
    block_q6_K blk;
    if (!FitHeaderQ6_KInto(x, nullptr, &blk, L)) {
      std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
      continue;
    }
    const float d_stored = HalfToFloat(blk.d);
    for (int j = 0; j < 16; ++j) {
      const float d = d_stored * static_cast<float>(blk.scales[j]);
      if (d == 0) continue;
      for (int l = 0; l < 16; ++l) {
        L[16 * j + l] = static_cast<uint8_t>(std::clamp(NearestInt(x[16 * j + l] / d), -32, 31) + 32);
      }
    }
    SetCodesQ6_K(L, reinterpret_cast<uint8_t*>(&blk));
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  }
}

namespace {

// A row of IQ4_NL (super_block 32) or IQ4_XS (256) blocks; importance nullptr: the unweighted fit.
void QuantizeRowIq4(const float* x, const float* importance, int64_t n, int super_block, uint8_t* out) {
  for (int64_t b = 0; b < n / super_block; ++b) {
    const float* w = importance != nullptr ? importance + b * super_block : nullptr;
    if (super_block == 32) {
      block_iq4_nl blk;
      QuantizeIq4Blocks(x + b * 32, w, 32, &blk.d, blk.qs, nullptr, nullptr);
      std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
    } else {
      block_iq4_xs blk;
      uint16_t scales_h = 0;
      QuantizeIq4Blocks(x + b * kQK_K, w, kQK_K, &blk.d, blk.qs, &scales_h, blk.scales_l);
      std::memcpy(&blk.scales_h, &scales_h, sizeof(scales_h));
      std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
    }
  }
}

}  // namespace

void QuantizeRowIQ4_NL(const float* x, int64_t n, uint8_t* out) { QuantizeRowIq4(x, nullptr, n, 32, out); }
void QuantizeRowIQ4_XS(const float* x, int64_t n, uint8_t* out) { QuantizeRowIq4(x, nullptr, n, kQK_K, out); }

// ---- Importance-weighted K-quant encoding (llama.cpp's imatrix path, quantize_row_*_impl with quant_weights) ----
// The differences from the reference encoders above: each weight's squared error in a sub-block fit counts
// importance * sqrt(sigma2 + x^2) (Q6_K: importance alone), sigma2 being the super-block's mean square (twice it for
// Q3_K / Q4_K / Q5_K); the min-and-scale fits search more candidates (ggml's make_qkx3_quants: 37 steps of 0.05 from
// -0.9); and the sub-block scales (and mins) are themselves fit to their 4- or 6-bit codes weighted by each
// sub-block's summed importance, instead of taken against the largest.

namespace {

// ggml's make_qp_quants: x[n] >= 0 ~ scale * L, L in [0, nmax], each element's squared error weighted by w. Tries
// nine scales around nmax / max, then up to five passes move single codes where the least-squares scale of the
// others asks, and returns that least-squares scale. All codes 0 and scale 0 when max < GROUP_MAX_EPS; with no
// weight anywhere, the plain max / nmax.
float FitPositiveScale(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < kGroupMaxEps) {
    std::fill(L, L + n, 0);
    return 0.0f;
  }
  auto code = [nmax](float v) { return std::min(nmax, NearestInt(v)); };
  auto error = [&](float iscale) {
    const float scale = 1 / iscale;
    float e = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = x[i] - scale * static_cast<float>(code(iscale * x[i]));
      e += w[i] * diff * diff;
    }
    return e;
  };
  float iscale = static_cast<float>(nmax) / max;
  float best = error(iscale);
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float candidate = (0.1f * static_cast<float>(is) + static_cast<float>(nmax)) / max;
    const float e = error(candidate);
    if (e < best) {
      best = e;
      iscale = candidate;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = code(iscale * x[i]);
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * static_cast<float>(l);
    suml2 += w[i] * static_cast<float>(l) * static_cast<float>(l);
  }
  if (!(suml2 > 0)) return 1 / iscale;
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float li = static_cast<float>(L[i]);
      float slx = sumlx - w[i] * x[i] * li;
      float sl2 = suml2 - w[i] * li * li;
      if (!(slx > 0 && sl2 > 0)) continue;
      const int new_l = code(x[i] * sl2 / slx);
      if (new_l == L[i]) continue;
      slx += w[i] * x[i] * static_cast<float>(new_l);
      sl2 += w[i] * static_cast<float>(new_l) * static_cast<float>(new_l);
      if (slx * slx * suml2 > sumlx * sumlx * sl2) {
        L[i] = static_cast<uint8_t>(new_l);
        sumlx = slx;
        suml2 = sl2;
        ++changed;
      }
    }
    if (changed == 0) break;
  }
  return sumlx / suml2;
}

// The min-and-scale fits of a super-block's 256 / sub sub-blocks (sub 16 or 32, codes 0..nmax) with importance
// weights, eight per FitScaleMinMany pass: each sub-block's scale and -min, and its summed weight in sw.
void WeightedMinScaleFits(const float* x, const float* importance, int sub, int nmax, float sigma2, float* scales,
                          float* neg_mins, float* sw) {
  const int count = kQK_K / sub;
  float w[kQK_K];
  uint8_t L[kQK_K];
  const float* xs[16];
  const float* ws[16];
  uint8_t* Ls[16];
  for (int j = 0; j < count; ++j) {
    sw[j] = ImportanceWeights(x + sub * j, importance + sub * j, sub, sigma2, w + sub * j);
    xs[j] = x + sub * j;
    ws[j] = w + sub * j;
    Ls[j] = L + sub * j;
  }
  for (int j = 0; j < count; j += 8) {
    FitScaleMinMany(8, sub, nmax, xs + j, ws + j, Ls + j, scales + j, neg_mins + j, -0.9f, 0.05f, 36);
  }
}

// Q4_K / Q5_K: eight min-and-scale fits of 32, their scales and mins fit to 6 bits.
template <typename Block>
void FitHeaderK4Weighted(const float* x, const float* importance, int nmax, Block* blk, SubBlockGrid* grids) {
  float sw[8], scales[8], mins[8];
  WeightedMinScaleFits(x, importance, 32, nmax, 2 * MeanSquare(x, kQK_K), scales, mins, sw);
  uint8_t ls[8], lm[8];
  StoreHalf(&blk->d, FitPositiveScale(8, 63, scales, ls, sw));
  StoreHalf(&blk->dmin, FitPositiveScale(8, 63, mins, lm, sw));
  std::fill(blk->scales, blk->scales + kKScaleSize, 0);
  for (int j = 0; j < 8; ++j) PackScaleMinK4(j, ls[j], lm[j], blk->scales);
  const float d = HalfToFloat(blk->d), dmin = HalfToFloat(blk->dmin);
  for (int j = 0; j < 8; ++j) {
    grids[j] = {d * static_cast<float>(ls[j]), dmin * static_cast<float>(lm[j]), 0, nmax};
  }
}

}  // namespace

void FitHeaderQ4_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids) {
  FitHeaderK4Weighted(x, importance, 15, reinterpret_cast<block_q4_K*>(block), grids);
}
void FitHeaderQ5_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids) {
  FitHeaderK4Weighted(x, importance, 31, reinterpret_cast<block_q5_K*>(block), grids);
}

// Q2_K: sixteen min-and-scale fits of 16 (codes 0..3), their scales and mins fit to 4 bits.
void FitHeaderQ2_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids) {
  auto* blk = reinterpret_cast<block_q2_K*>(block);
  float sw[16], scales[16], mins[16];
  WeightedMinScaleFits(x, importance, 16, 3, MeanSquare(x, kQK_K), scales, mins, sw);
  uint8_t ls[16], lm[16];
  StoreHalf(&blk->d, FitPositiveScale(16, 15, scales, ls, sw));
  StoreHalf(&blk->dmin, FitPositiveScale(16, 15, mins, lm, sw));
  const float d = HalfToFloat(blk->d), dmin = HalfToFloat(blk->dmin);
  for (int j = 0; j < 16; ++j) {
    blk->scales[j] = static_cast<uint8_t>(ls[j] | (lm[j] << 4));
    grids[j] = {d * static_cast<float>(ls[j]), dmin * static_cast<float>(lm[j]), 0, 3};
  }
}

// Q3_K: sixteen symmetric fits of 16 (codes -4..3), their scales fit symmetrically to 6 bits.
void FitHeaderQ3_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids) {
  auto* blk = reinterpret_cast<block_q3_K*>(block);
  const float sigma2 = 2 * MeanSquare(x, kQK_K);
  float w[16], sw[16], scales[16];
  uint8_t L[16], ls[16];
  for (int j = 0; j < 16; ++j) {
    sw[j] = ImportanceWeights(x + 16 * j, importance + 16 * j, 16, sigma2, w);
    scales[j] = FitSymmetricScale(16, 4, x + 16 * j, L, w);
  }
  StoreHalf(&blk->d, FitSymmetricScale(16, 32, scales, ls, sw));
  std::fill(blk->scales, blk->scales + 12, 0);
  for (int j = 0; j < 16; ++j) PackScaleQ3_K(j, ls[j], blk->scales);
  const float d = HalfToFloat(blk->d);
  for (int j = 0; j < 16; ++j) grids[j] = {d * static_cast<float>(Q3KScale(blk->scales, j)), 0.0f, 4, 7};
}

// Q6_K: the reference header with each sub-block fit weighted by the importance alone.
void FitHeaderQ6_K(const float* x, const float* importance, uint8_t* block, SubBlockGrid* grids) {
  auto* blk = reinterpret_cast<block_q6_K*>(block);
  uint8_t L[kQK_K];
  const bool nonzero = FitHeaderQ6_KInto(x, importance, blk, L);
  const float d = nonzero ? HalfToFloat(blk->d) : 0.0f;
  for (int j = 0; j < 16; ++j) grids[j] = {d * static_cast<float>(blk->scales[j]), 0.0f, 32, 63};
}

int SubBlockGridCode(float x, const SubBlockGrid& g) {
  if (g.scale == 0) return g.zero;
  return std::clamp(NearestInt((x + g.offset) / g.scale) + g.zero, 0, g.max_code);
}

namespace {

// ggml's quantize_row_q{4,5}_0_impl: per 32-weight block the symmetric fit x ~ d * (L - nmax) weighted by
// importance * sqrt(sigma² + x²), sigma² the whole row's mean square; pack(block, d, L) stores it.
template <class Pack>
void QuantizeRowWeightedSymmetric(const float* x, const float* importance, int64_t n, int nmax, Pack pack) {
  const float sigma2 = MeanSquare(x, static_cast<int>(n));
  float w[32];
  uint8_t L[32];
  for (int64_t b = 0; b < n / 32; ++b) {
    ImportanceWeights(x + b * 32, importance + b * 32, 32, sigma2, w);
    pack(b, FitSymmetricScale(32, nmax, x + b * 32, L, w), L);
  }
}

}  // namespace

void QuantizeRowWeightedQ4_0(const float* x, const float* importance, int64_t n, uint8_t* out) {
  auto* blocks = reinterpret_cast<block_q4_0*>(out);
  QuantizeRowWeightedSymmetric(x, importance, n, 8, [&](int64_t b, float d, const uint8_t* L) {
    StoreHalf(&blocks[b].d, d);
    for (int j = 0; j < kQK4_0 / 2; ++j) blocks[b].qs[j] = static_cast<uint8_t>(L[j] | (L[j + kQK4_0 / 2] << 4));
  });
}

void QuantizeRowWeightedQ5_0(const float* x, const float* importance, int64_t n, uint8_t* out) {
  QuantizeRowWeightedSymmetric(x, importance, n, 16, [&](int64_t b, float d, const uint8_t* L) {
    block_q5_0 blk;
    StoreHalf(&blk.d, d);
    PackFiveBit(L, blk.qs, blk.qh);
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  });
}

// ggml's Q8_0 takes no importance (quantize_q8_0 ignores its quant_weights; 8 bits leave nothing to weigh), so
// with an imatrix llama-quantize writes the plain bytes, and so does this.
void QuantizeRowWeightedQ8_0(const float* x, const float* /*importance*/, int64_t n, uint8_t* out) {
  QuantizeRowQ8_0(x, n, out);
}

namespace {

// ggml's quantize_row_q{4,5}_1_impl: per 32-weight block the min-and-scale fit (make_qkx3_quants: 37 candidate
// scales, the least-squares refit of each) weighted by importance * sqrt(sigma² + x²), sigma² the row's mean
// square.
template <class Pack>
void QuantizeRowWeightedMinScale(const float* x, const float* importance, int64_t n, int nmax, Pack pack) {
  const float sigma2 = MeanSquare(x, static_cast<int>(n));
  float w[32];
  uint8_t L[32], Laux[32];
  for (int64_t b = 0; b < n / 32; ++b) {
    ImportanceWeights(x + b * 32, importance + b * 32, 32, sigma2, w);
    float neg_min = 0;
    const float d = FitScaleMin(32, nmax, x + b * 32, w, L, &neg_min, Laux, -0.9f, 0.05f, 36);
    pack(b, d, -neg_min, L);
  }
}

}  // namespace

void QuantizeRowWeightedQ4_1(const float* x, const float* importance, int64_t n, uint8_t* out) {
  QuantizeRowWeightedMinScale(x, importance, n, 15, [&](int64_t b, float d, float m, const uint8_t* L) {
    block_q4_1 blk;
    StoreHalf(&blk.d, d);
    StoreHalf(&blk.m, m);
    for (int j = 0; j < 16; ++j) blk.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  });
}

void QuantizeRowWeightedQ5_1(const float* x, const float* importance, int64_t n, uint8_t* out) {
  QuantizeRowWeightedMinScale(x, importance, n, 31, [&](int64_t b, float d, float m, const uint8_t* L) {
    block_q5_1 blk;
    StoreHalf(&blk.d, d);
    StoreHalf(&blk.m, m);
    PackFiveBit(L, blk.qs, blk.qh);
    std::memcpy(out + b * sizeof(blk), &blk, sizeof(blk));
  });
}

void QuantizeRowWeightedIQ4_NL(const float* x, const float* importance, int64_t n, uint8_t* out) {
  QuantizeRowIq4(x, importance, n, 32, out);
}
void QuantizeRowWeightedIQ4_XS(const float* x, const float* importance, int64_t n, uint8_t* out) {
  QuantizeRowIq4(x, importance, n, kQK_K, out);
}

void QuantizeRowWeighted(const GgmlKernelTraits& k, const float* x, const float* importance, int64_t n, uint8_t* out) {
  if (k.quantize_weighted != nullptr) {
    k.quantize_weighted(x, importance, n, out);
    return;
  }
  SubBlockGrid grids[kQK_K / 16];
  uint8_t codes[kQK_K];
  const int64_t block_bytes = FindGgmlType(k.type)->block_bytes;
  for (int64_t b = 0; b < n / kQK_K; ++b, x += kQK_K, importance += kQK_K, out += block_bytes) {
    k.fit_header(x, importance, out, grids);
    for (int e = 0; e < kQK_K; ++e) codes[e] = static_cast<uint8_t>(SubBlockGridCode(x[e], grids[e / k.sub_block]));
    k.set_codes(codes, out);
  }
}

}  // namespace qforge::kernels
