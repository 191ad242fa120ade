#include "core/kernels/qmoe.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <queue>
#include <new>

#include <sys/mman.h>

#include <immintrin.h>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"
#include "core/base/status_macros.h"
#include "core/kernels/blocks.h"
#include "core/kernels/kernels.h"

namespace qforge::kernels::qmoe {
namespace {

constexpr uint64_t kMask56 = (uint64_t{1} << 56) - 1;  // a word's trits; its length sits above

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
  d->entries.reserve(static_cast<size_t>(leaves));
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
    d->entries.push_back({(nonzero & ~negative) | uint64_t{nodes[id].depth} << 56, negative});
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
    const int len = static_cast<int>(e.plus_and_length >> 56);
    uint64_t negative = e.minus, nonzero = (e.plus_and_length & kMask56) | negative;
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

// Calls f(first row, rows, first word of the first row) for the groups of rows [r0, r1) that end on multiples
// of kTileRows (so a row's group does not depend on the range asked for), with the rows' counts checked against
// the group starts.
template <class F>
absl::Status ForEachRowGroup(const View& v, int64_t r0, int64_t r1, F&& f) {
  constexpr int64_t G = QmoeLayout::kRowGroup;
  static_assert(G % kTileRows == 0, "a group start is a tile start");
  int64_t next = v.GroupStart(r0 / G);
  for (int64_t r = r0 / G * G; r < r0; ++r) next += v.Count(r);
  for (int64_t g0 = r0; g0 < r1;) {
    const int64_t g1 = std::min(r1, (g0 / kTileRows + 1) * kTileRows);
    if (g0 % G == 0 && next != v.GroupStart(g0 / G)) {
      return DataLoss(*v.w, absl::StrCat("rows before row ", g0, " hold ", next, " codewords, its group starts at ",
                                         v.GroupStart(g0 / G)));
    }
    QF_RETURN_IF_ERROR(f(g0, g1 - g0, next));
    for (int64_t r = g0; r < g1; ++r) next += v.Count(r);
    g0 = g1;
  }
  if (r1 == v.rows && r1 > r0 && next != v.words) {
    return DataLoss(*v.w, absl::StrCat("the rows hold ", next, " codewords, the format says ", v.words));
  }
  return absl::OkStatus();
}

// Calls f(r, first word of r) for rows [r0, r1), with ForEachRowGroup's checks.
template <class F>
absl::Status ForEachRow(const View& v, int64_t r0, int64_t r1, F&& f) {
  return ForEachRowGroup(v, r0, r1, [&](int64_t g0, int64_t rows, int64_t first) -> absl::Status {
    for (int64_t r = g0; r < g0 + rows; ++r) {
      QF_RETURN_IF_ERROR(f(r, first));
      first += v.Count(r);
    }
    return absl::OkStatus();
  });
}

absl::Status CheckRange(const Tensor& w, int64_t r0, int64_t r1) {
  if (r0 < 0 || r1 > w.rows() || r0 > r1) {
    return absl::OutOfRangeError(
        absl::StrCat("rows [", r0, ", ", r1, ") out of range for '", w.name, "' with ", w.rows(), " rows"));
  }
  return absl::OkStatus();
}

}  // namespace

template <class T>
T* Dictionary::HugePageAllocator<T>::allocate(size_t n) {
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = (n * sizeof(T) + kHugePage - 1) / kHugePage * kHugePage;
  void* p = std::aligned_alloc(kHugePage, bytes);
  if (p == nullptr) throw std::bad_alloc();
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages where the kernel says no
  return static_cast<T*>(p);
}
template struct Dictionary::HugePageAllocator<Dictionary::Entry>;

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

absl::StatusOr<Encoded> Encode(const uint8_t* codes, const uint16_t* row_scales, int64_t rows, int64_t cols,
                               int zero_code) {
  if (rows <= 0 || cols <= 0 || cols > kQmoeMaxCols) {
    return absl::InvalidArgumentError(
        absl::StrCat("qmoe: a [", rows, ", ", cols, "] matrix does not fit (rows of 1..", kQmoeMaxCols, ")"));
  }
  if (zero_code < -1 || zero_code > 255) {
    return absl::InvalidArgumentError(absl::StrCat("qmoe: zero_code ", zero_code, " is not in -1..255"));
  }
  int64_t zeros = 0;
  for (int64_t i = 0; i < rows * cols; ++i) {
    if (codes[i] > 2) return absl::InvalidArgumentError(absl::StrCat("qmoe: ternary code ", int{codes[i]}, " > 2"));
    zeros += codes[i] == 1;
  }
  if (zero_code == -1) zero_code = ZeroCodeFor(static_cast<double>(zeros) / static_cast<double>(rows * cols));
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

absl::Status MatMulRowsReference(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n,
                                 float* y, int64_t y_stride) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  const int64_t cols = v.cols;
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

namespace {

// The reference decoder: row r's trits, trit by trit, into trits[0, cols) (zeroed first).
absl::Status DecodeRowBitwise(const View& v, int64_t r, int64_t first, int8_t* trits) {
  std::memset(trits, 0, static_cast<size_t>(v.cols));
  return ForEachWord(v, r, first, [&](int64_t c, uint64_t nonzero, uint64_t negative) {
    for (uint64_t m = nonzero; m != 0; m &= m - 1) {
      const int b = __builtin_ctzll(m);
      trits[c + b] = (negative >> b & 1) ? int8_t{-1} : int8_t{1};
    }
  });
}

#define QF_QMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// Up to kTileRows consecutive rows decoded at once: row i's trits are trits[start[i], start[i] + cols), and
// at least 64 readable bytes follow the last row's (the dot loads 64 bytes where one block is left).
struct RowGroup {
  std::vector<int8_t> trits;
  int64_t start[kTileRows] = {};
};

// The reference decoder for a group: rows at a stride of cols; DATA_LOSS naming the first inconsistent row.
absl::Status DecodeGroupBitwise(const View& v, int64_t r0, int64_t rows, int64_t first, RowGroup& g) {
  g.trits.resize(static_cast<size_t>(rows * v.cols + 64));
  for (int64_t i = 0; i < rows; ++i) {
    g.start[i] = i * v.cols;
    QF_RETURN_IF_ERROR(DecodeRowBitwise(v, r0 + i, first, g.trits.data() + g.start[i]));
    first += v.Count(r0 + i);
  }
  return absl::OkStatus();
}

// The group's words in one pass, 32 trits per store and a second 32 for a word longer than that: a word's stores
// are zero past its length in its masks, and the next word's first store, which starts where this word ends,
// overwrites that (a word of more than 32 trits ends at most 56 in, so that store reaches past its 64th), so
// stores in word order leave each position its own trit; a row starts where the previous row's last word ended.
// Two 32-byte stores where needed instead of one 64-byte store per word: a 64-byte store at any offset crosses a
// cache line, a 32-byte one half the time, and seven words in ten are 32 trits or shorter (88 % zeros; the 24 expert
// matmuls of docs/moe.md ~4 % faster, the branch mispredicted on the rest included). Every condition the reference
// decoder checks is checked here (a codeword outside the dictionary, a row with too few trits or a word past its
// columns); false where one fails, and the caller asks the reference decoder for the message. Lookups land at
// random in the 1 MiB dictionary, most of them L1 misses and many L2 misses: each word prefetches the entry
// kPrefetchWords ahead (12 to 48 are alike): the loop alone went from 1.33 to 0.98 ns per word in a
// microbenchmark, the 24 expert matmuls of docs/moe.md 5 % faster.
constexpr int64_t kPrefetchWords = 16;
QF_QMOE_AVX512 bool DecodeGroupAvx512(const View& v, int64_t r0, int64_t rows, int64_t first, RowGroup& g) {
  const int64_t cols = v.cols;
  int64_t counts[kTileRows], total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    counts[i] = v.Count(r0 + i);
    if (counts[i] < 1 || counts[i] > cols) return false;
    total += counts[i];
  }
  if (first + total > v.words) return false;
  const uint8_t* words = v.base + v.layout.words_offset + 2 * first;
  // Codes are 16-bit and the dictionary has at most 65,535 words, so its count fits an unsigned 16-bit compare.
  const __m512i dictionary_words = _mm512_set1_epi16(static_cast<int16_t>(v.dict->words));
  __mmask32 outside = 0;
  int64_t k = 0;
  for (; k + 32 <= total; k += 32) {
    outside |= _mm512_cmpge_epu16_mask(_mm512_loadu_si512(words + 2 * k), dictionary_words);
  }
  if (k < total) {
    const __mmask32 tail = (uint32_t{1} << (total - k)) - 1;
    outside |= _mm512_mask_cmpge_epu16_mask(tail, _mm512_maskz_loadu_epi16(tail, words + 2 * k), dictionary_words);
  }
  if (outside != 0) return false;
  // Row i starts before i * (cols + kMaxWordTrits) when the rows before it are valid (each ends before its
  // last word, which starts before cols, passes), and its own words reach at most counts[i] * kMaxWordTrits
  // further, plus the 64-byte store: room for that, so no store needs a bound of its own.
  int64_t size = 0;
  for (int64_t i = 0; i < rows; ++i) size = std::max(size, i * (cols + kMaxWordTrits) + counts[i] * kMaxWordTrits);
  size += 64;
  if (static_cast<int64_t>(g.trits.size()) < size) g.trits.resize(static_cast<size_t>(size));
  int8_t* out = g.trits.data();
  const uint8_t* entries = reinterpret_cast<const uint8_t*>(v.dict->entries.data());
  static_assert(sizeof(Dictionary::Entry) == 16);
  const __m512i one = _mm512_set1_epi8(1), minus_one = _mm512_set1_epi8(-1);
  int64_t c = 0;
  k = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row_start = c;
    int64_t length = 0;
    for (const int64_t row_end = k + counts[i]; k < row_end; ++k) {
      // The entry kPrefetchWords ahead (the group's last word near its end), asked for now: a prefetch retires
      // at once, where a load that misses L1 holds back everything after it, so more lookups overlap.
      const int64_t ahead = std::min(k + kPrefetchWords, total - 1);
      _mm_prefetch(reinterpret_cast<const char*>(entries + 16 * size_t{LoadU16(words + 2 * ahead)}), _MM_HINT_T0);
      // An entry is two 64-bit masks (+1 positions with the length in its top byte, -1 positions), loaded into
      // mask registers as they are. The length bits write +1 to trits c + 56.. c + 63 of a word longer than 32:
      // past its end, so the next word's first store or the room after the row takes them.
      auto* e = reinterpret_cast<__mmask64*>(const_cast<uint8_t*>(entries + 16 * size_t{LoadU16(words + 2 * k)}));
      const __m512i plus = _mm512_maskz_mov_epi8(_load_mask64(e), one);
      const __m512i trits = _mm512_mask_mov_epi8(plus, _load_mask64(e + 1), minus_one);
      length = reinterpret_cast<const uint8_t*>(e)[7];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), _mm512_castsi512_si256(trits));
      if (length > 32) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c + 32), _mm512_extracti64x4_epi64(trits, 1));
      }
      c += length;
    }
    if (c - length - row_start >= cols || c - row_start < cols) return false;  // the last word starts past cols
    g.start[i] = row_start;
  }
  return true;
}

// A group's rows decoded by the AVX-512 decoder where simd, else (or to name a fault) by the reference.
absl::Status DecodeGroup(const View& v, int64_t r0, int64_t rows, int64_t first, bool simd, RowGroup& g) {
  if (simd && DecodeGroupAvx512(v, r0, rows, first, g)) return absl::OkStatus();
  return DecodeGroupBitwise(v, r0, rows, first, g);
}

// One row of trits times one token's Q8_0 activations with int_dot.h's Q8_0 numerics: per 32-column block the
// exact integer sum of trit * code, then acc = fma(dw * dx, float(sum), acc) in block order.
float DotRowQ8_0Scalar(const int8_t* trits, const int8_t* codes, const float* dx, float dw, int64_t blocks) {
  float acc = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) sum += int32_t{trits[32 * b + j]} * codes[32 * b + j];
    acc = std::fma(dw * dx[b], static_cast<float>(sum), acc);
  }
  return acc;
}

// A group's rows times one token's Q8_0 activations, y[i] for row i with the f16 scale f16_scales[i] (rows <=
// kTileRows; row[i] for i >= rows may be any readable row, its lane is not stored), the same integers by
// vpdpbusd, whose first operand is unsigned: sum (t + 1) * a = sum t * a + sum a, and the activations carry each block's exact code sum. Two blocks of all
// 16 rows per step; the rows' lanes are transposed into one vector of block sums per block (integers: any order),
// then added to each row's acc one block after another as DotRowQ8_0Scalar does, 16 rows in the lanes.
// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 intrinsics as maybe uninitialised
// when they are inlined into a function with a target attribute (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// acc + dw * dx[b] * (sums - code sum of block b), as DotRowQ8_0Scalar rounds it.
QF_QMOE_AVX512 __attribute__((always_inline)) inline __m512 AddBlock(__m512 acc, __m512 dw, __m512i sums,
                                                                     const Q8_0Activations& a, int64_t b) {
  const __m512i s = _mm512_sub_epi32(sums, _mm512_set1_epi32(a.code_sums[b]));
  return _mm512_fmadd_ps(_mm512_mul_ps(dw, _mm512_set1_ps(a.scales[b])), _mm512_cvtepi32_ps(s), acc);
}

QF_QMOE_AVX512 void DotGroupQ8_0Avx512(const int8_t* const* row, int64_t rows, const Q8_0Activations& a,
                                       const uint8_t* f16_scales, int64_t blocks, float* y) {
  const auto row_mask = static_cast<__mmask16>((uint32_t{1} << rows) - 1);
  const __m512i one = _mm512_set1_epi8(1);
  const __m512i even_chunks = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i odd_chunks = _mm512_add_epi32(even_chunks, _mm512_set1_epi32(4));
  const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(row_mask, f16_scales));  // exact, as HalfToFloat
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; b += 2) {
    const bool pair = b + 1 < blocks;
    // A lone last block: the activations' upper half is zero, so whatever the rows hold there adds nothing.
    const __m512i act = pair ? _mm512_loadu_si512(a.codes + 32 * b)
                             : _mm512_zextsi256_si512(_mm256_loadu_si256(
                                   reinterpret_cast<const __m256i*>(a.codes + 32 * b)));
    __m512i v[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
      const __m512i t1 = _mm512_add_epi8(_mm512_loadu_si512(row[r] + 32 * b), one);
      v[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), t1, act);
    }
    // Lanes 0-7 of v[r] hold row r's block b, lanes 8-15 its block b + 1, four lanes per 128-bit chunk. Pairs of
    // rows: chunk lanes (r, r+1, r, r+1) of two partial sums each; then four rows per chunk; then q[j] chunk k
    // holds rows 4j..4j+3's sums over chunk k.
    __m512i p[8], q[4];
    for (int j = 0; j < 8; ++j) {
      p[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]),
                              _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
    }
    for (int j = 0; j < 4; ++j) {
      q[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * j], p[2 * j + 1]),
                              _mm512_unpackhi_epi64(p[2 * j], p[2 * j + 1]));
    }
    // Chunks 0 + 1 are block b, 2 + 3 block b + 1: e01 = (rows 0-3 b, rows 0-3 b+1, rows 4-7 b, rows 4-7 b+1).
    const __m512i e01 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_i32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512i e23 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2], q[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                         _mm512_shuffle_i32x4(q[2], q[3], _MM_SHUFFLE(3, 1, 3, 1)));
    acc = AddBlock(acc, dw, _mm512_permutex2var_epi32(e01, even_chunks, e23), a, b);
    if (pair) acc = AddBlock(acc, dw, _mm512_permutex2var_epi32(e01, odd_chunks, e23), a, b + 1);
  }
  _mm512_mask_storeu_ps(y, row_mask, acc);
}
#pragma GCC diagnostic pop

// The AVX-512 decoder and dot run where the kernels run AVX-512 (an ISA pinned lower by SetIsa or QFORGE_ISA keeps
// them off) and the CPU has BW and VNNI.
bool UseAvx512Decoder() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return has && ActiveIsa() == Isa::kAvx512;
}

absl::Status CheckQ8_0Columns(const View& v) {
  if (v.cols % kQ8_0TileColumns == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tensor '", v.w->name, "' (qmoe): ", v.cols,
                                                 " columns have no Q8_0 form (a multiple of 32)"));
}

}  // namespace

absl::Status ForEachQ8_0Tile(const Tensor& w, int64_t row_begin, int64_t row_end, bool bitwise,
                             const std::function<absl::Status(const Tensor& tile, int64_t first_row)>& f) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  QF_RETURN_IF_ERROR(CheckQ8_0Columns(v));
  const int64_t cols = v.cols, blocks = cols / kQ8_0TileColumns;
  const bool simd = !bitwise && UseAvx512Decoder();
  RowGroup g;
  std::vector<block_q8_0> tile(static_cast<size_t>(kTileRows * blocks));
  return ForEachRowGroup(v, row_begin, row_end, [&](int64_t r0, int64_t rows, int64_t first) -> absl::Status {
    QF_RETURN_IF_ERROR(DecodeGroup(v, r0, rows, first, simd, g));
    for (int64_t i = 0; i < rows; ++i) {
      const int8_t* row = g.trits.data() + g.start[i];
      const uint16_t scale = LoadU16(v.base + v.layout.scales_offset + 2 * (r0 + i));
      for (int64_t b = 0; b < blocks; ++b) {
        block_q8_0& q = tile[i * blocks + b];
        q.d = scale;
        std::memcpy(q.qs, row + b * kQ8_0TileColumns, kQ8_0TileColumns);
      }
    }
    const Tensor t = Tensor::View(w.name, {rows, cols}, WeightFormat::Of(WeightType::kQ8_0), nullptr,
                                  reinterpret_cast<const uint8_t*>(tile.data()),
                                  static_cast<size_t>(rows * blocks) * sizeof(block_q8_0));
    return f(t, r0);
  });
}

absl::Status DotRowsQ8_0(const Tensor& w, int64_t row_begin, int64_t row_end, const Q8_0Activations& a, float* y,
                         bool bitwise) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  QF_RETURN_IF_ERROR(CheckQ8_0Columns(v));
  const int64_t cols = v.cols, blocks = cols / kQ8_0TileColumns;
  if (bitwise || !UseAvx512Decoder()) {
    std::vector<int8_t> trits(static_cast<size_t>(cols));
    return ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
      QF_RETURN_IF_ERROR(DecodeRowBitwise(v, r, first, trits.data()));
      y[r] = DotRowQ8_0Scalar(trits.data(), a.codes, a.scales, v.Scale(r), blocks);
      return absl::OkStatus();
    });
  }
  // A whole group is decoded before any row is read back: a load that spans several recent overlapping stores
  // cannot be forwarded from the store buffer and waits until they reach the cache.
  RowGroup g;
  return ForEachRowGroup(v, row_begin, row_end, [&](int64_t r0, int64_t rows, int64_t first) -> absl::Status {
    QF_RETURN_IF_ERROR(DecodeGroup(v, r0, rows, first, /*simd=*/true, g));
    const int8_t* row[kTileRows];
    for (int64_t i = 0; i < kTileRows; ++i) row[i] = g.trits.data() + g.start[i < rows ? i : 0];
    DotGroupQ8_0Avx512(row, rows, a, v.base + v.layout.scales_offset + 2 * r0, blocks, y + r0);
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
