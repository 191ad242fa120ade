// AVX2 + FMA versions of the attention loops in ops.cc (the scalar ones are the reference; ops_test checks them
// against each other). Compiled with function-level target attributes and only called after the kernels' CPUID
// check (kernels::ActiveIsa() >= kAvx2), so the binary stays baseline x86-64.
#include <immintrin.h>

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

}  // namespace

QF_AVX2 void AttendHeadAvx2(const float* q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                            float scale, float* scores, float* out) {
  for (int p = 0; p < n_pos; ++p) {
    const float* kp = k + p * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= head_dim; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kp + i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(kp + i + 8), a1);
    }
    for (; i + 8 <= head_dim; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kp + i), a0);
    float dot = Hsum(_mm256_add_ps(a0, a1));
    for (; i < head_dim; ++i) dot += q[i] * kp[i];
    scores[p] = dot * scale;
  }
  Softmax(scores, n_pos);
  // Values in spans of up to 64 dimensions (eight accumulators in registers), each span one pass over the
  // positions, so every position's span is read once, contiguously.
  int i = 0;
  for (; i + 64 <= head_dim; i += 64) {
    __m256 o[8];
    for (int c = 0; c < 8; ++c) o[c] = _mm256_setzero_ps();
    for (int p = 0; p < n_pos; ++p) {
      const __m256 a = _mm256_set1_ps(scores[p]);
      const float* vp = v + p * stride + i;
      for (int c = 0; c < 8; ++c) o[c] = _mm256_fmadd_ps(a, _mm256_loadu_ps(vp + 8 * c), o[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(out + i + 8 * c, o[c]);
  }
  for (; i + 8 <= head_dim; i += 8) {
    __m256 o = _mm256_setzero_ps();
    for (int p = 0; p < n_pos; ++p) o = _mm256_fmadd_ps(_mm256_set1_ps(scores[p]), _mm256_loadu_ps(v + p * stride + i), o);
    _mm256_storeu_ps(out + i, o);
  }
  for (; i < head_dim; ++i) {
    float o = 0.0f;
    for (int p = 0; p < n_pos; ++p) o += scores[p] * v[p * stride + i];
    out[i] = o;
  }
}

}  // namespace qforge::runtime_ops
