#include "core/kernels/lora_delta.h"

namespace qforge::kernels {
namespace {

// Eight independent lanes let the compiler vectorise without reassociating: the order of every addition is fixed
// by this source, not by the ISA or the batch.
inline __attribute__((always_inline)) float Dot(const float* a, const float* x, int64_t n) {
  float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) lane[k] += a[i + k] * x[i + k];
  }
  float s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
  for (; i < n; ++i) s += a[i] * x[i];
  return s;
}

}  // namespace

// The AVX2 clone runs the same IEEE operations as the default one on wider registers (no FMA: this target builds
// with -ffp-contract=off, and each lane or output keeps its own sequential sum), so both give the same bits and the
// clone chosen at load time changes only the speed (LoraDeltaTest.FollowsTheDocumentedOrder).
__attribute__((target_clones("avx2", "default"))) void AddLoraDelta(const float* a, const float* b_t, int rank,
                                                                    int64_t in, int64_t out, float scale,
                                                                    const float* const* x_rows,
                                                                    float* const* y_rows, int n_tokens, float* u) {
  // Row j of A stays in L1 while every token's dot product with it runs.
  for (int j = 0; j < rank; ++j) {
    const float* aj = a + static_cast<int64_t>(j) * in;
    for (int t = 0; t < n_tokens; ++t) u[static_cast<int64_t>(t) * rank + j] = Dot(aj, x_rows[t], in);
  }
  // Outputs in blocks of B's transpose (rank x kBlock floats, in L1 across the tokens). Each d[o] is its own
  // sequential sum over j, so vectorising across o reorders nothing.
  constexpr int64_t kBlock = 64;
  float d[kBlock];
  for (int64_t o0 = 0; o0 < out; o0 += kBlock) {
    const int64_t n = out - o0 < kBlock ? out - o0 : kBlock;
    for (int t = 0; t < n_tokens; ++t) {
      const float* ut = u + static_cast<int64_t>(t) * rank;
      for (int64_t o = 0; o < n; ++o) d[o] = 0.0f;
      for (int j = 0; j < rank; ++j) {
        const float* row = b_t + static_cast<int64_t>(j) * out + o0;
        const float uj = ut[j];
        for (int64_t o = 0; o < n; ++o) d[o] += row[o] * uj;
      }
      float* y = y_rows[t] + o0;
      for (int64_t o = 0; o < n; ++o) y[o] += scale * d[o];
    }
  }
}

}  // namespace qforge::kernels
