// The unmerged LoRA update beside a quantized matmul: y += scale · B (A x) for each token row, in fp32.
// Kept apart from the runtime's plumbing (core/runtime/transformer.cc decides which token gets which adapter).
#pragma once

#include <cstdint>

namespace qforge::kernels {

// For each of n_tokens tokens t (input row x_rows[t], in floats; output row y_rows[t], out floats):
// u[j] = A[j, :] · x (j < rank), then y[o] += scale · d[o] with d[o] = B[o, :] · u, for o < out.
// a: A [rank, in] row-major; b_t: B transposed, [rank, out] row-major (so that d is built many outputs at a time);
// u: n_tokens * rank floats of scratch. Tokens of one adapter go through together so that each row of A and each
// block of B is read once for all of them instead of once per token.
// Order, fixed whatever the batch, the grouping or the ISA: A·x in eight lanes over the columns (lane k takes
// columns i ≡ k mod 8), combined ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), then the tail columns in order; d[o] sums
// j = 0, 1, ... in order. A token's result is therefore the same computed alone or with any others.
void AddLoraDelta(const float* a, const float* b_t, int rank, int64_t in, int64_t out, float scale,
                  const float* const* x_rows, float* const* y_rows, int n_tokens, float* u);

}  // namespace qforge::kernels
