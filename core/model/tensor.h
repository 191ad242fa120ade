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

// How a tensor's bytes encode its values. The byte layouts are documented in docs/formats.md and
// implemented (dequantize, dot products) in core/kernels.
enum class WeightType : uint8_t {
  kF32 = 0,
  kF16 = 1,
  kBF16 = 2,
  // ggml block layouts, bit-exact with block_q8_0 / block_q4_0 / block_q4_K.
  kQ8_0 = 3,   // 32 weights: f16 d, int8 qs[32]                       -> 34 bytes, w = d*q
  kQ4_0 = 4,   // 32 weights: f16 d, u8 qs[16] (j low nibble, j+16 high) -> 18 bytes, w = d*(q-8)
  kQ4_K = 5,   // 256 weights: f16 d, f16 dmin, u8 scales[12], u8 qs[128] -> 144 bytes
  // qforge grouped integers (RTN, later GPTQ/AWQ): planar layout, see QIntLayout below.
  kQInt = 6,
  // NormalFloat-4 (QLoRA), blockwise absmax, optionally double-quantized scales: see Nf4Layout.
  kNF4 = 7,
};

struct WeightFormat {
  WeightType type = WeightType::kF32;
  int bits = 0;               // kQInt: 2..8
  int group = 0;              // kQInt: elements per scale (0 = whole row, "per-channel"); kNF4: block size
  bool symmetric = true;      // kQInt: true -> zero point is the fixed 2^(bits-1)
  bool double_quant = false;  // kNF4: block absmax stored as int8 with fp32 scale per 256 blocks

  static WeightFormat F32() { return {}; }
  static WeightFormat F16() { return {WeightType::kF16}; }
  static WeightFormat BF16() { return {WeightType::kBF16}; }
  static WeightFormat Of(WeightType t) { return {t}; }
  static WeightFormat QInt(int bits, int group, bool symmetric) {
    return {WeightType::kQInt, bits, group, symmetric, false};
  }
  static WeightFormat NF4(int block, bool double_quant) { return {WeightType::kNF4, 4, block, true, double_quant}; }

  bool is_float() const {
    return type == WeightType::kF32 || type == WeightType::kF16 || type == WeightType::kBF16;
  }
  bool operator==(const WeightFormat&) const = default;
};

// "f32", "q4_k", "qint4_g128_sym", "qint3_pc_asym", "nf4_b64_dq" ...: stable, used in file metadata.
std::string FormatName(const WeightFormat& f);
absl::StatusOr<WeightFormat> ParseFormatName(const std::string& name);

// Bytes needed to encode a [rows, cols] matrix in `f`, or an error naming why `cols` does not fit
// the format's block structure (e.g. Q4_K needs cols % 256 == 0). Checks for overflow.
absl::StatusOr<size_t> EncodedBytes(const WeightFormat& f, int64_t rows, int64_t cols);

// kQInt planar layout for [rows, cols] with g = group (or cols when group == 0), G = cols/g groups per row:
//   codes : rows * cols * bits / 8 bytes; each row starts on a byte boundary (cols*bits % 8 == 0 is required),
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

// The byte sizes of an encoding's planes in storage order: qint stores codes | scales (| zeros), nf4 without
// double quantization codes | absmax, each plane row-major; every other encoding is one plane of row-major
// blocks. So a matrix cut into row slices is, plane by plane, its slices' parts of that plane in row order: the
// rule by which the scheduler assembles a tensor from its slices. nf4 with double quantization shares its
// second-level scales across rows; it is one plane here, and is never sliced.
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
