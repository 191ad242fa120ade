// The quantization methods and the registry table. The numeric encoders are in packing.cc.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/large_buffer.h"
#include "core/base/status_macros.h"
#include "core/kernels/blocks.h"
#include "core/kernels/ggml_kernels.h"
#include "core/model/ggml_types.h"
#include "core/quant/awq.h"
#include "core/quant/gptq.h"
#include "core/quant/packing.h"
#include "core/quant/quant_method.h"
#include "core/quant/spqr.h"
#include "core/quant/quip.h"
#include "core/quant/smoothquant.h"
#include "core/quant/billm.h"
#include "core/quant/ternary.h"

namespace qforge::quant {

std::string ParamsToString(const QuantParams& p) {
  std::string s = absl::StrCat("bits=", p.bits, " group=", p.group, p.symmetric ? " sym" : " asym",
                               p.double_quant ? " dq" : " no-dq");
  // The gptq fields appear only when they differ from their defaults, so other methods' strings are unchanged.
  if (p.act_order) absl::StrAppend(&s, " act-order");
  if (p.static_groups) absl::StrAppend(&s, " static-groups");
  if (p.damp != QuantParams{}.damp) absl::StrAppend(&s, " damp=", p.damp);
  if (p.alpha != QuantParams{}.alpha) absl::StrAppend(&s, " alpha=", p.alpha);
  if (p.outlier_threshold != QuantParams{}.outlier_threshold) absl::StrAppend(&s, " outlier=", p.outlier_threshold);
  if (p.seed != QuantParams{}.seed) absl::StrAppend(&s, " seed=", p.seed);
  return s;
}

namespace {

absl::Status CheckShape(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
  }
  return absl::OkStatus();
}

// The layer's input Hessian is there and fits a [rows, cols] matrix: what every Hessian-driven method here needs.
absl::Status RequireLayerHessian(const std::string& method, int64_t cols, const calib::LayerStats* calib) {
  if (calib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(method, ": needs calibration statistics (the layer's input Hessian)"));
  }
  if (calib->cols != cols || calib->hessian.size() != static_cast<size_t>(cols * cols)) {
    return absl::InvalidArgumentError(
        absl::StrCat(method, ": calibration statistics are for ", calib->cols, " inputs, the matrix has ", cols));
  }
  return absl::OkStatus();
}

// Bits and group checks shared by every method that writes the qint encoding (rtn, gptq).
absl::Status ValidateQIntParams(const char* method, const QuantParams& p) {
  if (p.bits < 2 || p.bits > 8) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": bits must be 2..8, got ", p.bits));
  }
  if (p.group < 0) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": group must be 0 (per-channel) or positive, got ", p.group));
  }
  return absl::OkStatus();
}

// The qint format a [rows, cols] matrix gets, or why the shape does not fit it.
absl::StatusOr<WeightFormat> QIntOutputFormat(const char* method, const QuantParams& p, int64_t rows, int64_t cols) {
  QF_RETURN_IF_ERROR(CheckShape(rows, cols));
  if (p.group > 0 && cols % p.group != 0) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": group ", p.group, " does not divide the row length ", cols));
  }
  return WeightFormat::QInt(p.bits, p.group, p.symmetric);
}

// A ggml block format quantized row by row with the encoder of its row in the kernels' type table
// (ggml_kernels.h); the block size is the type table's (ggml_types.h), so a type is one row there and one line here.
class GgmlBlockMethod : public QuantMethod {
 public:
  GgmlBlockMethod(std::string name, std::string description, WeightType type, int bits,
                  std::optional<std::string> fallback)
      : name_(std::move(name)), description_(std::move(description)), type_(type),
        block_(FindGgmlType(type)->block), bits_(bits), encode_(kernels::FindGgmlKernels(type)->quantize),
        fallback_(std::move(fallback)) {}

  std::string name() const override { return name_; }
  std::string description() const override { return description_; }
  QuantParams DefaultParams() const override { return {bits_, block_, true, false}; }
  absl::Status Validate(const QuantParams&) const override { return absl::OkStatus(); }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams&, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    if (cols % block_ != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": row length ", cols, " is not a multiple of the block size ", block_));
    }
    return WeightFormat::Of(type_);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    if (encode_ == nullptr) return absl::InternalError(absl::StrCat(name_, ": the type table has no encoder"));
    QF_ASSIGN_OR_RETURN(const size_t nbytes, EncodedBytes(f, rows, cols));
    std::vector<uint8_t> out = LargeZeroedVector<uint8_t>(nbytes, pool);
    const size_t row_bytes = nbytes / static_cast<size_t>(rows);
    // An imported importance matrix (llama-quantize --imatrix's job): the type's weighted fit.
    if (calib != nullptr && !calib->importance.empty()) {
      const kernels::GgmlKernelTraits* k = kernels::FindGgmlKernels(type_);
      if (k == nullptr || !kernels::HasWeightedEncoding(*k)) {
        return absl::FailedPreconditionError(absl::StrCat(
            name_, ": no importance-weighted encoder for this type"));
      }
      if (static_cast<int64_t>(calib->importance.size()) != cols) {
        return absl::InvalidArgumentError(absl::StrCat(name_, ": the importance has ", calib->importance.size(),
                                                       " columns, the matrix ", cols));
      }
      const std::vector<float> importance(calib->importance.begin(), calib->importance.end());
      ParallelForOrInline(pool, rows, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          kernels::QuantizeRowWeighted(*k, w + r * cols, importance.data(), cols,
                                       out.data() + static_cast<size_t>(r) * row_bytes);
        }
      });
      return out;
    }
    ParallelForOrInline(pool, rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) encode_(w + r * cols, cols, out.data() + static_cast<size_t>(r) * row_bytes);
    });
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    if (!fallback_) return std::nullopt;
    return std::make_pair(*fallback_, FindMethod(*fallback_)->DefaultParams());
  }

 private:
  std::string name_, description_;
  WeightType type_;
  int block_, bits_;
  kernels::QuantizeBlocksFn encode_;
  std::optional<std::string> fallback_;
};

// Plain f16: fits every shape, the last resort of every fallback chain.
class F16Method : public QuantMethod {
 public:
  std::string name() const override { return "f16"; }
  std::string description() const override { return "IEEE half precision (round to nearest even)"; }
  QuantParams DefaultParams() const override { return {16, 0, true, false}; }
  absl::Status Validate(const QuantParams&) const override { return absl::OkStatus(); }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams&, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    return WeightFormat::F16();
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats*) const override {
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    std::vector<uint8_t> out = LargeZeroedVector<uint8_t>(2 * static_cast<size_t>(rows * cols), pool);
    ParallelForOrInline(pool, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * cols; i < r1 * cols; ++i) {
        const uint16_t h = FloatToHalf(w[i]);
        std::memcpy(out.data() + 2 * i, &h, 2);
      }
    });
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::nullopt;
  }
};

// Round-to-nearest integers in the qforge planar kQInt layout.
class RtnMethod : public QuantMethod {
 public:
  std::string name() const override { return "rtn"; }
  std::string description() const override {
    return "round-to-nearest integers, 2..8 bits, per-channel or grouped, symmetric or asymmetric";
  }
  QuantParams DefaultParams() const override { return {4, 128, true, false}; }
  absl::Status Validate(const QuantParams& p) const override {
    return ValidateQIntParams("rtn", p);
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    return QIntOutputFormat("rtn", p, rows, cols);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats*) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const QIntLayout l, GetQIntLayout(f, rows, cols));
    std::vector<uint8_t> out(l.total_bytes, 0);
    ParallelForOrInline(pool, rows, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) QuantizeRowQInt(w + r * cols, r, cols, f, l, out.data());
    });
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    // A group that does not divide the row: one scale per row at the same bit width.
    if (p.group != 0) return std::make_pair(std::string("rtn"), QuantParams{p.bits, 0, p.symmetric, false});
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

// NormalFloat-4 with blockwise absmax, optionally double-quantized (QLoRA).
class Nf4Method : public QuantMethod {
 public:
  std::string name() const override { return "nf4"; }
  std::string description() const override {
    return "NormalFloat-4 (QLoRA), absmax per block, double-quantized absmax by default";
  }
  QuantParams DefaultParams() const override { return {4, 64, true, true}; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.group <= 0 || p.group % 2 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("nf4: group (block size) must be positive and even, got ", p.group));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    if (cols % p.group != 0) {
      return absl::InvalidArgumentError(absl::StrCat("nf4: group (block size) ", p.group,
                                                     " does not divide the row length ", cols));
    }
    return WeightFormat::NF4(p.group, p.double_quant);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats*) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const Nf4Layout l, GetNf4Layout(f, rows, cols));
    std::vector<uint8_t> out(l.total_bytes, 0);
    const int64_t B = l.block;
    std::vector<float> absmax(static_cast<size_t>(l.blocks));
    ParallelForOrInline(pool, l.blocks, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        float m = 0;
        for (int64_t i = 0; i < B; ++i) m = std::max(m, std::fabs(w[b * B + i]));
        absmax[b] = m;
      }
    });
    // The scale each block is encoded against: what the kernels will reconstruct.
    std::vector<float> stored(absmax);
    if (f.double_quant) {
      std::vector<int8_t> q(static_cast<size_t>(l.blocks));
      std::vector<float> dq_scale(static_cast<size_t>(l.dq_groups));
      float dq_offset = 0;
      DoubleQuantizeAbsmax(absmax.data(), l.blocks, q.data(), dq_scale.data(), &dq_offset);
      std::memcpy(out.data() + l.absmax_offset, q.data(), q.size());
      std::memcpy(out.data() + l.dq_scale_offset, dq_scale.data(), 4 * dq_scale.size());
      std::memcpy(out.data() + l.dq_offset_offset, &dq_offset, 4);
      for (int64_t b = 0; b < l.blocks; ++b) {
        stored[b] = dq_scale[b / kNf4DoubleQuantGroup] * static_cast<float>(q[b]) + dq_offset;
      }
    } else {
      std::memcpy(out.data() + l.absmax_offset, absmax.data(), 4 * absmax.size());
    }
    ParallelForOrInline(pool, l.blocks, 64, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        EncodeNf4Block(w + b * B, B, stored[b], out.data() + l.codes_offset + static_cast<size_t>(b * B / 2));
      }
    });
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

// GPTQ/OPTQ into the same kQInt grid as rtn: the codes are chosen with second-order error feedback from the
// layer's calibration Hessian (gptq.h).
class GptqMethod : public QuantMethod {
 public:
  std::string name() const override { return "gptq"; }
  std::string description() const override {
    return "GPTQ/OPTQ: Hessian-aware rounding into qint (needs calibration), 2..8 bits, grouped, act-order";
  }
  QuantParams DefaultParams() const override { return {4, 128, true, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    QF_RETURN_IF_ERROR(ValidateQIntParams("gptq", p));
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("gptq: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    return QIntOutputFormat("gptq", p, rows, cols);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const QIntLayout l, GetQIntLayout(f, rows, cols));
    QF_RETURN_IF_ERROR(RequireLayerHessian("gptq", cols, calib));
    GptqOptions o;
    o.bits = p.bits;
    o.group = p.group;
    o.symmetric = p.symmetric;
    o.act_order = p.act_order;
    o.static_groups = p.static_groups;
    o.percdamp = p.damp;
    o.pool = pool;
    QF_ASSIGN_OR_RETURN(const GptqResult r, GptqQuantize(w, rows, cols, calib->hessian.data(), o));
    std::vector<uint8_t> out(l.total_bytes, 0);
    PackQInt(r.codes.data(), r.scales.data(), r.zeros.data(), rows, cols, f, l, out.data());
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    if (p.group != 0) {
      QuantParams pc = p;
      pc.group = 0;
      pc.static_groups = false;
      return std::make_pair(std::string("gptq"), pc);
    }
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

// GPTQ's error feedback onto ggml's Q4_0 grid, so the file is a plain Q4_0 GGUF that llama.cpp runs: each
// 32-column block's grid is Q4_0's own, d = (its signed largest weight) / -8 stored as f16, codes 0..15 for
// d * (q - 8), chosen from the block's weights as the feedback has updated them when its first column comes
// up; the feedback then spreads each column's rounding error over the columns after it (docs/calibrated.md).
class GptqQ4_0Method : public QuantMethod {
 public:
  std::string name() const override { return "gptq_q4_0"; }
  std::string description() const override {
    return "GPTQ's Hessian error feedback onto ggml's Q4_0 grid (needs calibration; a Q4_0 GGUF llama.cpp runs)";
  }
  QuantParams DefaultParams() const override { return {4, 32, false, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.bits != 4 || p.group != 32) {
      return absl::InvalidArgumentError(
          absl::StrCat("gptq_q4_0: Q4_0 is 4 bits per 32-weight block, got bits ", p.bits, " group ", p.group));
    }
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("gptq_q4_0: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    if (cols % kernels::kQK4_0 != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("gptq_q4_0: row length ", cols, " is not a multiple of the block size ", kernels::kQK4_0));
    }
    return WeightFormat::Of(WeightType::kQ4_0);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    QF_RETURN_IF_ERROR(RequireLayerHessian("gptq_q4_0", cols, calib));
    GptqOptions o;
    o.bits = 4;
    o.group = kernels::kQK4_0;
    o.act_order = p.act_order;
    o.static_groups = p.static_groups;
    o.percdamp = p.damp;
    o.pool = pool;
    o.choose_grid = [](const float* x, int64_t n) { return Q4_0Grid(x, n); };
    QF_ASSIGN_OR_RETURN(const GptqResult r, GptqQuantize(w, rows, cols, calib->hessian.data(), o));
    const int64_t blocks = cols / kernels::kQK4_0;
    std::vector<uint8_t> out(static_cast<size_t>(rows * blocks) * sizeof(kernels::block_q4_0));
    auto* q = reinterpret_cast<kernels::block_q4_0*>(out.data());
    for (int64_t r0 = 0; r0 < rows; ++r0) {
      for (int64_t b = 0; b < blocks; ++b) {
        kernels::block_q4_0& blk = q[r0 * blocks + b];
        blk.d = r.scales[r0 * blocks + b];
        const uint8_t* c = &r.codes[r0 * cols + b * kernels::kQK4_0];
        for (int j = 0; j < kernels::kQK4_0 / 2; ++j) {
          blk.qs[j] = static_cast<uint8_t>(c[j] | (c[j + kernels::kQK4_0 / 2] << 4));
        }
      }
    }
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());  // as q4_0 falls back
  }

 private:
  // Q4_0's grid of one block: d = the signed value of largest magnitude (the first on ties) / -8, as f16, so
  // that value takes code 0 and the codes 0..15 span d * [-8, 7].
  static QIntGrid Q4_0Grid(const float* x, int64_t n) {
    QIntGrid g;
    g.scale_half = FloatToHalf(kernels::SignedAbsMax(x, static_cast<int>(n)) / -8.0f);
    g.scale = HalfToFloat(g.scale_half);
    g.zero = 8;
    g.max_code = 15;
    return g;
  }
};

// GPTQ onto a ggml K-quant's grid (gptq_q2_k ... gptq_q6_k), written as that type so llama.cpp runs it. A group is
// a 256-column super-block: when its first column comes up, its header (d, dmin, the sub-block scales) is fit to
// the weights as the feedback has updated them, with the importance-weighted fit llama-quantize runs with an
// imatrix (each column weighted by what its rounding error costs, GptqOptions::choose_subgroup_grids); then every
// column is rounded onto its 16- or 32-column sub-block's grid and its error spread over the columns after it.
class GptqKQuantMethod : public QuantMethod {
 public:
  GptqKQuantMethod(WeightType type, int bits, std::string plain)
      : type_(type), bits_(bits), plain_(std::move(plain)), name_(absl::StrCat("gptq_", plain_)),
        kernels_(kernels::FindGgmlKernels(type)) {}

  std::string name() const override { return name_; }
  std::string description() const override {
    return absl::StrCat("GPTQ's Hessian error feedback onto ggml's ", plain_,
                        " grid, headers fit with Hessian importance (needs calibration; a ", plain_,
                        " GGUF llama.cpp runs)");
  }
  QuantParams DefaultParams() const override { return {bits_, kernels::kQK_K, false, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.bits != bits_ || p.group != kernels::kQK_K) {
      return absl::InvalidArgumentError(absl::StrCat(name_, ": ", plain_, " is ", bits_, " bits per ", kernels::kQK_K,
                                                     "-weight super-block, got bits ", p.bits, " group ", p.group));
    }
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat(name_, ": damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    QF_RETURN_IF_ERROR(CheckShape(rows, cols));
    if (cols % kernels::kQK_K != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name_, ": row length ", cols, " is not a multiple of the block size ", kernels::kQK_K));
    }
    return WeightFormat::Of(type_);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    QF_RETURN_IF_ERROR(RequireLayerHessian(name_, cols, calib));
    const int64_t blocks = cols / kernels::kQK_K;
    const size_t block_bytes = static_cast<size_t>(FindGgmlType(type_)->block_bytes);
    std::vector<uint8_t> out = LargeZeroedVector<uint8_t>(static_cast<size_t>(rows * blocks) * block_bytes, pool);
    auto block_at = [&](int64_t row, int64_t b) { return out.data() + static_cast<size_t>(row * blocks + b) * block_bytes; };
    GptqOptions o;
    o.bits = bits_;
    o.group = kernels::kQK_K;
    o.subgroup = kernels_->sub_block;
    o.act_order = p.act_order;
    o.static_groups = p.static_groups;
    o.percdamp = p.damp;
    o.pool = pool;
    o.choose_subgroup_grids = [&](int64_t row, int64_t b, const float* x, const float* importance, int64_t,
                                  QIntGrid* grids) {
      kernels::SubBlockGrid fitted[kernels::kQK_K / 16];
      kernels_->fit_header(x, importance, block_at(row, b), fitted);
      for (int j = 0; j < kernels::kQK_K / kernels_->sub_block; ++j) {
        grids[j].scale = fitted[j].scale;
        grids[j].offset = fitted[j].offset;
        grids[j].zero = fitted[j].zero;
        grids[j].max_code = fitted[j].max_code;
      }
    };
    QF_ASSIGN_OR_RETURN(const GptqResult r, GptqQuantize(w, rows, cols, calib->hessian.data(), o));
    ParallelForOrInline(pool, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t row = r0; row < r1; ++row) {
        for (int64_t b = 0; b < blocks; ++b) kernels_->set_codes(&r.codes[row * cols + b * kernels::kQK_K], block_at(row, b));
      }
    });
    return out;
  }
  // Where the type cannot hold a shape, what the plain type falls back to (llama-quantize's chain).
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    return FindMethod(plain_)->Fallback(p);
  }

 private:
  WeightType type_;
  int bits_;
  std::string plain_, name_;
  const kernels::GgmlKernelTraits* kernels_;
};

// AWQ into the same kQInt grid as rtn. The per-channel scaling half changes the model (1/s folded into the
// RMSNorm weights), so it is the model transform (PrepareModel = AwqScaleModel), run once before QuantizeModel;
// Quantize is the per-layer half, the activation-aware clipping search (awq.h) on the folded weights.
class AwqMethod : public QuantMethod {
 public:
  static constexpr int kClipGrid = 20;
  std::string name() const override { return "awq"; }
  std::string description() const override {
    return "AWQ: activation-aware clipping into qint (needs calibration; channel scaling via AwqScaleModel)";
  }
  QuantParams DefaultParams() const override { return {4, 128, true, false}; }
  bool NeedsCalibration() const override { return true; }
  bool HasModelTransform() const override { return true; }
  // The activation-aware channel scaling (AwqScaleModel): q/k/v and gate/up scales folded into the norms.
  absl::Status PrepareModel(Model& model, calib::CalibrationStats& stats, const QuantParams& p) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    return AwqScaleModel(model, stats, AwqOptions{.bits = p.bits, .group = p.group, .symmetric = p.symmetric});
  }
  absl::Status Validate(const QuantParams& p) const override { return ValidateQIntParams("awq", p); }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    return QIntOutputFormat("awq", p, rows, cols);
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool*, const calib::LayerStats* calib) const override {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const QIntLayout l, GetQIntLayout(f, rows, cols));
    QF_RETURN_IF_ERROR(RequireLayerHessian("awq", cols, calib));
    AwqOptions o;
    o.bits = p.bits;
    o.group = p.group;
    o.symmetric = p.symmetric;
    std::vector<uint8_t> codes, zeros;
    std::vector<uint16_t> scales;
    QF_RETURN_IF_ERROR(AwqClipQuantize(w, rows, cols, calib->hessian.data(), o, kClipGrid, &codes, &scales, &zeros));
    std::vector<uint8_t> out(l.total_bytes, 0);
    PackQInt(codes.data(), scales.data(), zeros.data(), rows, cols, f, l, out.data());
    return out;
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams& p) const override {
    if (p.group != 0) {
      QuantParams pc = p;
      pc.group = 0;
      return std::make_pair(std::string("awq"), pc);
    }
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

// The registry table: one entry per method.
const std::vector<std::unique_ptr<QuantMethod>>& Registry() {
  static const auto* registry = [] {
    auto* r = new std::vector<std::unique_ptr<QuantMethod>>();
    r->push_back(std::make_unique<RtnMethod>());
    r->push_back(std::make_unique<Nf4Method>());
    // One line per writable ggml type: name, description, type (its encoder and block come from the type tables),
    // nominal bits, fallback. The fallbacks of the 256-weight types are llama-quantize's (tensor_type_fallback in
    // llama.cpp 007dbbf): q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0, q2_k / q3_k -> q4_0, iq4_xs -> iq4_nl; the
    // 32-weight types then reach f16 through q8_0 (same block, so exactly where llama.cpp writes f16).
    auto ggml = [r](const char* name, const char* description, WeightType type, int bits, const char* fallback) {
      r->push_back(std::make_unique<GgmlBlockMethod>(name, description, type, bits, fallback));
    };
    ggml("q8_0", "ggml Q8_0: 32 weights per f16 scale, int8", WeightType::kQ8_0, 8, "f16");
    ggml("q4_0", "ggml Q4_0: 32 weights per f16 scale, 4-bit", WeightType::kQ4_0, 4, "q8_0");
    ggml("q4_k", "ggml Q4_K: 256-weight super-blocks, 6-bit scales/mins per 32", WeightType::kQ4_K, 4, "q5_0");
    ggml("q4_1", "ggml Q4_1: 32 weights per f16 scale and min, 4-bit", WeightType::kQ4_1, 4, "q8_0");
    ggml("q5_0", "ggml Q5_0: 32 weights per f16 scale, 5-bit", WeightType::kQ5_0, 5, "q8_0");
    ggml("q5_1", "ggml Q5_1: 32 weights per f16 scale and min, 5-bit", WeightType::kQ5_1, 5, "q8_0");
    ggml("q2_k", "ggml Q2_K: 256-weight super-blocks, 4-bit scales/mins per 16, 2-bit", WeightType::kQ2_K, 2,
         "q4_0");
    ggml("q3_k", "ggml Q3_K: 256-weight super-blocks, 6-bit scales per 16, 3-bit symmetric", WeightType::kQ3_K, 3,
         "q4_0");
    ggml("q5_k", "ggml Q5_K: 256-weight super-blocks, 6-bit scales/mins per 32, 5-bit", WeightType::kQ5_K, 5,
         "q5_1");
    ggml("q6_k", "ggml Q6_K: 256-weight super-blocks, int8 scales per 16, 6-bit symmetric", WeightType::kQ6_K, 6,
         "q8_0");
    ggml("iq4_nl", "ggml IQ4_NL: 32 weights per f16 scale, 4-bit indices into a non-linear 16-level grid",
         WeightType::kIQ4_NL, 4, "q8_0");
    ggml("iq4_xs", "ggml IQ4_XS: 256-weight super-blocks, 6-bit scales per 32, IQ4_NL's grid", WeightType::kIQ4_XS, 4,
         "iq4_nl");
    r->push_back(std::make_unique<GptqMethod>());
    r->push_back(std::make_unique<GptqQ4_0Method>());
    // One line per K-quant GPTQ can target: type, bits, the plain method of that type.
    for (const auto& [type, bits, plain] : {std::tuple{WeightType::kQ2_K, 2, "q2_k"}, std::tuple{WeightType::kQ3_K, 3, "q3_k"},
                                            std::tuple{WeightType::kQ4_K, 4, "q4_k"}, std::tuple{WeightType::kQ5_K, 5, "q5_k"},
                                            std::tuple{WeightType::kQ6_K, 6, "q6_k"}}) {
      r->push_back(std::make_unique<GptqKQuantMethod>(type, bits, plain));
    }
    r->push_back(std::make_unique<AwqMethod>());
    r->push_back(MakeSpqrMethod());
    r->push_back(MakeSmoothQuantMethod());
    r->push_back(MakeQuipMethod());
    r->push_back(MakeTernaryMethod());
    r->push_back(MakeBitnetMethod());
    r->push_back(MakeQmoeMethod());
    r->push_back(MakeBillmMethod());
    r->push_back(std::make_unique<F16Method>());
    return r;
  }();
  return *registry;
}

}  // namespace

const QuantMethod* FindMethod(const std::string& name) {
  for (const auto& m : Registry()) {
    if (m->name() == name) return m.get();
  }
  return nullptr;
}

std::vector<const QuantMethod*> ListMethods() {
  std::vector<const QuantMethod*> out;
  for (const auto& m : Registry()) out.push_back(m.get());
  return out;
}

}  // namespace qforge::quant
