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
// The matmul never materialises a matrix: it decodes 16 rows at a time into tiles of a ggml type that holds
// them exactly, a few KiB that stay in L1, and runs that type's kernels on them. With fp32 activations the tiles
// are Q8_0 (d = the row's f16 scale, q = its trits as int8, so w = d * q). With int8 activations (kernels.h
// ActivationMode) they are Q4_K (q = trit + 1, every sub-block's scale and min 1, d = dmin = the row's scale, so
// w = d * q - dmin = d * trit), which takes ggml's Q8_K activations, one scale per 256 columns, as llama.cpp's
// ternary types do; many tokens (a prompt) run the Q4_K integer GEMM on them. One token (decode) or a few (several
// sequences served at once) compute the same integers without tiles (DotRowsQ8_K): each word's masks select and
// negate each token's activations where it stands (one masked load, one masked subtract, a vpdpbusd), so no trit
// is written, and the tokens share the walk over the words.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <functional>
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
  // What the kernels read, one 16-byte entry per word (one cache line fetch per codeword, not three): the mask
  // of non-zero positions, and the mask of -1 positions with the length in its top byte (where a mask of a
  // word's positions selects nothing: a kernel that picks activations by the first mask reads none there).
  struct Entry {
    uint64_t nonzero;
    uint64_t minus_and_length;
  };
  // Lookups land at random in this 1 MiB table: on 4 KiB pages nearly each one would miss the TLB as well.
  template <class T>
  struct HugePageAllocator {
    using value_type = T;
    HugePageAllocator() = default;
    template <class U>
    HugePageAllocator(const HugePageAllocator<U>&) {}
    T* allocate(size_t n);
    void deallocate(T* p, size_t) { std::free(p); }
    template <class U>
    bool operator==(const HugePageAllocator<U>&) const { return true; }
  };
  std::vector<Entry, HugePageAllocator<Entry>> entries;
  // The encoder's tree: child[3 * node + trit] (-1: none), word[node] (-1: an inner node); node 0 is the root.
  std::vector<int32_t> child;
  std::vector<int32_t> word;
};

// The dictionary of zero_code (0..255), built on first use and kept (thread-safe).
const Dictionary& DictionaryFor(int zero_code);

// The zero_code whose p0 is nearest to the measured fraction of zero trits.
int ZeroCodeFor(double zero_fraction);

// Encodes ternary codes [rows, cols] (0, 1, 2 for -1, 0, +1: the GPTQ / QIntGrid codes with zero 1) and one f16
// scale per row into a kQMoE tensor's bytes; the format carries the codeword count. The dictionary is that of
// zero_code, or with zero_code -1 the one for the codes' own zero fraction. A method gives all its tensors one
// zero_code: each dictionary the runtime reads is 1 MiB of lookups at random, so a model's experts should share
// one that stays in cache (a few per cent larger for a matrix whose zero fraction is off the code's).
// INVALID_ARGUMENT when cols exceeds kQmoeMaxCols, a code is above 2 or zero_code is outside -1..255.
struct Encoded {
  WeightFormat format;
  std::vector<uint8_t> bytes;
};
absl::StatusOr<Encoded> Encode(const uint8_t* codes, const uint16_t* row_scales, int64_t rows, int64_t cols,
                               int zero_code = -1);

// kernels::DequantizeRows for kQMoE (any row range). Here and below: DATA_LOSS, naming the tensor and row, when
// the header, the row counts and starts, a codeword or a row's decoded length is inconsistent: a corrupt file is
// refused, never read out of bounds.
absl::Status DequantizeRows(const Tensor& w, int64_t row_begin, int64_t row_end, float* out);

// The scalar reference of kernels::MatMulRows: each row decoded to floats, every token's products summed in
// double. Also the path for rows whose length is no multiple of 32 (no Q8_0 form).
absl::Status MatMulRowsReference(const Tensor& w, int64_t row_begin, int64_t row_end, const float* x, int64_t n,
                                 float* y, int64_t y_stride);

// Rows [row_begin, row_end) decoded into tiles of tile_type: f(tile, first_row) for each, tile a [rows, cols]
// tensor (valid only during the call) holding rows first_row.. of w exactly: kQ8_0 (cols a multiple of 32) or
// kQ4_K (a multiple of 256), as the header comment says. Tiles end at multiples of kTileRows, whatever the range,
// so a row's products do not depend on how the caller cut the rows. bitwise: the reference decoder (trit by
// trit); otherwise AVX-512 stores where the active ISA is AVX-512 and the CPU has BW, VNNI and BMI2 (the same
// bytes, qmoe_test). INVALID_ARGUMENT for another tile_type or cols of no multiple of its block.
inline constexpr int64_t kTileRows = 16;
absl::Status ForEachTile(const Tensor& w, int64_t row_begin, int64_t row_end, WeightType tile_type, bool bitwise,
                         const std::function<absl::Status(const Tensor& tile, int64_t first_row)>& f);

// Tokens' int8 activations in the kQ8_K layout of int_dot.h: per token cols codes, a scale per 256 columns and
// the exact sum of the codes of every 32; token t's three arrays start t * stride bytes after token 0's.
struct Q8_KActivations {
  const int8_t* codes;
  const float* scales;
  const int32_t* code_sums;
  int64_t tokens = 1;
  int64_t stride = 0;
};
// Decode, a few tokens: y[t * y_stride + r] for rows [row_begin, row_end), the bits of the Q4_K tiles' integer
// product (int_dot.h Q4_K with sc = m = 1): per 256-column block, with dw the row's scale, D = dw * dx, T2 the
// block's code sum and T1 = T2 + sum_c trit[c] * code[c], acc = fma(-D, float(T2), fma(D, float(T1), acc)). So a
// token's result is the same alone, with others, and batched through ForEachTile. The words are walked once for
// up to four tokens at a time (the walk is most of a token's cost), so kernels::MatMulRows sends up to
// kSelectTokens tokens here rather than through the tiles: at 5 the tiles were faster, at 4 this, on the Intel
// host of docs/moe.md. bitwise: the reference decoder and dot; otherwise AVX-512 where ForEachTile's are.
// INVALID_ARGUMENT when cols is not a multiple of 256.
inline constexpr int64_t kQ8_KBlockColumns = 256;
inline constexpr int64_t kSelectTokens = 4;
absl::Status DotRowsQ8_K(const Tensor& w, int64_t row_begin, int64_t row_end, const Q8_KActivations& a, float* y,
                         int64_t y_stride, bool bitwise);

// Builds (once per process) the dictionary w's header names, so that the first matmul does not pay for it
// (~30 ms); the runtime calls it when it loads a model. DATA_LOSS for a bad header.
absl::Status Prepare(const Tensor& w);

// Every row of w checked as MatMulRows checks them (files, the fuzzer).
absl::Status Validate(const Tensor& w);

}  // namespace qforge::kernels::qmoe
