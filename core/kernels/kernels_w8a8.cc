// W8A8 (SmoothQuant) kernels: int8 weights with one f32 scale per output row, activations quantized to int8 per
// token inside the matmul, products summed in int32. Integer sums are exact, so the scalar reference and the
// AVX2 path give the same bits, and a token's result cannot depend on its batch as long as its quantization
// looks at that token only (it does: s_x comes from the token's own max |x|).
//
// AVX2 dot product: _mm256_maddubs_epi16 multiplies unsigned by signed bytes, so it gets |w| and x·sign(w)
// (|w| <= 128 and |x| <= 127 keep each pair sum <= 2·128·127 = 32512, no int16 saturation; that is why
// activations are clamped to ±127), then _mm256_madd_epi16 by ones widens the pairs into int32 lanes.
// AVX-512 CPUs run the AVX2 code (dispatch in kernels.cc): same integers, same bits.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/kernels_internal.h"

#define QF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qforge::kernels::internal {
namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kInfBits = 0x7f800000u;

inline const int8_t* W8A8Row(const WeightView& v, int64_t r) {
  return reinterpret_cast<const int8_t*>(v.data + v.w8a8.codes_offset) + r * v.cols;
}
inline float W8A8Scale(const WeightView& v, int64_t r) { return LoadF32(v.data + v.w8a8.scales_offset + 4 * r); }

// The token scale from the largest |x| as float bits (an order-independent integer max, so every ISA finds the
// same one, NaN included). Returns false when the codes are all zero: x == 0 (scale 0) or a non-finite x
// (scale NaN, so the outputs are NaN as the fp32 product's would be).
inline bool TokenScale(uint32_t max_bits, float* scale) {
  if (max_bits >= kInfBits) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  *scale = BitsToFloat(max_bits) / 127.0f;
  if (!(*scale > 0)) {  // x == 0, or max |x| so small that max/127 underflows
    *scale = 0;
    return false;
  }
  return true;
}

inline int8_t QuantizeOne(float x, float scale) {
  const float q = std::nearbyint(x / scale);  // the default rounding mode: to nearest, ties to even
  return static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
}

float QuantizeTokenScalar(const float* x, int64_t cols, int8_t* q) {
  uint32_t max_bits = 0;
  for (int64_t c = 0; c < cols; ++c) max_bits = std::max(max_bits, FloatBits(x[c]) & kAbsMask);
  float scale;
  if (!TokenScale(max_bits, &scale)) {
    std::memset(q, 0, static_cast<size_t>(cols));
    return scale;
  }
  for (int64_t c = 0; c < cols; ++c) q[c] = QuantizeOne(x[c], scale);
  return scale;
}

void QuantizeTokensScalar(const float* x, int64_t n, int64_t cols, int8_t* q, float* scales) {
  for (int64_t t = 0; t < n; ++t) scales[t] = QuantizeTokenScalar(x + t * cols, cols, q + t * cols);
}

QF_AVX2 inline int HsumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

QF_AVX2 inline uint32_t HmaxU32(__m256i v) {
  __m128i s = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_max_epu32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_max_epu32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

// 8 floats -> 8 int32 codes: the same division, rounding and clamp as QuantizeOne.
QF_AVX2 inline __m256i QuantizeVec(const float* x, __m256 scale) {
  const __m256 lim = _mm256_set1_ps(127.0f);
  __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm256_min_ps(lim, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), lim), q));
  return _mm256_cvtps_epi32(q);  // exact: q is integral
}

QF_AVX2 float QuantizeTokenAvx2(const float* x, int64_t cols, int8_t* q) {
  const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbsMask));
  __m256i vmax = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    const __m256i bits = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c)), abs_mask);
    vmax = _mm256_max_epu32(vmax, bits);
  }
  uint32_t max_bits = HmaxU32(vmax);
  for (; c < cols; ++c) max_bits = std::max(max_bits, FloatBits(x[c]) & kAbsMask);
  float scale;
  if (!TokenScale(max_bits, &scale)) {
    std::memset(q, 0, static_cast<size_t>(cols));
    return scale;
  }
  const __m256 vs = _mm256_set1_ps(scale);
  // packs interleave 128-bit lanes; this permutation puts the 32 codes back in column order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m256i a = QuantizeVec(x + c, vs), b = QuantizeVec(x + c + 8, vs);
    const __m256i d = QuantizeVec(x + c + 16, vs), e = QuantizeVec(x + c + 24, vs);
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(d, e));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + c), _mm256_permutevar8x32_epi32(bytes, order));
  }
  for (; c < cols; ++c) q[c] = QuantizeOne(x[c], scale);
  return scale;
}

// One step of kTile tokens against 32 weight codes.
QF_AVX2 inline __m256i DotStep(__m256i abs_w, __m256i w, const int8_t* x, __m256i acc, __m256i ones) {
  const __m256i sx = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)), w);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, sx), ones));
}

// sum_c w[c] * x_t[c] for kTile tokens (x rows `cols` apart), each weight vector loaded once for all of them.
template <int kTile>
QF_AVX2 void DotTile(const int8_t* w, const int8_t* x, int64_t cols, int32_t* dots) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[kTile];
  for (int t = 0; t < kTile; ++t) acc[t] = _mm256_setzero_si256();
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + c));
    const __m256i abs_w = _mm256_abs_epi8(wv);  // -128 -> 0x80, read as unsigned 128 by maddubs
    for (int t = 0; t < kTile; ++t) acc[t] = DotStep(abs_w, wv, x + t * cols + c, acc[t], ones);
  }
  for (int t = 0; t < kTile; ++t) {
    int32_t s = HsumI32(acc[t]);
    for (int64_t k = c; k < cols; ++k) s += static_cast<int32_t>(w[k]) * x[t * cols + k];
    dots[t] = s;
  }
}

}  // namespace

void DecodeW8A8Scalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const int8_t* codes = W8A8Row(v, r) + c0;
  const float scale = W8A8Scale(v, r);
  for (int64_t i = 0; i < len; ++i) out[i] = scale * static_cast<float>(codes[i]);
}

void MatMulW8A8Scalar(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                      int64_t y_stride) {
  const int64_t cols = v.cols;
  std::vector<int8_t> qx(static_cast<size_t>(n * cols));
  std::vector<float> sx(static_cast<size_t>(n));
  QuantizeTokensScalar(x, n, cols, qx.data(), sx.data());
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = W8A8Row(v, r);
    const float sw = W8A8Scale(v, r);
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* xt = qx.data() + t * cols;
      int32_t dot = 0;
      for (int64_t c = 0; c < cols; ++c) dot += static_cast<int32_t>(w[c]) * xt[c];
      y[t * y_stride + r] = (sx[t] * sw) * static_cast<float>(dot);
    }
  }
}

QF_AVX2 void DecodeW8A8Avx2(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const int8_t* codes = W8A8Row(v, r) + c0;
  const float scale = W8A8Scale(v, r);
  const __m256 vs = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(vs, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
  }
  for (; i < len; ++i) out[i] = scale * static_cast<float>(codes[i]);
}

QF_AVX2 void MatMulW8A8Avx2(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                            int64_t y_stride) {
  const int64_t cols = v.cols;
  std::vector<int8_t> qx(static_cast<size_t>(n * cols));
  std::vector<float> sx(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) sx[t] = QuantizeTokenAvx2(x + t * cols, cols, qx.data() + t * cols);
  constexpr int kTile = 4;
  int32_t dots[kTile];
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = W8A8Row(v, r);
    const float sw = W8A8Scale(v, r);
    int64_t t = 0;
    for (; t + kTile <= n; t += kTile) {
      DotTile<kTile>(w, qx.data() + t * cols, cols, dots);
      for (int k = 0; k < kTile; ++k) y[(t + k) * y_stride + r] = (sx[t + k] * sw) * static_cast<float>(dots[k]);
    }
    for (; t < n; ++t) {
      DotTile<1>(w, qx.data() + t * cols, cols, dots);
      y[t * y_stride + r] = (sx[t] * sw) * static_cast<float>(dots[0]);
    }
  }
}

}  // namespace qforge::kernels::internal
