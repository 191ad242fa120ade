#include "core/model/tensor.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/base/status_macros.h"
#include "core/model/ggml_types.h"

namespace qforge {

const float kNf4Levels[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

std::string FormatName(const WeightFormat& f) {
  if (const GgmlTypeTraits* g = FindGgmlType(f.type)) return g->name;
  switch (f.type) {
    case WeightType::kQInt:
      return absl::StrCat("qint", f.bits, "_", f.group == 0 ? std::string("pc") : absl::StrCat("g", f.group),
                          f.symmetric ? "_sym" : "_asym");
    case WeightType::kNF4:
      return absl::StrCat("nf4_b", f.group, f.double_quant ? "_dq" : "");
    case WeightType::kSpQR:
      return absl::StrCat("spqr", f.bits, "_g", f.group, "_o", f.outliers);
    case WeightType::kW8A8: return "w8a8";
    case WeightType::kQMoE: return absl::StrCat("qmoe_c", f.codewords);
    case WeightType::kBiLLM: return "billm";
    case WeightType::kQuip:
      return absl::StrCat("quip", f.bits, "_", f.group == 0 ? std::string("pc") : absl::StrCat("g", f.group),
                          f.symmetric ? "_sym" : "_asym");
    default: break;  // the ggml types: FindGgmlType above
  }
  return "unknown";
}

absl::StatusOr<WeightFormat> ParseFormatName(const std::string& name) {
  if (const GgmlTypeTraits* g = FindGgmlTypeByName(name)) return WeightFormat::Of(g->type);
  if (name == "w8a8") return WeightFormat::Of(WeightType::kW8A8);
  if (name == "billm") return WeightFormat::Of(WeightType::kBiLLM);
  const std::vector<absl::string_view> parts = absl::StrSplit(name, '_');
  auto bad = [&] { return absl::InvalidArgumentError(absl::StrCat("unknown weight format '", name, "'")); };
  if (parts.size() == 2 && parts[0] == "qmoe" && absl::StartsWith(parts[1], "c")) {
    int64_t words = 0;
    if (!absl::SimpleAtoi(parts[1].substr(1), &words) || words < 0) return bad();
    return WeightFormat::QMoE(words);
  }
  if (parts.size() == 3 && absl::StartsWith(parts[0], "quip")) {
    // The payload's qint name with "quip" in place of "qint".
    auto q = ParseFormatName(absl::StrCat("qint", parts[0].substr(4), "_", parts[1], "_", parts[2]));
    if (!q.ok()) return bad();
    return WeightFormat::Quip(q->bits, q->group, q->symmetric);
  }
  if (parts.size() == 3 && absl::StartsWith(parts[0], "qint")) {
    int bits = 0, group = 0;
    if (!absl::SimpleAtoi(parts[0].substr(4), &bits)) return bad();
    if (parts[1] == "pc") {
      group = 0;
    } else if (!absl::StartsWith(parts[1], "g") || !absl::SimpleAtoi(parts[1].substr(1), &group) || group <= 0) {
      return bad();
    }
    if (parts[2] != "sym" && parts[2] != "asym") return bad();
    if (bits < 2 || bits > 8) return bad();
    return WeightFormat::QInt(bits, group, parts[2] == "sym");
  }
  if ((parts.size() == 2 || parts.size() == 3) && parts[0] == "nf4" && absl::StartsWith(parts[1], "b")) {
    int block = 0;
    if (!absl::SimpleAtoi(parts[1].substr(1), &block) || block <= 0 || block % 2 != 0) return bad();
    if (parts.size() == 3 && parts[2] != "dq") return bad();
    return WeightFormat::NF4(block, parts.size() == 3);
  }
  if (parts.size() == 3 && absl::StartsWith(parts[0], "spqr") && absl::StartsWith(parts[1], "g") &&
      absl::StartsWith(parts[2], "o")) {
    int bits = 0, group = 0;
    int64_t outliers = 0;
    if (!absl::SimpleAtoi(parts[0].substr(4), &bits) || bits < 2 || bits > 4) return bad();
    if (!absl::SimpleAtoi(parts[1].substr(1), &group) || group <= 0) return bad();
    if (!absl::SimpleAtoi(parts[2].substr(1), &outliers) || outliers < 0) return bad();
    return WeightFormat::SpQR(bits, group, outliers);
  }
  return bad();
}

namespace {
constexpr int64_t kMaxElements = int64_t{1} << 48;

absl::Status CheckDims(int64_t rows, int64_t cols) {
  if (rows < 0 || cols < 0) return absl::InvalidArgumentError("negative tensor dimension");
  if (cols > 0 && rows > kMaxElements / cols)
    return absl::InvalidArgumentError(absl::StrCat("tensor of ", rows, " x ", cols, " elements is too large"));
  return absl::OkStatus();
}

absl::Status NeedMultiple(const WeightFormat& f, int64_t cols, int64_t block) {
  if (cols % block != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(FormatName(f), " needs a row length that is a multiple of ", block, ", got ", cols));
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<QIntLayout> GetQIntLayout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kQInt) return absl::InvalidArgumentError("not a qint format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  if (f.bits < 2 || f.bits > 8) return absl::InvalidArgumentError(absl::StrCat("qint bits must be 2..8, got ", f.bits));
  if (f.group < 0) return absl::InvalidArgumentError("qint group must be >= 0");
  QIntLayout l{};
  l.group = f.group == 0 ? cols : f.group;
  if (l.group == 0) {
    l.groups_per_row = 0;
  } else {
    QF_RETURN_IF_ERROR(NeedMultiple(f, cols, l.group));
    l.groups_per_row = cols / l.group;
  }
  // Rows are padded to a whole byte (zero bits), so any row length takes any bit width (172 x 3 bits: 65 bytes).
  l.row_code_bytes = static_cast<size_t>((cols * f.bits + 7) / 8);
  l.codes_offset = 0;
  l.scales_offset = l.row_code_bytes * static_cast<size_t>(rows);
  l.zeros_offset = l.scales_offset + 2 * static_cast<size_t>(rows * l.groups_per_row);
  l.total_bytes = l.zeros_offset + (f.symmetric ? 0 : static_cast<size_t>(rows * l.groups_per_row));
  return l;
}

absl::StatusOr<QuipLayout> GetQuipLayout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kQuip) return absl::InvalidArgumentError("not a quip format");
  QuipLayout l{};
  l.payload = WeightFormat::QInt(f.bits, f.group, f.symmetric);
  QF_ASSIGN_OR_RETURN(l.qint, GetQIntLayout(l.payload, rows, cols));
  l.col_scales_offset = QuipLayout::kHeaderBytes;
  l.payload_offset = (QuipLayout::kHeaderBytes + 2 * static_cast<size_t>(cols) + 31) / 32 * 32;
  l.total_bytes = l.payload_offset + l.qint.total_bytes;
  return l;
}

absl::StatusOr<SpqrLayout> GetSpqrLayout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kSpQR) return absl::InvalidArgumentError("not an spqr format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  if (f.bits < 2 || f.bits > 4) return absl::InvalidArgumentError(absl::StrCat("spqr bits must be 2..4, got ", f.bits));
  if (f.group <= 0) return absl::InvalidArgumentError(absl::StrCat("spqr group must be positive, got ", f.group));
  QF_RETURN_IF_ERROR(NeedMultiple(f, cols, f.group));
  if ((cols * f.bits) % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(FormatName(f), " needs row length * bits to be a multiple of 8, got ", cols));
  }
  // The CSR row pointers are u32.
  if (f.outliers < 0 || f.outliers > rows * cols || f.outliers > int64_t{0xFFFFFFFF}) {
    return absl::InvalidArgumentError(absl::StrCat("spqr outliers must be 0..", std::min(rows * cols, int64_t{0xFFFFFFFF}),
                                                   " for [", rows, ", ", cols, "], got ", f.outliers));
  }
  SpqrLayout l{};
  l.group = f.group;
  l.groups_per_row = cols / f.group;
  l.row_blocks = (rows + kSpqrStatGroup - 1) / kSpqrStatGroup;
  l.index_bytes = cols <= 65536 ? 2 : 4;
  l.row_code_bytes = static_cast<size_t>(cols * f.bits / 8);
  const size_t stat_bytes = (static_cast<size_t>(rows * l.groups_per_row) * kSpqrStatBits + 7) / 8;
  const size_t nnz = static_cast<size_t>(f.outliers);
  l.codes_offset = 0;
  l.scale_codes_offset = l.row_code_bytes * static_cast<size_t>(rows);
  l.zero_codes_offset = l.scale_codes_offset + stat_bytes;
  l.second_offset = l.zero_codes_offset + stat_bytes;
  l.row_ptr_offset = l.second_offset + 8 * static_cast<size_t>(l.row_blocks * l.groups_per_row);
  l.col_index_offset = l.row_ptr_offset + 4 * (static_cast<size_t>(rows) + 1);
  l.values_offset = l.col_index_offset + static_cast<size_t>(l.index_bytes) * nnz;
  l.total_bytes = l.values_offset + 2 * nnz;
  return l;
}

absl::StatusOr<QmoeLayout> GetQmoeLayout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kQMoE) return absl::InvalidArgumentError("not a qmoe format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  if (cols > kQmoeMaxCols) {
    return absl::InvalidArgumentError(absl::StrCat("qmoe needs a row length of at most ", kQmoeMaxCols, ", got ", cols));
  }
  if (f.codewords < 0 || f.codewords > rows * cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("qmoe codewords must be 0..", rows * cols, " (one trit each at least), got ", f.codewords));
  }
  QmoeLayout l{};
  l.row_groups = (rows + QmoeLayout::kRowGroup - 1) / QmoeLayout::kRowGroup;
  l.scales_offset = QmoeLayout::kHeaderBytes;
  l.counts_offset = l.scales_offset + 2 * static_cast<size_t>(rows);
  l.starts_offset = l.counts_offset + 2 * static_cast<size_t>(rows);
  l.words_offset = l.starts_offset + 4 * static_cast<size_t>(l.row_groups);
  l.total_bytes = l.words_offset + 2 * static_cast<size_t>(f.codewords);
  return l;
}

absl::StatusOr<BillmLayout> GetBillmLayout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kBiLLM) return absl::InvalidArgumentError("not a billm format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  BillmLayout l{};
  l.row_code_bytes = static_cast<size_t>((cols + 3) / 4);
  l.codebooks_offset = 0;
  l.salient_offset = 16 * static_cast<size_t>(rows);
  l.codes_offset = l.salient_offset + static_cast<size_t>((cols + 7) / 8);
  l.total_bytes = l.codes_offset + l.row_code_bytes * static_cast<size_t>(rows);
  return l;
}

absl::StatusOr<std::vector<size_t>> PlaneSizes(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type == WeightType::kQInt) {
    QF_ASSIGN_OR_RETURN(const QIntLayout l, GetQIntLayout(f, rows, cols));
    std::vector<size_t> sizes = {l.scales_offset - l.codes_offset, l.zeros_offset - l.scales_offset};
    if (l.total_bytes > l.zeros_offset) sizes.push_back(l.total_bytes - l.zeros_offset);
    return sizes;
  }
  if (f.type == WeightType::kNF4 && !f.double_quant) {
    QF_ASSIGN_OR_RETURN(const Nf4Layout l, GetNf4Layout(f, rows, cols));
    return std::vector<size_t>{l.absmax_offset - l.codes_offset, l.total_bytes - l.absmax_offset};
  }
  if (f.type == WeightType::kW8A8) {
    QF_ASSIGN_OR_RETURN(const W8A8Layout l, GetW8A8Layout(f, rows, cols));
    return std::vector<size_t>{l.scales_offset - l.codes_offset, l.total_bytes - l.scales_offset};
  }
  QF_ASSIGN_OR_RETURN(const size_t n, EncodedBytes(f, rows, cols));
  return std::vector<size_t>{n};
}

absl::StatusOr<Nf4Layout> GetNf4Layout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kNF4) return absl::InvalidArgumentError("not an nf4 format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  if (f.group <= 0 || f.group % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrCat("nf4 block must be a positive even number, got ", f.group));
  }
  QF_RETURN_IF_ERROR(NeedMultiple(f, cols, f.group));
  Nf4Layout l{};
  const int64_t n = rows * cols;
  l.block = f.group;
  l.blocks = n / f.group;
  l.codes_offset = 0;
  l.absmax_offset = static_cast<size_t>(n / 2);
  if (f.double_quant) {
    l.dq_groups = (l.blocks + kNf4DoubleQuantGroup - 1) / kNf4DoubleQuantGroup;
    l.dq_scale_offset = l.absmax_offset + static_cast<size_t>(l.blocks);
    l.dq_offset_offset = l.dq_scale_offset + 4 * static_cast<size_t>(l.dq_groups);
    l.total_bytes = l.dq_offset_offset + 4;
  } else {
    l.dq_groups = 0;
    l.dq_scale_offset = l.dq_offset_offset = l.absmax_offset + 4 * static_cast<size_t>(l.blocks);
    l.total_bytes = l.dq_scale_offset;
  }
  return l;
}

absl::StatusOr<W8A8Layout> GetW8A8Layout(const WeightFormat& f, int64_t rows, int64_t cols) {
  if (f.type != WeightType::kW8A8) return absl::InvalidArgumentError("not a w8a8 format");
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  if (cols > kW8A8MaxCols) {
    return absl::InvalidArgumentError(absl::StrCat("w8a8 needs a row length of at most ", kW8A8MaxCols,
                                                   " (int32 accumulators), got ", cols));
  }
  W8A8Layout l{};
  l.codes_offset = 0;
  l.scales_offset = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  l.total_bytes = l.scales_offset + 4 * static_cast<size_t>(rows);
  return l;
}

absl::StatusOr<size_t> EncodedBytes(const WeightFormat& f, int64_t rows, int64_t cols) {
  QF_RETURN_IF_ERROR(CheckDims(rows, cols));
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  if (const GgmlTypeTraits* g = FindGgmlType(f.type)) {
    if (g->block > 1) QF_RETURN_IF_ERROR(NeedMultiple(f, cols, g->block));
    return n / static_cast<size_t>(g->block) * static_cast<size_t>(g->block_bytes);
  }
  switch (f.type) {
    case WeightType::kQInt: {
      QF_ASSIGN_OR_RETURN(QIntLayout l, GetQIntLayout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kNF4: {
      QF_ASSIGN_OR_RETURN(Nf4Layout l, GetNf4Layout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kSpQR: {
      QF_ASSIGN_OR_RETURN(SpqrLayout l, GetSpqrLayout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kW8A8: {
      QF_ASSIGN_OR_RETURN(W8A8Layout l, GetW8A8Layout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kQuip: {
      QF_ASSIGN_OR_RETURN(QuipLayout l, GetQuipLayout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kQMoE: {
      QF_ASSIGN_OR_RETURN(QmoeLayout l, GetQmoeLayout(f, rows, cols));
      return l.total_bytes;
    }
    case WeightType::kBiLLM: {
      QF_ASSIGN_OR_RETURN(BillmLayout l, GetBillmLayout(f, rows, cols));
      return l.total_bytes;
    }
    default: break;  // the ggml types: FindGgmlType above
  }
  return absl::InvalidArgumentError("unknown weight type");
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}
int64_t Tensor::rows() const {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) n *= shape[i];
  return n;
}
int64_t Tensor::cols() const { return shape.empty() ? 1 : shape.back(); }

Tensor Tensor::FromBytes(std::string name, std::vector<int64_t> shape, WeightFormat format,
                         std::vector<uint8_t> bytes) {
  auto buf = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  Tensor t;
  t.name = std::move(name);
  t.shape = std::move(shape);
  t.format = format;
  t.data = buf->data();
  t.nbytes = buf->size();
  t.owner = std::move(buf);
  return t;
}

Tensor Tensor::FromFloats(std::string name, std::vector<int64_t> shape, std::span<const float> values) {
  std::vector<uint8_t> bytes(values.size() * 4);
  if (!values.empty()) std::memcpy(bytes.data(), values.data(), bytes.size());
  return FromBytes(std::move(name), std::move(shape), WeightFormat::F32(), std::move(bytes));
}

Tensor Tensor::View(std::string name, std::vector<int64_t> shape, WeightFormat format,
                    std::shared_ptr<const void> owner, const uint8_t* data, size_t nbytes) {
  Tensor t;
  t.name = std::move(name);
  t.shape = std::move(shape);
  t.format = format;
  t.owner = std::move(owner);
  t.data = data;
  t.nbytes = nbytes;
  return t;
}

absl::Status ValidateTensor(const Tensor& t) {
  if (t.shape.empty() || t.shape.size() > 4) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has ", t.shape.size(), " dimensions"));
  }
  int64_t rows = 1;
  for (size_t i = 0; i < t.shape.size(); ++i) {
    const int64_t d = t.shape[i];
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has a negative dimension"));
    if (i + 1 < t.shape.size()) {
      if (d != 0 && rows > kMaxElements / d)
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' shape overflows"));
      rows *= d;
    }
  }
  auto need = EncodedBytes(t.format, rows, t.shape.back());
  if (!need.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': ", need.status().message()));
  }
  if (*need != t.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has ", t.nbytes, " bytes, its shape [",
                                                   absl::StrJoin(t.shape, ", "), "] in ", FormatName(t.format),
                                                   " needs ", *need));
  }
  if (t.nbytes > 0 && t.data == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has no data"));
  }
  return absl::OkStatus();
}

}  // namespace qforge
