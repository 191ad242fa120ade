// The kQMoE encoding at run time (tensor.h QmoeLayout): QMoE's idea (Frantar & Alistarh 2023) that ternary
// experts are mostly zeros, so a dictionary of fixed-length 16-bit codewords for the most probable trit
// sequences stores them below one bit per weight and decodes by table lookup.
//
// The dictionary is not stored: it is Tunstall's variable-to-fixed code for independent trits with
// P(0) = p0 and P(+1) = P(-1) = (1 - p0) / 2, so the 8-bit zero_code in the header (p0 = (zero_code + 0.5) /
// 256) rebuilds it exactly. Tunstall's construction keeps a complete tree of trit strings and expands its most
// probable leaf (ties: the leaf made first) into three until one more expansion would pass 2^16 leaves; strings
// stop at 56 trits. Its 65,535 leaves are the codewords, numbered in the order they were made. Any trit
// sequence parses into leaves; a row's last word is completed with zeros, which the decoder cuts at cols.
//
// The matmul never materialises a row: each word's precomputed masks of non-zero and negative positions give
// the row's +1 and -1 columns, and a token's output is s_r * (sum of x over the +1 columns - sum over the -1
// columns), summed in the same order for every batch (batch-invariant).
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model/tensor.h"

namespace qforge::kernels::qmoe {

inline constexpr uint32_t kMagic = 0x456f4d51;  // "QMoE" little-endian
inline constexpr uint8_t kVersion = 1;
inline constexpr int kMaxWordTrits = 56;  // so a word's length fits the top byte of its packed entry
inline constexpr int kMaxWords = 65535;

// Trits as the dictionary numbers them.
enum Trit : uint8_t { kZero = 0, kPlus = 1, kMinus = 2 };

struct Dictionary {
  int zero_code = 0;
  int words = 0;                  // codewords in use: indices >= words never occur in a valid tensor
  std::vector<uint8_t> length;    // [words] trits of each word, 1..56
  std::vector<uint64_t> nonzero;  // [words] bit i: trit i of the word is +1 or -1
  std::vector<uint64_t> negative; // [words] bit i: trit i is -1
  // What the kernels read, one 16-byte entry per word (one cache line fetch per codeword, not three): the
  // non-zero mask, and the negative mask with the length in its top byte.
  struct Entry {
    uint64_t nonzero;
    uint64_t negative_and_length;
  };
  std::vector<Entry> entries;
  // The encoder's tree: child[3 * node + trit] (-1: none), word[node] (-1: an inner node); node 0 is the root.
  std::vector<int32_t> child;
  std::vector<int32_t> word;
};

// The dictionary of zero_code (0..255), built on first use and kept (thread-safe).
const Dictionary& DictionaryFor(int zero_code);

// The zero_code whose p0 is nearest to the measured fraction of zero trits.
int ZeroCodeFor(double zero_fraction);

// Encodes ternary codes [rows, cols] (0, 1, 2 for -1, 0, +1: the GPTQ / QIntGrid codes with zero 1) and one f16
// scale per row into a kQMoE tensor's bytes; the format carries the codeword count. The dictionary is the one
// for the codes' own zero fraction. INVALID_ARGUMENT when cols exceeds kQmoeMaxCols or a code is above 2.
struct Encoded {
  WeightFormat format;
  std::vector<uint8_t> bytes;
};
absl::StatusOr<Encoded> Encode(const uint8_t* codes, const uint16_t* row_scales, int64_t rows, int64_t cols);

// kernels::DequantizeRows / MatMulRows for kQMoE (any row range; the runtime calls MatMulRows per chunk of
// rows). DATA_LOSS, naming the tensor and row, when the header, the row counts and starts, a codeword or a row's
// decoded length is inconsistent: a corrupt file is refused, never read out of bounds.
absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out);
// use_reference: decode each row to floats and sum every token's products in double (the scalar reference);
// otherwise the fused sparse sums of the header comment.
absl::Status MatMulRows(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n, float* y,
                        int64_t y_stride, bool use_reference);

// Builds (once per process) the dictionary w's header names, so that the first matmul does not pay for it
// (~30 ms); the runtime calls it when it loads a model. DATA_LOSS for a bad header.
absl::Status Prepare(const Tensor& w);

// Every row of w checked as MatMulRows checks them (files, the fuzzer).
absl::Status Validate(const Tensor& w);

}  // namespace qforge::kernels::qmoe
