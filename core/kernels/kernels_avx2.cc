// AVX2 + FMA + F16C kernels, compiled with function-level target attributes so the rest of the binary
// stays baseline x86-64; only called after CPUID says the CPU has them.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "core/kernels/blocks.h"
#include "core/kernels/kernels_internal.h"

#define QF_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace qforge::kernels::internal {
namespace {

QF_AVX2 inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// f16 -> f32 with the F16C instruction: exact, like HalfToFloat, but branch-free.
QF_AVX2 inline float LoadHalfF16c(const void* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 8 unsigned bytes -> 8 floats.
QF_AVX2 inline __m256 U8x8ToFloat(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

QF_AVX2 void DecodeQ8_0(const block_q8_0* b, int64_t nblocks, float* out) {
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK8_0) {
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    for (int k = 0; k < 4; ++k) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b->qs + 8 * k));
      _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d));
    }
  }
}

QF_AVX2 void DecodeQ4_0(const block_q4_0* b, int64_t nblocks, float* out) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK4_0) {
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs));
    const __m128i lo = _mm_and_si128(raw, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) {
      const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), eight);
      _mm256_storeu_ps(out + 8 * k, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
    }
  }
}

QF_AVX2 void DecodeQ4_K(const block_q4_K* b, int64_t nblocks, float* out) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalfF16c(&b->d);
    const float dmin = LoadHalfF16c(&b->dmin);
    const uint8_t* q = b->qs;
    for (int chunk = 0; chunk < 4; ++chunk, q += 32) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const __m256 d1 = _mm256_set1_ps(d * sc1), min1 = _mm256_set1_ps(dmin * m1);
      const __m256 d2 = _mm256_set1_ps(d * sc2), min2 = _mm256_set1_ps(dmin * m2);
      for (int half = 0; half < 2; ++half) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * half));
        const __m128i lo = _mm_and_si128(raw, low_mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
        float* o_lo = out + 16 * half;
        float* o_hi = out + 32 + 16 * half;
        // mul then sub (no FMA) so the floats match the scalar reference bit for bit.
        _mm256_storeu_ps(o_lo, _mm256_sub_ps(_mm256_mul_ps(d1, U8x8ToFloat(lo)), min1));
        _mm256_storeu_ps(o_lo + 8, _mm256_sub_ps(_mm256_mul_ps(d1, U8x8ToFloat(_mm_srli_si128(lo, 8))), min1));
        _mm256_storeu_ps(o_hi, _mm256_sub_ps(_mm256_mul_ps(d2, U8x8ToFloat(hi)), min2));
        _mm256_storeu_ps(o_hi + 8, _mm256_sub_ps(_mm256_mul_ps(d2, U8x8ToFloat(_mm_srli_si128(hi, 8))), min2));
      }
      out += 64;
    }
  }
}

// 8 codes of kBits each, LSB-first in exactly kBits bytes, widened to 8 int32 lanes.
template <int kBits>
QF_AVX2 inline __m256i Load8Codes(const uint8_t* src) {
  if constexpr (kBits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  } else if constexpr (kBits == 4) {
    uint32_t packed;
    std::memcpy(&packed, src, 4);
    const __m128i raw = _mm_cvtsi32_si128(static_cast<int>(packed));
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    // Even elements are low nibbles: interleave low and high nibbles of each byte.
    return _mm256_cvtepu8_epi32(
        _mm_unpacklo_epi8(_mm_and_si128(raw, low_mask), _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask)));
  } else {
    // Assemble the 8*kBits-bit word in a register (no partial-store forwarding stalls), shift each
    // 64-bit lane by its code's bit offset, then gather the low halves into code order.
    uint64_t word = 0;
    for (int i = 0; i < kBits; ++i) word |= static_cast<uint64_t>(src[i]) << (8 * i);
    const __m256i w = _mm256_set1_epi64x(static_cast<long long>(word));
    const __m256i mask = _mm256_set1_epi64x((1 << kBits) - 1);
    const __m256i first = _mm256_and_si256(_mm256_srlv_epi64(w, _mm256_setr_epi64x(0, kBits, 2 * kBits, 3 * kBits)), mask);
    const __m256i second =
        _mm256_and_si256(_mm256_srlv_epi64(w, _mm256_setr_epi64x(4 * kBits, 5 * kBits, 6 * kBits, 7 * kBits)), mask);
    // 32-bit lanes now hold codes 0,4,1,5,2,6,3,7.
    const __m256i mixed = _mm256_or_si256(first, _mm256_slli_epi64(second, 32));
    return _mm256_permutevar8x32_epi32(mixed, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
  }
}

// Consumers of 8 decoded weights at a time: store them (dequantize, matmul chunks) or multiply them
// straight into one token's dot product (the fused n = 1 path).
struct StoreSink {
  float* out;
  QF_AVX2 void operator()(int64_t i, __m256 w) { _mm256_storeu_ps(out + i, w); }
};
// Vector v of the walk goes into chain v % 4 (see "Batch invariance" below). The chains rotate one register
// per vector, so c0 is always the chain the next vector belongs to; ChainAt undoes the rotation at the end.
struct ChainSink {
  const float* x;
  __m256 c0, c1, c2, c3;
  QF_AVX2 void operator()(int64_t i, __m256 w) {
    const __m256 a = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i), c0);
    c0 = c1;
    c1 = c2;
    c2 = c3;
    c3 = a;
  }
};

// QInt, 8 elements per step: needs every 8 consecutive elements in one group and c0 % 8 == 0, so each
// step's codes start on a byte boundary (8 codes = kBits bytes). Returns how many elements were emitted
// (a multiple of 8); the caller handles the rest.
template <int kBits, typename Sink>
QF_AVX2 int64_t WalkQInt(const WeightView& v, int64_t r, int64_t c0, int64_t len, Sink& sink) {
  const WeightFormat& f = v.format;
  const QIntLayout& l = v.qint;
  const uint8_t* codes = v.data + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
  const uint8_t* scales = v.data + l.scales_offset + 2 * static_cast<size_t>(r * l.groups_per_row);
  const uint8_t* zeros = f.symmetric ? nullptr : v.data + l.zeros_offset + static_cast<size_t>(r * l.groups_per_row);
  constexpr int kSymZero = 1 << (kBits - 1);
  // Scale and zero change only at group boundaries; track the next one instead of dividing per vector.
  int64_t next_group_start = -1;
  __m256 scale = _mm256_setzero_ps();
  __m256i zero = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const int64_t c = c0 + i;
    if (c >= next_group_start) {
      const int64_t g = c / l.group;
      next_group_start = (g + 1) * l.group;
      scale = _mm256_set1_ps(LoadHalfF16c(scales + 2 * g));
      zero = _mm256_set1_epi32(zeros ? zeros[g] : kSymZero);
    }
    const __m256i q = _mm256_sub_epi32(Load8Codes<kBits>(codes + c / 8 * kBits), zero);
    sink(i, _mm256_mul_ps(scale, _mm256_cvtepi32_ps(q)));
  }
  return i;
}

inline bool QIntSimdOk(const WeightView& v, int64_t c0) {
  return (v.qint.groups_per_row == 1 || v.qint.group % 8 == 0) && c0 % 8 == 0;
}

template <typename Sink>
QF_AVX2 int64_t WalkQIntAnyBits(const WeightView& v, int64_t r, int64_t c0, int64_t len, Sink& sink) {
  switch (v.format.bits) {
    case 2: return WalkQInt<2>(v, r, c0, len, sink);
    case 3: return WalkQInt<3>(v, r, c0, len, sink);
    case 4: return WalkQInt<4>(v, r, c0, len, sink);
    case 5: return WalkQInt<5>(v, r, c0, len, sink);
    case 6: return WalkQInt<6>(v, r, c0, len, sink);
    case 7: return WalkQInt<7>(v, r, c0, len, sink);
    case 8: return WalkQInt<8>(v, r, c0, len, sink);
    default: return 0;
  }
}

// NF4: a 16-entry float table looked up with two 8-lane permutes selected by the code's bit 3.
template <typename Sink>
QF_AVX2 int64_t WalkNf4(const WeightView& v, int64_t r, int64_t c0, int64_t len, Sink& sink) {
  const int64_t block = v.nf4.block;
  const __m256 table_lo = _mm256_loadu_ps(kNf4Levels);
  const __m256 table_hi = _mm256_loadu_ps(kNf4Levels + 8);
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const int64_t base = r * v.cols + c0;  // multiple of 8: cols is a multiple of the block
  int64_t i = 0;
  int64_t next_block_start = -1;  // first element of the block after the cached one
  __m256 scale = _mm256_setzero_ps();
  for (; i + 8 <= len; i += 8) {
    const int64_t e = base + i;
    if (e >= next_block_start) {
      const int64_t b = e / block;
      next_block_start = (b + 1) * block;
      scale = _mm256_set1_ps(Nf4BlockScale(v, b));
    }
    uint32_t packed;
    std::memcpy(&packed, v.data + v.nf4.codes_offset + static_cast<size_t>(e / 2), 4);
    const __m128i raw = _mm_cvtsi32_si128(static_cast<int>(packed));
    const __m128i nibbles =
        _mm_unpacklo_epi8(_mm_and_si128(raw, low_mask), _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask));
    const __m256i idx = _mm256_cvtepu8_epi32(nibbles);
    const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
    const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
    const __m256 level = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    sink(i, _mm256_mul_ps(scale, level));
  }
  return i;
}

inline bool Nf4SimdOk(const WeightView& v, int64_t c0) { return v.nf4.block % 8 == 0 && c0 % 8 == 0; }

QF_AVX2 void DecodeQInt(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  StoreSink sink{out};
  const int64_t done = QIntSimdOk(v, c0) ? WalkQIntAnyBits(v, r, c0, len, sink) : 0;
  if (done < len) DecodeScalar(v, r, c0 + done, len - done, out + done);
}

QF_AVX2 void DecodeNf4(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  StoreSink sink{out};
  const int64_t done = Nf4SimdOk(v, c0) ? WalkNf4(v, r, c0, len, sink) : 0;
  if (done < len) DecodeScalar(v, r, c0 + done, len - done, out + done);
}

QF_AVX2 void DecodeF16(const uint8_t* src, int64_t len, float* out) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i))));
  }
  for (; i < len; ++i) out[i] = LoadHalfF16c(src + 2 * i);
}

QF_AVX2 void DecodeBf16(const uint8_t* src, int64_t len, float* out) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < len; ++i) {
    uint16_t b;
    std::memcpy(&b, src + 2 * i, 2);
    out[i] = Bf16ToFloat(b);
  }
}

// Batch invariance. Every (token, row) dot product has one fixed operation order, whatever n is and
// wherever the token sits in the call, so a token's result never depends on its batch:
//   - the row's first 8 * (cols / 8) weights form vectors v = c / 8, and vector v is FMA'd into chain
//     v % 4 (four 8-lane accumulators), in increasing v within each chain;
//   - the weights are the decoder's floats (bit-identical to DecodeAvx2 / the scalar reference);
//   - the result is Hsum((c0 + c1) + (c2 + c3)) + tail, where tail sums the last cols % 8 products in
//     column order, starting from 0, without FMA.
// Each chain only ever sees its own vectors in order, so a tile of several tokens sharing each weight
// vector and one token alone give the same bits; so do the fused n = 1 loops, which build the same
// weight vectors in registers instead of a buffer. Spans of a row start at multiples of 32, so a
// span-local vector index has the same chain as the row-global one.

// Four chains of a token, as stored between chunks: acc[8 * k + lane] is lane `lane` of chain k.
QF_AVX2 inline float FinishDot(const float* acc, float tail) {
  const __m256 s01 = _mm256_add_ps(_mm256_loadu_ps(acc), _mm256_loadu_ps(acc + 8));
  const __m256 s23 = _mm256_add_ps(_mm256_loadu_ps(acc + 16), _mm256_loadu_ps(acc + 24));
  return Hsum(_mm256_add_ps(s01, s23)) + tail;
}
QF_AVX2 inline float FinishDot(__m256 c0, __m256 c1, __m256 c2, __m256 c3, float tail) {
  return Hsum(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3))) + tail;
}

// One token over w[0, len): the four chains interleaved. acc (32 floats) and tail carry across chunks.
QF_AVX2 void AccumulateOne(const float* w, int64_t len, const float* x, float* acc, float* tail) {
  __m256 a0 = _mm256_loadu_ps(acc), a1 = _mm256_loadu_ps(acc + 8);
  __m256 a2 = _mm256_loadu_ps(acc + 16), a3 = _mm256_loadu_ps(acc + 24);
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  // Up to three whole vectors left (only in a row's last chunk): chains 0, 1, 2.
  if (i + 8 <= len) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    i += 8;
    if (i + 8 <= len) {
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a1);
      i += 8;
      if (i + 8 <= len) {
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a2);
        i += 8;
      }
    }
  }
  _mm256_storeu_ps(acc, a0);
  _mm256_storeu_ps(acc + 8, a1);
  _mm256_storeu_ps(acc + 16, a2);
  _mm256_storeu_ps(acc + 24, a3);
  for (; i < len; ++i) *tail += w[i] * x[i];
}

// kTile (2 or 3) tokens over w[0, len), all four chains of each interleaved: 4 * kTile accumulators
// stay in registers, each weight vector is loaded once for kTile tokens, and weights and tokens are
// read sequentially (prefetch-friendly). acc holds 32 floats per token, tail one. (Running the chains
// one after another for 8 tokens instead gave the same bits but was ~1.5x slower on f32: strided reads
// and accumulator traffic per pass.)
template <int kTile>
QF_AVX2 void AccumulateTile(const float* w, int64_t len, const float* x, int64_t x_stride, float* acc,
                            float* tail) {
  static_assert(kTile >= 2 && kTile <= 3, "4 * kTile accumulators plus a weight vector must fit 16 registers");
  __m256 a[kTile][4];
  for (int t = 0; t < kTile; ++t) {
    for (int k = 0; k < 4; ++k) a[t][k] = _mm256_loadu_ps(acc + 32 * t + 8 * k);
  }
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 wv = _mm256_loadu_ps(w + i + 8 * k);
      for (int t = 0; t < kTile; ++t) {
        a[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * x_stride + i + 8 * k), a[t][k]);
      }
    }
  }
  // Up to three whole vectors left (only in a row's last chunk): chains 0, 1, 2.
  for (int k = 0; k < 3 && i + 8 <= len; ++k, i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int t = 0; t < kTile; ++t) a[t][k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * x_stride + i), a[t][k]);
  }
  for (int t = 0; t < kTile; ++t) {
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(acc + 32 * t + 8 * k, a[t][k]);
  }
  for (; i < len; ++i) {
    for (int t = 0; t < kTile; ++t) tail[t] += w[i] * x[t * x_stride + i];
  }
}

// Tokens [0, n) over w[0, len): tiles of 3, then 2 or 1 (same bits per token whatever the tile).
QF_AVX2 void AccumulateTokens(const float* w, int64_t len, const float* x, int64_t x_stride, int64_t n,
                              float* acc, float* tail) {
  int64_t t = 0;
  for (; t + 3 <= n; t += 3) AccumulateTile<3>(w, len, x + t * x_stride, x_stride, acc + 32 * t, tail + t);
  if (n - t == 2) AccumulateTile<2>(w, len, x + t * x_stride, x_stride, acc + 32 * t, tail + t);
  if (n - t == 1) AccumulateOne(w, len, x + t * x_stride, acc + 32 * t, tail + t);
}

// One-token dot products (the decode path, n = 1) that decode in registers: each weight vector is built
// with exactly DecodeAvx2's operations and goes straight into its chain, so there is no decoded buffer
// and the bits are those of decode-then-AccumulateOne.
QF_AVX2 float DotF32(const float* w, int64_t len, const float* x) {
  alignas(32) float acc[32] = {};
  float tail = 0;
  AccumulateOne(w, len, x, acc, &tail);
  return FinishDot(acc, tail);
}

QF_AVX2 float DotQ8_0(const block_q8_0* b, int64_t nblocks, const float* x) {
  __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < nblocks; ++i, ++b, x += kQK8_0) {
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    for (int k = 0; k < 4; ++k) {  // a block is vectors 4i .. 4i + 3: chains 0..3
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b->qs + 8 * k));
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
      c[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * k), c[k]);
    }
  }
  return FinishDot(c[0], c[1], c[2], c[3], 0.0f);
}

QF_AVX2 float DotQ4_0(const block_q4_0* b, int64_t nblocks, const float* x) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m256i eight = _mm256_set1_epi32(8);
  __m256 c[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < nblocks; ++i, ++b, x += kQK4_0) {
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs));
    const __m128i lo = _mm_and_si128(raw, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int k = 0; k < 4; ++k) {
      const __m256i q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[k]), eight);
      const __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
      c[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + 8 * k), c[k]);
    }
  }
  return FinishDot(c[0], c[1], c[2], c[3], 0.0f);
}

QF_AVX2 float DotQ4_K(const block_q4_K* b, int64_t nblocks, const float* x) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(), c3 = _mm256_setzero_ps();
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalfF16c(&b->d);
    const float dmin = LoadHalfF16c(&b->dmin);
    const uint8_t* q = b->qs;
    for (int chunk = 0; chunk < 4; ++chunk, q += 32, x += 64) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const __m256 d1 = _mm256_set1_ps(d * sc1), min1 = _mm256_set1_ps(dmin * m1);
      const __m256 d2 = _mm256_set1_ps(d * sc2), min2 = _mm256_set1_ps(dmin * m2);
      // 64 weights = vectors 0..7 of this stretch: 0..3 low nibbles, 4..7 high; chain = vector % 4.
      for (int half = 0; half < 2; ++half) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * half));
        const __m128i lo = _mm_and_si128(raw, low_mask);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
        const float* xl = x + 16 * half;
        const float* xh = x + 32 + 16 * half;
        const __m256 w0 = _mm256_sub_ps(_mm256_mul_ps(d1, U8x8ToFloat(lo)), min1);
        const __m256 w1 = _mm256_sub_ps(_mm256_mul_ps(d1, U8x8ToFloat(_mm_srli_si128(lo, 8))), min1);
        const __m256 w4 = _mm256_sub_ps(_mm256_mul_ps(d2, U8x8ToFloat(hi)), min2);
        const __m256 w5 = _mm256_sub_ps(_mm256_mul_ps(d2, U8x8ToFloat(_mm_srli_si128(hi, 8))), min2);
        if (half == 0) {  // vectors 0, 1, 4, 5: chains 0, 1, 0, 1
          c0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xl), c0);
          c1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xl + 8), c1);
          c0 = _mm256_fmadd_ps(w4, _mm256_loadu_ps(xh), c0);
          c1 = _mm256_fmadd_ps(w5, _mm256_loadu_ps(xh + 8), c1);
        } else {  // vectors 2, 3, 6, 7: chains 2, 3, 2, 3
          c2 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xl), c2);
          c3 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xl + 8), c3);
          c2 = _mm256_fmadd_ps(w4, _mm256_loadu_ps(xh), c2);
          c3 = _mm256_fmadd_ps(w5, _mm256_loadu_ps(xh + 8), c3);
        }
      }
    }
  }
  return FinishDot(c0, c1, c2, c3, 0.0f);
}

// QInt / NF4 through their walkers; the last cols % 8 weights (if any) are decoded by the scalar
// reference, as DecodeQInt / DecodeNf4 do, and summed as the tail.
QF_AVX2 float DotWalked(const WeightView& v, int64_t r, const float* x) {
  ChainSink sink{x, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  const int64_t done = v.format.type == WeightType::kQInt ? WalkQIntAnyBits(v, r, 0, v.cols, sink)
                                                          : WalkNf4(v, r, 0, v.cols, sink);
  const __m256 rotated[4] = {sink.c0, sink.c1, sink.c2, sink.c3};
  const int64_t s = done / 8;  // after s vectors, chain k sits at position (k - s) mod 4
  float tail = 0;
  if (done < v.cols) {
    float rest[8];
    DecodeScalar(v, r, done, v.cols - done, rest);
    for (int64_t c = done; c < v.cols; ++c) tail += rest[c - done] * x[c];
  }
  return FinishDot(rotated[(0 - s) & 3], rotated[(1 - s) & 3], rotated[(2 - s) & 3], rotated[(3 - s) & 3], tail);
}

}  // namespace

QF_AVX2 void DequantizeF16Avx2(const uint8_t* b, int64_t n, float* out) { DecodeF16(b, n, out); }
QF_AVX2 void DequantizeBF16Avx2(const uint8_t* b, int64_t n, float* out) { DecodeBf16(b, n, out); }
QF_AVX2 void DequantizeQ8_0Avx2(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ8_0(reinterpret_cast<const block_q8_0*>(b), nblocks, out);
}
QF_AVX2 void DequantizeQ4_0Avx2(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ4_0(reinterpret_cast<const block_q4_0*>(b), nblocks, out);
}
QF_AVX2 void DequantizeQ4_KAvx2(const uint8_t* b, int64_t nblocks, float* out) {
  DecodeQ4_K(reinterpret_cast<const block_q4_K*>(b), nblocks, out);
}

QF_AVX2 void DecodeAvx2(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  if (v.ggml != nullptr) {  // the ggml types: the table's AVX2 decoder, or its scalar one where none exists yet
    const DequantizeBlocksFn fn = v.ggml->dequantize_avx2 != nullptr ? v.ggml->dequantize_avx2 : v.ggml->dequantize;
    fn(GgmlBlocksAt(v, r, c0), len / v.block, out);
    return;
  }
  switch (v.format.type) {
    case WeightType::kQInt: DecodeQInt(v, r, c0, len, out); return;
    case WeightType::kNF4: DecodeNf4(v, r, c0, len, out); return;
    case WeightType::kSpQR: DecodeSpqrScalar(v, r, c0, len, out); return;  // scalar decode, SIMD dot
    case WeightType::kW8A8: DecodeW8A8Avx2(v, r, c0, len, out); return;
    case WeightType::kQuip: return;  // never viewed row by row: kernels.cc routes it to quip.cc
    default: return;                 // the ggml types: v.ggml above
  }
}

QF_AVX2 void MatMulAvx2(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                        int64_t y_stride) {
  const int64_t cols = v.cols;
  const WeightType type = v.format.type;
  if (n == 1) {
    // Decode: the fused in-register loops where they exist (no buffer round trip), otherwise the chunked
    // path below with one token. Same bits either way.
    const bool qint_fused = type == WeightType::kQInt && QIntSimdOk(v, 0);
    const bool nf4_fused = type == WeightType::kNF4 && Nf4SimdOk(v, 0);
    const bool fused = type == WeightType::kF32 || type == WeightType::kQ8_0 || type == WeightType::kQ4_0 ||
                       type == WeightType::kQ4_K || qint_fused || nf4_fused;
    if (fused) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* row = v.data + static_cast<size_t>(r) * v.row_bytes;
        switch (type) {
          case WeightType::kF32: y[r] = DotF32(reinterpret_cast<const float*>(row), cols, x); break;
          case WeightType::kQ8_0: y[r] = DotQ8_0(reinterpret_cast<const block_q8_0*>(row), cols / kQK8_0, x); break;
          case WeightType::kQ4_0: y[r] = DotQ4_0(reinterpret_cast<const block_q4_0*>(row), cols / kQK4_0, x); break;
          case WeightType::kQ4_K: y[r] = DotQ4_K(reinterpret_cast<const block_q4_K*>(row), cols / kQK_K, x); break;
          default: y[r] = DotWalked(v, r, x); break;  // QInt, NF4
        }
      }
      return;
    }
  }
  // Multi-token (and one token of the other formats): each token over a span of the row held in L1/L2.
  // f32 needs no decode, so its span is the whole row read in place; other formats decode a span of
  // kSpan columns once and every token consumes it. Spans are long so the accumulators' load/store per
  // span and tile stays small next to the FMAs.
  constexpr int64_t kSpan = 4 * kChunk;
  static_assert(kSpan % 32 == 0, "spans must keep the chain of every vector");
  alignas(32) float buf[kSpan];
  std::vector<float> acc(32 * static_cast<size_t>(n));  // four 8-lane chains per token
  std::vector<float> tail(static_cast<size_t>(n));
  const int64_t span = type == WeightType::kF32 ? cols : kSpan;
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(tail.begin(), tail.end(), 0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += span) {
      const int64_t len = std::min(span, cols - c0);
      const float* w = buf;
      if (type == WeightType::kF32) {
        w = reinterpret_cast<const float*>(v.data + static_cast<size_t>(r) * v.row_bytes) + c0;
      } else {
        DecodeAvx2(v, r, c0, len, buf);
      }
      AccumulateTokens(w, len, x + c0, cols, n, acc.data(), tail.data());
    }
    for (int64_t t = 0; t < n; ++t) y[t * y_stride + r] = FinishDot(&acc[32 * t], tail[t]);
  }
}

QF_AVX2 void RowErrorLanesAvx2(const float* ref, const float* row, int64_t blocks, double* e, double* n) {
  __m256d e_lo = _mm256_setzero_pd(), e_hi = e_lo, n_lo = e_lo, n_hi = e_lo;
  for (int64_t b = 0; b < blocks; ++b, ref += 8, row += 8) {
    const __m256 w = _mm256_loadu_ps(ref), r = _mm256_loadu_ps(row);
    const __m256d w_lo = _mm256_cvtps_pd(_mm256_castps256_ps128(w));
    const __m256d w_hi = _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1));
    const __m256d d_lo = _mm256_sub_pd(w_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(r)));
    const __m256d d_hi = _mm256_sub_pd(w_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1)));
    e_lo = _mm256_add_pd(e_lo, _mm256_mul_pd(d_lo, d_lo));
    e_hi = _mm256_add_pd(e_hi, _mm256_mul_pd(d_hi, d_hi));
    n_lo = _mm256_add_pd(n_lo, _mm256_mul_pd(w_lo, w_lo));
    n_hi = _mm256_add_pd(n_hi, _mm256_mul_pd(w_hi, w_hi));
  }
  _mm256_storeu_pd(e, e_lo);
  _mm256_storeu_pd(e + 4, e_hi);
  _mm256_storeu_pd(n, n_lo);
  _mm256_storeu_pd(n + 4, n_hi);
}

}  // namespace qforge::kernels::internal
