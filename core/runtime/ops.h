// The runtime's own numeric loops (everything in the forward pass that is not a weight matmul, which lives
// in core/kernels): normalisation, rotary embedding, attention over the KV cache, the SwiGLU gate, softmax.
// Single-threaded; the transformer splits work across its pool.
#pragma once

#include <cstdint>

namespace qforge::runtime_ops {

// out[i] = x[i] * w[i] / sqrt(mean(x^2) + eps). out may alias x.
void RmsNorm(const float* x, const float* w, int n, float eps, float* out);

// Rotates the interleaved pairs (v[2j], v[2j+1]) of every head of `v` (n_heads * head_dim floats) by
// the angle pos * freq[j], given cos_sin[2j] = cos(pos * freq[j]), cos_sin[2j+1] = sin(pos * freq[j])
// for j in [0, head_dim / 2).
void ApplyRope(float* v, int n_heads, int head_dim, const float* cos_sin);

// One query head attending to cache positions [0, n_pos): scores = q·k_p * scale, softmax, out = Σ p_p v_p.
// k and v point at the head's slice of position 0; consecutive positions are `stride` floats apart.
// `scores` is scratch of n_pos floats. The reference loops.
void AttendHeadScalar(const float* q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                      float scale, float* scores, float* out);

// The n_q query heads that share one key/value head (grouped-query attention), each attending as
// AttendHeadScalar does: queries and outputs are head_dim apart, `scores` is scratch of n_q * n_pos floats.
// AttendGroupAvx2 loads every key and value once for up to four queries and uses 8-lane FMA dot products and a
// vectorised exp (a different summation order from the reference); a query's result has the same bits whatever
// n_q and its place in the group. AttendGroup runs it when the kernels' active ISA has AVX2, the reference
// otherwise.
void AttendGroup(const float* q, int n_q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                 float scale, float* scores, float* out);
void AttendGroupAvx2(const float* q, int n_q, const float* k, const float* v, int64_t stride, int n_pos,
                     int head_dim, float scale, float* scores, float* out);

// In place: x[i] = softmax(x)[i], subtracting the max first.
void Softmax(float* x, int n);

// Mixtral's router on one token: logits (n_experts floats, overwritten by their softmax) -> the k experts of
// largest probability, in decreasing order (the lower index first on ties), and their probabilities divided by
// the sum of the k (so the weights sum to 1).
void RouteTopK(float* logits, int n_experts, int k, int* experts, float* weights);

// gate[i] = silu(gate[i]) * up[i].
void SwiGlu(float* gate, const float* up, int n);

// x[i] += y[i].
void AddInPlace(float* x, const float* y, int n);

}  // namespace qforge::runtime_ops
