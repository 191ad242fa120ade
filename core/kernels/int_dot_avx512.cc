// AVX-512 instantiation of the integer dot kernels (int_dot_x86.inc): vpdpbusd on 256-bit vectors (AVX-512 VL +
// VNNI), which forms each group of four byte products in one instruction.
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <vector>

#include "core/kernels/int_dot.h"
#include "core/kernels/kernels_internal.h"

// GCC 12's 512-bit intrinsics pass _mm512_undefined_*() (a self-initialised variable) as their unused merge
// source, which -Wmaybe-uninitialized reports at every inlined call.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define QF_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")))
#define QF_VNNI 1

namespace qforge::kernels::internal {
namespace avx512 {
#include "core/kernels/int_dot_x86.inc"
}  // namespace avx512

bool HasAvx512Vnni() {
  static const bool has = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return (ecx & (1u << 11)) != 0;  // CPUID.(EAX=7,ECX=0):ECX[11] AVX512_VNNI
  }();
  return has;
}

void IntMatMulAvx512(const WeightView& w, int64_t r0, int64_t r1, const ActView& a, int64_t n, float* y,
                     int64_t y_stride) {
  avx512::IntMatMul(w, r0, r1, a, n, y, y_stride);
}

}  // namespace qforge::kernels::internal
