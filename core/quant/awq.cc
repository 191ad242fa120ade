// AWQ: the α search, the clipping search and the model-level fold (awq.h).
#include "core/quant/awq.h"

#include "core/kernels/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/quant/gptq.h"
#include "core/quant/packing.h"

namespace qforge::quant {
namespace {

absl::Status ValidateOptions(const AwqOptions& o, int64_t cols) {
  if (o.bits < 2 || o.bits > 8) return absl::InvalidArgumentError(absl::StrCat("awq: bits must be 2..8, got ", o.bits));
  if (o.group < 0) return absl::InvalidArgumentError(absl::StrCat("awq: group must be >= 0, got ", o.group));
  if (o.grid < 1) return absl::InvalidArgumentError(absl::StrCat("awq: grid must be >= 1, got ", o.grid));
  if (cols <= 0) return absl::InvalidArgumentError(absl::StrCat("awq: cols must be positive, got ", cols));
  if (o.group > 0 && cols % o.group != 0) {
    return absl::InvalidArgumentError(absl::StrCat("awq: group ", o.group, " does not divide the row length ", cols));
  }
  return absl::OkStatus();
}

int64_t GroupLen(const AwqOptions& o, int64_t cols) { return o.group > 0 ? o.group : cols; }

}  // namespace

absl::StatusOr<std::vector<float>> ReadF32Tensor(const Model& m, const std::string& name, const char* method) {
  QF_ASSIGN_OR_RETURN(const Tensor* t, m.Get(name));
  // A fold rescales the source's own values: f16 / bf16 checkpoints (most Hugging Face models) are widened
  // exactly; a quantized tensor has no values of its own to rescale.
  if (!t->format.is_float()) {
    return absl::FailedPreconditionError(
        absl::StrCat(method, ": fold needs f32/f16/bf16 tensors, ", name, " is ", FormatName(t->format)));
  }
  std::vector<float> v(static_cast<size_t>(t->numel()));
  QF_RETURN_IF_ERROR(kernels::DequantizeRows(*t, 0, t->rows(), v.data()));
  return v;
}

void WriteF32Tensor(Model& m, const std::string& name, const std::vector<float>& v) {
  Tensor& t = m.tensors.at(name);
  t = Tensor::FromFloats(name, t.shape, std::span<const float>(v));
}

std::vector<float> AwqChannelScales(const std::vector<double>& mean_abs, double alpha) {
  std::vector<double> s(mean_abs.size());
  double mx = 0, mn = std::numeric_limits<double>::infinity();
  for (size_t j = 0; j < s.size(); ++j) {
    s[j] = std::max(std::pow(std::max(mean_abs[j], 0.0), alpha), 1e-4);
    mx = std::max(mx, s[j]);
    mn = std::min(mn, s[j]);
  }
  const double norm = s.empty() ? 1.0 : std::sqrt(mx * mn);
  std::vector<float> out(s.size());
  for (size_t j = 0; j < s.size(); ++j) out[j] = static_cast<float>(s[j] / norm);
  return out;
}

void AwqFakeQuantize(const float* w, int64_t rows, int64_t cols, const float* s, const AwqOptions& o, float* w_hat) {
  const int64_t g = GroupLen(o, cols);
  std::vector<float> buf(static_cast<size_t>(g));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c0 = 0; c0 < cols; c0 += g) {
      for (int64_t i = 0; i < g; ++i) buf[i] = s ? w[r * cols + c0 + i] * s[c0 + i] : w[r * cols + c0 + i];
      const QIntGrid grid = ChooseQIntGrid(buf.data(), g, o.bits, o.symmetric);
      for (int64_t i = 0; i < g; ++i) {
        const float q = QIntValue(QIntCode(buf[i], grid), grid);
        w_hat[r * cols + c0 + i] = s ? q / s[c0 + i] : q;
      }
    }
  }
}

absl::StatusOr<AwqScaleResult> AwqSearchScales(const std::vector<AwqWeight>& weights, int64_t cols,
                                               const calib::LayerStats& stats, const AwqOptions& o) {
  QF_RETURN_IF_ERROR(ValidateOptions(o, cols));
  if (weights.empty()) return absl::InvalidArgumentError("awq: weights must not be empty");
  for (const AwqWeight& wt : weights) {
    if (wt.w == nullptr || wt.rows <= 0) return absl::InvalidArgumentError("awq: weights must be non-empty matrices");
  }
  if (stats.cols != cols || stats.hessian.size() != static_cast<size_t>(cols * cols) ||
      stats.mean_abs.size() != static_cast<size_t>(cols)) {
    return absl::InvalidArgumentError(
        absl::StrCat("awq: calibration statistics are for ", stats.cols, " inputs, the matrix has ", cols));
  }
  AwqScaleResult res;
  res.errors.assign(static_cast<size_t>(o.grid), 0.0);
  int best = 0;
  for (int k = 0; k < o.grid; ++k) {
    const double alpha = static_cast<double>(k) / o.grid;
    // α = 0: all scales exactly 1, i.e. plain rtn.
    const std::vector<float> s = AwqChannelScales(stats.mean_abs, alpha);
    double total = 0;
    for (const AwqWeight& wt : weights) {
      std::vector<float> w_hat(static_cast<size_t>(wt.rows * cols));
      AwqFakeQuantize(wt.w, wt.rows, cols, k == 0 ? nullptr : s.data(), o, w_hat.data());
      double err = 0, ref = 0;
      LayerOutputError(wt.w, w_hat.data(), wt.rows, cols, stats.hessian.data(), &err, &ref);
      total += err;
    }
    res.errors[k] = total;
    if (total < res.errors[best]) best = k;
  }
  res.alpha = static_cast<double>(best) / o.grid;
  res.scales = best == 0 ? std::vector<float>(static_cast<size_t>(cols), 1.0f)
                         : AwqChannelScales(stats.mean_abs, res.alpha);
  res.error = res.errors[best];
  return res;
}

absl::Status AwqClipQuantize(const float* w, int64_t rows, int64_t cols, const double* hessian, const AwqOptions& o,
                             int grid, std::vector<uint8_t>* codes, std::vector<uint16_t>* scales,
                             std::vector<uint8_t>* zeros) {
  QF_RETURN_IF_ERROR(ValidateOptions(o, cols));
  if (rows <= 0) return absl::InvalidArgumentError(absl::StrCat("awq: rows must be positive, got ", rows));
  const int64_t g = GroupLen(o, cols);
  const int64_t groups = cols / g;
  codes->assign(static_cast<size_t>(rows * cols), 0);
  scales->assign(static_cast<size_t>(rows * groups), 0);
  zeros->assign(static_cast<size_t>(rows * groups), 0);
  std::vector<float> shrunk(static_cast<size_t>(g));
  std::vector<double> d(static_cast<size_t>(g));
  std::vector<uint8_t> c(static_cast<size_t>(g));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float* x = w + r * cols + gi * g;
      const int64_t c0 = gi * g;
      double best = std::numeric_limits<double>::infinity();
      // The reference's max_shrink 0.5: r = 1 - k/grid for k < grid/2. grid <= 1: no clipping search (r = 1 only).
      const int steps = std::max(grid / 2, 1);
      for (int k = 0; k < steps; ++k) {
        const float ratio = grid > 0 ? 1.0f - static_cast<float>(k) / static_cast<float>(grid) : 1.0f;
        for (int64_t i = 0; i < g; ++i) shrunk[i] = x[i] * ratio;
        const QIntGrid q = ChooseQIntGrid(shrunk.data(), g, o.bits, o.symmetric);
        for (int64_t i = 0; i < g; ++i) {
          c[i] = static_cast<uint8_t>(QIntCode(x[i], q));
          d[i] = static_cast<double>(x[i]) - QIntValue(c[i], q);
        }
        double e = 0;
        for (int64_t i = 0; i < g; ++i) {
          if (d[i] == 0) continue;
          const double* hr = hessian + (c0 + i) * cols + c0;
          double acc = 0;
          for (int64_t j = 0; j < g; ++j) acc += hr[j] * d[j];
          e += d[i] * acc;
        }
        if (e < best) {
          best = e;
          std::memcpy(codes->data() + r * cols + c0, c.data(), static_cast<size_t>(g));
          (*scales)[r * groups + gi] = q.scale_half;
          (*zeros)[r * groups + gi] = static_cast<uint8_t>(q.zero);
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::Status AwqFoldScales(Model& m, const std::vector<AwqLayerScales>& layers) {
  const ModelConfig& c = m.config;
  if (static_cast<int>(layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("awq: layers has ", layers.size(), " entries, the model has ", c.n_layers, " blocks"));
  }
  for (int l = 0; l < c.n_layers; ++l) {
    struct Pair {
      const std::vector<float>* s;
      std::string norm;
      std::vector<std::string> mats;
    };
    const Pair pairs[2] = {
        {&layers[l].attn, names::AttnNorm(l), {names::AttnQ(l), names::AttnK(l), names::AttnV(l)}},
        {&layers[l].ffn, names::FfnNorm(l), {names::FfnGate(l), names::FfnUp(l)}},
    };
    for (const Pair& p : pairs) {
      if (p.s->empty()) continue;
      const std::vector<float>& s = *p.s;
      if (static_cast<int>(s.size()) != c.dim) {
        return absl::InvalidArgumentError(
            absl::StrCat("awq: scales for ", p.norm, " have ", s.size(), " entries, dim is ", c.dim));
      }
      for (float v : s) {
        if (!(v > 0) || !std::isfinite(v)) {
          return absl::InvalidArgumentError(absl::StrCat("awq: scales for ", p.norm, " must be positive and finite"));
        }
      }
      QF_ASSIGN_OR_RETURN(std::vector<float> norm, ReadF32Tensor(m, p.norm, "awq"));
      for (int j = 0; j < c.dim; ++j) norm[j] /= s[j];
      std::vector<std::vector<float>> mats;
      for (const std::string& name : p.mats) {
        QF_ASSIGN_OR_RETURN(std::vector<float> w, ReadF32Tensor(m, name, "awq"));
        const size_t cols = static_cast<size_t>(c.dim);
        for (size_t i = 0; i < w.size(); ++i) w[i] *= s[i % cols];
        mats.push_back(std::move(w));
      }
      WriteF32Tensor(m, p.norm, norm);
      for (size_t i = 0; i < mats.size(); ++i) WriteF32Tensor(m, p.mats[i], mats[i]);
    }
  }
  return absl::OkStatus();
}

calib::LayerStats AwqScaleStats(const calib::LayerStats& stats, const std::vector<float>& s) {
  calib::LayerStats out = stats;
  const int64_t n = stats.cols;
  for (int64_t i = 0; i < n; ++i) {
    if (!out.mean_abs.empty()) out.mean_abs[i] /= s[i];
    if (!out.max_abs.empty()) out.max_abs[i] /= s[i];
    if (!out.hessian.empty()) {
      for (int64_t j = 0; j < n; ++j) out.hessian[i * n + j] /= static_cast<double>(s[i]) * s[j];
    }
  }
  return out;
}

absl::Status AwqScaleModel(Model& m, calib::CalibrationStats& stats, const AwqOptions& o,
                           std::vector<std::pair<double, double>>* chosen) {
  const ModelConfig& c = m.config;
  // A group that does not divide the row is searched per channel: the grid the quantizer falls back to.
  AwqOptions so = o;
  if (so.group > 0 && c.dim % so.group != 0) so.group = 0;
  std::vector<AwqLayerScales> layers(static_cast<size_t>(c.n_layers));
  if (chosen) chosen->assign(static_cast<size_t>(c.n_layers), {0.0, 0.0});
  for (int l = 0; l < c.n_layers; ++l) {
    const std::vector<std::string> groups[2] = {{names::AttnQ(l), names::AttnK(l), names::AttnV(l)},
                                                {names::FfnGate(l), names::FfnUp(l)}};
    for (int p = 0; p < 2; ++p) {
      auto it = stats.find(groups[p][0]);
      if (it == stats.end() || !it->second) {
        return absl::FailedPreconditionError(absl::StrCat("awq: no calibration statistics for ", groups[p][0]));
      }
      const calib::LayerStats& st = *it->second;
      std::vector<std::vector<float>> mats;
      std::vector<AwqWeight> ws;
      for (const std::string& name : groups[p]) {
        QF_ASSIGN_OR_RETURN(std::vector<float> w, ReadF32Tensor(m, name, "awq"));
        mats.push_back(std::move(w));
      }
      for (size_t i = 0; i < mats.size(); ++i) {
        ws.push_back({mats[i].data(), static_cast<int64_t>(mats[i].size()) / c.dim});
      }
      QF_ASSIGN_OR_RETURN(AwqScaleResult r, AwqSearchScales(ws, c.dim, st, so));
      if (chosen) (p == 0 ? (*chosen)[l].first : (*chosen)[l].second) = r.alpha;
      if (r.alpha == 0) continue;
      auto scaled = std::make_shared<const calib::LayerStats>(AwqScaleStats(st, r.scales));
      for (const std::string& name : groups[p]) stats[name] = scaled;
      (p == 0 ? layers[l].attn : layers[l].ffn) = std::move(r.scales);
    }
  }
  return AwqFoldScales(m, layers);
}

}  // namespace qforge::quant
