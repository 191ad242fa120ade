#include "core/quant/ternary.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/large_buffer.h"
#include "core/base/status_macros.h"
#include "core/kernels/blocks.h"
#include "core/kernels/qmoe.h"
#include "core/quant/gptq.h"

namespace qforge::quant {

QIntGrid ChooseTernaryGrid(const float* x, int64_t n, int /*bits*/, bool /*symmetric*/) {
  std::vector<float> mag(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mag[i] = std::fabs(x[i]);
  std::sort(mag.begin(), mag.end(), std::greater<float>());
  double prefix = 0, best_gain = 0, best_scale = 0;
  for (int64_t k = 1; k <= n; ++k) {
    prefix += mag[k - 1];
    const double gain = prefix * prefix / static_cast<double>(k);
    if (gain > best_gain) {
      best_gain = gain;
      best_scale = prefix / static_cast<double>(k);
    }
  }
  constexpr float kMaxHalf = 65504.0f;
  QIntGrid g;
  g.max_code = 2;
  g.zero = 1;
  g.scale_half = FloatToHalf(std::min(static_cast<float>(best_scale), kMaxHalf));
  g.scale = HalfToFloat(g.scale_half);
  return g;
}

QIntGrid ChooseSparseTernaryGrid(const float* x, int64_t n, double drop) {
  std::vector<float> mag(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) mag[i] = std::fabs(x[i]);
  std::sort(mag.begin(), mag.end(), std::greater<float>());
  const int64_t keep =
      std::clamp<int64_t>(static_cast<int64_t>(std::ceil((1.0 - drop) * static_cast<double>(n))), 1, n);
  double sum = 0;
  for (int64_t i = 0; i < keep; ++i) sum += mag[i];
  QIntGrid g;
  g.max_code = 2;
  g.zero = 1;
  g.scale_half = FloatToHalf(std::min(static_cast<float>(sum / static_cast<double>(keep)), 65504.0f));
  g.scale = HalfToFloat(g.scale_half);
  const float dropped = keep < n ? mag[keep] : 0.0f;
  // Never exactly zero: a positive dead zone is what selects the dead-zone rule in QIntCode.
  g.deadzone = std::max(0.5f * (mag[keep - 1] + dropped), std::numeric_limits<float>::min());
  return g;
}

namespace {

// ggml's TQ1_0 byte of five trits t[0] (most significant) .. t[4]: the base-3 number as a fixed-point fraction of
// 256, rounded up so that the decoder's (byte * 3^n mod 256) * 3 >> 8 reads trit n back.
uint8_t PackFiveTrits(const uint8_t* t, int64_t stride) {
  int q = 0;
  for (int n = 0; n < 5; ++n) q = q * 3 + t[n * stride];
  return static_cast<uint8_t>((q * 256 + 242) / 243);
}

void PackTQ1_0Block(const uint8_t* t, uint16_t d, kernels::block_tq1_0* b) {
  // qs[0..32): trit n of byte m is weight 32n + m; qs[32..48): weight 160 + 16n + m.
  for (int m = 0; m < 32; ++m) b->qs[m] = PackFiveTrits(t + m, 32);
  for (int m = 0; m < 16; ++m) b->qs[32 + m] = PackFiveTrits(t + 160 + m, 16);
  // qh[m]: four trits, weight 240 + 4n + m, with a zero fifth trit below them.
  for (int m = 0; m < 4; ++m) {
    int q = 0;
    for (int n = 0; n < 4; ++n) q = q * 3 + t[240 + 4 * n + m];
    q *= 3;
    b->qh[m] = static_cast<uint8_t>((q * 256 + 242) / 243);
  }
  b->d = d;
}

void PackTQ2_0Block(const uint8_t* t, uint16_t d, kernels::block_tq2_0* b) {
  // Bits [2l, 2l + 2) of qs[32 h + m] hold weight 128 h + 32 l + m.
  for (int h = 0; h < 2; ++h) {
    for (int m = 0; m < 32; ++m) {
      uint8_t q = 0;
      for (int l = 0; l < 4; ++l) q |= static_cast<uint8_t>((t[128 * h + 32 * l + m] & 3) << (2 * l));
      b->qs[32 * h + m] = q;
    }
  }
  b->d = d;
}

}  // namespace

void PackTernaryBlocks(const uint8_t* codes, const uint16_t* block_scales, int64_t rows, int64_t cols,
                       WeightType type, uint8_t* out) {
  const int64_t blocks = rows * (cols / kTernaryBlock);
  for (int64_t i = 0; i < blocks; ++i) {
    const uint8_t* t = codes + i * kTernaryBlock;
    if (type == WeightType::kTQ1_0) {
      PackTQ1_0Block(t, block_scales[i], reinterpret_cast<kernels::block_tq1_0*>(out) + i);
    } else {
      PackTQ2_0Block(t, block_scales[i], reinterpret_cast<kernels::block_tq2_0*>(out) + i);
    }
  }
}

absl::StatusOr<const double*> CalibrationHessian(const char* method, int64_t cols, const calib::LayerStats* calib,
                                                 std::vector<double>* identity) {
  if (calib == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(method, ": needs calibration statistics (the layer's input Hessian)"));
  }
  if (calib->cols != cols || calib->hessian.size() != static_cast<size_t>(cols * cols)) {
    return absl::InvalidArgumentError(absl::StrCat(method, ": calibration statistics are for ", calib->cols,
                                                   " inputs, the matrix has ", cols));
  }
  if (calib->tokens != 0) return calib->hessian.data();
  identity->assign(static_cast<size_t>(cols * cols), 0.0);
  for (int64_t i = 0; i < cols; ++i) (*identity)[i * cols + i] = 1.0;
  return identity->data();
}

namespace {

absl::StatusOr<WeightType> TernaryFileType(const char* method, int bits) {
  if (bits == 2) return WeightType::kTQ2_0;
  if (bits == 1) return WeightType::kTQ1_0;
  return absl::InvalidArgumentError(
      absl::StrCat(method, ": bits must be 2 (TQ2_0, 2 bits per weight) or 1 (TQ1_0, base-3 packed), got ", bits));
}

// What the two methods share: the file types, the shape rule, the packing and the fallback.
class TernaryMethodBase : public QuantMethod {
 public:
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    if (cols % kTernaryBlock != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name(), ": row length ", cols, " is not a multiple of the block size ", kTernaryBlock));
    }
    QF_ASSIGN_OR_RETURN(const WeightType t, TernaryFileType(name().c_str(), p.bits));
    return WeightFormat::Of(t);
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }

 protected:
  // codes: [rows, cols] in {0, 1, 2}; block_scales: f16 per 256 weights.
  absl::StatusOr<std::vector<uint8_t>> Pack(const std::vector<uint8_t>& codes, const std::vector<uint16_t>& scales,
                                            const QuantParams& p, int64_t rows, int64_t cols) const {
    QF_ASSIGN_OR_RETURN(const WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const size_t nbytes, EncodedBytes(f, rows, cols));
    std::vector<uint8_t> out = LargeZeroedVector<uint8_t>(nbytes);
    PackTernaryBlocks(codes.data(), scales.data(), rows, cols, f.type, out.data());
    return out;
  }
};

class TernaryMethod : public TernaryMethodBase {
 public:
  std::string name() const override { return "ternary"; }
  std::string description() const override {
    return "QMoE ternary {-s, 0, +s}: GPTQ error feedback onto a least-squares ternary grid per 256 (group 256) or "
           "per row (group 0), written as TQ2_0 (bits 2) or TQ1_0 (bits 1) (needs calibration)";
  }
  QuantParams DefaultParams() const override { return {2, 256, true, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    QF_RETURN_IF_ERROR(TernaryFileType("ternary", p.bits).status());
    if (p.group != 0 && p.group != kTernaryBlock) {
      return absl::InvalidArgumentError(
          absl::StrCat("ternary: group must be 256 (a scale per block) or 0 (one per row), got ", p.group));
    }
    if (p.act_order) return absl::InvalidArgumentError("ternary: act_order is not supported");
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("ternary: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    std::vector<double> identity;
    QF_ASSIGN_OR_RETURN(const double* hessian, CalibrationHessian("ternary", cols, calib, &identity));
    GptqOptions o;
    o.bits = 2;
    o.group = p.group;
    o.symmetric = true;
    o.percdamp = p.damp;
    o.pool = pool;
    o.choose_grid = [](const float* x, int64_t n) { return ChooseTernaryGrid(x, n, 2, true); };
    QF_ASSIGN_OR_RETURN(GptqResult r, GptqQuantize(w, rows, cols, hessian, o));
    // One scale per 256-weight block: the group's, or the row's repeated.
    const int64_t blocks_per_row = cols / kTernaryBlock;
    const int64_t groups_per_row = p.group == 0 ? 1 : blocks_per_row;
    std::vector<uint16_t> scales(static_cast<size_t>(rows * blocks_per_row));
    for (int64_t r0 = 0; r0 < rows; ++r0) {
      for (int64_t b = 0; b < blocks_per_row; ++b) {
        scales[r0 * blocks_per_row + b] = r.scales[r0 * groups_per_row + (p.group == 0 ? 0 : b)];
      }
    }
    return Pack(r.codes, scales, p, rows, cols);
  }
};

class BitnetMethod : public TernaryMethodBase {
 public:
  std::string name() const override { return "bitnet"; }
  std::string description() const override {
    return "BitNet b1.58 absmean ternary: one scale mean|W| per matrix, RoundClip(w / scale, -1, 1), written as "
           "TQ2_0 (bits 2) or TQ1_0 (bits 1)";
  }
  QuantParams DefaultParams() const override { return {2, 0, true, false}; }
  absl::Status Validate(const QuantParams& p) const override { return TernaryFileType("bitnet", p.bits).status(); }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats*) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    double sum = 0;
    for (int64_t i = 0; i < rows * cols; ++i) sum += std::fabs(w[i]);
    QIntGrid g;
    g.max_code = 2;
    g.zero = 1;
    g.scale_half = FloatToHalf(std::min(static_cast<float>(sum / static_cast<double>(rows * cols)), 65504.0f));
    g.scale = HalfToFloat(g.scale_half);
    std::vector<uint8_t> codes(static_cast<size_t>(rows * cols));
    ParallelForOrInline(pool, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0 * cols; i < r1 * cols; ++i) codes[i] = static_cast<uint8_t>(QIntCode(w[i], g));
    });
    std::vector<uint16_t> scales(static_cast<size_t>(rows * cols / kTernaryBlock), g.scale_half);
    return Pack(codes, scales, p, rows, cols);
  }
};

// Refits each row's scale to the codes the feedback chose: with the row's trits t fixed, the layer-output error
// (w - s t)ᵀ H (w - s t) is least at s = tᵀ H w / tᵀ H t. The products run on panels of rows (BLAS).
void RefitRowScales(const float* w, int64_t rows, int64_t cols, const double* hessian, const uint8_t* codes,
                    uint16_t* scales) {
  constexpr int64_t kPanel = 256;
  std::vector<double> a(static_cast<size_t>(kPanel * cols)), t(a.size()), ha(a.size()), ht(a.size());
  for (int64_t r0 = 0; r0 < rows; r0 += kPanel) {
    const int64_t pr = std::min(kPanel, rows - r0);
    for (int64_t i = 0; i < pr * cols; ++i) {
      a[i] = w[r0 * cols + i];
      t[i] = static_cast<double>(codes[r0 * cols + i]) - 1.0;
    }
    for (auto [in, out] : {std::pair{&a, &ha}, std::pair{&t, &ht}}) {
      cblas_dsymm(CblasRowMajor, CblasRight, CblasUpper, static_cast<int>(pr), static_cast<int>(cols), 1.0, hessian,
                  static_cast<int>(cols), in->data(), static_cast<int>(cols), 0.0, out->data(), static_cast<int>(cols));
    }
    for (int64_t r = 0; r < pr; ++r) {
      double num = 0, den = 0;
      for (int64_t c = 0; c < cols; ++c) {
        num += t[r * cols + c] * ha[r * cols + c];
        den += t[r * cols + c] * ht[r * cols + c];
      }
      if (den > 0 && num > 0) scales[r0 + r] = FloatToHalf(static_cast<float>(std::min(num / den, 65504.0)));
    }
  }
}

// GPTQ onto the sparse per-row grid, then the QMoE codec. The bytes are the codec's; their codeword count is the
// format's, read back from the bytes' length (EncodedFormat).
class QmoeMethod : public QuantMethod {
 public:
  std::string name() const override { return "qmoe"; }
  std::string description() const override {
    return "QMoE: GPTQ error feedback onto a sparse ternary grid per row (88% zeros), entropy-coded with 16-bit "
           "dictionary codewords below 1 bit/weight, decoded inside the matmul (needs calibration)";
  }
  QuantParams DefaultParams() const override { return {2, 0, true, false}; }
  bool NeedsCalibration() const override { return true; }
  absl::Status Validate(const QuantParams& p) const override {
    if (p.group != 0) return absl::InvalidArgumentError(absl::StrCat("qmoe: group must be 0 (one scale per row), got ", p.group));
    if (p.act_order) return absl::InvalidArgumentError("qmoe: act_order is not supported");
    if (!(p.damp >= 0)) return absl::InvalidArgumentError(absl::StrCat("qmoe: damp must be >= 0, got ", p.damp));
    return absl::OkStatus();
  }
  absl::StatusOr<WeightFormat> OutputFormat(const QuantParams& p, int64_t rows, int64_t cols) const override {
    QF_RETURN_IF_ERROR(Validate(p));
    if (rows <= 0 || cols <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("cannot quantize an empty [", rows, ", ", cols, "] matrix"));
    }
    if (cols > kQmoeMaxCols) {
      return absl::InvalidArgumentError(absl::StrCat("qmoe: row length ", cols, " exceeds ", kQmoeMaxCols));
    }
    // The codeword count is known only once the matrix is encoded: EncodedFormat.
    return WeightFormat::QMoE(0);
  }
  absl::StatusOr<WeightFormat> EncodedFormat(const QuantParams& p, int64_t rows, int64_t cols,
                                             std::span<const uint8_t> bytes) const override {
    QF_ASSIGN_OR_RETURN(WeightFormat f, OutputFormat(p, rows, cols));
    QF_ASSIGN_OR_RETURN(const QmoeLayout l, GetQmoeLayout(f, rows, cols));
    if (bytes.size() < l.words_offset || (bytes.size() - l.words_offset) % 2 != 0) {
      return absl::InvalidArgumentError(absl::StrCat("qmoe: ", bytes.size(), " bytes are no [", rows, ", ", cols,
                                                     "] encoding"));
    }
    f.codewords = static_cast<int64_t>((bytes.size() - l.words_offset) / 2);
    return f;
  }
  absl::StatusOr<std::vector<uint8_t>> Quantize(const float* w, int64_t rows, int64_t cols, const QuantParams& p,
                                                ThreadPool* pool, const calib::LayerStats* calib) const override {
    QF_RETURN_IF_ERROR(OutputFormat(p, rows, cols).status());
    std::vector<double> identity;
    QF_ASSIGN_OR_RETURN(const double* hessian, CalibrationHessian("qmoe", cols, calib, &identity));
    GptqOptions o;
    o.bits = 2;
    o.group = 0;
    o.symmetric = true;
    o.percdamp = p.damp;
    o.pool = pool;
    // Bisect the dropped fraction of the grid until the codes after the feedback are kQmoeSparsity zeros
    // (within half a per cent), keeping the last result that reaches it; the passes are deterministic.
    double lo = kQmoeSparsity, hi = 0.999, drop = kQmoeSparsity;
    std::optional<GptqResult> best;
    for (int pass = 0; pass < 8; ++pass) {
      o.choose_grid = [drop](const float* x, int64_t n) { return ChooseSparseTernaryGrid(x, n, drop); };
      QF_ASSIGN_OR_RETURN(GptqResult r, GptqQuantize(w, rows, cols, hessian, o));
      const double zeros = static_cast<double>(std::count(r.codes.begin(), r.codes.end(), uint8_t{1})) /
                           static_cast<double>(r.codes.size());
      const bool sparse_enough = zeros >= kQmoeSparsity - 0.005;
      if (sparse_enough || (pass == 7 && !best)) best = std::move(r);
      if (sparse_enough && zeros <= kQmoeSparsity + 0.005) break;
      (sparse_enough ? hi : lo) = drop;
      drop = 0.5 * (lo + hi);
    }
    GptqResult& r = *best;
    RefitRowScales(w, rows, cols, hessian, r.codes.data(), r.scales.data());
    // One dictionary for every matrix the method writes, that of its target sparsity (qmoe.h Encode).
    const int zero_code = kernels::qmoe::ZeroCodeFor(kQmoeSparsity);
    QF_ASSIGN_OR_RETURN(kernels::qmoe::Encoded e,
                        kernels::qmoe::Encode(r.codes.data(), r.scales.data(), rows, cols, zero_code));
    return std::move(e.bytes);
  }
  std::optional<std::pair<std::string, QuantParams>> Fallback(const QuantParams&) const override {
    return std::make_pair(std::string("q8_0"), FindMethod("q8_0")->DefaultParams());
  }
};

}  // namespace

std::unique_ptr<QuantMethod> MakeQmoeMethod() { return std::make_unique<QmoeMethod>(); }
std::unique_ptr<QuantMethod> MakeTernaryMethod() { return std::make_unique<TernaryMethod>(); }
std::unique_ptr<QuantMethod> MakeBitnetMethod() { return std::make_unique<BitnetMethod>(); }

}  // namespace qforge::quant
