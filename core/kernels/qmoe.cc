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

#define QF_QMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

// Row r's trits into trits[0, cols) at 64 per store: a word's store is zero past its length in its masks, and
// the next word's store, which starts where this word ends, overwrites that, so stores in word order leave
// each position its own trit. The last word's store may reach 64 bytes past cols (slack the caller provides;
// a following row in the same buffer overwrites it the same way). false where the row is inconsistent: the
// caller asks the reference decoder for the message.
QF_QMOE_AVX512 bool DecodeRowAvx512(const View& v, int64_t r, int64_t first, int8_t* trits) {
  const int64_t count = v.Count(r), cols = v.cols;
  if (first + count > v.words) return false;
  const uint8_t* words = v.base + v.layout.words_offset + 2 * first;
  const Dictionary::Entry* entries = v.dict->entries.data();
  const int dictionary_words = v.dict->words;
  const __m512i one = _mm512_set1_epi8(1), minus_one = _mm512_set1_epi8(-1);
  int64_t c = 0;
  for (int64_t i = 0; i < count; ++i) {
    const uint16_t code = LoadU16(words + 2 * i);
    if (code >= dictionary_words || c >= cols) return false;
    // The length bits in the top byte of the +1 mask write +1 to trits c + 56.. c + 63: past this word's end,
    // so the next store or the slack takes them.
    const Dictionary::Entry e = entries[code];
    const __m512i plus = _mm512_maskz_mov_epi8(e.plus_and_length, one);
    _mm512_storeu_si512(trits + c, _mm512_mask_mov_epi8(plus, e.minus, minus_one));
    c += static_cast<int64_t>(e.plus_and_length >> 56);
  }
  return c >= cols;
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

// The same integers by vpdpbusd, whose first operand is unsigned: sum (t + 1) * a = sum t * a + sum a, and the
// activations carry each block's exact code sum. Eight blocks' lanes are summed together (integers: any order),
// then added to acc one block after another as the reference does.
QF_QMOE_AVX512 float DotRowQ8_0Avx512(const int8_t* trits, const int8_t* codes, const float* dx,
                                      const int32_t* code_sums, float dw, int64_t blocks) {
  const __m256i one = _mm256_set1_epi8(1), zero = _mm256_setzero_si256();
  float acc = 0;
  int64_t b = 0;
  for (; b + 8 <= blocks; b += 8) {
    __m256i v[8];
    for (int j = 0; j < 8; ++j) {
      const int64_t at = 32 * (b + j);
      const __m256i t1 = _mm256_add_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(trits + at)), one);
      v[j] = _mm256_dpbusd_epi32(zero, t1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + at)));
    }
    // hadd pairs lanes within 128-bit halves: after two rounds lane k of half h holds half h of block k's sum
    // (k = 0..3 from q03, 4..7 from q47); adding the halves finishes each block.
    const __m256i q03 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    const __m256i q47 = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    const __m128i s03 = _mm_add_epi32(_mm256_castsi256_si128(q03), _mm256_extracti128_si256(q03, 1));
    const __m128i s47 = _mm_add_epi32(_mm256_castsi256_si128(q47), _mm256_extracti128_si256(q47, 1));
    const __m256i sums = _mm256_sub_epi32(_mm256_set_m128i(s47, s03),
                                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(code_sums + b)));
    alignas(32) float scale[8], sum[8];
    _mm256_store_ps(scale, _mm256_mul_ps(_mm256_set1_ps(dw), _mm256_loadu_ps(dx + b)));
    _mm256_store_ps(sum, _mm256_cvtepi32_ps(sums));
    for (int j = 0; j < 8; ++j) acc = __builtin_fmaf(scale[j], sum[j], acc);
  }
  for (; b < blocks; ++b) {
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) sum += int32_t{trits[32 * b + j]} * codes[32 * b + j];
    acc = __builtin_fmaf(dw * dx[b], static_cast<float>(sum), acc);
  }
  return acc;
}

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
  std::vector<int8_t> trits(static_cast<size_t>(kTileRows * cols + 64));
  std::vector<block_q8_0> tile(static_cast<size_t>(kTileRows * blocks));
  int64_t tile_first = row_begin;
  // Hands the rows decoded so far, [tile_first, end), to f as one Q8_0 tensor.
  auto flush = [&](int64_t end) -> absl::Status {
    const int64_t rows = end - tile_first;
    if (rows == 0) return absl::OkStatus();
    const Tensor t = Tensor::View(w.name, {rows, cols}, WeightFormat::Of(WeightType::kQ8_0), nullptr,
                                  reinterpret_cast<const uint8_t*>(tile.data()),
                                  static_cast<size_t>(rows * blocks) * sizeof(block_q8_0));
    QF_RETURN_IF_ERROR(f(t, tile_first));
    tile_first = end;
    return absl::OkStatus();
  };
  QF_RETURN_IF_ERROR(ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
    // Tiles end on multiples of kTileRows, so a row's tile does not depend on the range asked for.
    if (r > tile_first && r % kTileRows == 0) QF_RETURN_IF_ERROR(flush(r));
    const int64_t i = r - tile_first;
    int8_t* row = trits.data() + i * cols;
    if (!simd || !DecodeRowAvx512(v, r, first, row)) QF_RETURN_IF_ERROR(DecodeRowBitwise(v, r, first, row));
    const uint16_t scale = LoadU16(v.base + v.layout.scales_offset + 2 * r);
    for (int64_t b = 0; b < blocks; ++b) {
      block_q8_0& q = tile[i * blocks + b];
      q.d = scale;
      std::memcpy(q.qs, row + b * kQ8_0TileColumns, kQ8_0TileColumns);
    }
    return absl::OkStatus();
  }));
  return flush(row_end);
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
  // kTileRows rows are decoded before any is read back: a load that spans several recent overlapping stores
  // cannot be forwarded from the store buffer and stalls until they reach the cache.
  std::vector<int8_t> trits(static_cast<size_t>(kTileRows * cols + 64));
  int64_t pending_first = row_begin;
  auto dot_pending = [&](int64_t end) {
    for (int64_t r = pending_first; r < end; ++r) {
      y[r] = DotRowQ8_0Avx512(trits.data() + (r - pending_first) * cols, a.codes, a.scales, a.code_sums,
                              v.Scale(r), blocks);
    }
    pending_first = end;
  };
  QF_RETURN_IF_ERROR(ForEachRow(v, row_begin, row_end, [&](int64_t r, int64_t first) {
    if (r - pending_first == kTileRows) dot_pending(r);
    int8_t* row = trits.data() + (r - pending_first) * cols;
    if (!DecodeRowAvx512(v, r, first, row)) return DecodeRowBitwise(v, r, first, row);  // names the fault
    return absl::OkStatus();
  }));
  dot_pending(row_end);
  return absl::OkStatus();
}

absl::Status Prepare(const Tensor& w) { return Open(w).status(); }

absl::Status Validate(const Tensor& w) {
  QF_ASSIGN_OR_RETURN(const View v, Open(w));
  return ForEachRow(v, 0, v.rows, [&](int64_t r, int64_t first) {
    return ForEachWord(v, r, first, [](int64_t, uint64_t, uint64_t) {});
  });
}

}  // namespace qforge::kernels::qmoe
