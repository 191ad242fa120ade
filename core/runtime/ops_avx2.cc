// AVX2 + FMA versions of the attention loops in ops.cc (the scalar ones are the reference; runtime_test checks
// them against each other). Compiled with function-level target attributes and only called after the kernels'
// CPUID check (kernels::ActiveIsa() >= kAvx2), so the binary stays baseline x86-64.
#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/runtime/ops.h"

#define QF_AVX2 __attribute__((target("avx2,fma")))

namespace qforge::runtime_ops {
namespace {

QF_AVX2 inline float Hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Hsum of four vectors at once, with Hsum's own pairings (lanes i + i+4, then 0+2 and 1+3, then those two), so
// every result has the bits Hsum(a), Hsum(b), ... would give: a key's score does not depend on which others
// shared its reduction.
QF_AVX2 inline void Hsum4(__m256 a, __m256 b, __m256 c, __m256 d, float* out) {
  const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  const __m256 z = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  // z: [a02 a13 c02 c13 | b02 b13 d02 d13]; pairwise sums -> [a c a c | b d b d].
  const __m256 s = _mm256_add_ps(_mm256_shuffle_ps(z, z, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(z, z, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
  out[0] = _mm_cvtss_f32(lo);
  out[1] = _mm_cvtss_f32(hi);
  out[2] = _mm_cvtss_f32(_mm_movehdup_ps(lo));
  out[3] = _mm_cvtss_f32(_mm_movehdup_ps(hi));
}

// e^x for x <= 0 (softmax after subtracting the max): Cephes' expf reduction and polynomial, ~1 ulp; inputs
// below -87.3 give e^-87.3 (~1e-38) rather than a denormal.
QF_AVX2 inline __m256 ExpNonPositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

QF_AVX2 void SoftmaxAvx2(float* x, int n) {
  if (n <= 0) return;
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float max = *std::max_element(lanes, lanes + 8);
  for (; i < n; ++i) max = std::max(max, x[i]);
  const __m256 m = _mm256_set1_ps(max);
  __m256 sv = _mm256_setzero_ps();
  i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
    _mm256_storeu_ps(x + i, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = Hsum(sv);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (; i < n; ++i) x[i] *= 1.0f / sum;
}

// The eight-lane partial dot of q and kp over the first head_dim / 8 * 8 dimensions, in two accumulators.
QF_AVX2 inline __m256 DotLanes(const float* q, const float* kp, int head_dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= head_dim; i += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kp + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(kp + i + 8), a1);
  }
  if (i + 8 <= head_dim) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kp + i), a0);
  return _mm256_add_ps(a0, a1);
}

inline float DotTail(const float* q, const float* kp, int head_dim, float dot) {
  for (int i = head_dim / 8 * 8; i < head_dim; ++i) dot += q[i] * kp[i];
  return dot;
}

// Scores of kNq queries (head_dim apart) against positions [0, n_pos): scores[g * n_pos + p]. Four (query, key)
// dot products share each Hsum4: four keys for one query, two for two, one for four.
template <int kNq>
QF_AVX2 void Scores(const float* q, const float* k, int64_t stride, int n_pos, int head_dim, float scale,
                    float* scores) {
  constexpr int kKeys = 4 / kNq;
  int p = 0;
  for (; p + kKeys <= n_pos; p += kKeys) {
    // DotLanes for the four (key, query) pairs in one loop, so each key and query span is loaded once.
    __m256 a0[4], a1[4];
    for (int c = 0; c < 4; ++c) a0[c] = a1[c] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= head_dim; i += 16) {
      for (int j = 0; j < kKeys; ++j) {
        const float* kp = k + (p + j) * stride + i;
        const __m256 k0 = _mm256_loadu_ps(kp), k1 = _mm256_loadu_ps(kp + 8);
        for (int g = 0; g < kNq; ++g) {
          a0[j * kNq + g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * head_dim + i), k0, a0[j * kNq + g]);
          a1[j * kNq + g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * head_dim + i + 8), k1, a1[j * kNq + g]);
        }
      }
    }
    if (i + 8 <= head_dim) {
      for (int j = 0; j < kKeys; ++j) {
        const __m256 k0 = _mm256_loadu_ps(k + (p + j) * stride + i);
        for (int g = 0; g < kNq; ++g) {
          a0[j * kNq + g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * head_dim + i), k0, a0[j * kNq + g]);
        }
      }
    }
    __m256 v[4];
    for (int c = 0; c < 4; ++c) v[c] = _mm256_add_ps(a0[c], a1[c]);
    float dots[4];
    Hsum4(v[0], v[1], v[2], v[3], dots);
    for (int j = 0; j < kKeys; ++j) {
      for (int g = 0; g < kNq; ++g) {
        const float* qg = q + g * head_dim;
        scores[g * n_pos + p + j] = DotTail(qg, k + (p + j) * stride, head_dim, dots[j * kNq + g]) * scale;
      }
    }
  }
  for (; p < n_pos; ++p) {
    for (int g = 0; g < kNq; ++g) {
      const float* qg = q + g * head_dim;
      const float* kp = k + p * stride;
      scores[g * n_pos + p] = DotTail(qg, kp, head_dim, Hsum(DotLanes(qg, kp, head_dim))) * scale;
    }
  }
}

// out_g = sum_p scores_g[p] v_p for kNq queries, 16 dimensions at a time so each value span is loaded once for
// all of them; every output dimension is one FMA chain over the positions in order, whatever kNq.
template <int kNq>
QF_AVX2 void WeightedValues(const float* scores, const float* v, int64_t stride, int n_pos, int head_dim,
                            float* out) {
  int i = 0;
  for (; i + 16 <= head_dim; i += 16) {
    __m256 o[kNq][2];
    for (int g = 0; g < kNq; ++g) o[g][0] = o[g][1] = _mm256_setzero_ps();
    for (int p = 0; p < n_pos; ++p) {
      const float* vp = v + p * stride + i;
      const __m256 v0 = _mm256_loadu_ps(vp), v1 = _mm256_loadu_ps(vp + 8);
      for (int g = 0; g < kNq; ++g) {
        const __m256 a = _mm256_broadcast_ss(scores + g * n_pos + p);
        o[g][0] = _mm256_fmadd_ps(a, v0, o[g][0]);
        o[g][1] = _mm256_fmadd_ps(a, v1, o[g][1]);
      }
    }
    for (int g = 0; g < kNq; ++g) {
      _mm256_storeu_ps(out + g * head_dim + i, o[g][0]);
      _mm256_storeu_ps(out + g * head_dim + i + 8, o[g][1]);
    }
  }
  for (; i + 8 <= head_dim; i += 8) {
    for (int g = 0; g < kNq; ++g) {
      __m256 o = _mm256_setzero_ps();
      for (int p = 0; p < n_pos; ++p) {
        o = _mm256_fmadd_ps(_mm256_broadcast_ss(scores + g * n_pos + p), _mm256_loadu_ps(v + p * stride + i), o);
      }
      _mm256_storeu_ps(out + g * head_dim + i, o);
    }
  }
  for (; i < head_dim; ++i) {
    for (int g = 0; g < kNq; ++g) {
      float o = 0.0f;
      for (int p = 0; p < n_pos; ++p) o += scores[g * n_pos + p] * v[p * stride + i];
      out[g * head_dim + i] = o;
    }
  }
}

template <int kNq>
QF_AVX2 void AttendQueries(const float* q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                           float scale, float* scores, float* out) {
  Scores<kNq>(q, k, stride, n_pos, head_dim, scale, scores);
  for (int g = 0; g < kNq; ++g) SoftmaxAvx2(scores + g * n_pos, n_pos);
  WeightedValues<kNq>(scores, v, stride, n_pos, head_dim, out);
}

}  // namespace

QF_AVX2 void AttendGroupAvx2(const float* q, int n_q, const float* k, const float* v, int64_t stride, int n_pos,
                             int head_dim, float scale, float* scores, float* out) {
  // Queries four at a time, then two, then one: each query's operations are the same in every case.
  int g = 0;
  for (; g + 4 <= n_q; g += 4) {
    AttendQueries<4>(q + g * head_dim, k, v, stride, n_pos, head_dim, scale, scores + g * n_pos, out + g * head_dim);
  }
  for (; g + 2 <= n_q; g += 2) {
    AttendQueries<2>(q + g * head_dim, k, v, stride, n_pos, head_dim, scale, scores + g * n_pos, out + g * head_dim);
  }
  for (; g < n_q; ++g) {
    AttendQueries<1>(q + g * head_dim, k, v, stride, n_pos, head_dim, scale, scores + g * n_pos, out + g * head_dim);
  }
}

}  // namespace qforge::runtime_ops
