// Tensors and their encodings. A weight matrix is row-major [rows, cols]: `cols` is the contiguous,
// input dimension (ggml's ne[0]), and every quantized encoding groups elements along a row.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qforge {

// How a tensor's bytes encode its values. The byte layouts are documented in docs/encodings.md and
// implemented (dequantize, dot products) in core/kernels.
enum class WeightType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  // ggml block layouts, bit-exact with ggml's block_* structs. Their shapes (ggml type id, name, elements and
  // bytes per block) are rows of one table, core/model/ggml_types.h; their decoders rows of another,
  // core/kernels/ggml_kernels.h; docs/encodings.md has every byte layout.
  kQ8_0 = 3,   // 32 weights: f16 d, int8 qs[32]                       -> 34 bytes, w = d*q
  kQ4_0 = 4,   // 32 weights: f16 d, u8 qs[16] (j low nibble, j+16 high) -> 18 bytes, w = d*(q-8)
  kQ4_K = 5,   // 256 weights: f16 d, f16 dmin, u8 scales[12], u8 qs[128] -> 144 bytes
  // qforge grouped integers (RTN, later GPTQ/AWQ): planar layout, see QIntLayout below.
  kQInt = 6,
  // NormalFloat-4 (QLoRA), blockwise absmax, optionally double-quantized scales: see Nf4Layout.
  kNF4 = 7,
  // SmoothQuant W8A8: int8 codes per element and one f32 scale per output row, planar, see W8A8Layout. The
  // matmul quantizes activations to int8 per token and multiplies in integers (core/kernels).
  kW8A8 = 8,
  // SpQR (Dettmers et al. 2023): grouped low-bit codes with 3-bit quantized group statistics plus a CSR matrix
  // of fp16 outliers added at run time, see SpqrLayout.
  kSpQR = 9,
  // QuIP (Chee et al. 2023): a kQInt payload of the incoherence-processed W' = U (W diag(1/c)) Vᵀ with seeded
  // random orthogonal U, V (Kronecker products of two factors each, core/kernels/orthogonal.h), see QuipLayout.
  // U mixes every output row, so rows are not independent: never row-sliced, no row view.
  kQuip = 10,
  // More ggml block layouts (read, run and written; quantized by llama.cpp, not yet by qforge).
  kQ4_1 = 11,     // 32 weights, 20 bytes: w = d*q + m
  kQ5_0 = 12,     // 32 weights, 22 bytes: w = d*(q-16), 5-bit q
  kQ5_1 = 13,     // 32 weights, 24 bytes: w = d*q + m, 5-bit q
  kQ2_K = 14,     // 256 weights, 84 bytes: 16 sub-blocks of 16, 4-bit scales and mins, 2-bit q
  kQ3_K = 15,     // 256 weights, 110 bytes: 16 sub-blocks of 16, 6-bit scales, 3-bit q
  kQ5_K = 16,     // 256 weights, 176 bytes: Q4_K plus a fifth bit
  kQ6_K = 17,     // 256 weights, 210 bytes: 16 sub-blocks of 16, int8 scales, 6-bit q
  kIQ4_NL = 18,   // 32 weights, 18 bytes: w = d*kvalues_iq4nl[q]
  kIQ4_XS = 19,   // 256 weights, 136 bytes: IQ4_NL values, 6-bit scales per 32
  kTQ1_0 = 20,    // 256 weights, 54 bytes: ternary, five trits a byte
  kTQ2_0 = 21,    // 256 weights, 66 bytes: ternary, two bits each
  kIQ2_XXS = 22,  // 256 weights, 66 bytes: grid points of 8 weights (core/kernels/iq_grids.h)
  kIQ2_XS = 23,   // 256 weights, 74 bytes
  kIQ2_S = 24,    // 256 weights, 82 bytes
  kIQ3_XXS = 25,  // 256 weights, 98 bytes
  kIQ3_S = 26,    // 256 weights, 110 bytes
  kIQ1_S = 27,    // 256 weights, 50 bytes
  kIQ1_M = 28,    // 256 weights, 56 bytes
  kMXFP4 = 29,    // 32 weights, 17 bytes: E8M0 scale, FP4 (E2M1) values (OCP microscaling)
  // QMoE's sub-1-bit idea (Frantar & Alistarh 2023): ternary rows {-s, 0, +s} entropy-coded as fixed-length
  // 16-bit codewords of a dictionary of the most probable trit sequences, decoded by table lookup inside the
  // matmul; see QmoeLayout and core/kernels/qmoe.h.
  kQMoE = 30,
  // BiLLM (Huang et al. 2024): binarised weights, Hessian-salient columns with a second (residual) binary
  // basis, the other weights split at a break point into two magnitudes; 2-bit codes into per-row codebooks,
  // see BillmLayout.
  kBiLLM = 31,
};

struct WeightFormat {
  WeightType type = WeightType::kF32;
  int bits = 0;               // kQInt: 2..8
  int group = 0;              // kQInt: elements per scale (0 = whole row, "per-channel"); kNF4: block size
  bool symmetric = true;      // kQInt: true -> zero point is the fixed 2^(bits-1)
  bool double_quant = false;  // kNF4: block absmax stored as int8 with fp32 scale per 256 blocks
  // kSpQR: number of stored outliers. Data-dependent, so it is part of the format (and of FormatName): a stored
  // tensor stays self-describing and EncodedBytes a function of (format, shape).
  int64_t outliers = 0;
  // kQMoE: number of stored codewords, data-dependent like outliers (FormatName "qmoe_c1234").
  int64_t codewords = 0;

  static WeightFormat F32() { return {}; }
  static WeightFormat F16() { return {WeightType::kF16}; }
  static WeightFormat BF16() { return {WeightType::kBF16}; }
  static WeightFormat Of(WeightType t) { return {t}; }
  static WeightFormat QInt(int bits, int group, bool symmetric) {
    return {WeightType::kQInt, bits, group, symmetric, false};
  }
  static WeightFormat NF4(int block, bool double_quant) { return {WeightType::kNF4, 4, block, true, double_quant}; }
  // bits / group / symmetric are those of the kQInt payload.
  static WeightFormat Quip(int bits, int group, bool symmetric) {
    return {WeightType::kQuip, bits, group, symmetric, false};
  }
  static WeightFormat SpQR(int bits, int group, int64_t outliers) {
    return {WeightType::kSpQR, bits, group, false, false, outliers};
  }
  static WeightFormat QMoE(int64_t codewords) { return {WeightType::kQMoE, 0, 0, true, false, 0, codewords}; }

  bool is_float() const {
    return type == WeightType::kF32 || type == WeightType::kF16 || type == WeightType::kBF16;
  }
  bool operator==(const WeightFormat&) const = default;
};

// "f32", "q4_k", "qint4_g128_sym", "qint3_pc_asym", "nf4_b64_dq", "spqr3_g16_o1234" ...: stable, used in file
// metadata.
std::string FormatName(const WeightFormat& f);
absl::StatusOr<WeightFormat> ParseFormatName(const std::string& name);

// Bytes needed to encode a [rows, cols] matrix in `f`, or an error naming why `cols` does not fit
// the format's block structure (e.g. Q4_K needs cols % 256 == 0). Checks for overflow.
absl::StatusOr<size_t> EncodedBytes(const WeightFormat& f, int64_t rows, int64_t cols);

// kQInt planar layout for [rows, cols] with g = group (or cols when group == 0), G = cols/g groups per row:
//   codes : rows * ceil(cols * bits / 8) bytes; each row starts on a byte boundary (a row's last byte is padded
//           with zero bits when cols * bits is not a multiple of 8),
//           codes packed LSB-first as a bit stream (element c of a row occupies bits [c*bits, (c+1)*bits)).
//   scales: rows * G little-endian f16, row-major.
//   zeros : (asymmetric only) rows * G u8.
//   w = scale * (code - zero), zero = 2^(bits-1) when symmetric.
struct QIntLayout {
  int64_t group;         // effective group size
  int64_t groups_per_row;
  size_t row_code_bytes;
  size_t codes_offset, scales_offset, zeros_offset, total_bytes;
};
absl::StatusOr<QIntLayout> GetQIntLayout(const WeightFormat& f, int64_t rows, int64_t cols);

// kNF4 layout for n = rows*cols elements, block size B (cols % B == 0), nb = n / B blocks:
//   codes   : n / 2 bytes, element 2i in the low nibble of byte i, 2i+1 in the high nibble;
//             code k means NF4 level kNf4Levels[k].
//   absmax  : without double quant nb f32; with double quant nb int8 q_b, then
//   dq_scale: ceil(nb/256) f32, then dq_offset: one f32;  absmax_b = dq_scale[b/256] * q_b + dq_offset.
//   w = absmax_b * kNf4Levels[code].
struct Nf4Layout {
  int64_t block;
  int64_t blocks;
  int64_t dq_groups;  // 0 without double quant
  size_t codes_offset, absmax_offset, dq_scale_offset, dq_offset_offset, total_bytes;
};
absl::StatusOr<Nf4Layout> GetNf4Layout(const WeightFormat& f, int64_t rows, int64_t cols);
inline constexpr int kNf4DoubleQuantGroup = 256;
// The 16 NF4 levels of QLoRA (Dettmers et al. 2023, appendix E), ascending, in [-1, 1].
extern const float kNf4Levels[16];

// kW8A8 planar layout for [rows, cols] (cols <= kW8A8MaxCols):
//   codes : rows * cols int8, row-major (the quantizer writes [-127, 127]; the kernels also accept -128);
//   scales: rows little-endian f32, one per output channel.
//   w = scale_r * code. The matmul quantizes each token x per token, s_x = max|x| / 127,
//   q = round-half-even(x / s_x) clamped to +-127, and computes y = s_x * s_w * sum(q_w * q_x) in int32.
struct W8A8Layout {
  size_t codes_offset, scales_offset, total_bytes;
};
// Bounds |sum q_w q_x| <= 128 * 127 * cols below 2^31, so the int32 accumulators cannot overflow.
inline constexpr int64_t kW8A8MaxCols = int64_t{1} << 17;
absl::StatusOr<W8A8Layout> GetW8A8Layout(const WeightFormat& f, int64_t rows, int64_t cols);

// kSpQR layout for [rows, cols], b = bits (2..4), g = group (β1, cols % g == 0, cols*b % 8 == 0), G = cols/g
// first-level groups per row, B = ceil(rows / 16) second-level row blocks, nnz = format.outliers:
//   codes      : rows * cols * b / 8 bytes, row-major, each row on a byte boundary, LSB-first bit stream exactly as
//                kQInt (element c of a row occupies bits [c*b, (c+1)*b) of the row's bytes).
//   scale_codes: ceil(rows * G * 3 / 8) bytes: the 3-bit code of first-level scale (r, k) at bits
//                [(r*G + k)*3, +3) of the plane (LSB-first, one bit stream for the whole plane).
//   zero_codes : the same for the first-level zeros.
//   second     : B * G * 4 little-endian f16, entry (rb, k) = {scale_s, zero_s, scale_z, zero_z}: the 3-bit
//                grids of the first-level scales and zeros of rows [16*rb, 16*rb + 16) in group column k.
//   row_ptr    : rows + 1 little-endian u32, CSR row pointers into the outlier arrays (row_ptr[rows] = nnz).
//   col_index  : nnz little-endian u16 when cols <= 65536, else u32; ascending within a row.
//   values     : nnz little-endian f16.
// Decoding (float arithmetic, in this order; the kernels and the quantizer share it, core/kernels/spqr.h):
//   s = scale_s * (scale_code - zero_s),  z = scale_z * (zero_code - zero_z),  w[r,c] = s * (code - z),
//   plus value[p] for every outlier p of row r with col_index[p] == c (the outliers add to the dense part).
struct SpqrLayout {
  int64_t group;           // β1
  int64_t groups_per_row;  // G
  int64_t row_blocks;      // B
  int index_bytes;         // 2 or 4
  size_t row_code_bytes;
  size_t codes_offset, scale_codes_offset, zero_codes_offset, second_offset, row_ptr_offset, col_index_offset,
      values_offset, total_bytes;
};
inline constexpr int kSpqrStatBits = 3;     // bits of every first-level scale and zero
inline constexpr int kSpqrStatGroup = 16;   // β2: rows sharing one second-level (scale, zero) pair
absl::StatusOr<SpqrLayout> GetSpqrLayout(const WeightFormat& f, int64_t rows, int64_t cols);

// kQuip layout for [rows, cols] (all little-endian):
//   header (32 bytes): u64 seed | u32 a_out | u32 b_out | u32 a_in | u32 b_in | u32 qk_heads | u32 reserved (0)
//   col_scales: cols f16 at offset 32 (c, the per-input-channel rescaling; all 1 when not rescaled)
//   payload   : from offset round_up(32 + 2*cols, 32), a kQInt [rows, cols] tensor (bits, group, symmetric of
//               the format) holding W'.
//   U = A_out ⊗ B_out (a_out*b_out = rows), V = A_in ⊗ B_in (a_in*b_in = cols), each factor a Haar-random
//   orthogonal matrix regenerated from `seed` (kernels::MakeKroneckerOrthogonal(a, b, seed, side 0 / 1)).
//   W = P Uᵀ W' V diag(c), so y = W x = P Uᵀ (W' (V (c ⊙ x))). P is the identity when qk_heads == 0, else the
//   canonical -> HF rotate-half row order of a q/k matrix with qk_heads heads (set by the safetensors writer,
//   undone by its reader): output row h*hd + j*hd/2 + i is row h*hd + 2i + j of Uᵀ W' V diag(c).
struct QuipLayout {
  static constexpr size_t kHeaderBytes = 32;
  static constexpr size_t kSeedOffset = 0, kFactorsOffset = 8, kQkHeadsOffset = 24, kReservedOffset = 28;
  size_t col_scales_offset, payload_offset, total_bytes;
  WeightFormat payload;  // the kQInt format of W'
  QIntLayout qint;       // its layout, offsets relative to payload_offset
};
absl::StatusOr<QuipLayout> GetQuipLayout(const WeightFormat& f, int64_t rows, int64_t cols);

// kQMoE layout for [rows, cols] with N = f.codewords (all little-endian):
//   header (8 bytes): u32 magic "QMoE" | u8 version (1) | u8 zero_code | u16 reserved (0)
//   scales : rows f16 at offset 8, s_r of row r
//   counts : rows u16, the number of codewords of row r
//   starts : ceil(rows / 64) u32, the index of the first codeword of rows 64 g, 64 g + 1, ...
//   words  : N u16, every row's codewords one row after another
//   Row r is the concatenation of its words' trit strings (a word of the dictionary built for zero_code,
//   core/kernels/qmoe.h), cut at cols: w[r, c] = s_r * trit_c, trit in {-1, 0, +1}.
struct QmoeLayout {
  static constexpr size_t kHeaderBytes = 8;
  static constexpr int64_t kRowGroup = 64;
  size_t scales_offset, counts_offset, starts_offset, words_offset, total_bytes;
  int64_t row_groups;
};
inline constexpr int64_t kQmoeMaxCols = 65535;  // a row's codeword count is a u16 and a word holds >= 1 trit
absl::StatusOr<QmoeLayout> GetQmoeLayout(const WeightFormat& f, int64_t rows, int64_t cols);

// kBiLLM layout for [rows, cols] (all little-endian), planar:
//   codebooks: rows x 8 f16: row r's values for codes 0..3 of its ordinary columns, then of its salient ones
//   salient  : ceil(cols / 8) bytes, bit c % 8 of byte c / 8 set when column c is salient (shared by every row)
//   codes    : rows x ceil(cols / 4) bytes, column c's 2-bit code at bits 2 (c % 4) of byte c / 4
//   w[r, c] = codebook[r][salient(c) ? 4 + code : code]. BiLLM's values are {-a_s, -a_c, a_c, a_s} for the
//   ordinary columns and {-(a1 + a2), -(a1 - a2), a1 - a2, a1 + a2} for the salient ones, but any eight values
//   decode. The salient map is shared by the rows: never row-sliced.
struct BillmLayout {
  size_t codebooks_offset, salient_offset, codes_offset, total_bytes;
  size_t row_code_bytes;
};
absl::StatusOr<BillmLayout> GetBillmLayout(const WeightFormat& f, int64_t rows, int64_t cols);

// The byte sizes of an encoding's planes in storage order: qint stores codes | scales (| zeros), nf4 without
// double quantization codes | absmax, w8a8 codes | scales, each plane row-major; every other encoding is one
// plane of row-major blocks. So a matrix cut into row slices is, plane by plane, its slices' parts of that
// plane in row order: the rule by which the scheduler assembles a tensor from its slices. nf4 with double
// quantization shares its second-level scales across rows, quip's rotation mixes all rows, qmoe's rows have
// variable length and billm's share a salient-column map; each is one plane here, and is never sliced.
absl::StatusOr<std::vector<size_t>> PlaneSizes(const WeightFormat& f, int64_t rows, int64_t cols);

// A named n-dimensional tensor whose bytes live in `owner` (a mapped file or a heap buffer).
// Shape is outermost first: a weight matrix is {rows, cols}. Vectors are {n}.
struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  WeightFormat format;
  std::shared_ptr<const void> owner;  // keeps `data` alive
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  int64_t numel() const;
  int64_t rows() const;  // product of all but the last dimension (1 for a vector)
  int64_t cols() const;  // last dimension
  std::span<const uint8_t> bytes() const { return {data, nbytes}; }

  // A tensor that owns a copy of `bytes` (or adopts the moved vector).
  static Tensor FromBytes(std::string name, std::vector<int64_t> shape, WeightFormat format,
                          std::vector<uint8_t> bytes);
  static Tensor FromFloats(std::string name, std::vector<int64_t> shape, std::span<const float> values);
  // A view into memory kept alive by `owner`.
  static Tensor View(std::string name, std::vector<int64_t> shape, WeightFormat format,
                     std::shared_ptr<const void> owner, const uint8_t* data, size_t nbytes);
};

// Checks that shape has no negative dims, numel does not overflow, and nbytes == EncodedBytes.
absl::Status ValidateTensor(const Tensor& t);

}  // namespace qforge
