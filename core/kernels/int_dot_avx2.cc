// AVX2 instantiation of the integer dot kernels (int_dot_x86.inc): maddubs + madd.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/kernels/int_dot.h"
#include "core/kernels/kernels_internal.h"

#define QF_TARGET __attribute__((target("avx2,fma,f16c")))
#define QF_VNNI 0

namespace qforge::kernels::internal {
namespace avx2 {
#include "core/kernels/int_dot_x86.inc"
}  // namespace avx2

void QuantizeActAvx2(ActType t, const float* x, int64_t cols, uint8_t* row) { avx2::QuantizeRow(t, x, cols, row); }

void IntMatMulAvx2(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                   int64_t y_stride) {
  avx2::IntMatMul(w, r0, r1, a, n, y, y_stride);
}

}  // namespace qforge::kernels::internal
