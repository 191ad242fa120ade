// AVX-512 (F, BW, DQ, VL) kernels: F32 dot products for any n, and for prompts (n > 1) 16-lane decoders for
// Q8_0, Q4_0 and Q4_K feeding a 16-lane multi-token dot. Other formats decode with the AVX2 code (every
// AVX-512 CPU has AVX2); quantized n = 1 reuses the AVX2 fused decode-dot loops.
// GCC 12's avx512fintrin.h trips -Wmaybe-uninitialized on its own _mm512_undefined_* helpers (a known
// false positive in the header, not in this file).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/kernels/blocks.h"
#include "core/kernels/kernels_internal.h"

#define QF_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))

namespace qforge::kernels::internal {
namespace {

// 16 unsigned bytes -> 16 floats.
QF_AVX512 inline __m512 U8x16ToFloat(__m128i bytes) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)); }

QF_AVX512 void DecodeQ8_0(const block_q8_0* b, int64_t nblocks, float* out) {
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK8_0) {
    const __m512 d = _mm512_set1_ps(LoadHalf(&b->d));
    for (int k = 0; k < 2; ++k) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16 * k));
      _mm512_storeu_ps(out + 16 * k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
    }
  }
}

QF_AVX512 void DecodeQ4_0(const block_q4_0* b, int64_t nblocks, float* out) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK4_0) {
    const __m512 d = _mm512_set1_ps(LoadHalf(&b->d));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs));
    const __m128i lo = _mm_and_si128(raw, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
    const __m512i qlo = _mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight);
    const __m512i qhi = _mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight);
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_cvtepi32_ps(qlo), d));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_cvtepi32_ps(qhi), d));
  }
}

QF_AVX512 void DecodeQ4_K(const block_q4_K* b, int64_t nblocks, float* out) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const float dmin = LoadHalf(&b->dmin);
    const uint8_t* q = b->qs;
    for (int chunk = 0; chunk < 4; ++chunk, q += 32, out += 64) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const __m512 d1 = _mm512_set1_ps(d * sc1), min1 = _mm512_set1_ps(dmin * m1);
      const __m512 d2 = _mm512_set1_ps(d * sc2), min2 = _mm512_set1_ps(dmin * m2);
      for (int half = 0; half < 2; ++half) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * half));
        const __m128i lo = _mm_and_si128(raw, low_mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
        // mul then sub (no FMA): bit-identical to the scalar reference.
        _mm512_storeu_ps(out + 16 * half, _mm512_sub_ps(_mm512_mul_ps(d1, U8x16ToFloat(lo)), min1));
        _mm512_storeu_ps(out + 32 + 16 * half, _mm512_sub_ps(_mm512_mul_ps(d2, U8x16ToFloat(hi)), min2));
      }
    }
  }
}

QF_AVX512 float DotF32(const float* a, const float* b, int64_t len) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), _mm512_loadu_ps(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), _mm512_loadu_ps(b + i + 48), acc3);
  }
  for (; i + 16 <= len; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
  for (; i < len; ++i) sum += a[i] * b[i];
  return sum;
}

template <int kTile>
QF_AVX512 void AccumulateTile(const float* w, int64_t len, const float* x, int64_t x_stride, float* acc,
                              float* tail) {
  __m512 a[kTile];
  for (int t = 0; t < kTile; ++t) a[t] = _mm512_loadu_ps(acc + 16 * t);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    for (int t = 0; t < kTile; ++t) a[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * x_stride + i), a[t]);
  }
  for (int t = 0; t < kTile; ++t) _mm512_storeu_ps(acc + 16 * t, a[t]);
  for (; i < len; ++i) {
    for (int t = 0; t < kTile; ++t) tail[t] += w[i] * x[t * x_stride + i];
  }
}

}  // namespace

QF_AVX512 void DecodeAvx512(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const uint8_t* row = v.data + static_cast<size_t>(r) * v.row_bytes;
  switch (v.format.type) {
    case WeightType::kQ8_0:
      DecodeQ8_0(reinterpret_cast<const block_q8_0*>(row) + c0 / kQK8_0, len / kQK8_0, out);
      return;
    case WeightType::kQ4_0:
      DecodeQ4_0(reinterpret_cast<const block_q4_0*>(row) + c0 / kQK4_0, len / kQK4_0, out);
      return;
    case WeightType::kQ4_K:
      DecodeQ4_K(reinterpret_cast<const block_q4_K*>(row) + c0 / kQK_K, len / kQK_K, out);
      return;
    default:
      DecodeAvx2(v, r, c0, len, out);
      return;
  }
}

QF_AVX512 void MatMulAvx512(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                            int64_t y_stride) {
  const int64_t cols = v.cols;
  if (v.format.type == WeightType::kF32) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = reinterpret_cast<const float*>(v.data + static_cast<size_t>(r) * v.row_bytes);
      for (int64_t t = 0; t < n; ++t) y[t * y_stride + r] = DotF32(w, x + t * cols, cols);
    }
    return;
  }
  if (n == 1) {
    // One token: the AVX2 fused decode-dot loops (block scale applied per partial sum, no decoded buffer)
    // beat decode-then-dot at any vector width, so the n = 1 path is shared.
    MatMulAvx2(v, r0, r1, x, n, y, y_stride);
    return;
  }
  alignas(64) float buf[kChunk];
  std::vector<float> acc(16 * static_cast<size_t>(n));
  std::vector<float> tail(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(tail.begin(), tail.end(), 0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
      const int64_t len = std::min(kChunk, cols - c0);
      DecodeAvx512(v, r, c0, len, buf);
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) AccumulateTile<4>(buf, len, x + t * cols + c0, cols, &acc[16 * t], &tail[t]);
      for (; t < n; ++t) AccumulateTile<1>(buf, len, x + t * cols + c0, cols, &acc[16 * t], &tail[t]);
    }
    for (int64_t t = 0; t < n; ++t) y[t * y_stride + r] = _mm512_reduce_add_ps(_mm512_loadu_ps(&acc[16 * t])) + tail[t];
  }
}

}  // namespace qforge::kernels::internal
