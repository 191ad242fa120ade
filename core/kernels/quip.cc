#include "core/kernels/quip.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/kernels/blocks.h"
#include "core/kernels/kernels.h"

namespace qforge::kernels {
namespace {

void StoreU32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }

}  // namespace

void WriteQuipHeader(const QuipHeader& h, uint8_t* bytes) {
  std::memcpy(bytes + QuipLayout::kSeedOffset, &h.seed, 8);
  StoreU32(bytes + QuipLayout::kFactorsOffset + 0, static_cast<uint32_t>(h.a_out));
  StoreU32(bytes + QuipLayout::kFactorsOffset + 4, static_cast<uint32_t>(h.b_out));
  StoreU32(bytes + QuipLayout::kFactorsOffset + 8, static_cast<uint32_t>(h.a_in));
  StoreU32(bytes + QuipLayout::kFactorsOffset + 12, static_cast<uint32_t>(h.b_in));
  StoreU32(bytes + QuipLayout::kQkHeadsOffset, static_cast<uint32_t>(h.qk_heads));
  StoreU32(bytes + QuipLayout::kReservedOffset, 0);
}

absl::StatusOr<std::shared_ptr<const QuipTransform>> QuipTransform::Create(const Tensor& w) {
  QF_RETURN_IF_ERROR(ValidateTensor(w));
  if (w.format.type != WeightType::kQuip) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "' is ", FormatName(w.format), ", not quip"));
  }
  const int64_t rows = w.rows(), cols = w.cols();
  QF_ASSIGN_OR_RETURN(const QuipLayout l, GetQuipLayout(w.format, rows, cols));
  auto bad = [&](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("quip tensor '", w.name, "' [", rows, ", ", cols, "]: ", what));
  };
  auto q = std::shared_ptr<QuipTransform>(new QuipTransform());
  QuipHeader& h = q->header_;
  std::memcpy(&h.seed, w.data + QuipLayout::kSeedOffset, 8);
  h.a_out = LoadU32(w.data + QuipLayout::kFactorsOffset + 0);
  h.b_out = LoadU32(w.data + QuipLayout::kFactorsOffset + 4);
  h.a_in = LoadU32(w.data + QuipLayout::kFactorsOffset + 8);
  h.b_in = LoadU32(w.data + QuipLayout::kFactorsOffset + 12);
  h.qk_heads = LoadU32(w.data + QuipLayout::kQkHeadsOffset);
  if (LoadU32(w.data + QuipLayout::kReservedOffset) != 0) return bad("header: reserved field is not 0");
  if (h.a_out < 1 || h.b_out < 1 || h.a_out * h.b_out != rows) {
    return bad(absl::StrCat("header: output factors ", h.a_out, " x ", h.b_out, " do not multiply to ", rows));
  }
  if (h.a_in < 1 || h.b_in < 1 || h.a_in * h.b_in != cols) {
    return bad(absl::StrCat("header: input factors ", h.a_in, " x ", h.b_in, " do not multiply to ", cols));
  }
  for (int64_t f : {h.a_out, h.b_out, h.a_in, h.b_in}) {
    if (f > kQuipMaxFactor) return bad(absl::StrCat("header: factor ", f, " exceeds ", kQuipMaxFactor));
  }
  if (h.qk_heads != 0) {
    if (rows % h.qk_heads != 0 || (rows / h.qk_heads) % 2 != 0) {
      return bad(absl::StrCat("header: qk_heads ", h.qk_heads, " does not split the rows into even heads"));
    }
    const int64_t hd = rows / h.qk_heads, half = hd / 2;
    q->out_src_.resize(static_cast<size_t>(rows));
    for (int64_t head = 0; head < h.qk_heads; ++head) {
      for (int64_t i = 0; i < half; ++i) {
        for (int64_t j = 0; j < 2; ++j) q->out_src_[head * hd + j * half + i] = head * hd + 2 * i + j;
      }
    }
  }
  q->col_scales_.resize(static_cast<size_t>(cols));
  for (int64_t j = 0; j < cols; ++j) {
    uint16_t bits;
    std::memcpy(&bits, w.data + l.col_scales_offset + 2 * j, 2);
    const float c = HalfToFloat(bits);
    if (!std::isfinite(c)) return bad(absl::StrCat("column scale ", j, " is not finite"));
    q->col_scales_[j] = c;
  }
  q->payload_ = Tensor::View(w.name, {rows, cols}, l.payload, w.owner, w.data + l.payload_offset, l.qint.total_bytes);
  q->u_ = MakeKroneckerOrthogonal(h.a_out, h.b_out, h.seed, 0);
  q->v_ = MakeKroneckerOrthogonal(h.a_in, h.b_in, h.seed, 1);
  return std::shared_ptr<const QuipTransform>(std::move(q));
}

void QuipTransform::RotateInput(const float* x, float* xr, double* scratch) const {
  const int64_t n = cols();
  double* in = scratch;
  double* out = scratch + n;
  for (int64_t j = 0; j < n; ++j) in[j] = static_cast<double>(x[j]) * col_scales_[j];
  v_.Apply(in, out, scratch + 2 * n);
  for (int64_t j = 0; j < n; ++j) xr[j] = static_cast<float>(out[j]);
}

void QuipTransform::UnrotateOutput(const float* yr, float* y, double* scratch) const {
  const int64_t m = rows();
  double* in = scratch;
  double* out = scratch + m;
  for (int64_t i = 0; i < m; ++i) in[i] = yr[i];
  u_.ApplyTranspose(in, out, scratch + 2 * m);
  if (out_src_.empty()) {
    for (int64_t i = 0; i < m; ++i) y[i] = static_cast<float>(out[i]);
  } else {
    for (int64_t i = 0; i < m; ++i) y[i] = static_cast<float>(out[out_src_[i]]);
  }
}

absl::StatusOr<std::vector<float>> QuipTransform::Dequantize() const {
  const int64_t m = rows(), n = cols();
  std::vector<float> wp(static_cast<size_t>(m * n));
  QF_RETURN_IF_ERROR(DequantizeRows(payload_, 0, m, wp.data()));
  // Z = W' V row by row (row i of Z is Vᵀ w'_i), then W = Uᵀ Z column by column, then P and diag(c).
  std::vector<double> z(static_cast<size_t>(m * n));
  std::vector<double> s(static_cast<size_t>(3 * std::max(m, n)));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) s[j] = wp[i * n + j];
    v_.ApplyTranspose(s.data(), &z[i * n], s.data() + n);
  }
  std::vector<double> col(static_cast<size_t>(m)), res(static_cast<size_t>(m));
  std::vector<float> w(static_cast<size_t>(m * n));
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) col[i] = z[i * n + j];
    u_.ApplyTranspose(col.data(), res.data(), s.data());
    for (int64_t i = 0; i < m; ++i) {
      const int64_t src = out_src_.empty() ? i : out_src_[i];
      w[i * n + j] = static_cast<float>(res[src] * col_scales_[j]);
    }
  }
  return w;
}

absl::Status QuipMatMul(const QuipTransform& q, const float* x, int64_t n, float* y, int64_t y_stride,
                        ThreadPool* pool) {
  const int64_t rows = q.rows(), cols = q.cols();
  if (n <= 0) return absl::OkStatus();
  if (n > 1 && y_stride < rows) return absl::InvalidArgumentError(absl::StrCat("y_stride ", y_stride, " < rows ", rows));
  std::vector<float> xr(static_cast<size_t>(n * cols)), yr(static_cast<size_t>(n * rows));
  ParallelForOrInline(pool, n, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> s(static_cast<size_t>(3 * cols));
    for (int64_t t = t0; t < t1; ++t) q.RotateInput(x + t * cols, &xr[t * cols], s.data());
  });
  // The same row split as every other encoding's matmul (transformer.cc): ~32K multiply-adds per chunk.
  const int64_t min_chunk = std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, cols * n));
  std::mutex mu;
  absl::Status first;
  ParallelForOrInline(pool, rows, min_chunk, [&](int64_t r0, int64_t r1) {
    absl::Status s = MatMulRows(q.payload(), r0, r1, xr.data(), n, yr.data(), rows);
    if (!s.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      if (first.ok()) first = s;
    }
  });
  QF_RETURN_IF_ERROR(first);
  ParallelForOrInline(pool, n, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> s(static_cast<size_t>(3 * rows));
    for (int64_t t = t0; t < t1; ++t) q.UnrotateOutput(&yr[t * rows], y + t * y_stride, s.data());
  });
  return absl::OkStatus();
}

absl::Status QuipDequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out) {
  QF_ASSIGN_OR_RETURN(const std::shared_ptr<const QuipTransform> q, QuipTransform::Create(w));
  QF_ASSIGN_OR_RETURN(const std::vector<float> all, q->Dequantize());
  const int64_t cols = w.cols();
  std::copy(all.begin() + row_begin * cols, all.begin() + row_end * cols, out);
  return absl::OkStatus();
}

absl::Status QuipMatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                            int64_t y_stride) {
  QF_ASSIGN_OR_RETURN(const std::shared_ptr<const QuipTransform> q, QuipTransform::Create(w));
  const int64_t rows = w.rows();
  std::vector<float> all(static_cast<size_t>(n * rows));
  QF_RETURN_IF_ERROR(QuipMatMul(*q, x, n, all.data(), rows, nullptr));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = row_begin; r < row_end; ++r) y[t * y_stride + r] = all[t * rows + r];
  }
  return absl::OkStatus();
}

}  // namespace qforge::kernels
