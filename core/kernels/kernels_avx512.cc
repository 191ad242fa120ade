// AVX-512 (F, BW, DQ, VL) kernels: 16-lane decoders for Q8_0, Q4_0 and Q4_K (the AVX-512 slots of the ggml
// table, ggml_kernels.cc), and a 16-lane dot product shared by every n (see "Batch invariance" in
// kernels_avx2.cc; the same rules at 16 lanes). Other formats decode with the AVX2 code (every AVX-512 CPU has
// AVX2).
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

// Batch invariance: the rules of kernels_avx2.cc at 16 lanes. Vector v = c / 16 of the row's first
// 16 * (cols / 16) weights is FMA'd into chain v % 4 in increasing v; the result is
// reduce((c0 + c1) + (c2 + c3)) + tail, tail being the last cols % 16 products summed in column order
// from 0. Each chain sees its own vectors in order however many tokens share a weight vector: same bits.

QF_AVX512 inline float FinishDot(const float* acc, float tail) {
  const __m512 s01 = _mm512_add_ps(_mm512_loadu_ps(acc), _mm512_loadu_ps(acc + 16));
  const __m512 s23 = _mm512_add_ps(_mm512_loadu_ps(acc + 32), _mm512_loadu_ps(acc + 48));
  return _mm512_reduce_add_ps(_mm512_add_ps(s01, s23)) + tail;
}

// One token over w[0, len), the four chains interleaved. acc (64 floats) and tail carry across chunks.
QF_AVX512 void AccumulateOne(const float* w, int64_t len, const float* x, float* acc, float* tail) {
  __m512 a0 = _mm512_loadu_ps(acc), a1 = _mm512_loadu_ps(acc + 16);
  __m512 a2 = _mm512_loadu_ps(acc + 32), a3 = _mm512_loadu_ps(acc + 48);
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  // Up to three whole vectors left (only in a row's last chunk): chains 0, 1, 2.
  if (i + 16 <= len) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    i += 16;
    if (i + 16 <= len) {
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a1);
      i += 16;
      if (i + 16 <= len) {
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a2);
        i += 16;
      }
    }
  }
  _mm512_storeu_ps(acc, a0);
  _mm512_storeu_ps(acc + 16, a1);
  _mm512_storeu_ps(acc + 32, a2);
  _mm512_storeu_ps(acc + 48, a3);
  for (; i < len; ++i) *tail += w[i] * x[i];
}

// kTile (2..6) tokens, all four chains of each interleaved: 4 * kTile accumulators in registers, each
// weight vector loaded once for kTile tokens, sequential reads (as in kernels_avx2.cc, where running the
// chains one after another was measured slower). acc: 64 floats a token.
template <int kTile>
QF_AVX512 void AccumulateTile(const float* w, int64_t len, const float* x, int64_t x_stride, float* acc,
                              float* tail) {
  static_assert(kTile >= 2 && kTile <= 6, "4 * kTile accumulators plus a weight vector must fit 32 registers");
  __m512 a[kTile][4];
  for (int t = 0; t < kTile; ++t) {
    for (int k = 0; k < 4; ++k) a[t][k] = _mm512_loadu_ps(acc + 64 * t + 16 * k);
  }
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    for (int k = 0; k < 4; ++k) {
      const __m512 wv = _mm512_loadu_ps(w + i + 16 * k);
      for (int t = 0; t < kTile; ++t) {
        a[t][k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * x_stride + i + 16 * k), a[t][k]);
      }
    }
  }
  // Up to three whole vectors left (only in a row's last span): chains 0, 1, 2.
  for (int k = 0; k < 3 && i + 16 <= len; ++k, i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    for (int t = 0; t < kTile; ++t) a[t][k] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + t * x_stride + i), a[t][k]);
  }
  for (int t = 0; t < kTile; ++t) {
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(acc + 64 * t + 16 * k, a[t][k]);
  }
  for (; i < len; ++i) {
    for (int t = 0; t < kTile; ++t) tail[t] += w[i] * x[t * x_stride + i];
  }
}

// Tokens [0, n): tiles of 6, then one tile of the remainder (same bits per token whatever the tile).
QF_AVX512 void AccumulateTokens(const float* w, int64_t len, const float* x, int64_t x_stride, int64_t n,
                                float* acc, float* tail) {
  int64_t t = 0;
  for (; t + 6 <= n; t += 6) AccumulateTile<6>(w, len, x + t * x_stride, x_stride, acc + 64 * t, tail + t);
  const float* xt = x + t * x_stride;
  float* at = acc + 64 * t;
  float* tt = tail + t;
  switch (n - t) {
    case 0: break;
    case 1: AccumulateOne(w, len, xt, at, tt); break;
    case 2: AccumulateTile<2>(w, len, xt, x_stride, at, tt); break;
    case 3: AccumulateTile<3>(w, len, xt, x_stride, at, tt); break;
    case 4: AccumulateTile<4>(w, len, xt, x_stride, at, tt); break;
    default: AccumulateTile<5>(w, len, xt, x_stride, at, tt); break;
  }
}

}  // namespace

QF_AVX512 void DequantizeQ8_0Avx512(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ8_0(reinterpret_cast<const block_q8_0*>(b), nblocks, out);
}
QF_AVX512 void DequantizeQ4_0Avx512(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ4_0(reinterpret_cast<const block_q4_0*>(b), nblocks, out);
}
QF_AVX512 void DequantizeQ4_KAvx512(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ4_K(reinterpret_cast<const block_q4_K*>(b), nblocks, out);
}

QF_AVX512 void DecodeAvx512(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  // The ggml types with an AVX-512 decoder in the table; everything else decodes as on AVX2 (the table's AVX2
  // decoder, else its scalar one; qforge's own formats their AVX2 code).
  if (v.ggml != nullptr && v.ggml->dequantize_avx512 != nullptr) {
    v.ggml->dequantize_avx512(GgmlBlocksAt(v, r, c0), len / v.block, out);
    return;
  }
  DecodeAvx2(v, r, c0, len, out);
}

QF_AVX512 void MatMulAvx512(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                            int64_t y_stride) {
  const int64_t cols = v.cols;
  const bool f32 = v.format.type == WeightType::kF32;
  // Every n takes this path: a span of the row (f32: the whole row, read in place; otherwise kSpan
  // columns decoded once into L1), then each token over it. For n = 1, AccumulateOne keeps four FMA
  // chains in flight.
  constexpr int64_t kSpan = 4 * kChunk;
  static_assert(kSpan % 64 == 0, "spans must keep the chain of every vector");
  alignas(64) float buf[kSpan];
  std::vector<float> acc(64 * static_cast<size_t>(n));  // four 16-lane chains per token
  std::vector<float> tail(static_cast<size_t>(n));
  const int64_t span = f32 ? cols : kSpan;
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(tail.begin(), tail.end(), 0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += span) {
      const int64_t len = std::min(span, cols - c0);
      const float* w = buf;
      if (f32) {
        w = reinterpret_cast<const float*>(v.data + static_cast<size_t>(r) * v.row_bytes) + c0;
      } else {
        DecodeAvx512(v, r, c0, len, buf);
      }
      AccumulateTokens(w, len, x + c0, cols, n, acc.data(), tail.data());
    }
    for (int64_t t = 0; t < n; ++t) y[t * y_stride + r] = FinishDot(&acc[64 * t], tail[t]);
  }
}

}  // namespace qforge::kernels::internal
