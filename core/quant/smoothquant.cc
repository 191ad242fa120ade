// SmoothQuant: the smoothing scales, the model-level fold and the W8A8 weight encoder (smoothquant.h).
#include "core/quant/smoothquant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/base/thread_pool.h"

namespace qforge::quant {
namespace {

absl::Status ValidateAlpha(double alpha) {
  if (!(alpha >= 0 && alpha <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat("smoothquant: alpha must be in [0, 1], got ", alpha));
  }
  return absl::OkStatus();
}

absl::Status CheckScales(const std::vector<float>& s, int64_t n, const std::string& what) {
  if (static_cast<int64_t>(s.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("smoothquant: scales for ", what, " have ", s.size(), " entries, expected ", n));
  }
  for (float v : s) {
    if (!(v > 0) || !std::isfinite(v)) {
      return absl::InvalidArgumentError(absl::StrCat("smoothquant: scales for ", what, " must be positive and finite"));
    }
  }
  return absl::OkStatus();
}

void QuantizeRowW8A8(const float* w, int64_t cols, int8_t* codes, float* scale) {
  float amax = 0;
  for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[c]));
  const float s = amax / 127.0f;
  *scale = s;
  if (!(s > 0)) {
    std::memset(codes, 0, static_cast<size_t>(cols));
    *scale = 0;
    return;
  }
  for (int64_t c = 0; c < cols; ++c) {
    const float q = std::nearbyint(w[c] / s);  // the default rounding mode: ties to even, as the activations
    codes[c] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
  }
}

class SmoothQuantMethod : public QuantMethod {
 public:
  std::string name() const override { return "smoothquant"; }
  std::string description() const override {
    return "SmoothQuant W8A8: activation outliers migrated into the weights (needs calibration; --alpha), int8 "
           "weights per output channel, int8 activations per token at run time";
  }
  QuantParams DefaultParams() const override { return {8, 0, true, false}; }
  bool NeedsCalibration() const override { return true; }
  bool HasModelTransform() const override { return true; }
  absl::Status PrepareModel(Model& model, calib::CalibrationStats& stats, const QuantParams& p) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    return SmoothQuantModel(model, stats, p.alpha);
  }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.bits != 8) {
      return absl::InvalidArgumentError(absl::StrCat("smoothquant: bits must be 8 (W8A8), got ", p.bits));
    }
    return ValidateAlpha(p.alpha);
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    const WeightFormat f = WeightFormat::Of(WeightType::kW8A8);
    QF_RETURN_IF_ERROR(GetW8A8Layout(f, rows, cols).status());
    return f;
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    // The encoder itself reads no statistics, but smoothquant without them (and without PrepareModel) would be
    // plain W8A8: refuse, as the interface asks of calibrated methods.
    if (calib == nullptr) {
      return absl::FailedPreconditionError("smoothquant: needs calibration statistics (the layer's input maxima)");
    }
    if (calib->cols != cols) {
      return absl::InvalidArgumentError(
          absl::StrCat("smoothquant: calibration statistics are for ", calib->cols, " inputs, the matrix has ", cols));
    }
    QF_ASSIGN_OR_RETURN(const W8A8Layout l, GetW8A8Layout(f, rows, cols));
    std::vector<uint8_t> out(l.total_bytes, 0);
    ParallelForOrInline(pool, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float scale;
        QuantizeRowW8A8(w + r * cols, cols, reinterpret_cast<int8_t*>(out.data() + l.codes_offset) + r * cols, &scale);
        std::memcpy(out.data() + l.scales_offset + 4 * static_cast<size_t>(r), &scale, 4);
      }
    });
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

}  // namespace

absl::StatusOr<std::vector<float>> SmoothQuantScales(const std::vector<AwqWeight>& weights, int64_t cols,
                                                     const std::vector<double>& act_max, double alpha) {
  QF_RETURN_IF_ERROR(ValidateAlpha(alpha));
  if (cols <= 0) return absl::InvalidArgumentError(absl::StrCat("smoothquant: cols must be positive, got ", cols));
  if (weights.empty()) return absl::InvalidArgumentError("smoothquant: weights must not be empty");
  if (static_cast<int64_t>(act_max.size()) != cols) {
    return absl::InvalidArgumentError(absl::StrCat("smoothquant: act_max has ", act_max.size(),
                                                   " entries, the weights have ", cols, " inputs"));
  }
  std::vector<double> w_max(static_cast<size_t>(cols), 0.0);
  for (const AwqWeight& wt : weights) {
    if (wt.w == nullptr || wt.rows <= 0) return absl::InvalidArgumentError("smoothquant: weights must be non-empty");
    for (int64_t r = 0; r < wt.rows; ++r) {
      const float* row = wt.w + r * cols;
      for (int64_t j = 0; j < cols; ++j) w_max[j] = std::max(w_max[j], std::fabs(static_cast<double>(row[j])));
    }
  }
  std::vector<float> s(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    const double a = act_max[j];
    if (!(a >= 0) || !std::isfinite(a)) {
      return absl::InvalidArgumentError(
          absl::StrCat("smoothquant: act_max[", j, "] must be finite and non-negative, got ", a));
    }
    if (!std::isfinite(w_max[j])) {
      return absl::InvalidArgumentError(absl::StrCat("smoothquant: weight column ", j, " is not finite"));
    }
    const double v = std::pow(a, alpha) / std::pow(std::max(w_max[j], kSmoothQuantMinScale), 1.0 - alpha);
    s[j] = static_cast<float>(std::max(v, kSmoothQuantMinScale));
  }
  return s;
}

absl::Status SmoothQuantFoldScales(Model& m, const std::vector<SmoothQuantLayerScales>& layers) {
  const ModelConfig& c = m.config;
  if (static_cast<int>(layers.size()) != c.n_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("smoothquant: layers has ", layers.size(), " entries, the model has ", c.n_layers, " blocks"));
  }
  std::vector<AwqLayerScales> norm_scales(layers.size());
  for (int l = 0; l < c.n_layers; ++l) {
    const SmoothQuantLayerScales& ls = layers[l];
    if (!ls.down.empty()) QF_RETURN_IF_ERROR(CheckScales(ls.down, c.hidden_dim, names::FfnDown(l)));
    norm_scales[l] = {ls.attn, ls.ffn};
  }
  // attn/ffn (AwqFoldScales checks their lengths and signs), then the down fold on top of the column-scaled
  // up_proj: row and column scalings commute.
  QF_RETURN_IF_ERROR(AwqFoldScales(m, norm_scales));
  const size_t dim = static_cast<size_t>(c.dim), hidden = static_cast<size_t>(c.hidden_dim);
  for (int l = 0; l < c.n_layers; ++l) {
    const std::vector<float>& s = layers[l].down;
    if (s.empty()) continue;
    QF_ASSIGN_OR_RETURN(std::vector<float> up, ReadF32Tensor(m, names::FfnUp(l), "smoothquant"));
    QF_ASSIGN_OR_RETURN(std::vector<float> down, ReadF32Tensor(m, names::FfnDown(l), "smoothquant"));
    if (up.size() != hidden * dim || down.size() != dim * hidden) {
      return absl::InvalidArgumentError(absl::StrCat("smoothquant: ", names::FfnUp(l), " / ", names::FfnDown(l),
                                                     " do not have the shapes of the config"));
    }
    for (size_t i = 0; i < up.size(); ++i) up[i] /= s[i / dim];        // up row i / dim
    for (size_t i = 0; i < down.size(); ++i) down[i] *= s[i % hidden];  // down column i % hidden
    WriteF32Tensor(m, names::FfnUp(l), up);
    WriteF32Tensor(m, names::FfnDown(l), down);
  }
  return absl::OkStatus();
}

absl::Status SmoothQuantModel(Model& m, calib::CalibrationStats& stats, double alpha,
                              std::vector<SmoothQuantLayerScales>* applied) {
  QF_RETURN_IF_ERROR(ValidateAlpha(alpha));
  const ModelConfig& c = m.config;
  std::vector<SmoothQuantLayerScales> layers(static_cast<size_t>(c.n_layers));
  struct Input {
    std::vector<std::string> mats;  // the matrices reading it; stats are keyed by mats[0]
    int64_t cols;
    std::vector<float> SmoothQuantLayerScales::*scales;
  };
  for (int l = 0; l < c.n_layers; ++l) {
    const Input inputs[3] = {
        {{names::AttnQ(l), names::AttnK(l), names::AttnV(l)}, c.dim, &SmoothQuantLayerScales::attn},
        {{names::FfnGate(l), names::FfnUp(l)}, c.dim, &SmoothQuantLayerScales::ffn},
        {{names::FfnDown(l)}, c.hidden_dim, &SmoothQuantLayerScales::down},
    };
    for (const Input& in : inputs) {
      auto it = stats.find(in.mats[0]);
      if (it == stats.end() || !it->second) {
        return absl::FailedPreconditionError(absl::StrCat("smoothquant: no calibration statistics for ", in.mats[0]));
      }
      const calib::LayerStats& st = *it->second;
      if (st.cols != in.cols) {
        return absl::InvalidArgumentError(absl::StrCat("smoothquant: calibration statistics for ", in.mats[0],
                                                       " are for ", st.cols, " inputs, expected ", in.cols));
      }
      std::vector<std::vector<float>> mats;
      std::vector<AwqWeight> ws;
      for (const std::string& name : in.mats) {
        QF_ASSIGN_OR_RETURN(std::vector<float> w, ReadF32Tensor(m, name, "smoothquant"));
        mats.push_back(std::move(w));
      }
      for (const std::vector<float>& w : mats) ws.push_back({w.data(), static_cast<int64_t>(w.size()) / in.cols});
      QF_ASSIGN_OR_RETURN(layers[l].*in.scales, SmoothQuantScales(ws, in.cols, st.max_abs, alpha));
    }
  }
  QF_RETURN_IF_ERROR(SmoothQuantFoldScales(m, layers));
  for (int l = 0; l < c.n_layers; ++l) {
    const std::pair<std::vector<std::string>, const std::vector<float>*> inputs[3] = {
        {{names::AttnQ(l), names::AttnK(l), names::AttnV(l)}, &layers[l].attn},
        {{names::FfnGate(l), names::FfnUp(l)}, &layers[l].ffn},
        {{names::FfnDown(l)}, &layers[l].down},
    };
    for (const auto& [mats, s] : inputs) {
      auto scaled = std::make_shared<const calib::LayerStats>(AwqScaleStats(*stats.at(mats[0]), *s));
      for (const std::string& name : mats) stats[name] = scaled;
    }
  }
  if (applied) *applied = std::move(layers);
  return absl::OkStatus();
}

std::unique_ptr<QuantMethod> MakeSmoothQuantMethod() { return std::make_unique<SmoothQuantMethod>(); }

}  // namespace qforge::quant
