// kSpQR decoding: the scalar reference (dense codes on their decoded group grids, then the row's CSR outliers
// added) and the bounds check of the CSR part for the rows a call touches. The SIMD matmuls consume the decoded
// chunks with their own dot products, so batch invariance is theirs.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/kernels/kernels_internal.h"
#include "core/kernels/spqr.h"

namespace qforge::kernels::internal {

void DecodeSpqrScalar(const WeightView& v, int64_t r, int64_t c0, int64_t len, float* out) {
  const SpqrLayout& l = v.spqr;
  const int bits = v.format.bits;
  const uint8_t* codes = v.data + l.codes_offset + static_cast<size_t>(r) * l.row_code_bytes;
  const int64_t end = c0 + len;
  for (int64_t c = c0; c < end;) {
    const int64_t k = c / l.group;
    const int64_t group_end = std::min(end, (k + 1) * l.group);
    float scale, zero;
    spqr::GroupStats(v.data, l, r, k, &scale, &zero);
    for (; c < group_end; ++c) out[c - c0] = spqr::WeightValue(StreamCode(codes, c, bits), scale, zero);
  }
  const uint8_t* row_ptr = v.data + l.row_ptr_offset;
  const uint32_t p0 = LoadU32(row_ptr + 4 * r), p1 = LoadU32(row_ptr + 4 * (r + 1));
  for (uint32_t p = p0; p < p1; ++p) {
    const int64_t c = spqr::LoadIndex(v.data + l.col_index_offset + static_cast<size_t>(p) * l.index_bytes,
                                      l.index_bytes);
    if (c >= c0 && c < end) out[c - c0] += LoadHalf(v.data + l.values_offset + 2 * static_cast<size_t>(p));
  }
}

absl::Status CheckSpqrRows(const WeightView& v, int64_t r0, int64_t r1) {
  const SpqrLayout& l = v.spqr;
  const uint8_t* row_ptr = v.data + l.row_ptr_offset;
  const uint32_t nnz = static_cast<uint32_t>(v.format.outliers);
  if (r0 == 0 && LoadU32(row_ptr) != 0) return absl::DataLossError("spqr: row_ptr[0] is not 0");
  if (r1 == v.rows && LoadU32(row_ptr + 4 * v.rows) != nnz) {
    return absl::DataLossError(absl::StrCat("spqr: row_ptr[rows] is not the outlier count ", nnz));
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint32_t p0 = LoadU32(row_ptr + 4 * r), p1 = LoadU32(row_ptr + 4 * (r + 1));
    if (p0 > p1 || p1 > nnz) {
      return absl::DataLossError(absl::StrCat("spqr: row_ptr of row ", r, " is [", p0, ", ", p1, "), outside [0, ",
                                              nnz, "] or decreasing"));
    }
    for (uint32_t p = p0; p < p1; ++p) {
      const uint32_t c = spqr::LoadIndex(v.data + l.col_index_offset + static_cast<size_t>(p) * l.index_bytes,
                                         l.index_bytes);
      if (c >= static_cast<uint64_t>(v.cols)) {
        return absl::DataLossError(absl::StrCat("spqr: outlier ", p, " of row ", r, " has column ", c, " of ", v.cols));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace qforge::kernels::internal
