#include "core/kernels/qmoe.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <queue>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"

namespace qforge::kernels::qmoe {
namespace {

uint16_t LoadU16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

std::unique_ptr<Dictionary> Build(int zero_code) {
  const double p0 = (zero_code + 0.5) / 256.0;
  const std::array<double, 3> p = {p0, (1 - p0) / 2, (1 - p0) / 2};
  struct Node {
    int32_t parent;
    uint8_t trit, depth;
    double prob;
  };
  std::vector<Node> nodes = {{-1, 0, 0, 1.0}};
  auto d = std::make_unique<Dictionary>();
  d->zero_code = zero_code;
  d->child.assign(3, -1);
  // The most probable expandable leaf first; among equals, the one made first.
  auto after = [&nodes](int32_t a, int32_t b) {
    if (nodes[a].prob != nodes[b].prob) return nodes[a].prob < nodes[b].prob;
    return a > b;
  };
  std::priority_queue<int32_t, std::vector<int32_t>, decltype(after)> leaves_by_prob(after);
  auto expand = [&](int32_t id) {
    const Node parent = nodes[id];
    for (int t = 0; t < 3; ++t) {
      const auto c = static_cast<int32_t>(nodes.size());
      nodes.push_back({id, static_cast<uint8_t>(t), static_cast<uint8_t>(parent.depth + 1), parent.prob * p[t]});
      d->child[3 * static_cast<size_t>(id) + t] = c;
      d->child.insert(d->child.end(), {-1, -1, -1});
      if (parent.depth + 1 < kMaxWordTrits) leaves_by_prob.push(c);
    }
  };
  expand(0);
  int leaves = 3;
  while (leaves + 2 <= kMaxWords && !leaves_by_prob.empty()) {
    const int32_t id = leaves_by_prob.top();
    leaves_by_prob.pop();
    expand(id);
    leaves += 2;
  }
  d->word.assign(nodes.size(), -1);
  for (size_t id = 1; id < nodes.size(); ++id) {
    if (d->child[3 * id] != -1) continue;
    const int w = d->words++;
    d->word[id] = w;
    uint64_t nonzero = 0, negative = 0;
    for (int32_t n = static_cast<int32_t>(id); n > 0; n = nodes[n].parent) {
      const int bit = nodes[n].depth - 1;
      if (nodes[n].trit != kZero) nonzero |= uint64_t{1} << bit;
      if (nodes[n].trit == kMinus) negative |= uint64_t{1} << bit;
    }
    d->length.push_back(nodes[id].depth);
    d->nonzero.push_back(nonzero);
    d->negative.push_back(negative);
    d->entries.push_back({nonzero, negative | uint64_t{nodes[id].depth} << 56});
  }
  return d;
}

absl::Status DataLoss(const Tensor& w, const std::string& what) {
  return absl::DataLossError(absl::StrCat("tensor '", w.name, "' (qmoe): ", what));
}

// A checked kQMoE tensor: header, layout and dictionary.
struct View {
  const Tensor* w = nullptr;
  const Dictionary* dict = nullptr;
  QmoeLayout layout{};
  int64_t rows = 0, cols = 0, words = 0;
  const uint8_t* base = nullptr;

  float Scale(int64_t r) const { return HalfToFloat(LoadU16(base + layout.scales_offset + 2 * r)); }
  int64_t Count(int64_t r) const { return LoadU16(base + layout.counts_offset + 2 * r); }
  int64_t GroupStart(int64_t g) const { return LoadU32(base + layout.starts_offset + 4 * g); }
  uint16_t Word(int64_t i) const { return LoadU16(base + layout.words_offset + 2 * i); }
};

absl::StatusOr<View> Open(const Tensor& w) {
  QF_RETURN_IF_ERROR(ValidateTensor(w));
  if (w.format.type != WeightType::kQMoE) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", w.name, "' is ", FormatName(w.format), ", not qmoe"));
  }
  View v;
  v.w = &w;
  v.rows = w.rows();
  v.cols = w.cols();
  v.words = w.format.codewords;
  v.base = w.data;
  QF_ASSIGN_OR_RETURN(v.layout, GetQmoeLayout(w.format, v.rows, v.cols));
  if (LoadU32(v.base) != kMagic) return DataLoss(w, "bad magic");
  if (v.base[4] != kVersion) return DataLoss(w, absl::StrCat("version ", int{v.base[4]}, ", this build reads 1"));
  if (LoadU16(v.base + 6) != 0) return DataLoss(w, "reserved header field is not zero");
  v.dict = &DictionaryFor(v.base[5]);
  return v;
}

// Calls f(first column, non-zero mask, negative mask) for each word of row r, whose words start at `first`, with
// the masks cut at cols; DATA_LOSS unless every word exists and the row decodes to exactly cols trits.
template <class F>
absl::Status ForEachWord(const View& v, int64_t r, int64_t first, F&& f) {
  const Dictionary& d = *v.dict;
  const int64_t count = v.Count(r);
  if (first + count > v.words) return DataLoss(*v.w, absl::StrCat("row ", r, " runs past the ", v.words, " codewords"));
  int64_t c = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t code = v.Word(first + i);
    if (code >= d.words) return DataLoss(*v.w, absl::StrCat("row ", r, ": codeword ", code, " is not in the dictionary"));
    if (c >= v.cols) return DataLoss(*v.w, absl::StrCat("row ", r, " has codewords past its ", v.cols, " columns"));
    const Dictionary::Entry& e = d.entries[code];
    const int len = static_cast<int>(e.negative_and_length >> 56);
    uint64_t nonzero = e.nonzero, negative = e.negative_and_length & ((uint64_t{1} << 56) - 1);
    if (c + len > v.cols) {
      const uint64_t keep = (uint64_t{1} << (v.cols - c)) - 1;  // v.cols - c < len <= 56
      nonzero &= keep;
      negative &= keep;
    }
    f(c, nonzero, negative);
    c += len;
  }
  if (c < v.cols) return DataLoss(*v.w, absl::StrCat("row ", r, " decodes to ", c, " of ", v.cols, " columns"));
  return absl::OkStatus();
}

// Calls f(r, first word of r) for rows [r0, r1), with the rows' counts checked against the group starts.
template <class F>
absl::Status ForEachRow(const View& v, int64_t r0, int64_t r1, F&& f) {
  constexpr int64_t G = QmoeLayout::kRowGroup;
  int64_t next = v.GroupStart(r0 / G);
  for (int64_t r = r0 / G * G; r < r0; ++r) next += v.Count(r);
  for (int64_t r = r0; r < r1; ++r) {
    if (r % G == 0 && next != v.GroupStart(r / G)) {
      return DataLoss(*v.w, absl::StrCat("rows before row ", r, " hold ", next, " codewords, its group starts at ",
                                         v.GroupStart(r / G)));
    }
    QF_RETURN_IF_ERROR(f(r, next));
    next += v.Count(r);
  }
  if (r1 == v.rows && r1 > r0 && next != v.words) {
    return DataLoss(*v.w, absl::StrCat("the rows hold ", next, " codewords, the format says ", v.words));
  }
  return absl::OkStatus();
}

absl::Status CheckRange(const Tensor& w, int64_t r0, int64_t r1) {
  if (r0 < 0 || r1 > w.rows() || r0 > r1) {
    return absl::OutOfRangeError(
        absl::StrCat("rows [", r0, ", ", r1, ") out of range for '", w.name, "' with ", w.rows(), " rows"));
  }
  return absl::OkStatus();
}

}  // namespace

const Dictionary& DictionaryFor(int zero_code) {
  static std::mutex mu;
  static std::array<std::unique_ptr<const Dictionary>, 256> cache;
  zero_code = std::clamp(zero_code, 0, 255);
  std::lock_guard<std::mutex> lock(mu);
  if (cache[zero_code] == nullptr) cache[zero_code] = Build(zero_code);
  return *cache[zero_code];
}

int ZeroCodeFor(double zero_fraction) {
  return std::clamp(static_cast<int>(std::floor(zero_fraction * 256.0)), 0, 255);
}

absl::StatusOr<Encoded> Encode(const uint8_t* codes, const uint16_t* row_scales, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0 || cols > kQmoeMaxCols) {
    return absl::InvalidArgumentError(
        absl::StrCat("qmoe: a [", rows, ", ", cols, "] matrix does not fit (rows of 1..", kQmoeMaxCols, ")"));
  }
  int64_t zeros = 0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    if (codes[i] > 2) return absl::InvalidArgumentError(absl::StrCat("qmoe: ternary code ", int{codes[i]}, " > 2"));
    zeros += codes[i] == 1;
  }
  const int zero_code = ZeroCodeFor(static_cast<double>(zeros) / static_cast<double>(rows * cols));
  const Dictionary& d = DictionaryFor(zero_code);
  static constexpr uint8_t kTritOfCode[3] = {kMinus, kZero, kPlus};
  std::vector<uint16_t> words, counts(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const size_t before = words.size();
    int32_t node = 0;
    auto step = [&](uint8_t trit) {
      node = d.child[3 * static_cast<size_t>(node) + trit];
      if (d.word[node] >= 0) {
        words.push_back(static_cast<uint16_t>(d.word[node]));
        node = 0;
      }
    };
    for (int64_t c = 0; c < cols; ++c) step(kTritOfCode[codes[r * cols + c]]);
    while (node != 0) step(kZero);  // the tree is complete: zeros reach a leaf, cut off again when decoding
    counts[r] = static_cast<uint16_t>(words.size() - before);
  }
  Encoded e;
  e.format = WeightFormat::QMoE(static_cast<int64_t>(words.size()));
  QF_ASSIGN_OR_RETURN(const QmoeLayout l, GetQmoeLayout(e.format, rows, cols));
  e.bytes.assign(l.total_bytes, 0);
  uint8_t* out = e.bytes.data();
  std::memcpy(out, &kMagic, 4);
  out[4] = kVersion;
  out[5] = static_cast<uint8_t>(zero_code);
  std::memcpy(out + l.scales_offset, row_scales, 2 * static_cast<size_t>(rows));
  std::memcpy(out + l.counts_offset, counts.data(), 2 * counts.size());
  uint32_t start = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (r % QmoeLayout::kRowGroup == 0) std::memcpy(out + l.starts_offset + 4 * (r / QmoeLayout::kRowGroup), &start, 4);
    start += counts[r];
  }
  if (!words.empty()) std::memcpy(out + l.words_offset, words.data(), 2 * words.size());
  return e;
}

absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  return ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
    float* row = out + (r - row_begin) * v.cols;
    std::fill(row, row + v.cols, 0.0f);
    const float s = v.Scale(r);
    return ForEachWord(v, r, first, [&](int64_t c, uint64_t nonzero, uint64_t negative) {
      for (uint64_t m = nonzero; m != 0; m &= m - 1) {
        const int b = __builtin_ctzll(m);
        row[c + b] = (negative >> b & 1) ? -s : s;
      }
    });
  });
}

absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride, bool use_reference) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  const int64_t cols = v.cols;
  if (use_reference) {
    std::vector<float> row(static_cast<size_t>(cols));
    return ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
      std::fill(row.begin(), row.end(), 0.0f);
      const float s = v.Scale(r);
      QF_RETURN_IF_ERROR(ForEachWord(v, r, first, [&](int64_t c, uint64_t nonzero, uint64_t negative) {
        for (uint64_t m = nonzero; m != 0; m &= m - 1) {
          const int b = __builtin_ctzll(m);
          row[c + b] = (negative >> b & 1) ? -s : s;
        }
      }));
      for (int64_t t = 0; t < n; ++t) {
        double acc = 0;
        for (int64_t c = 0; c < cols; ++c) acc += static_cast<double>(row[c]) * x[t * cols + c];
        y[t * y_stride + r] = static_cast<float>(acc);
      }
      return absl::OkStatus();
    });
  }
  // The row's +1 and -1 columns, listed once per row and shared by every token of the call.
  std::vector<int32_t> plus(static_cast<size_t>(cols)), minus(static_cast<size_t>(cols));
  return ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
    int64_t np = 0, nm = 0;
    QF_RETURN_IF_ERROR(ForEachWord(v, r, first, [&](int64_t c, uint64_t nonzero, uint64_t negative) {
      for (uint64_t m = nonzero & ~negative; m != 0; m &= m - 1) plus[np++] = static_cast<int32_t>(c + __builtin_ctzll(m));
      for (uint64_t m = negative & nonzero; m != 0; m &= m - 1) minus[nm++] = static_cast<int32_t>(c + __builtin_ctzll(m));
    }));
    const float s = v.Scale(r);
    for (int64_t t = 0; t < n; ++t) {
      const float* xt = x + t * cols;
      // Four partial sums each, combined in a fixed order: the same bits for a token alone or in a batch.
      float p[4] = {0, 0, 0, 0}, q[4] = {0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 4 <= np; i += 4) {
        for (int k = 0; k < 4; ++k) p[k] += xt[plus[i + k]];
      }
      for (; i < np; ++i) p[0] += xt[plus[i]];
      for (i = 0; i + 4 <= nm; i += 4) {
        for (int k = 0; k < 4; ++k) q[k] += xt[minus[i + k]];
      }
      for (; i < nm; ++i) q[0] += xt[minus[i]];
      y[t * y_stride + r] = s * (((p[0] + p[1]) + (p[2] + p[3])) - ((q[0] + q[1]) + (q[2] + q[3])));
    }
    return absl::OkStatus();
  });
}

absl::Status Prepare(const Tensor& w) { return Open(w).status(); }

absl::Status Validate(const Tensor& w) {
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  return ForEachRow(v, 0, v.rows, [&](int64_t r, int64_t first) {
    return ForEachWord(v, r, first, [](int64_t, uint64_t, uint64_t) {});
  });
}

}  // namespace qforge::kernels::qmoe
