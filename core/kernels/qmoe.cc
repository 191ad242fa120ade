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
#include "core/kernels/ggml_kernels.h"
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
    const int len = static_cast<int>(e.minus_and_length >> 56);
    uint64_t nonzero = e.nonzero, negative = e.minus_and_length & kMask56;
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

#define QF_QMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,bmi2,fma,f16c")))

// GCC 12 reports the _mm512_undefined_* placeholders inside its own AVX-512 intrinsics as maybe uninitialised
// when they are inlined into a function with a target attribute (a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Up to kTileRows consecutive rows decoded at once: row i's trits are trits[start[i], start[i] + cols), and
// at least 64 readable bytes follow the last row's.
struct RowGroup {
  std::vector<int8_t> trits;
  int64_t start[kTileRows] = {};
  std::vector<uint32_t> offset_room;  // CheckedGroupOffsets' (AVX-512 decoder)
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

// A 64-bit mask loaded straight into a mask register (kmovq from memory).
QF_QMOE_AVX512 __attribute__((always_inline)) inline __mmask64 LoadMask(const uint8_t* p) {
  return _load_mask64(reinterpret_cast<__mmask64*>(const_cast<uint8_t*>(p)));
}

// Lookups land at random in the 1 MiB dictionary, most of them L1 misses and many L2 misses: each word prefetches
// the entry kPrefetchWords ahead (12 to 48 are alike; the decode loop alone went from 1.33 to 0.98 ns per word in
// a microbenchmark). A prefetch retires at once, where a load that misses L1 holds back everything after it, so
// more lookups overlap.
constexpr int64_t kPrefetchWords = 16;

// A group's words checked and looked up before the AVX-512 paths read any, in one pass over them: each row's count
// is 1..cols, the words exist (counts[i] is row r0 + i's count, *total their sum) and every codeword is in the
// dictionary, else nullptr; the result is their byte offsets in the dictionary, 16 at a time, with kPrefetchWords
// zeros after them (entry 0, so a prefetch ahead of the last word needs no bound); room grows to hold them. The
// loops over the words then have no address arithmetic (on Zen 5 the selection ~10 % faster).
QF_QMOE_AVX512 const uint32_t* CheckedGroupOffsets(const View& v, int64_t r0, int64_t rows, int64_t first,
                                                   int64_t* counts, int64_t* total, std::vector<uint32_t>& room) {
  static_assert(sizeof(Dictionary::Entry) == 16 && kPrefetchWords <= 16);
  *total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    counts[i] = v.Count(r0 + i);
    if (counts[i] < 1 || counts[i] > v.cols) return nullptr;
    *total += counts[i];
  }
  if (first + *total > v.words) return nullptr;
  if (room.size() < static_cast<size_t>(*total + 16 + kPrefetchWords)) {
    room.resize(static_cast<size_t>(*total + 16 + kPrefetchWords));
  }
  const uint8_t* words = v.base + v.layout.words_offset + 2 * first;
  uint32_t* offsets = room.data();
  // Codes are 16-bit and the dictionary has at most 65,535 words, so its count fits an unsigned 16-bit compare.
  const __m256i dictionary_words = _mm256_set1_epi16(static_cast<int16_t>(v.dict->words));
  __mmask16 outside = 0;
  for (int64_t k = 0; k < *total; k += 16) {
    const auto lanes = static_cast<__mmask16>(*total - k >= 16 ? 0xFFFF : (1u << (*total - k)) - 1);
    const __m256i w = _mm256_maskz_loadu_epi16(lanes, words + 2 * k);
    outside |= _mm256_mask_cmpge_epu16_mask(lanes, w, dictionary_words);
    _mm512_storeu_si512(offsets + k, _mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 4));  // lanes past total: 0
  }
  _mm512_storeu_si512(offsets + *total, _mm512_setzero_si512());
  return outside == 0 ? offsets : nullptr;
}

// The group's words in one pass, one 64-byte store of trits per word: a word's store is zero past its length in its
// masks, and the next word's store, which starts where this word ends (at most 56 in), overwrites that, so stores
// in word order leave each position its own trit; a row starts where the previous row's last word ended. Until
// 2026-12-08 a word stored 32 trits and a second 32 only when longer (three words in ten at 88 % zeros), as a
// 64-byte store at any offset crosses a cache line and a 32-byte one half the time: 9 % faster on a Zen 4 host,
// but the branch on the length made the 24 expert matmuls of docs/moe.md at 8 tokens 27 % slower on an Intel
// Xeon and prompts ~10-20 % slower on a Zen 5. Every condition the reference decoder checks is checked here (a
// codeword outside the dictionary, a row with too few trits or a word past its columns); false where one fails,
// and the caller asks the reference decoder for the message.
QF_QMOE_AVX512 bool DecodeGroupAvx512(const View& v, int64_t r0, int64_t rows, int64_t first, RowGroup& g) {
  const int64_t cols = v.cols;
  int64_t counts[kTileRows], total = 0;
  const uint32_t* offset = CheckedGroupOffsets(v, r0, rows, first, counts, &total, g.offset_room);
  if (offset == nullptr) return false;
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
  const __m512i plus_trit = _mm512_set1_epi8(1), minus_trit = _mm512_set1_epi8(-1);
  int64_t c = 0, k = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row_start = c;
    int64_t length = 0;
    for (const int64_t row_end = k + counts[i]; k < row_end; ++k) {
      // An entry's two masks loaded into mask registers as they are. The length bits write -1 to trits
      // c + 56.. c + 63: past the word's end, so the next word's store or the room after the row takes them.
      _mm_prefetch(reinterpret_cast<const char*>(entries + offset[k + kPrefetchWords]), _MM_HINT_T0);
      const uint8_t* e = entries + offset[k];
      const __m512i nonzero = _mm512_maskz_mov_epi8(LoadMask(e), plus_trit);
      const __m512i trits = _mm512_mask_mov_epi8(nonzero, LoadMask(e + 8), minus_trit);
      length = e[15];
      _mm512_storeu_si512(out + c, trits);
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

// Tokens [t, t + count) of a, as a view of their own.
Q8_KActivations TokensOf(const Q8_KActivations& a, int64_t t, int64_t count = 1) {
  const int64_t offset = t * a.stride;
  return {reinterpret_cast<const int8_t*>(reinterpret_cast<const uint8_t*>(a.codes) + offset),
          reinterpret_cast<const float*>(reinterpret_cast<const uint8_t*>(a.scales) + offset),
          reinterpret_cast<const int32_t*>(reinterpret_cast<const uint8_t*>(a.code_sums) + offset), count, a.stride};
}

// The code sum of block b of one token's Q8_K activations (T2 of DotRowsQ8_K).
int32_t BlockCodeSum(const Q8_KActivations& a, int64_t b) {
  int32_t sum = 0;
  for (int64_t j = 0; j < kQ8_KBlockColumns / 32; ++j) sum += a.code_sums[b * (kQ8_KBlockColumns / 32) + j];
  return sum;
}

// One row of trits times one token's Q8_K activations, DotRowsQ8_K's numerics (qmoe.h) as int_dot_scalar.cc's
// Q4_K rounds them.
float DotRowQ8_KScalar(const int8_t* trits, const Q8_KActivations& a, float dw, int64_t blocks) {
  float acc = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    int32_t sum = 0;
    for (int64_t j = 0; j < kQ8_KBlockColumns; ++j) {
      sum += int32_t{trits[kQ8_KBlockColumns * b + j]} * a.codes[kQ8_KBlockColumns * b + j];
    }
    const int32_t t2 = BlockCodeSum(a, b);
    const float d = dw * a.scales[b];
    acc = std::fma(-d, static_cast<float>(t2), std::fma(d, static_cast<float>(sum + t2), acc));
  }
  return acc;
}

// The lane sums of 16 vectors, v[r]'s in lane r (integers: any order). Pairs of rows: 128-bit chunk lanes (r,
// r+1, r, r+1) of two partial sums each; then four rows per chunk, q[j] chunk k holding rows 4j..4j+3's sums
// over chunk k; then the chunks added, rows 4j.. in chunk j.
QF_QMOE_AVX512 __attribute__((always_inline)) inline __m512i SumLanes16(const __m512i* v) {
  __m512i p[8], q[4];
  for (int j = 0; j < 8; ++j) {
    p[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * j], v[2 * j + 1]),
                            _mm512_unpackhi_epi32(v[2 * j], v[2 * j + 1]));
  }
  for (int j = 0; j < 4; ++j) {
    q[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * j], p[2 * j + 1]),
                            _mm512_unpackhi_epi64(p[2 * j], p[2 * j + 1]));
  }
  const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(q[2], q[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(q[2], q[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Rows' block sums into their y: sums[b * kTileRows + i] is row i's sum_c trit[c] * code[c] over block b (rows <=
// kTileRows; lanes past rows may hold anything, they are not stored), added as DotRowQ8_KScalar adds them, 16
// rows in the lanes.
QF_QMOE_AVX512 void AddBlockSumsAvx512(const int32_t* sums, int64_t rows, const Q8_KActivations& a,
                                       const uint8_t* f16_scales, int64_t blocks, float* y) {
  const auto row_mask = static_cast<__mmask16>((uint32_t{1} << rows) - 1);
  const __m512 dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(row_mask, f16_scales));  // exact, as HalfToFloat
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t t2 = BlockCodeSum(a, b);
    const __m512 d = _mm512_mul_ps(dw, _mm512_set1_ps(a.scales[b]));
    const __m512i t1 = _mm512_add_epi32(_mm512_loadu_si512(sums + b * kTileRows), _mm512_set1_epi32(t2));
    acc = _mm512_fnmadd_ps(d, _mm512_set1_ps(static_cast<float>(t2)),
                           _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(t1), acc));  // fnmadd: fma(-d, ...) exactly
  }
  _mm512_mask_storeu_ps(y, row_mask, acc);
}

// acc + the codes at p that `select` picks, negated where `minus` says (codes are -127..127, so no negation
// overflows), four bytes to a lane by vpdpbusd against ones, into acc itself (a vpdpbusd from zero and a vpaddd
// into acc, a chain of one-cycle adds, was slower on Zen 5: SelectGroupQ8_KAvx512).
QF_QMOE_AVX512 __attribute__((always_inline)) inline __m512i AddSelected(__m512i acc, __mmask64 select,
                                                                         __mmask64 minus, const int8_t* p) {
  const __m512i picked = _mm512_maskz_loadu_epi8(select, p);
  const __m512i signed_codes = _mm512_mask_sub_epi8(picked, minus, _mm512_setzero_si512(), picked);
  return _mm512_dpbusd_epi32(acc, _mm512_set1_epi8(1), signed_codes);
}

// kTokens tokens (a's first), a group's rows: each word's masks select and negate each token's activations where
// the word stands (a masked load reads only the non-zero positions, so nothing past a row's columns is read and no
// trit is written) and add them; a word that reaches the end of its 256-column block is split there. The checks
// of DecodeGroupAvx512 (the row must decode to at least cols trits, its last word start before cols); false where
// one fails. Each token's row's vector of partial sums per block goes to lanes[16 * ((t * blocks + b) * kTileRows
// + i)] (rows past `rows` keep what they hold: their lanes are not stored), and the group's are summed by
// SumLanes16, a few instructions a row instead of a reduction per row (no change measured either way). sums: room
// for kTokens * kTileRows * blocks; offset_room: CheckedGroupOffsets'. One token's row adds its even and odd words
// into two vpdpbusd chains; with more tokens each token is a chain. On Zen 5 these took the 24 expert matmuls of
// docs/moe.md from ~130 to ~100 us (the offsets ~10 %, vpdpbusd into the chain instead of a vpaddd ~8 %, two
// chains instead of one ~12 %; four were no better). The walk (offsets, entries, columns, branches) is most of one
// token's time and the same for every token, so the tokens share it: on the Intel host of docs/moe.md two take
// ~1.5x one token's time, three ~2x, four ~2.5x (there the vector work bounds a pass of four).
template <int kTokens>
QF_QMOE_AVX512 bool SelectGroupQ8_KAvx512(const View& v, int64_t r0, int64_t rows, int64_t first,
                                          const Q8_KActivations& a, std::vector<uint32_t>& offset_room,
                                          int32_t* lanes, int32_t* sums, float* y, int64_t y_stride) {
  const int64_t cols = v.cols, blocks = cols / kQ8_KBlockColumns;
  int64_t counts[kTileRows], total = 0;
  const uint32_t* offset = CheckedGroupOffsets(v, r0, rows, first, counts, &total, offset_room);
  if (offset == nullptr) return false;
  const uint8_t* entries = reinterpret_cast<const uint8_t*>(v.dict->entries.data());
  const int8_t* codes[kTokens];
  for (int t = 0; t < kTokens; ++t) codes[t] = TokensOf(a, t).codes;
  auto lanes_of = [&](int t, int64_t b, int64_t i) { return lanes + 16 * ((t * blocks + b) * kTileRows + i); };
  int64_t k = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t last = k + counts[i] - 1;
    int64_t c = 0, block_end = kQ8_KBlockColumns, b = 0;
    __m512i even[kTokens], odd[kTokens];
    for (int t = 0; t < kTokens; ++t) even[t] = odd[t] = _mm512_setzero_si512();
    // Word w of the group into acc (even or odd); false where a word before the last reaches the row's end.
    auto add_word = [&](int64_t w, __m512i* acc) QF_QMOE_AVX512 __attribute__((always_inline)) {
      _mm_prefetch(reinterpret_cast<const char*>(entries + offset[w + kPrefetchWords]), _MM_HINT_T0);
      const uint8_t* e = entries + offset[w];
      __mmask64 nonzero = LoadMask(e);
      const __mmask64 minus = LoadMask(e + 8);
      const int64_t length = e[15];
      if (c + length >= block_end) {  // the word reaches its block's end (1 word in ~10 at 88 % zeros)
        if (block_end == cols) return false;  // a word before the last reaches the row's end
        const __mmask64 low = _bzhi_u64(nonzero, static_cast<unsigned>(block_end - c));
        for (int t = 0; t < kTokens; ++t) {
          _mm512_storeu_si512(lanes_of(t, b, i),
                              AddSelected(_mm512_add_epi32(even[t], odd[t]), low, minus, codes[t] + c));
          even[t] = odd[t] = _mm512_setzero_si512();
        }
        ++b;
        block_end += kQ8_KBlockColumns;
        nonzero ^= low;
      }
      for (int t = 0; t < kTokens; ++t) acc[t] = AddSelected(acc[t], nonzero, minus, codes[t] + c);
      c += length;
      return true;
    };
    if constexpr (kTokens == 1) {
      for (; k + 1 < last; k += 2) {
        if (!add_word(k, even) || !add_word(k + 1, odd)) return false;
      }
      if (k < last) {
        if (!add_word(k, even)) return false;
        ++k;
      }
    } else {  // the tokens' chains are independent already
      for (; k < last; ++k) {
        if (!add_word(k, even)) return false;
      }
    }
    // The last word, cut at cols: it must start before cols and reach it, so in the last block (a word before
    // it ended inside that block or at its start).
    const uint8_t* e = entries + offset[k];
    ++k;
    const int64_t length = e[15];
    if (c >= cols || c + length < cols || block_end != cols) return false;
    const __mmask64 nonzero = _bzhi_u64(LoadMask(e), static_cast<unsigned>(cols - c));
    for (int t = 0; t < kTokens; ++t) {
      _mm512_storeu_si512(lanes_of(t, b, i),
                          AddSelected(_mm512_add_epi32(even[t], odd[t]), nonzero, LoadMask(e + 8), codes[t] + c));
    }
  }
  for (int t = 0; t < kTokens; ++t) {
    int32_t* token_sums = sums + t * kTileRows * blocks;
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i rows_lanes[kTileRows];
      for (int i = 0; i < kTileRows; ++i) rows_lanes[i] = _mm512_loadu_si512(lanes_of(t, b, i));
      _mm512_storeu_si512(token_sums + b * kTileRows, SumLanes16(rows_lanes));
    }
    AddBlockSumsAvx512(token_sums, rows, TokensOf(a, t), v.base + v.layout.scales_offset + 2 * r0, blocks,
                       y + t * y_stride + r0);
  }
  return true;
}

// A Q4_K tile block's codes from 256 trits, as ForEachTile's scalar loop packs them: trit + 1 (0..2) of column
// 64p + l in the low nibble of qs[32p + l], of column 64p + 32 + l in its high nibble. 32 bytes at a time, where
// the compiler's loop (SSE2: ForEachTile has no AVX target) was ~12 % of the tiles' time at 8 tokens.
QF_QMOE_AVX512 void PackQ4_KCodesAvx512(const int8_t* trits, uint8_t* qs) {
  const __m256i one = _mm256_set1_epi8(1);
  for (int p = 0; p < 4; ++p) {
    const __m256i low = _mm256_add_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(trits + 64 * p)), one);
    const __m256i high =
        _mm256_add_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(trits + 64 * p + 32)), one);
    // high < 4, so shifting its 16-bit lanes by 4 moves each byte's value into its own high nibble
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(qs + 32 * p), _mm256_or_si256(low, _mm256_slli_epi16(high, 4)));
  }
}

// SelectGroupQ8_KAvx512 for count (1..4) tokens.
template <class... Args>
QF_QMOE_AVX512 bool SelectGroupTokens(int64_t count, Args&&... args) {
  switch (count) {
    case 1: return SelectGroupQ8_KAvx512<1>(args...);
    case 2: return SelectGroupQ8_KAvx512<2>(args...);
    case 3: return SelectGroupQ8_KAvx512<3>(args...);
    default: return SelectGroupQ8_KAvx512<4>(args...);
  }
}

#pragma GCC diagnostic pop

// The AVX-512 decoder and dot run where the kernels run AVX-512 (an ISA pinned lower by SetIsa or QFORGE_ISA keeps
// them off) and the CPU has BW, VNNI and BMI2.
bool UseAvx512Decoder() {
  static const bool has = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("bmi2");
  return has && ActiveIsa() == Isa::kAvx512;
}

absl::Status CheckColumns(const View& v, int64_t multiple, const char* what) {
  if (v.cols % multiple == 0) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tensor '", v.w->name, "' (qmoe): ", v.cols, " columns have no ",
                                                 what, " form (a multiple of ", multiple, ")"));
}

}  // namespace

absl::Status ForEachTile(const Tensor& w, int64_t row_begin, int64_t row_end, WeightType tile_type, bool bitwise,
                         const std::function<absl::Status(const Tensor& tile, int64_t first_row)>& f) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  if (tile_type != WeightType::kQ8_0 && tile_type != WeightType::kQ4_K) {
    return absl::InvalidArgumentError(
        absl::StrCat("qmoe tiles are q8_0 or q4_k, not ", FormatName(WeightFormat::Of(tile_type))));
  }
  const bool q8_0 = tile_type == WeightType::kQ8_0;
  const int64_t block = q8_0 ? kQK8_0 : kQK_K;
  QF_RETURN_IF_ERROR(CheckColumns(v, block, q8_0 ? "Q8_0" : "Q4_K"));
  const int64_t cols = v.cols, blocks = cols / block;
  const size_t block_bytes = q8_0 ? sizeof(block_q8_0) : sizeof(block_q4_K);
  const bool simd = !bitwise && UseAvx512Decoder();
  // Every Q4_K sub-block's scale and min is 1.
  uint8_t unit_scales[kKScaleSize] = {};
  for (int j = 0; j < 8; ++j) PackScaleMinK4(j, 1, 1, unit_scales);
  RowGroup g;
  std::vector<uint8_t> tile(static_cast<size_t>(kTileRows * blocks) * block_bytes);
  return ForEachRowGroup(v, row_begin, row_end, [&](int64_t r0, int64_t rows, int64_t first) -> absl::Status {
    QF_RETURN_IF_ERROR(DecodeGroup(v, r0, rows, first, simd, g));
    for (int64_t i = 0; i < rows; ++i) {
      const int8_t* row = g.trits.data() + g.start[i];
      const uint16_t scale = LoadU16(v.base + v.layout.scales_offset + 2 * (r0 + i));
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* out = tile.data() + static_cast<size_t>(i * blocks + b) * block_bytes;
        const int8_t* t = row + b * block;
        if (q8_0) {
          auto& q = *reinterpret_cast<block_q8_0*>(out);
          q.d = scale;
          std::memcpy(q.qs, t, kQK8_0);
          continue;
        }
        // Sub-blocks 2p and 2p + 1 are the low and high nibbles of qs[32p, 32p + 32).
        auto& q = *reinterpret_cast<block_q4_K*>(out);
        q.d = q.dmin = scale;
        std::memcpy(q.scales, unit_scales, kKScaleSize);
        if (simd) {
          PackQ4_KCodesAvx512(t, q.qs);
          continue;
        }
        for (int p = 0; p < 4; ++p) {
          for (int l = 0; l < 32; ++l) {
            q.qs[32 * p + l] = static_cast<uint8_t>((t[64 * p + l] + 1) | (t[64 * p + 32 + l] + 1) << 4);
          }
        }
      }
    }
    const Tensor t = Tensor::View(w.name, {rows, cols}, WeightFormat::Of(tile_type), nullptr, tile.data(),
                                  static_cast<size_t>(rows * blocks) * block_bytes);
    return f(t, r0);
  });
}

absl::Status DotRowsQ8_K(const Tensor& w, int64_t row_begin, int64_t row_end, const Q8_KActivations& a, float* y,
                         int64_t y_stride, bool bitwise) {
  QF_RETURN_IF_ERROR(CheckRange(w, row_begin, row_end));
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  QF_RETURN_IF_ERROR(CheckColumns(v, kQ8_KBlockColumns, "Q8_K"));
  const int64_t cols = v.cols, blocks = cols / kQ8_KBlockColumns;
  auto dot_rows = [&](const int8_t* trits, int64_t r) {
    for (int64_t t = 0; t < a.tokens; ++t) {
      y[t * y_stride + r] = DotRowQ8_KScalar(trits, TokensOf(a, t), v.Scale(r), blocks);
    }
  };
  if (bitwise || !UseAvx512Decoder()) {
    std::vector<int8_t> trits(static_cast<size_t>(cols));
    return ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
      QF_RETURN_IF_ERROR(DecodeRowBitwise(v, r, first, trits.data()));
      dot_rows(trits.data(), r);
      return absl::OkStatus();
    });
  }
  // A group the AVX-512 paths refuse: the reference decoder names its fault (were there none, the reference dot
  // gives the same bits).
  auto reference_group = [&](int64_t r0, int64_t rows, int64_t first) -> absl::Status {
    RowGroup g;
    QF_RETURN_IF_ERROR(DecodeGroupBitwise(v, r0, rows, first, g));
    for (int64_t i = 0; i < rows; ++i) dot_rows(g.trits.data() + g.start[i], r0 + i);
    return absl::OkStatus();
  };
  constexpr int64_t kMostTokens = 4;  // tokens a pass at most (SelectGroupTokens)
  const int64_t pass_tokens = std::min(a.tokens, kMostTokens);
  std::vector<int32_t> sums(static_cast<size_t>(pass_tokens * kTileRows * blocks));
  // Every row's words select their activations by their masks; no trit is written. Until 2026-12-08 rows of one
  // block were decoded into trits + 1 and dotted instead: 5-10 % faster on the Zen 4 hosts of docs/moe.md, but
  // 2.1x slower on a Zen 5 one, whose profile put a third of the decoder's time after its branch on a word's
  // length (docs/moe.md).
  std::vector<int32_t> lanes(static_cast<size_t>(16 * pass_tokens * kTileRows * blocks));
  std::vector<uint32_t> offset_room;
  return ForEachRowGroup(v, row_begin, row_end, [&](int64_t r0, int64_t rows, int64_t first) -> absl::Status {
    // The tokens up to four at a time, each group's words (in L1 after the first pass) walked once per pass. Each
    // pass checks and looks up the words again: doing that once here, outside the selection, made one token ~5 %
    // slower (Intel, alternated 5 times), and MatMulRows never asks for more than one pass.
    for (int64_t t = 0; t < a.tokens; t += kMostTokens) {
      const int64_t count = std::min(a.tokens - t, kMostTokens);
      const bool done = SelectGroupTokens(count, v, r0, rows, first, TokensOf(a, t, count), offset_room,
                                          lanes.data(), sums.data(), y + t * y_stride, y_stride);
      if (!done) return reference_group(r0, rows, first);
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
