// The QMoE codec's reader on arbitrary bytes. The first 4 bytes give the shape (byte 0: rows 1..128, bytes 1-2:
// cols 1 + byte 1 + 256 * (byte 2 % 4), so 1..1024; byte 3 spare), the rest is the tensor. Oracles: whatever
// decodes, decodes to {-s, 0, +s} per row and agrees with the fused matmul on x = 1 (both read the same words),
// and on rows of a multiple of 256 columns the few-token int8 dot (six tokens) gives the bits of its reference
// (any NaN for a NaN); anything else is DATA_LOSS or INVALID_ARGUMENT, the same from every reader, never a crash.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "core/kernels/int_dot.h"
#include "core/kernels/kernels.h"
#include "core/kernels/qmoe.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 4) return 0;
  const int64_t rows = 1 + data[0] % 128, cols = 1 + data[1] + 256 * (data[2] % 4);
  const std::vector<uint8_t> bytes(data + 4, data + size);
  const qforge::QmoeLayout l = qforge::GetQmoeLayout(qforge::WeightFormat::QMoE(0), rows, cols).value();
  if (bytes.size() < l.words_offset || (bytes.size() - l.words_offset) % 2 != 0) return 0;
  const auto words = static_cast<int64_t>((bytes.size() - l.words_offset) / 2);
  if (words > rows * cols) return 0;
  const qforge::Tensor t =
      qforge::Tensor::FromBytes("fuzz", {rows, cols}, qforge::WeightFormat::QMoE(words), bytes);
  std::vector<float> w(static_cast<size_t>(rows * cols));
  const absl::Status s = qforge::kernels::qmoe::DequantizeRows(t, 0, rows, w.data());
  if (s.ok() != qforge::kernels::qmoe::Validate(t).ok()) std::abort();
  if (cols % qforge::kernels::qmoe::kQ8_KBlockColumns == 0) {
    // Six tokens (a pass of four and one of two through the AVX-512 selection), each row laid out as
    // PrepareInput lays them out (GetActRowLayout).
    constexpr int64_t kTokens = 6;
    const int64_t blocks = cols / 256;
    const qforge::kernels::internal::ActRowLayout l =
        qforge::kernels::internal::GetActRowLayout(qforge::kernels::internal::ActType::kQ8_K, cols);
    std::vector<uint8_t> act(kTokens * l.bytes);
    for (int64_t t = 0; t < kTokens; ++t) {
      uint8_t* row = act.data() + t * l.bytes;
      auto* codes = reinterpret_cast<int8_t*>(row + l.codes);
      auto* scales = reinterpret_cast<float*>(row + l.scales);
      auto* sums = reinterpret_cast<int32_t*>(row + l.sums);
      for (int64_t b = 0; b < blocks; ++b) scales[b] = 0.5f + 0.25f * static_cast<float>(t);
      for (int64_t c = 0; c < cols / 32; ++c) sums[c] = 0;
      for (int64_t c = 0; c < cols; ++c) {
        codes[c] = static_cast<int8_t>((c + 41 * t) % 255 - 127);
        sums[c / 32] += codes[c];
      }
    }
    const qforge::kernels::qmoe::Q8_KActivations a{reinterpret_cast<const int8_t*>(act.data() + l.codes),
                                                   reinterpret_cast<const float*>(act.data() + l.scales),
                                                   reinterpret_cast<const int32_t*>(act.data() + l.sums), kTokens,
                                                   static_cast<int64_t>(l.bytes)};
    std::vector<float> y_simd(static_cast<size_t>(kTokens * rows)), y_ref(static_cast<size_t>(kTokens * rows));
    const absl::Status simd = qforge::kernels::qmoe::DotRowsQ8_K(t, 0, rows, a, y_simd.data(), rows, false);
    const absl::Status ref = qforge::kernels::qmoe::DotRowsQ8_K(t, 0, rows, a, y_ref.data(), rows, true);
    if (simd.code() != s.code() || ref.code() != s.code()) std::abort();
    for (int64_t r = 0; s.ok() && r < kTokens * rows; ++r) {  // the same bits, but a NaN scale's payload may differ
      if (std::isnan(y_simd[r]) && std::isnan(y_ref[r])) continue;
      if (std::memcmp(&y_simd[r], &y_ref[r], sizeof(float)) != 0) std::abort();
    }
  }
  if (!s.ok()) {
    if (s.code() != absl::StatusCode::kDataLoss && s.code() != absl::StatusCode::kInvalidArgument) std::abort();
    return 0;
  }
  std::vector<float> ones(static_cast<size_t>(cols), 1.0f), y(static_cast<size_t>(rows));
  if (!qforge::kernels::MatMulRows(t, 0, rows, ones.data(), 1, y.data(), rows).ok()) std::abort();
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    float s_r = 0;
    for (int64_t c = 0; c < cols; ++c) {
      const float v = w[r * cols + c];
      if (v != 0 && s_r != 0 && std::fabs(v) != s_r && !std::isnan(v)) std::abort();
      if (v != 0) s_r = std::fabs(v);
      sum += v;
    }
    if (std::isfinite(sum) && std::fabs(sum - y[r]) > 1e-3 * (1 + std::fabs(sum))) std::abort();
  }
  return 0;
}
