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

// The AVX2 clone runs Dot's eight lanes as one 256-bit multiply and add, the default clone as two 128-bit ones: the
// same IEEE operations on the same lanes (no FMA: this target builds with -ffp-contract=off), so both give the same
// bits and the clone chosen at load time changes only the speed (LoraDeltaTest.FollowsTheDocumentedOrder).
__attribute__((target_clones("avx2", "default"))) void AddLoraDelta(const float* a, const float* b, int rank,
                                                                    int64_t in, int64_t out, float scale,
                                                                    const float* x, float* y, float* u) {
  for (int j = 0; j < rank; ++j) u[j] = Dot(a + static_cast<int64_t>(j) * in, x, in);
  for (int64_t o = 0; o < out; ++o) y[o] += scale * Dot(b + o * rank, u, rank);
}

}  // namespace qforge::kernels
