#include "core/calib/activations_codec.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "core/base/half.h"

namespace qforge::calib {
namespace {

constexpr char kMagic[8] = {'Q', 'F', 'A', 'C', 'T', 'S', '0', '1'};
constexpr size_t kHeaderBytes = sizeof(kMagic) + 4 + 8 + 8;

size_t ValueBytes(ActivationFormat f) { return f == ActivationFormat::kF32 ? 4 : 2; }

bool KnownFormat(uint32_t f) { return f <= static_cast<uint32_t>(ActivationFormat::kBF16); }

// The value `v` becomes when stored in `f`.
float Rounded(float v, ActivationFormat f) {
  switch (f) {
    case ActivationFormat::kF16: return HalfToFloat(FloatToHalf(v));
    case ActivationFormat::kBF16: return Bf16ToFloat(FloatToBf16(v));
    case ActivationFormat::kF32: break;
  }
  return v;
}

template <typename T>
void Append(std::string& out, T v) {
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

template <typename T>
T Read(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

absl::Status CheckShape(const BlockActivations& a) {
  if (a.dim <= 0) return absl::InvalidArgumentError(absl::StrCat("activations: dim ", a.dim));
  int64_t tokens = 0;
  for (int32_t w : a.windows) {
    if (w < 1) return absl::InvalidArgumentError(absl::StrCat("activations: a window of ", w, " tokens"));
    tokens += w;
  }
  if (a.windows.empty() || static_cast<int64_t>(a.values.size()) != tokens * a.dim) {
    return absl::InvalidArgumentError(absl::StrCat("activations: ", a.windows.size(), " windows of ", tokens,
                                                   " tokens x dim ", a.dim, " but ", a.values.size(), " values"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* ActivationFormatName(ActivationFormat f) {
  switch (f) {
    case ActivationFormat::kF32: return "f32";
    case ActivationFormat::kF16: return "f16";
    case ActivationFormat::kBF16: return "bf16";
  }
  return "?";
}

uint64_t EncodedActivationsBytes(ActivationFormat format, int64_t dim, int64_t windows, int64_t tokens) {
  return kHeaderBytes + 4 * static_cast<uint64_t>(windows) +
         static_cast<uint64_t>(tokens) * static_cast<uint64_t>(dim) * ValueBytes(format);
}

absl::StatusOr<ActivationFormat> ParseActivationFormat(const std::string& name) {
  for (ActivationFormat f : {ActivationFormat::kF32, ActivationFormat::kF16, ActivationFormat::kBF16}) {
    if (name == ActivationFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(absl::StrCat("activation format '", name.substr(0, 32), "': expected f32, f16 or bf16"));
}

absl::Status RoundActivations(BlockActivations& a, ActivationFormat format) {
  for (size_t i = 0; i < a.values.size(); ++i) {
    const float r = Rounded(a.values[i], format);
    if (!std::isfinite(r)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "activations: hidden state ", a.values[i], " (token ", a.dim > 0 ? static_cast<int64_t>(i) / a.dim : 0,
          ") is not finite in ", ActivationFormatName(format)));
    }
    a.values[i] = r;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> EncodeActivations(const BlockActivations& a, ActivationFormat format) {
  if (absl::Status s = CheckShape(a); !s.ok()) return s;
  std::string out;
  out.reserve(kHeaderBytes + a.windows.size() * 4 + a.values.size() * ValueBytes(format));
  out.append(kMagic, sizeof(kMagic));
  Append<uint32_t>(out, static_cast<uint32_t>(format));
  Append<int64_t>(out, a.dim);
  Append<int64_t>(out, static_cast<int64_t>(a.windows.size()));
  for (int32_t w : a.windows) Append<int32_t>(out, w);
  for (size_t i = 0; i < a.values.size(); ++i) {
    const float v = a.values[i];
    const float r = Rounded(v, format);
    if (!std::isfinite(r)) {
      return absl::InvalidArgumentError(absl::StrCat("activations: hidden state ", v, " (token ",
                                                     static_cast<int64_t>(i) / a.dim, ") is not finite in ",
                                                     ActivationFormatName(format)));
    }
    switch (format) {
      case ActivationFormat::kF16: Append<uint16_t>(out, FloatToHalf(v)); break;
      case ActivationFormat::kBF16: Append<uint16_t>(out, FloatToBf16(v)); break;
      case ActivationFormat::kF32: Append<float>(out, v); break;
    }
  }
  return out;
}

absl::StatusOr<BlockActivations> DecodeActivations(std::span<const uint8_t> bytes, const std::string& what) {
  auto bad = [&](const std::string& why) { return absl::DataLossError(absl::StrCat(what, ": ", why)); };
  if (bytes.size() < kHeaderBytes || std::memcmp(bytes.data(), kMagic, sizeof(kMagic)) != 0) {
    return bad("not a QFACTS01 activation artifact");
  }
  const uint8_t* p = bytes.data() + sizeof(kMagic);
  const uint32_t format = Read<uint32_t>(p);
  const int64_t dim = Read<int64_t>(p + 4);
  const int64_t n_windows = Read<int64_t>(p + 12);
  if (!KnownFormat(format)) return bad(absl::StrCat("unknown value format ", format));
  if (dim <= 0 || dim > (int64_t{1} << 24)) return bad(absl::StrCat("dim ", dim));
  const uint64_t rest = bytes.size() - kHeaderBytes;
  if (n_windows <= 0 || static_cast<uint64_t>(n_windows) > rest / 4) return bad(absl::StrCat(n_windows, " windows"));
  BlockActivations a;
  a.dim = dim;
  a.windows.resize(static_cast<size_t>(n_windows));
  const uint8_t* w = bytes.data() + kHeaderBytes;
  uint64_t tokens = 0;
  for (int64_t i = 0; i < n_windows; ++i) {
    a.windows[i] = Read<int32_t>(w + 4 * i);
    if (a.windows[i] < 1) return bad(absl::StrCat("window ", i, " has ", a.windows[i], " tokens"));
    tokens += static_cast<uint64_t>(a.windows[i]);
  }
  const ActivationFormat f = static_cast<ActivationFormat>(format);
  const uint64_t data = rest - 4 * static_cast<uint64_t>(n_windows);
  const uint64_t per_token = static_cast<uint64_t>(dim) * ValueBytes(f);
  if (data % per_token != 0 || data / per_token != tokens) {
    return bad(absl::StrCat(data, " value bytes, the header asks for ", tokens, " tokens x ", dim, " ",
                            ActivationFormatName(f), " values"));
  }
  a.values.resize(static_cast<size_t>(tokens * static_cast<uint64_t>(dim)));
  const uint8_t* v = w + 4 * n_windows;
  for (size_t i = 0; i < a.values.size(); ++i) {
    switch (f) {
      case ActivationFormat::kF16: a.values[i] = HalfToFloat(Read<uint16_t>(v + 2 * i)); break;
      case ActivationFormat::kBF16: a.values[i] = Bf16ToFloat(Read<uint16_t>(v + 2 * i)); break;
      case ActivationFormat::kF32: a.values[i] = Read<float>(v + 4 * i); break;
    }
  }
  return a;
}

}  // namespace qforge::calib
