// The unmerged LoRA update of one token beside a quantized matmul: y += scale · B (A x), in fp32.
// Kept apart from the runtime's plumbing (core/runtime/transformer.cc decides which token gets which adapter).
#pragma once

#include <cstdint>

namespace qforge::kernels {

// For one token: u[j] = A[j, :] · x (j < rank), then y[o] += scale · (B[o, :] · u) for o < out.
// a: [rank, in] row-major, b: [out, rank] row-major, x: in floats, y: out floats, u: rank floats of scratch.
// Every dot product runs in one fixed order (eight lanes over the columns, combined pairwise, the tail in column
// order), so a token's result does not depend on what else is in the batch.
void AddLoraDelta(const float* a, const float* b, int rank, int64_t in, int64_t out, float scale, const float* x,
                  float* y, float* u);

}  // namespace qforge::kernels
