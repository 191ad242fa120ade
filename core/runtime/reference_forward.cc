#include "core/runtime/reference_forward.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>

#include "core/kernels/kernels.h"

namespace qforge::testing {
namespace {

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

Mat Load(const Model& m, const std::string& name) {
  const Tensor* t = m.Find(name);
  if (t == nullptr) {
    std::cerr << "reference: missing " << name << "\n";
    std::abort();
  }
  std::vector<float> f(static_cast<size_t>(t->numel()));
  if (!kernels::DequantizeRows(*t, 0, t->rows(), f.data()).ok()) std::abort();
  Mat out(t->rows(), std::vector<double>(t->cols()));
  for (int64_t r = 0; r < t->rows(); ++r)
    for (int64_t c = 0; c < t->cols(); ++c) out[r][c] = f[r * t->cols() + c];
  return out;
}

std::vector<double> Apply(const Mat& w, const std::vector<double>& x) {
  std::vector<double> y(w.size(), 0.0);
  for (size_t r = 0; r < w.size(); ++r)
    for (size_t c = 0; c < x.size(); ++c) y[r] += w[r][c] * x[c];
  return y;
}

std::vector<double> Norm(const std::vector<double>& x, const Mat& w, double eps) {
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = w[0][i] * x[i] * inv;
  return out;
}

void Rotate(std::vector<double>& v, int head_dim, int pos, double theta) {
  for (size_t i = 0; i < v.size(); i += 2) {
    const int within = static_cast<int>(i % head_dim);
    const double angle = pos * std::pow(theta, -static_cast<double>(within) / head_dim);
    const double a = v[i], b = v[i + 1];
    v[i] = a * std::cos(angle) - b * std::sin(angle);
    v[i + 1] = a * std::sin(angle) + b * std::cos(angle);
  }
}

struct Ffn {
  Mat g, u, d;
};

std::vector<double> SwiGluFfn(const Ffn& f, const std::vector<double>& h) {
  std::vector<double> g = Apply(f.g, h), u = Apply(f.u, h);
  for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  return Apply(f.d, g);
}

}  // namespace

std::vector<std::vector<double>> ReferenceLogits(const Model& m, std::span<const int> tokens) {
  const ModelConfig& c = m.config;
  const int hd = c.dim / c.n_heads;
  const Mat embd = Load(m, names::kTokenEmbd);
  const Mat out_w = c.tied_embeddings ? embd : Load(m, names::kOutput);
  Mat final_norm = Load(m, names::kOutputNorm);
  struct L {
    Mat an, fn, q, k, v, o;
    Ffn dense;
    Mat router;                // MoE
    std::vector<Ffn> experts;  // MoE
  };
  std::vector<L> layers;
  for (int l = 0; l < c.n_layers; ++l) {
    L w{Load(m, names::AttnNorm(l)), Load(m, names::FfnNorm(l)), Load(m, names::AttnQ(l)), Load(m, names::AttnK(l)),
        Load(m, names::AttnV(l)), Load(m, names::AttnOutput(l))};
    if (c.is_moe()) {
      w.router = Load(m, names::FfnGateInp(l));
      for (int e = 0; e < c.n_experts; ++e) {
        w.experts.push_back({Load(m, names::FfnGateExpert(l, e)), Load(m, names::FfnUpExpert(l, e)),
                             Load(m, names::FfnDownExpert(l, e))});
      }
    } else {
      w.dense = {Load(m, names::FfnGate(l)), Load(m, names::FfnUp(l)), Load(m, names::FfnDown(l))};
    }
    layers.push_back(std::move(w));
  }
  // keys[l][pos], values[l][pos]: kv_dim vectors.
  std::vector<Mat> keys(c.n_layers), values(c.n_layers);
  std::vector<std::vector<double>> all_logits;
  for (size_t pos = 0; pos < tokens.size(); ++pos) {
    std::vector<double> x = embd[tokens[pos]];
    for (int l = 0; l < c.n_layers; ++l) {
      const L& w = layers[l];
      std::vector<double> h = Norm(x, w.an, c.norm_eps);
      std::vector<double> q = Apply(w.q, h), k = Apply(w.k, h), v = Apply(w.v, h);
      Rotate(q, hd, static_cast<int>(pos), c.rope_theta);
      Rotate(k, hd, static_cast<int>(pos), c.rope_theta);
      keys[l].push_back(k);
      values[l].push_back(v);
      std::vector<double> att(c.dim, 0.0);
      for (int head = 0; head < c.n_heads; ++head) {
        const int kvh = head / (c.n_heads / c.n_kv_heads);
        std::vector<double> s(pos + 1);
        double mx = -1e300;
        for (size_t p = 0; p <= pos; ++p) {
          double dot = 0.0;
          for (int i = 0; i < hd; ++i) dot += q[head * hd + i] * keys[l][p][kvh * hd + i];
          s[p] = dot / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[p]);
        }
        double sum = 0.0;
        for (double& e : s) sum += (e = std::exp(e - mx));
        for (size_t p = 0; p <= pos; ++p)
          for (int i = 0; i < hd; ++i) att[head * hd + i] += s[p] / sum * values[l][p][kvh * hd + i];
      }
      std::vector<double> o = Apply(w.o, att);
      for (int i = 0; i < c.dim; ++i) x[i] += o[i];
      h = Norm(x, w.fn, c.norm_eps);
      if (!c.is_moe()) {
        const std::vector<double> d = SwiGluFfn(w.dense, h);
        for (int i = 0; i < c.dim; ++i) x[i] += d[i];
        continue;
      }
      // Router: softmax over every expert, keep the k most probable (lower index on ties), weights renormalised.
      std::vector<double> p = Apply(w.router, h);
      const double mx = *std::max_element(p.begin(), p.end());
      for (double& e : p) e = std::exp(e - mx);
      std::vector<int> order(c.n_experts);
      for (int e = 0; e < c.n_experts; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
      double chosen = 0.0;
      for (int s = 0; s < c.n_experts_used; ++s) chosen += p[order[s]];
      for (int s = 0; s < c.n_experts_used; ++s) {
        const std::vector<double> d = SwiGluFfn(w.experts[order[s]], h);
        for (int i = 0; i < c.dim; ++i) x[i] += p[order[s]] / chosen * d[i];
      }
    }
    all_logits.push_back(Apply(out_w, Norm(x, final_norm, c.norm_eps)));
  }
  return all_logits;
}

}  // namespace qforge::testing
