#include "core/calib/stats_codec.h"

#include <bit>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace qforge::calib {
namespace {

constexpr char kMagic[8] = {'Q', 'F', 'L', 'S', 'T', 'A', 'T', '1'};
constexpr char kMagicPooled[8] = {'Q', 'F', 'L', 'S', 'T', 'A', 'T', '2'};
constexpr uint64_t kHeader = sizeof(kMagic) + 2 * sizeof(int64_t);

static_assert(std::endian::native == std::endian::little, "the stats codec writes the host's fp64 as little-endian");

}  // namespace

uint64_t EncodedLayerStatsBytes(int64_t cols) {
  const uint64_t c = static_cast<uint64_t>(cols);
  return kHeader + sizeof(double) * (c * c + 2 * c);
}

uint64_t EncodedPooledLayerStatsBytes(int64_t cols) { return EncodedLayerStatsBytes(cols) + sizeof(int64_t); }

absl::StatusOr<std::string> EncodeLayerStats(const LayerStats& s) {
  const size_t c = static_cast<size_t>(s.cols);
  if (s.cols <= 0 || s.hessian.size() != c * c || s.mean_abs.size() != c || s.max_abs.size() != c) {
    return absl::InvalidArgumentError(absl::StrCat("layer stats: cols ", s.cols, " but hessian ", s.hessian.size(),
                                                   ", mean_abs ", s.mean_abs.size(), ", max_abs ", s.max_abs.size()));
  }
  const bool pooled = s.pooled_tokens != 0;
  std::string out;
  out.reserve(EncodedLayerStatsBytes(s.cols) + (pooled ? sizeof(int64_t) : 0));
  out.append(pooled ? kMagicPooled : kMagic, sizeof(kMagic));
  out.append(reinterpret_cast<const char*>(&s.cols), sizeof(int64_t));
  out.append(reinterpret_cast<const char*>(&s.tokens), sizeof(int64_t));
  if (pooled) out.append(reinterpret_cast<const char*>(&s.pooled_tokens), sizeof(int64_t));
  for (const std::vector<double>* v : {&s.hessian, &s.mean_abs, &s.max_abs}) {
    out.append(reinterpret_cast<const char*>(v->data()), v->size() * sizeof(double));
  }
  return out;
}

absl::StatusOr<LayerStats> DecodeLayerStats(std::span<const uint8_t> bytes, const std::string& what) {
  const bool v1 = bytes.size() >= kHeader && std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) == 0;
  const bool v2 = bytes.size() >= kHeader + sizeof(int64_t) &&
                  std::memcmp(bytes.data(), kMagicPooled, sizeof(kMagicPooled)) == 0;
  if (!v1 && !v2) {
    return absl::DataLossError(absl::StrCat(what, ": not serialized layer statistics (", bytes.size(), " bytes)"));
  }
  LayerStats s;
  std::memcpy(&s.cols, bytes.data() + sizeof(kMagic), sizeof(int64_t));
  std::memcpy(&s.tokens, bytes.data() + sizeof(kMagic) + sizeof(int64_t), sizeof(int64_t));
  const uint64_t header = v2 ? kHeader + sizeof(int64_t) : kHeader;
  if (v2) std::memcpy(&s.pooled_tokens, bytes.data() + kHeader, sizeof(int64_t));
  // cols is bounded before squaring so a hostile header cannot overflow the size check.
  if (s.cols <= 0 || s.cols > (int64_t{1} << 20) || s.tokens < 0 || s.pooled_tokens < 0 ||
      s.pooled_tokens > s.tokens || bytes.size() != EncodedLayerStatsBytes(s.cols) + (header - kHeader)) {
    return absl::DataLossError(absl::StrCat(what, ": layer statistics of ", s.cols, " inputs, ", s.tokens,
                                            " tokens (", s.pooled_tokens, " pooled) do not fit ", bytes.size(),
                                            " bytes"));
  }
  const size_t c = static_cast<size_t>(s.cols);
  const uint8_t* p = bytes.data() + header;
  for (auto [v, n] : {std::pair{&s.hessian, c * c}, std::pair{&s.mean_abs, c}, std::pair{&s.max_abs, c}}) {
    v->resize(n);
    std::memcpy(v->data(), p, n * sizeof(double));
    p += n * sizeof(double);
  }
  return s;
}

}  // namespace qforge::calib
