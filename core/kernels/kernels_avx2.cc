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
// straight into a running dot product with one token (the fused n = 1 path).
struct StoreSink {
  float* out;
  QF_AVX2 void operator()(int64_t i, __m256 w) { _mm256_storeu_ps(out + i, w); }
};
struct DotSink {
  const float* x;
  __m256 acc0, acc1;  // two chains, alternating, to hide FMA latency
  QF_AVX2 void operator()(int64_t i, __m256 w) {
    if (i & 8) {
      acc1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i), acc1);
    } else {
      acc0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + i), acc0);
    }
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

// Dot product of one weight span with one token, four independent FMA chains to hide latency.
QF_AVX2 float DotF32(const float* a, const float* b, int64_t len) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), acc3);
  }
  for (; i + 8 <= len; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = Hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
  for (; i < len; ++i) sum += a[i] * b[i];
  return sum;
}

// Fused decode-dot for one token (the decode path, n = 1): no decoded buffer, and the block scale is
// applied once per block to a partial sum instead of once per weight.
QF_AVX2 inline __m256 I8x8ToFloat(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)); }

// Eight partial sums of q_l * x_l over one 32-weight block whose int8 codes are q[0..15] = `lo`, q[16..31] = `hi`
// (Q8_0 and Q4_0 differ only in how they produce those codes).
QF_AVX2 inline __m256 DotI8x32(__m128i lo, __m128i hi, const float* x) {
  __m256 s0 = _mm256_mul_ps(I8x8ToFloat(lo), _mm256_loadu_ps(x));
  __m256 s1 = _mm256_mul_ps(I8x8ToFloat(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x + 8));
  s0 = _mm256_fmadd_ps(I8x8ToFloat(hi), _mm256_loadu_ps(x + 16), s0);
  s1 = _mm256_fmadd_ps(I8x8ToFloat(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x + 24), s1);
  return _mm256_add_ps(s0, s1);
}

QF_AVX2 float DotQ8_0(const block_q8_0* b, int64_t nblocks, const float* x) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < nblocks; ++i, ++b, x += kQK8_0) {
    const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs));
    const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs + 16));
    const __m256 s = DotI8x32(q0, q1, x);
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    if (i & 1) {
      acc1 = _mm256_fmadd_ps(d, s, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(d, s, acc0);
    }
  }
  return Hsum(_mm256_add_ps(acc0, acc1));
}

QF_AVX2 float DotQ4_0(const block_q4_0* b, int64_t nblocks, const float* x) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  const __m128i eight = _mm_set1_epi8(8);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t i = 0; i < nblocks; ++i, ++b, x += kQK4_0) {
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b->qs));
    const __m128i lo = _mm_sub_epi8(_mm_and_si128(raw, low_mask), eight);  // elements 0..15, q - 8
    const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), low_mask), eight);  // 16..31
    const __m256 s = DotI8x32(lo, hi, x);
    const __m256 d = _mm256_set1_ps(LoadHalfF16c(&b->d));
    if (i & 1) {
      acc1 = _mm256_fmadd_ps(d, s, acc1);
    } else {
      acc0 = _mm256_fmadd_ps(d, s, acc0);
    }
  }
  return Hsum(_mm256_add_ps(acc0, acc1));
}

// sum_l (d*sc*q_l - dmin*m) * x_l = (d*sc) * sum q_l x_l - (dmin*m) * sum x_l, per 32-weight sub-block.
QF_AVX2 float DotQ4_K(const block_q4_K* b, int64_t nblocks, const float* x) {
  const __m128i low_mask = _mm_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalfF16c(&b->d);
    const float dmin = LoadHalfF16c(&b->dmin);
    const uint8_t* q = b->qs;
    for (int chunk = 0; chunk < 4; ++chunk, q += 32, x += 64) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const __m128i raw0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      const __m128i raw1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16));
      const __m128i lo0 = _mm_and_si128(raw0, low_mask), lo1 = _mm_and_si128(raw1, low_mask);
      const __m128i hi0 = _mm_and_si128(_mm_srli_epi16(raw0, 4), low_mask);
      const __m128i hi1 = _mm_and_si128(_mm_srli_epi16(raw1, 4), low_mask);
      const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8);
      const __m256 x2 = _mm256_loadu_ps(x + 16), x3 = _mm256_loadu_ps(x + 24);
      const __m256 x4 = _mm256_loadu_ps(x + 32), x5 = _mm256_loadu_ps(x + 40);
      const __m256 x6 = _mm256_loadu_ps(x + 48), x7 = _mm256_loadu_ps(x + 56);
      __m256 qx1 = _mm256_mul_ps(U8x8ToFloat(lo0), x0);
      __m256 qx1b = _mm256_mul_ps(U8x8ToFloat(_mm_srli_si128(lo0, 8)), x1);
      qx1 = _mm256_fmadd_ps(U8x8ToFloat(lo1), x2, qx1);
      qx1b = _mm256_fmadd_ps(U8x8ToFloat(_mm_srli_si128(lo1, 8)), x3, qx1b);
      __m256 qx2 = _mm256_mul_ps(U8x8ToFloat(hi0), x4);
      __m256 qx2b = _mm256_mul_ps(U8x8ToFloat(_mm_srli_si128(hi0, 8)), x5);
      qx2 = _mm256_fmadd_ps(U8x8ToFloat(hi1), x6, qx2);
      qx2b = _mm256_fmadd_ps(U8x8ToFloat(_mm_srli_si128(hi1, 8)), x7, qx2b);
      const __m256 sx1 = _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3));
      const __m256 sx2 = _mm256_add_ps(_mm256_add_ps(x4, x5), _mm256_add_ps(x6, x7));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1), _mm256_add_ps(qx1, qx1b), acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m1), sx1, acc);
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d * sc2), _mm256_add_ps(qx2, qx2b), acc);
      acc = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * m2), sx2, acc);
    }
  }
  return Hsum(acc);
}

// Adds the decoded chunk w[0, len) times tokens [t0, t0 + kTile) into their vector accumulators: each
// weight vector is loaded once and used for every token in the tile.
template <int kTile>
QF_AVX2 void AccumulateTile(const float* w, int64_t len, const float* x, int64_t x_stride, float* acc,
                            float* tail) {
  __m256 a[kTile];
  for (int t = 0; t < kTile; ++t) a[t] = _mm256_loadu_ps(acc + 8 * t);
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int t = 0; t < kTile; ++t) a[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * x_stride + i), a[t]);
  }
  for (int t = 0; t < kTile; ++t) _mm256_storeu_ps(acc + 8 * t, a[t]);
  for (; i < len; ++i) {
    for (int t = 0; t < kTile; ++t) tail[t] += w[i] * x[t * x_stride + i];
  }
}

}  // namespace

QF_AVX2 void DecodeAvx2(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const uint8_t* row = v.data + static_cast<size_t>(r) * v.row_bytes;
  switch (v.format.type) {
    case WeightType::kF32: std::memcpy(out, row + 4 * c0, 4 * static_cast<size_t>(len)); return;
    case WeightType::kF16: DecodeF16(row + 2 * c0, len, out); return;
    case WeightType::kBF16: DecodeBf16(row + 2 * c0, len, out); return;
    case WeightType::kQ8_0:
      DecodeQ8_0(reinterpret_cast<const block_q8_0*>(row) + c0 / kQK8_0, len / kQK8_0, out);
      return;
    case WeightType::kQ4_0:
      DecodeQ4_0(reinterpret_cast<const block_q4_0*>(row) + c0 / kQK4_0, len / kQK4_0, out);
      return;
    case WeightType::kQ4_K:
      DecodeQ4_K(reinterpret_cast<const block_q4_K*>(row) + c0 / kQK_K, len / kQK_K, out);
      return;
    case WeightType::kQInt: DecodeQInt(v, r, c0, len, out); return;
    case WeightType::kNF4: DecodeNf4(v, r, c0, len, out); return;
  }
}

QF_AVX2 void MatMulAvx2(const WeightView& v, int64_t r0, int64_t r1, const float* x, int64_t n, float* y,
                        int64_t y_stride) {
  const int64_t cols = v.cols;
  if (v.format.type == WeightType::kF32) {
    // No decode step: stream the row straight from the weights.
    for (int64_t r = r0; r < r1; ++r) {
      const float* w = reinterpret_cast<const float*>(v.data + static_cast<size_t>(r) * v.row_bytes);
      if (n == 1) {
        y[r] = DotF32(w, x, cols);
        continue;
      }
      // Prompt: each weight vector loaded once per tile of tokens, straight from the matrix.
      float acc[8 * 8], tail[8];
      int64_t t = 0;
      for (; t + 8 <= n; t += 8) {
        std::fill(acc, acc + 64, 0.0f);
        std::fill(tail, tail + 8, 0.0f);
        AccumulateTile<8>(w, cols, x + t * cols, cols, acc, tail);
        for (int k = 0; k < 8; ++k) y[(t + k) * y_stride + r] = Hsum(_mm256_loadu_ps(acc + 8 * k)) + tail[k];
      }
      for (; t < n; ++t) y[t * y_stride + r] = DotF32(w, x + t * cols, cols);
    }
    return;
  }
  alignas(32) float buf[kChunk];
  std::vector<float> acc(8 * static_cast<size_t>(n));  // one 8-lane partial sum per token
  std::vector<float> tail(static_cast<size_t>(n));
  for (int64_t r = r0; r < r1; ++r) {
    if (n == 1) {
      const uint8_t* row = v.data + static_cast<size_t>(r) * v.row_bytes;
      switch (v.format.type) {
        case WeightType::kQ8_0:
          y[r] = DotQ8_0(reinterpret_cast<const block_q8_0*>(row), cols / kQK8_0, x);
          continue;
        case WeightType::kQ4_0:
          y[r] = DotQ4_0(reinterpret_cast<const block_q4_0*>(row), cols / kQK4_0, x);
          continue;
        case WeightType::kQ4_K:
          y[r] = DotQ4_K(reinterpret_cast<const block_q4_K*>(row), cols / kQK_K, x);
          continue;
        case WeightType::kQInt:
        case WeightType::kNF4: {
          const bool qint = v.format.type == WeightType::kQInt;
          if (qint ? !QIntSimdOk(v, 0) : !Nf4SimdOk(v, 0)) break;
          DotSink sink{x, _mm256_setzero_ps(), _mm256_setzero_ps()};
          const int64_t done = qint ? WalkQIntAnyBits(v, r, 0, cols, sink) : WalkNf4(v, r, 0, cols, sink);
          float sum = Hsum(_mm256_add_ps(sink.acc0, sink.acc1));
          if (done < cols) {  // fewer than 8 left
            DecodeScalar(v, r, done, cols - done, buf);
            for (int64_t c = done; c < cols; ++c) sum += buf[c - done] * x[c];
          }
          y[r] = sum;
          continue;
        }
        default:
          break;
      }
      // Other formats: decode a chunk into L1, then the multi-chain dot.
      float sum = 0;
      for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
        const int64_t len = std::min(kChunk, cols - c0);
        DecodeAvx2(v, r, c0, len, buf);
        sum += DotF32(buf, x + c0, len);
      }
      y[r] = sum;
      continue;
    }
    std::fill(acc.begin(), acc.end(), 0.0f);
    std::fill(tail.begin(), tail.end(), 0.0f);
    for (int64_t c0 = 0; c0 < cols; c0 += kChunk) {
      const int64_t len = std::min(kChunk, cols - c0);
      DecodeAvx2(v, r, c0, len, buf);  // once per block, reused by every token below
      int64_t t = 0;
      for (; t + 8 <= n; t += 8) AccumulateTile<8>(buf, len, x + t * cols + c0, cols, &acc[8 * t], &tail[t]);
      for (; t + 4 <= n; t += 4) AccumulateTile<4>(buf, len, x + t * cols + c0, cols, &acc[8 * t], &tail[t]);
      for (; t < n; ++t) AccumulateTile<1>(buf, len, x + t * cols + c0, cols, &acc[8 * t], &tail[t]);
    }
    for (int64_t t = 0; t < n; ++t) y[t * y_stride + r] = Hsum(_mm256_loadu_ps(&acc[8 * t])) + tail[t];
  }
}

}  // namespace qforge::kernels::internal
