#include "core/runtime/ops.h"

#include <algorithm>
#include <cmath>

#include "core/kernels/kernels.h"

namespace qforge::runtime_ops {

void RmsNorm(const float* x, const float* w, int n, float eps, float* out) {
  // The sum of squares in double, as ggml's rms_norm: a float sum over 2048 or more elements loses ~1e-7 of the
  // scale, which in int8 mode moves activations across rounding boundaries of the next matmul's quantization.
  double ss = 0.0;
  for (int i = 0; i < n; ++i) ss += static_cast<double>(x[i] * x[i]);
  const float mean = static_cast<float>(ss / n);
  const float inv = 1.0f / std::sqrt(mean + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (inv * x[i]);
}

void ApplyRope(float* v, int n_heads, int head_dim, const float* cos_sin) {
  for (int h = 0; h < n_heads; ++h) {
    float* p = v + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < head_dim; i += 2) {
      const float c = cos_sin[i];
      const float s = cos_sin[i + 1];
      const float a = p[i];
      const float b = p[i + 1];
      p[i] = a * c - b * s;
      p[i + 1] = a * s + b * c;
    }
  }
}

void Softmax(float* x, int n) {
  if (n <= 0) return;
  const float max = *std::max_element(x, x + n);
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < n; ++i) x[i] *= inv;
}

void RouteTopK(float* logits, int n_experts, int k, int* experts, float* weights) {
  Softmax(logits, n_experts);
  // k is small (2 for Mixtral, 8 for the largest models): a selection pass per slot beats sorting.
  float sum = 0.0f;
  for (int s = 0; s < k; ++s) {
    int best = -1;
    for (int e = 0; e < n_experts; ++e) {
      if (std::find(experts, experts + s, e) != experts + s) continue;
      if (best < 0 || logits[e] > logits[best]) best = e;
    }
    experts[s] = best;
    weights[s] = logits[best];
    sum += logits[best];
  }
  for (int s = 0; s < k; ++s) weights[s] /= sum;
}

void AttendGroup(const float* q, int n_q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                 float scale, float* scores, float* out) {
  if (kernels::ActiveIsa() >= kernels::Isa::kAvx2) {
    AttendGroupAvx2(q, n_q, k, v, stride, n_pos, head_dim, scale, scores, out);
    return;
  }
  for (int g = 0; g < n_q; ++g) {
    AttendHeadScalar(q + g * head_dim, k, v, stride, n_pos, head_dim, scale, scores + g * n_pos, out + g * head_dim);
  }
}

void AttendHeadScalar(const float* q, const float* k, const float* v, int64_t stride, int n_pos, int head_dim,
                      float scale, float* scores, float* out) {
  for (int p = 0; p < n_pos; ++p) {
    const float* kp = k + p * stride;
    float dot = 0.0f;
    for (int i = 0; i < head_dim; ++i) dot += q[i] * kp[i];
    scores[p] = dot * scale;
  }
  Softmax(scores, n_pos);
  std::fill(out, out + head_dim, 0.0f);
  for (int p = 0; p < n_pos; ++p) {
    const float* vp = v + p * stride;
    const float a = scores[p];
    for (int i = 0; i < head_dim; ++i) out[i] += a * vp[i];
  }
}

void SwiGlu(float* gate, const float* up, int n) {
  for (int i = 0; i < n; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void AddInPlace(float* x, const float* y, int n) {
  for (int i = 0; i < n; ++i) x[i] += y[i];
}

}  // namespace qforge::runtime_ops
