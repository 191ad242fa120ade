// Read-only memory-mapped files: model weights are viewed in place, never copied on load.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/statusor.h"

namespace qforge {

class MappedFile {
 public:
  // Maps `path` read-only. An empty file maps to an empty span.
  static absl::StatusOr<std::shared_ptr<const MappedFile>> Open(const std::string& path);

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  // Hands every live mapping's resident pages back to the page cache (madvise MADV_DONTNEED; the bytes are
  // unchanged, a later read faults them in again from the file). A worker calls it after each task so that its
  // resident memory holds the pages of the task at hand, not of every block it ever read (docs/distributed.md,
  // memory bound).
  static void DropResidentPages();

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size)
      : path_(std::move(path)), data_(data), size_(size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
};

// Reads a whole (small) file, e.g. config.json or a tokenizer model.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `bytes` to `path` through a temporary file and rename, so a crash never leaves a torn file.
absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes);
// The same for a file made of `parts` one after another, written straight from their memory (no joined copy).
absl::Status WriteFileAtomically(const std::string& path, std::span<const std::span<const uint8_t>> parts);

}  // namespace qforge
