// Scalar dequantizers of the ggml block types: the reference definition of each type's bytes (docs/encodings.md
// has the layouts). Each computes exactly the floats of ggml's dequantize_row_* for the same block: the same
// float operations in the same order (scales multiplied first, then the code; no FMA, -ffp-contract=off), so a
// GGUF file decodes to the same numbers in qforge and in llama.cpp. Multiplying by -1 is written as negation,
// which gives the same bits.
#include <cstring>

#include "core/base/half.h"
#include "core/kernels/blocks.h"
#include "core/kernels/ggml_kernels.h"
#include "core/kernels/iq_grids.h"

namespace qforge::kernels {
namespace {

template <typename Block>
const Block* Blocks(const uint8_t* b) {
  return reinterpret_cast<const Block*>(b);
}

inline uint16_t LoadU16(const void* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Eight weights of an IQ2 / IQ3 grid point with magnitudes `grid` (bytes), scale `dl` and sign mask `signs`.
inline void GridPoint8(uint64_t grid, float dl, uint8_t signs, float* out) {
  for (int j = 0; j < 8; ++j) {
    const float w = dl * static_cast<float>(GridByte(grid, j));
    out[j] = (signs >> j & 1) ? -w : w;
  }
}

// Four weights of an IQ3 grid point.
inline void GridPoint4(uint32_t grid, float dl, uint8_t signs, float* out) {
  for (int j = 0; j < 4; ++j) {
    const float w = dl * static_cast<float>(GridByte(grid, j));
    out[j] = (signs >> j & 1) ? -w : w;
  }
}

// Eight weights of an IQ1 grid point: dl * (g + delta), g in {-1, 0, 1}.
inline void Iq1Point8(uint64_t grid, float dl, float delta, float* out) {
  for (int j = 0; j < 8; ++j) {
    out[j] = dl * (static_cast<float>(static_cast<int8_t>(GridByte(grid, j))) + delta);
  }
}

}  // namespace

void DequantizeF32(const uint8_t* b, int64_t n, float* out) { std::memcpy(out, b, 4 * static_cast<size_t>(n)); }

void DequantizeF16(const uint8_t* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = LoadHalf(b + 2 * i);
}

void DequantizeBF16(const uint8_t* b, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(LoadU16(b + 2 * i));
}

void DequantizeQ8_0(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q8_0* b = Blocks<block_q8_0>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK8_0) {
    const float d = LoadHalf(&b->d);
    for (int j = 0; j < kQK8_0; ++j) out[j] = static_cast<float>(b->qs[j]) * d;
  }
}

void DequantizeQ4_0(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q4_0* b = Blocks<block_q4_0>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += kQK4_0) {
    const float d = LoadHalf(&b->d);
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      out[j] = static_cast<float>((b->qs[j] & 0xF) - 8) * d;
      out[j + kQK4_0 / 2] = static_cast<float>((b->qs[j] >> 4) - 8) * d;
    }
  }
}

void DequantizeQ4_1(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q4_1* b = Blocks<block_q4_1>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += 32) {
    const float d = LoadHalf(&b->d);
    const float m = LoadHalf(&b->m);
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(b->qs[j] & 0xF) * d + m;
      out[j + 16] = static_cast<float>(b->qs[j] >> 4) * d + m;
    }
  }
}

void DequantizeQ5_0(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q5_0* b = Blocks<block_q5_0>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += 32) {
    const float d = LoadHalf(&b->d);
    const uint32_t qh = LoadU32(b->qh);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b->qs[j] & 0xF) | static_cast<int>((qh >> j & 1) << 4);
      const int hi = (b->qs[j] >> 4) | static_cast<int>((qh >> (j + 16) & 1) << 4);
      out[j] = static_cast<float>(lo - 16) * d;
      out[j + 16] = static_cast<float>(hi - 16) * d;
    }
  }
}

void DequantizeQ5_1(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q5_1* b = Blocks<block_q5_1>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += 32) {
    const float d = LoadHalf(&b->d);
    const float m = LoadHalf(&b->m);
    const uint32_t qh = LoadU32(b->qh);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b->qs[j] & 0xF) | static_cast<int>((qh >> j & 1) << 4);
      const int hi = (b->qs[j] >> 4) | static_cast<int>((qh >> (j + 16) & 1) << 4);
      out[j] = static_cast<float>(lo) * d + m;
      out[j + 16] = static_cast<float>(hi) * d + m;
    }
  }
}

// Q2_K and Q3_K share their walk: element e of a block is bits [2k, 2k+2) of qs[32 * (e / 128) + e % 32] with
// k = (e % 128) / 32, and belongs to sub-block e / 16.
void DequantizeQ2_K(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q2_K* b = Blocks<block_q2_K>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const float dmin = LoadHalf(&b->dmin);
    for (int e0 = 0; e0 < kQK_K; e0 += 16, out += 16) {
      const uint8_t sc = b->scales[e0 / 16];
      const float dl = d * static_cast<float>(sc & 0xF);
      const float ml = dmin * static_cast<float>(sc >> 4);
      const uint8_t* q = b->qs + 32 * (e0 / 128) + e0 % 32;
      const int shift = 2 * ((e0 % 128) / 32);
      for (int l = 0; l < 16; ++l) out[l] = dl * static_cast<float>(q[l] >> shift & 3) - ml;
    }
  }
}

void DequantizeQ3_K(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q3_K* b = Blocks<block_q3_K>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    for (int e0 = 0; e0 < kQK_K; e0 += 16, out += 16) {
      const float dl = d * static_cast<float>(Q3KScale(b->scales, e0 / 16));
      const uint8_t* q = b->qs + 32 * (e0 / 128) + e0 % 32;
      const uint8_t* hm = b->hmask + e0 % 32;
      const int shift = 2 * ((e0 % 128) / 32);
      const int hbit = e0 / 32;  // the high bit of element e is bit e / 32 of hmask[e % 32]
      for (int l = 0; l < 16; ++l) {
        const int q3 = (q[l] >> shift & 3) - ((hm[l] >> hbit & 1) ? 0 : 4);
        out[l] = dl * static_cast<float>(q3);
      }
    }
  }
}

void DequantizeQ4_K(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q4_K* b = Blocks<block_q4_K>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const float dmin = LoadHalf(&b->dmin);
    const uint8_t* q = b->qs;
    for (int chunk = 0; chunk < 4; ++chunk, q += 32) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const float d1 = d * sc1, min1 = dmin * m1;
      const float d2 = d * sc2, min2 = dmin * m2;
      for (int l = 0; l < 32; ++l) *out++ = d1 * static_cast<float>(q[l] & 0xF) - min1;
      for (int l = 0; l < 32; ++l) *out++ = d2 * static_cast<float>(q[l] >> 4) - min2;
    }
  }
}

void DequantizeQ5_K(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q5_K* b = Blocks<block_q5_K>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const float dmin = LoadHalf(&b->dmin);
    const uint8_t* q = b->qs;
    // Chunk c of 64 weights: its first 32 take bit 2c of qh[l] as bit 4, its last 32 bit 2c + 1.
    for (int chunk = 0; chunk < 4; ++chunk, q += 32) {
      uint8_t sc1, m1, sc2, m2;
      GetScaleMinK4(2 * chunk, b->scales, &sc1, &m1);
      GetScaleMinK4(2 * chunk + 1, b->scales, &sc2, &m2);
      const float d1 = d * sc1, min1 = dmin * m1;
      const float d2 = d * sc2, min2 = dmin * m2;
      for (int l = 0; l < 32; ++l) {
        const int v = (q[l] & 0xF) + ((b->qh[l] >> (2 * chunk) & 1) << 4);
        *out++ = d1 * static_cast<float>(v) - min1;
      }
      for (int l = 0; l < 32; ++l) {
        const int v = (q[l] >> 4) + ((b->qh[l] >> (2 * chunk + 1) & 1) << 4);
        *out++ = d2 * static_cast<float>(v) - min2;
      }
    }
  }
}

void DequantizeQ6_K(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_q6_K* b = Blocks<block_q6_K>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    // Each half of 128 weights: ql[64], qh[32], 8 scales. Weight 32k + l (k = 0..3, l = 0..31) takes the low
    // (k < 2) or high (k >= 2) nibble of ql[l + 32 * (k % 2)] and bits [2k, 2k + 2) of qh[l]; scale 2k + l / 16.
    for (int half = 0; half < 2; ++half, out += 128) {
      const uint8_t* ql = b->ql + 64 * half;
      const uint8_t* qh = b->qh + 32 * half;
      const int8_t* sc = b->scales + 8 * half;
      for (int k = 0; k < 4; ++k) {
        for (int l = 0; l < 32; ++l) {
          const uint8_t lo = ql[l + 32 * (k % 2)];
          const int nib = k < 2 ? (lo & 0xF) : (lo >> 4);
          const int q = (nib | ((qh[l] >> (2 * k) & 3) << 4)) - 32;
          out[32 * k + l] = d * static_cast<float>(sc[2 * k + l / 16]) * static_cast<float>(q);
        }
      }
    }
  }
}

void DequantizeIQ4_NL(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq4_nl* b = Blocks<block_iq4_nl>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += 32) {
    const float d = LoadHalf(&b->d);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * static_cast<float>(kIq4nlValues[b->qs[j] & 0xF]);
      out[j + 16] = d * static_cast<float>(kIq4nlValues[b->qs[j] >> 4]);
    }
  }
}

void DequantizeIQ4_XS(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq4_xs* b = Blocks<block_iq4_xs>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const uint16_t scales_h = LoadU16(&b->scales_h);
    for (int ib = 0; ib < 8; ++ib, out += 32) {
      const int ls = ((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4);
      const float dl = d * static_cast<float>(ls - 32);
      const uint8_t* qs = b->qs + 16 * ib;
      for (int j = 0; j < 16; ++j) {
        out[j] = dl * static_cast<float>(kIq4nlValues[qs[j] & 0xF]);
        out[j + 16] = dl * static_cast<float>(kIq4nlValues[qs[j] >> 4]);
      }
    }
  }
}

namespace {
// Trit n (0..4) of a TQ1_0 byte: the byte holds its trits as a base-3 fraction scaled to 256, so multiplying by
// 3^n (mod 256) moves trit n to the top, and * 3 >> 8 reads it.
inline int Trit(uint8_t byte, int n) {
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  const uint8_t q = static_cast<uint8_t>(byte * kPow3[n]);
  return (q * 3) >> 8;
}
}  // namespace

void DequantizeTQ1_0(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_tq1_0* b = Blocks<block_tq1_0>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    // qs[0..32): trit n of byte m is weight 32n + m (160 weights); qs[32..48): weight 160 + 16n + m (80 weights);
    // qh[0..4): trit n (of 4) of byte m is weight 240 + 4n + m.
    for (int n = 0; n < 5; ++n) {
      for (int m = 0; m < 32; ++m) *out++ = static_cast<float>(Trit(b->qs[m], n) - 1) * d;
    }
    for (int n = 0; n < 5; ++n) {
      for (int m = 0; m < 16; ++m) *out++ = static_cast<float>(Trit(b->qs[32 + m], n) - 1) * d;
    }
    for (int n = 0; n < 4; ++n) {
      for (int m = 0; m < 4; ++m) *out++ = static_cast<float>(Trit(b->qh[m], n) - 1) * d;
    }
  }
}

void DequantizeTQ2_0(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_tq2_0* b = Blocks<block_tq2_0>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    // Two halves of 128: bits [2l, 2l + 2) of qs[32 * half + m] are weight 128 * half + 32 l + m.
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 4; ++l) {
        for (int m = 0; m < 32; ++m) {
          *out++ = static_cast<float>(((b->qs[32 * half + m] >> (2 * l)) & 3) - 1) * d;
        }
      }
    }
  }
}

void DequantizeIQ2_XXS(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq2_xxs* b = Blocks<block_iq2_xxs>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const uint8_t* qs = reinterpret_cast<const uint8_t*>(b->qs);
    for (int ib = 0; ib < 8; ++ib) {
      const uint8_t* idx = qs + 8 * ib;          // four grid indices
      const uint32_t aux = LoadU32(qs + 8 * ib + 4);  // four 7-bit sign fields, then the 4-bit scale
      const float db = d * (0.5f + static_cast<float>(aux >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l, out += 8) GridPoint8(kIq2xxsGrid[idx[l]], db, EvenSigns(aux >> (7 * l)), out);
    }
  }
}

void DequantizeIQ2_XS(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq2_xs* b = Blocks<block_iq2_xs>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + static_cast<float>(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + static_cast<float>(b->scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, out += 8) {
        const uint16_t q = LoadU16(&b->qs[4 * ib + l]);
        GridPoint8(kIq2xsGrid[q & 511], db[l / 2], EvenSigns(q >> 9), out);
      }
    }
  }
}

void DequantizeIQ2_S(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq2_s* b = Blocks<block_iq2_s>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const uint8_t* signs = b->qs + 32;
    for (int ib = 0; ib < 8; ++ib) {
      const float db[2] = {d * (0.5f + static_cast<float>(b->scales[ib] & 0xF)) * 0.25f,
                           d * (0.5f + static_cast<float>(b->scales[ib] >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, out += 8) {
        const int index = b->qs[4 * ib + l] | (((b->qh[ib] >> (2 * l)) & 3) << 8);
        GridPoint8(kIq2sGrid[index], db[l / 2], signs[4 * ib + l], out);
      }
    }
  }
}

void DequantizeIQ3_XXS(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq3_xxs* b = Blocks<block_iq3_xxs>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    const uint8_t* qs = b->qs;
    const uint8_t* scales_and_signs = b->qs + 64;
    for (int ib = 0; ib < 8; ++ib) {
      const uint32_t aux = LoadU32(scales_and_signs + 4 * ib);
      const float db = d * (0.5f + static_cast<float>(aux >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l, out += 8) {
        const uint8_t signs = EvenSigns(aux >> (7 * l));
        GridPoint4(kIq3xxsGrid[qs[8 * ib + 2 * l]], db, signs, out);
        GridPoint4(kIq3xxsGrid[qs[8 * ib + 2 * l + 1]], db, static_cast<uint8_t>(signs >> 4), out + 4);
      }
    }
  }
}

void DequantizeIQ3_S(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq3_s* b = Blocks<block_iq3_s>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    // Group ib of 32 weights: grid indices qs[8 ib .. 8 ib + 8), their ninth bits in qh[ib] (bit k for index k),
    // signs[4 ib .. 4 ib + 4), scale nibble ib % 2 of scales[ib / 2].
    for (int ib = 0; ib < 8; ++ib) {
      const float db = d * static_cast<float>(1 + 2 * ((b->scales[ib / 2] >> (4 * (ib % 2))) & 0xF));
      const uint8_t* qs = b->qs + 8 * ib;
      const uint8_t qh = b->qh[ib];
      const uint8_t* signs = b->signs + 4 * ib;
      for (int l = 0; l < 4; ++l, out += 8) {
        const int i1 = qs[2 * l] | (((qh >> (2 * l)) & 1) << 8);
        const int i2 = qs[2 * l + 1] | (((qh >> (2 * l + 1)) & 1) << 8);
        GridPoint4(kIq3sGrid[i1], db, signs[l], out);
        GridPoint4(kIq3sGrid[i2], db, static_cast<uint8_t>(signs[l] >> 4), out + 4);
      }
    }
  }
}

void DequantizeIQ1_S(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq1_s* b = Blocks<block_iq1_s>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    const float d = LoadHalf(&b->d);
    for (int ib = 0; ib < 8; ++ib) {
      const uint16_t qh = LoadU16(&b->qh[ib]);
      const float dl = d * static_cast<float>(2 * ((qh >> 12) & 7) + 1);
      const float delta = (qh & 0x8000) ? -kIq1Delta : kIq1Delta;
      for (int l = 0; l < 4; ++l, out += 8) {
        const int index = b->qs[4 * ib + l] | (((qh >> (3 * l)) & 7) << 8);
        Iq1Point8(kIq1sGrid[index], dl, delta, out);
      }
    }
  }
}

void DequantizeIQ1_M(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_iq1_m* b = Blocks<block_iq1_m>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b) {
    uint16_t sc[4];
    for (int k = 0; k < 4; ++k) sc[k] = LoadU16(b->scales + 2 * k);
    // The f16 super-block scale: its four nibbles are the top nibbles of sc[0..3], lowest first.
    const uint16_t d16 = static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00F0) | ((sc[2] >> 4) & 0x0F00) |
                                               (sc[3] & 0xF000));
    const float d = HalfToFloat(d16);
    for (int ib = 0; ib < 8; ++ib) {
      // Two 3-bit scales per 32 weights (one per 16), six bits of sc[ib / 2] from bit 6 * (ib % 2).
      const int s = sc[ib / 2] >> (6 * (ib % 2));
      const float dl[2] = {d * static_cast<float>(2 * (s & 7) + 1), d * static_cast<float>(2 * ((s >> 3) & 7) + 1)};
      const uint8_t* qs = b->qs + 4 * ib;
      const uint8_t* qh = b->qh + 2 * ib;
      // Point l (8 weights): index qs[l] | bits of qh[l / 2] (low nibble's bits 0-2 for even l, high's 4-6 for
      // odd) << 8; the delta's sign is bit 3 (even l) or 7 (odd l) of that byte.
      for (int l = 0; l < 4; ++l, out += 8) {
        const int nib = (qh[l / 2] >> (4 * (l % 2))) & 0xF;
        const int index = qs[l] | ((nib & 7) << 8);
        const float delta = (nib & 8) ? -kIq1Delta : kIq1Delta;
        Iq1Point8(kIq1sGrid[index], dl[l / 2], delta, out);
      }
    }
  }
}

namespace {
// Half the E8M0 scale, 2^(e - 128), as an exact float: subnormal for e < 2.
inline float E8M0Half(uint8_t e) {
  const uint32_t bits = e < 2 ? (0x00200000u << e) : (static_cast<uint32_t>(e - 1) << 23);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace

void DequantizeMXFP4(const uint8_t* bytes, int64_t nblocks, float* out) {
  const block_mxfp4* b = Blocks<block_mxfp4>(bytes);
  for (int64_t i = 0; i < nblocks; ++i, ++b, out += 32) {
    const float d = E8M0Half(b->e);
    for (int j = 0; j < 16; ++j) {
      out[j] = static_cast<float>(kFp4Values[b->qs[j] & 0xF]) * d;
      out[j + 16] = static_cast<float>(kFp4Values[b->qs[j] >> 4]) * d;
    }
  }
}

}  // namespace qforge::kernels
