// Row permutations between the interleaved-pair RoPE order (canonical) and HF's rotate-half order.
//
// Within one head of size hd, interleaved row 2i+j (i < hd/2, j in {0,1}) is HF row j*hd/2 + i: HF's export
// views the rows as [n_head, hd/2, 2] and transposes the last two axes. Permuting rows is exact in every
// encoding because each encoding stores a row's data in row-major planes; we move each plane's rows.
#include <algorithm>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "core/formats/parsers.h"
#include "core/model/ggml_types.h"
#include "core/kernels/spqr.h"

namespace qforge::formats {
namespace {

// A region of a tensor's bytes holding `row_bytes` per row, rows in order.
struct Plane {
  size_t offset;
  size_t row_bytes;
};

// The row-major planes of `t`; bytes outside every plane are row-independent (copied as they are).
absl::StatusOr<std::vector<Plane>> RowPlanes(const Tensor& t) {
  const int64_t rows = t.rows(), cols = t.cols();
  const size_t r = static_cast<size_t>(rows);
  // The ggml types group elements along a row only, so a row is a contiguous run of bytes.
  if (IsGgmlType(t.format.type)) return std::vector<Plane>{{0, r == 0 ? 0 : t.nbytes / r}};
  switch (t.format.type) {
    case WeightType::kQInt: {
      QF_ASSIGN_OR_RETURN(QIntLayout l, GetQIntLayout(t.format, rows, cols));
      std::vector<Plane> p = {{l.codes_offset, l.row_code_bytes},
                              {l.scales_offset, 2 * static_cast<size_t>(l.groups_per_row)}};
      if (!t.format.symmetric) p.push_back({l.zeros_offset, static_cast<size_t>(l.groups_per_row)});
      return p;
    }
    case WeightType::kNF4: {
      QF_ASSIGN_OR_RETURN(Nf4Layout l, GetNf4Layout(t.format, rows, cols));
      const size_t blocks_per_row = static_cast<size_t>(cols / l.block);
      // Blocks are numbered flat (row-major), so a row's absmax entries are contiguous too.
      return std::vector<Plane>{{l.codes_offset, static_cast<size_t>(cols / 2)},
                                {l.absmax_offset, blocks_per_row * (t.format.double_quant ? 1 : 4)}};
    }
    case WeightType::kQuip:
      return absl::UnimplementedError("quip rows are not stored one after another");  // PermuteQk* toggle instead
    case WeightType::kSpQR:
      return absl::UnimplementedError("spqr rows are not stored one after another");  // PermuteSpqrRows instead
    case WeightType::kQMoE:
      return absl::UnimplementedError("qmoe rows are variable-length codeword runs, not permutable in place");
    case WeightType::kBiLLM:
      return absl::UnimplementedError("billm rows share a salient-column map, not permuted in place");
    case WeightType::kW8A8: {
      QF_ASSIGN_OR_RETURN(W8A8Layout l, GetW8A8Layout(t.format, rows, cols));
      return std::vector<Plane>{{l.codes_offset, static_cast<size_t>(cols)}, {l.scales_offset, 4}};
    }
    default: break;  // the ggml types: above
  }
  return absl::InvalidArgumentError("unknown weight type");
}

// kQuip rows are mixed by the output rotation U, so its bytes cannot be permuted; the header's qk_heads field
// records the HF order instead (tensor.h QuipLayout) and the runtime applies it after Uᵀ.
absl::StatusOr<Tensor> ToggleQuipQkOrder(const Tensor& t, int n_head, bool to_hf) {
  QF_RETURN_IF_ERROR(ValidateTensor(t));
  uint32_t heads = 0;
  std::memcpy(&heads, t.data + QuipLayout::kQkHeadsOffset, 4);
  const uint32_t want_now = to_hf ? 0 : static_cast<uint32_t>(n_head);
  if (heads != want_now) {
    return absl::UnimplementedError(absl::StrCat("cannot permute q/k rows of '", t.name, "' in ", FormatName(t.format),
                                                 ": its header records HF order for ", heads, " heads, expected ",
                                                 want_now));
  }
  std::vector<uint8_t> out(t.data, t.data + t.nbytes);
  const uint32_t next = to_hf ? static_cast<uint32_t>(n_head) : 0;
  std::memcpy(out.data() + QuipLayout::kQkHeadsOffset, &next, 4);
  return Tensor::FromBytes(t.name, t.shape, t.format, std::move(out));
}

// kSpQR: codes move row by row, the 3-bit statistics code by code, the CSR outliers are rebuilt in the new row
// order. The second-level grids are shared by 16 rows, so a row may only move inside its block of 16 (true for
// head sizes that divide 16, e.g. stories260K's 8; not for 64 or 128).
absl::StatusOr<Tensor> PermuteSpqrRows(const Tensor& t, const std::vector<int64_t>& src) {
  namespace ks = ::qforge::kernels::spqr;
  QF_RETURN_IF_ERROR(ValidateTensor(t));
  const int64_t rows = t.rows(), cols = t.cols();
  QF_ASSIGN_OR_RETURN(const SpqrLayout l, GetSpqrLayout(t.format, rows, cols));
  for (size_t row = 0; row < src.size(); ++row) {
    if (static_cast<int64_t>(row) / kSpqrStatGroup != src[row] / kSpqrStatGroup) {
      return absl::UnimplementedError(absl::StrCat("cannot permute q/k rows of '", t.name, "' in ", FormatName(t.format),
                                                   ": rows would move between the ", kSpqrStatGroup,
                                                   "-row blocks of its second-level statistics"));
    }
  }
  std::vector<uint8_t> out(t.data, t.data + t.nbytes);
  std::fill(out.begin() + static_cast<std::ptrdiff_t>(l.scale_codes_offset),
            out.begin() + static_cast<std::ptrdiff_t>(l.second_offset), 0);
  auto put3 = [&](size_t plane, int64_t i, int code) {
    const int64_t bit = i * kSpqrStatBits;
    const uint32_t v = static_cast<uint32_t>(code) << (bit & 7);
    out[plane + (bit >> 3)] |= static_cast<uint8_t>(v);
    if ((bit & 7) + kSpqrStatBits > 8) out[plane + (bit >> 3) + 1] |= static_cast<uint8_t>(v >> 8);
  };
  const int64_t G = l.groups_per_row;
  uint32_t p_out = 0;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t from = src[row];
    std::memcpy(out.data() + l.codes_offset + row * l.row_code_bytes, t.data + l.codes_offset + from * l.row_code_bytes,
                l.row_code_bytes);
    for (int64_t k = 0; k < G; ++k) {
      put3(l.scale_codes_offset, row * G + k, kernels::StreamCode(t.data + l.scale_codes_offset, from * G + k, kSpqrStatBits));
      put3(l.zero_codes_offset, row * G + k, kernels::StreamCode(t.data + l.zero_codes_offset, from * G + k, kSpqrStatBits));
    }
    std::memcpy(out.data() + l.row_ptr_offset + 4 * row, &p_out, 4);
    const uint32_t p0 = kernels::LoadU32(t.data + l.row_ptr_offset + 4 * from);
    const uint32_t p1 = kernels::LoadU32(t.data + l.row_ptr_offset + 4 * (from + 1));
    if (p0 > p1 || p1 > static_cast<uint64_t>(t.format.outliers)) {
      return absl::DataLossError(absl::StrCat("tensor '", t.name, "': bad spqr row pointers at row ", from));
    }
    for (uint32_t p = p0; p < p1; ++p, ++p_out) {
      std::memcpy(out.data() + l.col_index_offset + static_cast<size_t>(p_out) * l.index_bytes,
                  t.data + l.col_index_offset + static_cast<size_t>(p) * l.index_bytes, l.index_bytes);
      std::memcpy(out.data() + l.values_offset + 2 * static_cast<size_t>(p_out), t.data + l.values_offset + 2 * p, 2);
    }
  }
  std::memcpy(out.data() + l.row_ptr_offset + 4 * rows, &p_out, 4);
  return Tensor::FromBytes(t.name, t.shape, t.format, std::move(out));
}

// out row i = in row src[i].
absl::StatusOr<Tensor> PermuteRows(const Tensor& t, const std::vector<int64_t>& src) {
  QF_RETURN_IF_ERROR(ValidateTensor(t));
  QF_ASSIGN_OR_RETURN(std::vector<Plane> planes, RowPlanes(t));
  if (t.format.type == WeightType::kNF4 && t.format.double_quant) {
    // Double-quantized absmax values share an fp32 scale per 256 flat blocks: a moved block must stay in
    // its scale group, otherwise it would be decoded with another group's scale.
    const int64_t bpr = t.cols() / t.format.group;
    for (size_t row = 0; row < src.size(); ++row) {
      for (int64_t k = 0; k < bpr; ++k) {
        if ((static_cast<int64_t>(row) * bpr + k) / kNf4DoubleQuantGroup !=
            (src[row] * bpr + k) / kNf4DoubleQuantGroup) {
          return absl::UnimplementedError(absl::StrCat(
              "cannot permute q/k rows of '", t.name, "' in ", FormatName(t.format),
              ": rows would move between double-quantization groups of ", kNf4DoubleQuantGroup,
              " blocks; store q/k in nf4 without double quant or in another encoding"));
        }
      }
    }
  }
  std::vector<uint8_t> out(t.data, t.data + t.nbytes);
  for (const Plane& p : planes) {
    for (size_t row = 0; row < src.size(); ++row) {
      std::memcpy(out.data() + p.offset + row * p.row_bytes, t.data + p.offset + src[row] * p.row_bytes,
                  p.row_bytes);
    }
  }
  return Tensor::FromBytes(t.name, t.shape, t.format, std::move(out));
}

absl::StatusOr<std::vector<int64_t>> HfRows(const Tensor& t, int n_head, bool to_hf) {
  if (t.shape.size() != 2) {
    return absl::InvalidArgumentError(absl::StrCat("q/k tensor '", t.name, "' must be 2-D"));
  }
  const int64_t rows = t.shape[0];
  // With at least one column every row costs at least one byte, so `rows` is bounded by the data size
  // and the index vector below cannot be absurdly large.
  if (t.shape[1] <= 0) return absl::InvalidArgumentError(absl::StrCat("q/k tensor '", t.name, "' has no columns"));
  if (n_head <= 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("q/k tensor '", t.name, "' has ", rows, " rows, not n_head ", n_head, " x an even head size"));
  }
  const int64_t hd = rows / n_head, half = hd / 2;
  std::vector<int64_t> src(static_cast<size_t>(rows));
  for (int64_t h = 0; h < n_head; ++h) {
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t interleaved = h * hd + 2 * i + j;
        const int64_t rotate_half = h * hd + j * half + i;
        if (to_hf) {
          src[rotate_half] = interleaved;
        } else {
          src[interleaved] = rotate_half;
        }
      }
    }
  }
  return src;
}

}  // namespace

absl::StatusOr<Tensor> PermuteQkToHf(const Tensor& t, int n_head) {
  QF_ASSIGN_OR_RETURN(std::vector<int64_t> src, HfRows(t, n_head, true));
  if (t.format.type == WeightType::kQuip) return ToggleQuipQkOrder(t, n_head, true);
  if (t.format.type == WeightType::kSpQR) return PermuteSpqrRows(t, src);
  return PermuteRows(t, src);
}

absl::StatusOr<Tensor> PermuteQkFromHf(const Tensor& t, int n_head) {
  QF_ASSIGN_OR_RETURN(std::vector<int64_t> src, HfRows(t, n_head, false));
  if (t.format.type == WeightType::kQuip) return ToggleQuipQkOrder(t, n_head, false);
  if (t.format.type == WeightType::kSpQR) return PermuteSpqrRows(t, src);
  return PermuteRows(t, src);
}

}  // namespace qforge::formats
