#include "core/kernels/billm.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/kernels/kernels.h"

namespace qforge::kernels::billm {
namespace {

absl::Status CheckRange(const Tensor& w, int64_t r0, int64_t r1) {
  if (r0 < 0 || r1 > w.rows() || r0 > r1) {
    return absl::OutOfRangeError(
        absl::StrCat("rows [", r0, ", ", r1, ") out of range for '", w.name, "' with ", w.rows(), " rows"));
  }
  return absl::OkStatus();
}

absl::StatusOr<BillmLayout> Layout(const Tensor& w) {
  QF_RETURN_IF_ERROR(ValidateTensor(w));
  if (w.format.type != WeightType::kBiLLM) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "' is ", FormatName(w.format), ", not billm"));
  }
  return GetBillmLayout(w.format, w.rows(), w.cols());
}

// Row r into out[0, cols).
void DecodeRow(const Tensor& w, const BillmLayout& l, int64_t r, float* out) {
  const int64_t cols = w.cols();
  float values[8];
  for (int k = 0; k < 8; ++k) {
    uint16_t h;
    std::memcpy(&h, w.data + l.codebooks_offset + 16 * static_cast<size_t>(r) + 2 * k, 2);
    values[k] = HalfToFloat(h);
  }
  const uint8_t* salient = w.data + l.salient_offset;
  const uint8_t* codes = w.data + l.codes_offset + l.row_code_bytes * static_cast<size_t>(r);
  for (int64_t c = 0; c < cols; ++c) {
    const int code = codes[c / 4] >> (2 * (c % 4)) & 3;
    const int set = salient[c / 8] >> (c % 8) & 1;
    out[c] = values[4 * set + code];
  }
}

}  // namespace

absl::StatusOr<std::vector<uint8_t>> Encode(const uint8_t* codes, const uint16_t* codebooks,
                                            const uint8_t* salient, int64_t rows, int64_t cols) {
  QF_ASSIGN_OR_RETURN(const BillmLayout l, GetBillmLayout(WeightFormat::Of(WeightType::kBiLLM), rows, cols));
  std::vector<uint8_t> bytes(l.total_bytes, 0);
  std::memcpy(bytes.data() + l.codebooks_offset, codebooks, 16 * static_cast<size_t>(rows));
  for (int64_t c = 0; c < cols; ++c) {
    if (salient[c]) bytes[l.salient_offset + c / 8] |= static_cast<uint8_t>(1u << (c % 8));
  }
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = bytes.data() + l.codes_offset + l.row_code_bytes * static_cast<size_t>(r);
    for (int64_t c = 0; c < cols; ++c) {
      const uint8_t code = codes[r * cols + c];
      if (code > 3) return absl::InvalidArgumentError(absl::StrCat("billm: code ", int{code}, " > 3"));
      row[c / 4] |= static_cast<uint8_t>(code << (2 * (c % 4)));
    }
  }
  return bytes;
}

absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const BillmLayout l, Layout(w));
  for (int64_t r = row_begin; r < row_end; ++r) DecodeRow(w, l, r, out + (r - row_begin) * w.cols());
  return absl::OkStatus();
}

absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const BillmLayout l, Layout(w));
  const int64_t cols = w.cols();
  std::vector<float> tile(static_cast<size_t>(kTileRows * cols));
  for (int64_t r0 = row_begin; r0 < row_end;) {
    const int64_t r1 = std::min(row_end, (r0 / kTileRows + 1) * kTileRows);
    for (int64_t r = r0; r < r1; ++r) DecodeRow(w, l, r, tile.data() + (r - r0) * cols);
    const Tensor t = Tensor::View(w.name, {r1 - r0, cols}, WeightFormat::F32(), nullptr,
                                  reinterpret_cast<const uint8_t*>(tile.data()),
                                  static_cast<size_t>((r1 - r0) * cols) * sizeof(float));
    QF_RETURN_IF_ERROR(kernels::MatMulRows(t, 0, r1 - r0, x, n, y + r0, y_stride));
    r0 = r1;
  }
  return absl::OkStatus();
}

}  // namespace qforge::kernels::billm
