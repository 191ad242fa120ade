// Bounds-checked little-endian cursor over an untrusted byte buffer, and overflow-checked size arithmetic.
// Every read names what it was reading, so a truncated file yields a message that says where it broke.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qforge::formats {

static_assert(std::endian::native == std::endian::little,
              "model files are little-endian and are read by memcpy; a big-endian host needs byte swaps");

// a * b, or false on overflow.
inline bool MulOk(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
// a + b, or false on overflow.
inline bool AddOk(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

class ByteReader {
 public:
  // `prefix` starts every error message ("gguf", "llama2.c tokenizer", ...).
  ByteReader(std::span<const uint8_t> bytes, std::string prefix) : bytes_(bytes), prefix_(std::move(prefix)) {}

  size_t pos() const { return pos_; }
  size_t size() const { return bytes_.size(); }
  size_t remaining() const { return bytes_.size() - pos_; }
  const uint8_t* cursor() const { return bytes_.data() + pos_; }
  std::span<const uint8_t> bytes() const { return bytes_; }

  template <typename T>
  absl::Status Read(T* out, const char* what) {
    static_assert(std::is_trivially_copyable_v<T>);
    if (sizeof(T) > remaining()) return Truncated(sizeof(T), what);
    std::memcpy(out, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return absl::OkStatus();
  }

  // Points `out` at the next n bytes without copying.
  absl::Status ReadSpan(uint64_t n, std::span<const uint8_t>* out, const char* what) {
    if (n > remaining()) return Truncated(n, what);
    *out = bytes_.subspan(pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return absl::OkStatus();
  }

  absl::Status ReadString(uint64_t n, std::string* out, const char* what) {
    std::span<const uint8_t> s;
    if (absl::Status st = ReadSpan(n, &s, what); !st.ok()) return st;
    out->assign(reinterpret_cast<const char*>(s.data()), s.size());
    return absl::OkStatus();
  }

  absl::Status Skip(uint64_t n, const char* what) {
    if (n > remaining()) return Truncated(n, what);
    pos_ += static_cast<size_t>(n);
    return absl::OkStatus();
  }

  // Moves to absolute offset `off` (must be within the buffer).
  absl::Status Seek(uint64_t off, const char* what) {
    if (off > bytes_.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix_, ": ", what, " offset ", off, " is past the end of the file (", bytes_.size(), " bytes)"));
    }
    pos_ = static_cast<size_t>(off);
    return absl::OkStatus();
  }

  absl::Status Truncated(uint64_t need, const char* what) const {
    return absl::InvalidArgumentError(absl::StrCat(prefix_, ": file truncated reading ", what, " at offset ", pos_,
                                                   " (need ", need, " bytes, ", remaining(), " left)"));
  }

  const std::string& prefix() const { return prefix_; }

 private:
  std::span<const uint8_t> bytes_;
  std::string prefix_;
  size_t pos_ = 0;
};

}  // namespace qforge::formats
