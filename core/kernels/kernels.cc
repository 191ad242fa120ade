// Dispatch: validates the tensor once, resolves its layout, and routes to the ISA picked at run time.
#include "core/kernels/kernels.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cpuid.h>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/model/ggml_types.h"
#include "core/kernels/billm.h"
#include "core/kernels/ggml_kernels.h"
#include "core/kernels/int_dot.h"
#include "core/kernels/kernels_internal.h"
#include "core/kernels/qmoe.h"
#include "core/kernels/quip.h"

namespace qforge::kernels {
namespace {

uint64_t ReadXcr0() {
  uint32_t eax, edx;
  // xgetbv is only legal once CPUID reports OSXSAVE; callers check that first.
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

Isa DetectIsaUncached() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::kScalar;
  const bool osxsave = ecx & (1u << 27);
  const bool avx = ecx & (1u << 28);
  const bool fma = ecx & (1u << 12);
  const bool f16c = ecx & (1u << 29);
  if (!osxsave || !avx) return Isa::kScalar;
  const uint64_t xcr0 = ReadXcr0();
  // The OS must save YMM (bits 1, 2) and, for AVX-512, opmask/ZMM state (bits 5, 6, 7).
  if ((xcr0 & 0x6) != 0x6) return Isa::kScalar;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return Isa::kScalar;
  const bool avx2 = ebx & (1u << 5);
  if (!(avx2 && fma && f16c)) return Isa::kScalar;
  const bool avx512f = ebx & (1u << 16);
  const bool avx512dq = ebx & (1u << 17);
  const bool avx512bw = ebx & (1u << 30);
  const bool avx512vl = ebx & (1u << 31);
  if (avx512f && avx512dq && avx512bw && avx512vl && (xcr0 & 0xE6) == 0xE6) return Isa::kAvx512;
  return Isa::kAvx2;
}

// Set when the ISA was chosen by hand (QFORGE_ISA or SetIsa): every family then runs it.
std::atomic<bool>& IsaPinned() {
  static std::atomic<bool> pinned{std::getenv("QFORGE_ISA") != nullptr};
  return pinned;
}

Isa InitialIsa() {
  Isa isa = DetectIsa();
  // QFORGE_ISA=scalar|avx2|avx512 lets benchmarks and bug reports pin a path without recompiling.
  if (const char* env = std::getenv("QFORGE_ISA")) {
    if (std::strcmp(env, "scalar") == 0) isa = Isa::kScalar;
    if (std::strcmp(env, "avx2") == 0 && isa >= Isa::kAvx2) isa = Isa::kAvx2;
  }
  return isa;
}

std::atomic<int>& ActiveIsaSlot() {
  static std::atomic<int> slot{static_cast<int>(InitialIsa())};
  return slot;
}

}  // namespace

Isa DetectIsa() {
  static const Isa detected = DetectIsaUncached();
  return detected;
}

Isa ActiveIsa() { return static_cast<Isa>(ActiveIsaSlot().load(std::memory_order_relaxed)); }

Isa SetIsa(Isa isa) {
  IsaPinned().store(true);
  const Isa best = DetectIsa();
  const Isa chosen = static_cast<int>(isa) > static_cast<int>(best) ? best : isa;
  ActiveIsaSlot().store(static_cast<int>(chosen), std::memory_order_relaxed);
  return chosen;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
  }
  return "unknown";
}

namespace internal {

absl::StatusOr<WeightView> MakeView(const Tensor& w) {
  QF_RETURN_IF_ERROR(ValidateTensor(w));
  WeightView v;
  v.format = w.format;
  v.data = w.data;
  v.rows = w.rows();
  v.cols = w.cols();
  if (const GgmlTypeTraits* g = FindGgmlType(w.format.type)) {
    // A row is cols / block whole blocks (ValidateTensor checked the multiple).
    v.ggml = FindGgmlKernels(w.format.type);
    if (v.ggml == nullptr) return absl::InternalError(absl::StrCat(g->name, " has no row in the kernels' table"));
    v.block = g->block;
    v.block_bytes = g->block_bytes;
    v.row_bytes = static_cast<size_t>(v.cols / g->block) * static_cast<size_t>(g->block_bytes);
    return v;
  }
  switch (w.format.type) {
    case WeightType::kQInt: {
      QF_ASSIGN_OR_RETURN(v.qint, GetQIntLayout(w.format, v.rows, v.cols));
      v.row_bytes = v.qint.row_code_bytes;
      break;
    }
    case WeightType::kNF4: {
      QF_ASSIGN_OR_RETURN(v.nf4, GetNf4Layout(w.format, v.rows, v.cols));
      v.row_bytes = static_cast<size_t>(v.cols / 2);
      break;
    }
    case WeightType::kSpQR: {
      QF_ASSIGN_OR_RETURN(v.spqr, GetSpqrLayout(w.format, v.rows, v.cols));
      v.row_bytes = v.spqr.row_code_bytes;
      break;
    }
    case WeightType::kW8A8: {
      QF_ASSIGN_OR_RETURN(v.w8a8, GetW8A8Layout(w.format, v.rows, v.cols));
      v.row_bytes = static_cast<size_t>(v.cols);
      break;
    }
    case WeightType::kQuip:
      return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "': quip rows have no row view (quip.h)"));
    default:
      return absl::InternalError(absl::StrCat("tensor '", w.name, "': no view for ", FormatName(w.format)));
  }
  return v;
}

}  // namespace internal

namespace {
absl::Status CheckRows(const Tensor& w, int64_t row_begin, int64_t row_end) {
  if (row_begin < 0 || row_end > w.rows() || row_begin > row_end) {
    return absl::OutOfRangeError(absl::StrCat("rows [", row_begin, ", ", row_end, ") out of range for '", w.name,
                                              "' with ", w.rows(), " rows"));
  }
  return absl::OkStatus();
}
}  // namespace

absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out) {
  QF_RETURN_IF_ERROR(CheckRows(w, row_begin, row_end));
  // kQuip's rows are mixed by its output rotation: no per-row view exists (quip.h).
  if (w.format.type == WeightType::kQuip) return QuipDequantizeRows(w, row_begin, row_end, out);
  // kQMoE rows have variable length: decoded by walking their codewords (qmoe.h), not through a row view.
  if (w.format.type == WeightType::kQMoE) return qmoe::DequantizeRows(w, row_begin, row_end, out);
  // kBiLLM rows share a salient-column map: decoded through it (billm.h).
  if (w.format.type == WeightType::kBiLLM) return billm::DequantizeRows(w, row_begin, row_end, out);
  QF_ASSIGN_OR_RETURN(const internal::WeightView v, internal::MakeView(w));
  if (v.format.type == WeightType::kSpQR) QF_RETURN_IF_ERROR(internal::CheckSpqrRows(v, row_begin, row_end));
  const Isa isa = ActiveIsa();
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* dst = out + (r - row_begin) * v.cols;
    switch (isa) {
      case Isa::kAvx512: internal::DecodeAvx512(v, r, 0, v.cols, dst); break;
      case Isa::kAvx2: internal::DecodeAvx2(v, r, 0, v.cols, dst); break;
      case Isa::kScalar: internal::DecodeScalar(v, r, 0, v.cols, dst); break;
    }
  }
  return absl::OkStatus();
}

absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride) {
  QF_RETURN_IF_ERROR(CheckRows(w, row_begin, row_end));
  if (n < 0) return absl::InvalidArgumentError("negative token count");
  if (n > 1 && y_stride < row_end) {
    return absl::InvalidArgumentError(absl::StrCat("y_stride ", y_stride, " < row_end ", row_end));
  }
  if (w.format.type == WeightType::kQuip) {
    if (n == 0 || row_begin == row_end) return ValidateTensor(w);
    return QuipMatMulRows(w, row_begin, row_end, x, n, y, y_stride);
  }
  if (w.format.type == WeightType::kBiLLM) {
    if (n == 0) return ValidateTensor(w);
    return billm::MatMulRows(w, row_begin, row_end, x, n, y, y_stride);  // fp32 tiles through this function
  }
  if (w.format.type == WeightType::kQMoE) {
    if (n == 0) return ValidateTensor(w);
    if (ActiveIsa() == Isa::kScalar || w.cols() % kQK8_0 != 0) {
      return qmoe::MatMulRowsReference(w, row_begin, row_end, x, n, y, y_stride);
    }
    // Decoded rows run the Q8_0 kernels (qmoe.h): w = d * q exactly, so this is the format's own product.
    return qmoe::ForEachTile(w, row_begin, row_end, WeightType::kQ8_0, /*bitwise=*/false,
                             [&](const Tensor& tile, int64_t first) {
                               return MatMulRows(tile, 0, tile.rows(), x, n, y + first, y_stride);
                             });
  }
  QF_ASSIGN_OR_RETURN(const internal::WeightView v, internal::MakeView(w));
  if (n == 0 || row_begin == row_end) return absl::OkStatus();
  if (v.format.type == WeightType::kSpQR) QF_RETURN_IF_ERROR(internal::CheckSpqrRows(v, row_begin, row_end));
  if (v.format.type == WeightType::kW8A8) {
    if (ActiveIsa() == Isa::kScalar) {
      internal::MatMulW8A8Scalar(v, row_begin, row_end, x, n, y, y_stride);
    } else {
      internal::MatMulW8A8Avx2(v, row_begin, row_end, x, n, y, y_stride);
    }
    return absl::OkStatus();
  }
  switch (IsaFor(KernelFamily::kFloatDot)) {
    case Isa::kAvx512: internal::MatMulAvx512(v, row_begin, row_end, x, n, y, y_stride); break;
    case Isa::kAvx2: internal::MatMulAvx2(v, row_begin, row_end, x, n, y, y_stride); break;
    case Isa::kScalar: internal::MatMulScalar(v, row_begin, row_end, x, n, y, y_stride); break;
  }
  return absl::OkStatus();
}

namespace {

internal::ActType ActTypeOf(WeightType t) {
  switch (t) {
    case WeightType::kQ8_0:
    case WeightType::kQ4_0: return internal::ActType::kQ8_0;
    case WeightType::kQ4_K:
    case WeightType::kQMoE: return internal::ActType::kQ8_K;  // as llama.cpp's ternary types (qmoe.h)
    default: return internal::ActType::kNone;
  }
}

}  // namespace

bool HasIntegerKernel(WeightType t) { return ActTypeOf(t) != internal::ActType::kNone; }

namespace {

// The activation blocks a matmul with w takes in ActivationMode::kInt8: its type's, except that qmoe rows of no
// multiple of 256 columns have no Q8_K blocks and take fp32 activations.
internal::ActType ActTypeFor(const Tensor& w) {
  if (w.format.type == WeightType::kQMoE && w.cols() % qmoe::kQ8_KBlockColumns != 0) return internal::ActType::kNone;
  return ActTypeOf(w.format.type);
}

}  // namespace

namespace {

// Seconds of the fastest of `reps` runs of fn.
template <typename Fn>
double FastestRun(int reps, Fn fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Deterministic bytes for a calibration matrix: small positive fp16 scales where the format keeps them, so
// the kernels do realistic work (the values do not matter for timing).
Tensor CalibrationTensor(WeightFormat f, int64_t rows, int64_t cols) {
  std::vector<uint8_t> b(EncodedBytes(f, rows, cols).value());
  uint32_t s = 12345;
  for (auto& x : b) x = static_cast<uint8_t>((s = s * 1664525u + 1013904223u) >> 24);
  if (f.type == WeightType::kQ4_K) {
    const uint16_t h = 0x2000;  // a small positive fp16
    for (size_t i = 0; i < b.size(); i += sizeof(block_q4_K)) {
      std::memcpy(&b[i], &h, 2);
      std::memcpy(&b[i + 2], &h, 2);
    }
  }
  return Tensor::FromBytes("calibration", {rows, cols}, f, std::move(b));
}

// The choice between the AVX-512 and AVX2 code of each kernel family on this CPU. The float family computes
// different (equally valid) bits on the two ISAs, so it is not measured: a timing near the margin flipped it
// between processes on a loaded machine, and a worker's calibrated result (AWQ's scale search runs the float
// path) then differed from the same job in one process. It keeps AVX-512, for every token count (batch
// invariance) and every process on this CPU. The integer family gives the same bits on both, so decode (one
// token) and prompts are measured (first use, a few milliseconds) and pick separately.
struct MeasuredIsas {
  Isa float_dot = Isa::kAvx512, int_decode = Isa::kAvx512, int_prompt = Isa::kAvx512;
};

const MeasuredIsas& Measured() {
  static const MeasuredIsas m = [] {
    MeasuredIsas r;
    // A 36 MiB Q4_K matrix: past the last-level cache, as a model's weights are, so decode is measured where it
    // runs in practice, bound by memory.
    const int64_t cols = 2048, q_rows = 32768;
    std::vector<float> x(8 * cols, 0.25f), y(8 * q_rows);
    if (!internal::HasAvx512Vnni()) {
      r.int_decode = r.int_prompt = Isa::kAvx2;
      return r;
    }
    const Tensor q = CalibrationTensor(WeightFormat::Of(WeightType::kQ4_K), q_rows, cols);
    const internal::WeightView qv = internal::MakeView(q).value();
    const internal::ActRowLayout l = internal::GetActRowLayout(internal::ActType::kQ8_K, cols);
    std::vector<uint8_t> act(l.bytes * 8);
    for (int t = 0; t < 8; ++t) internal::QuantizeActAvx2(internal::ActType::kQ8_K, x.data() + t * cols, cols, &act[t * l.bytes]);
    const internal::ActView a{internal::ActType::kQ8_K, act.data(), l.bytes, l};
    for (int n : {1, 8}) {
      const double i2 = FastestRun(3, [&] { internal::IntMatMulAvx2(qv, 0, q_rows, a, n, y.data(), q_rows); });
      const double i5 = FastestRun(3, [&] { internal::IntMatMulAvx512(qv, 0, q_rows, a, n, y.data(), q_rows); });
      (n == 1 ? r.int_decode : r.int_prompt) = i5 <= i2 ? Isa::kAvx512 : Isa::kAvx2;
    }
    return r;
  }();
  return m;
}

}  // namespace

Isa IsaFor(KernelFamily family) {
  const Isa active = ActiveIsa();
  if (active != Isa::kAvx512 || IsaPinned().load()) return active;
  const MeasuredIsas& m = Measured();
  switch (family) {
    case KernelFamily::kFloatDot: return m.float_dot;
    case KernelFamily::kIntDecode: return m.int_decode;
    case KernelFamily::kIntPrompt: return m.int_prompt;
  }
  return active;
}

absl::Status PrepareInput(const Tensor& w, const float* x, int64_t n, ActivationMode mode, MatMulInput* in,
                          bool x_unchanged) {
  if (n < 0) return absl::InvalidArgumentError("negative token count");
  const internal::ActType wanted = mode == ActivationMode::kInt8 ? ActTypeFor(w) : internal::ActType::kNone;
  if (x_unchanged && in->x_ == x && in->n_ == n && in->cols_ == w.cols() &&
      in->act_type_ == static_cast<uint8_t>(wanted)) {
    return absl::OkStatus();
  }
  in->x_ = x;
  in->n_ = n;
  in->cols_ = w.cols();
  const internal::ActType act = wanted;
  in->act_type_ = static_cast<uint8_t>(act);
  if (act == internal::ActType::kNone) return absl::OkStatus();
  if (w.cols() % internal::ActBlock(act) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "': ", w.cols(), " columns are not a multiple of ",
                                                   internal::ActBlock(act)));
  }
  const internal::ActRowLayout l = internal::GetActRowLayout(act, w.cols());
  in->row_bytes_ = l.bytes;
  in->buffer_.resize(l.bytes * static_cast<size_t>(n));
  const bool simd = ActiveIsa() != Isa::kScalar;
  for (int64_t t = 0; t < n; ++t) {
    uint8_t* row = in->buffer_.data() + l.bytes * static_cast<size_t>(t);
    if (simd) internal::QuantizeActAvx2(act, x + t * w.cols(), w.cols(), row);
    else internal::QuantizeActScalar(act, x + t * w.cols(), w.cols(), row);
  }
  return absl::OkStatus();
}

absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const MatMulInput& in, float* y,
                        int64_t y_stride) {
  if (!in.quantized()) return MatMulRows(w, row_begin, row_end, in.x(), in.n(), y, y_stride);
  QF_RETURN_IF_ERROR(CheckRows(w, row_begin, row_end));
  if (in.cols() != w.cols() || ActTypeFor(w) != static_cast<internal::ActType>(in.act_type_)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "': input prepared for another weight"));
  }
  if (in.n() > 1 && y_stride < row_end) {
    return absl::InvalidArgumentError(absl::StrCat("y_stride ", y_stride, " < row_end ", row_end));
  }
  if (w.format.type == WeightType::kQMoE) {
    if (in.n() == 0) return ValidateTensor(w);
    const bool bitwise = ActiveIsa() == Isa::kScalar;
    if (in.n() <= qmoe::kSelectTokens) {
      const internal::ActRowLayout l = internal::GetActRowLayout(internal::ActType::kQ8_K, w.cols());
      const uint8_t* row = in.buffer_.data();
      const qmoe::Q8_KActivations a{reinterpret_cast<const int8_t*>(row + l.codes),
                                    reinterpret_cast<const float*>(row + l.scales),
                                    reinterpret_cast<const int32_t*>(row + l.sums), in.n(),
                                    static_cast<int64_t>(in.row_bytes_)};
      return qmoe::DotRowsQ8_K(w, row_begin, row_end, a, y, y_stride, bitwise);
    }
    // Q4_K tiles (qmoe.h), each multiplied with the activations quantized once for all by the Q4_K GEMM.
    return qmoe::ForEachTile(w, row_begin, row_end, WeightType::kQ4_K, bitwise,
                             [&](const Tensor& tile, int64_t first) {
                               return MatMulRows(tile, 0, tile.rows(), in, y + first, y_stride);
                             });
  }
  QF_ASSIGN_OR_RETURN(const internal::WeightView v, internal::MakeView(w));
  if (in.n() == 0 || row_begin == row_end) return absl::OkStatus();
  const internal::ActType act = static_cast<internal::ActType>(in.act_type_);
  const internal::ActView a{act, in.buffer_.data(), in.row_bytes_, internal::GetActRowLayout(act, w.cols())};
  switch (IsaFor(in.n() == 1 ? KernelFamily::kIntDecode : KernelFamily::kIntPrompt)) {
    case Isa::kAvx512:
      if (internal::HasAvx512Vnni()) {
        internal::IntMatMulAvx512(v, row_begin, row_end, a, in.n(), y, y_stride);
        break;
      }
      [[fallthrough]];
    case Isa::kAvx2: internal::IntMatMulAvx2(v, row_begin, row_end, a, in.n(), y, y_stride); break;
    case Isa::kScalar: internal::IntMatMulScalar(v, row_begin, row_end, a, in.n(), y, y_stride); break;
  }
  return absl::OkStatus();
}

namespace {

// RowErrorSums past the lanes: columns [c, cols) (fewer than eight) into lanes 0.., then the lanes combined.
void FinishRowErrorSums(const float* ref, const float* row, int64_t c, int64_t cols, double* e, double* n,
                        double* err, double* norm) {
  for (int l = 0; c < cols; ++c, ++l) {
    const double w = ref[c];
    const double d = w - row[c];
    e[l] += d * d;
    n[l] += w * w;
  }
  *err = ((e[0] + e[1]) + (e[2] + e[3])) + ((e[4] + e[5]) + (e[6] + e[7]));
  *norm = ((n[0] + n[1]) + (n[2] + n[3])) + ((n[4] + n[5]) + (n[6] + n[7]));
}

}  // namespace

void RowErrorSumsScalar(const float* ref, const float* row, int64_t cols, double* err, double* norm) {
  double e[8] = {}, n[8] = {};
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    for (int l = 0; l < 8; ++l) {
      const double w = ref[c + l];
      const double d = w - static_cast<double>(row[c + l]);
      e[l] += d * d;
      n[l] += w * w;
    }
  }
  FinishRowErrorSums(ref, row, c, cols, e, n, err, norm);
}

void RowErrorSums(const float* ref, const float* row, int64_t cols, double* err, double* norm) {
  if (ActiveIsa() < Isa::kAvx2) return RowErrorSumsScalar(ref, row, cols, err, norm);
  double e[8], n[8];
  internal::RowErrorLanesAvx2(ref, row, cols / 8, e, n);
  FinishRowErrorSums(ref, row, cols / 8 * 8, cols, e, n, err, norm);
}

}  // namespace qforge::kernels
