// Read-only files in memory: mapped (model weights viewed in place, never copied on load), or read once into
// memory of the process's own on 2 MiB pages, for the runtime, which streams every weight each token.
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
  // Where a file's bytes live.
  //  kMapped: the page cache, mapped read-only (4 KiB pages; shared, evictable, faulted in as touched).
  //  kHugePages: a private copy, read in at Open, on transparent huge pages where the kernel allows them (it
  //  does on madvise here) and read-only after. A decode step reads all the weights: on 4 KiB pages each
  //  token walks ~60,000 page tables for a 0.25 GB model, and two threads decoded a Q4_K model ~10-25 %
  //  slower from the mapping than from the copy (docs/benchmarks.md). Costs the copy's memory and the read.
  enum class Residency { kMapped, kHugePages };

  // `path` read-only, as `residency` says. An empty file is an empty span.
  static absl::StatusOr<std::shared_ptr<const MappedFile>> Open(const std::string& path,
                                                                Residency residency = Residency::kMapped);

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  // Hands every live mapping's resident pages back to the page cache (madvise MADV_DONTNEED; the bytes are
  // unchanged, a later read faults them in again from the file). Copies (kHugePages) are not touched. A worker calls it after each task so that its
  // resident memory holds the pages of the task at hand, not of every block it ever read (docs/distributed.md,
  // memory bound).
  static void DropResidentPages();

  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  Residency residency() const { return residency_; }

 private:
  MappedFile(std::string path, const uint8_t* data, size_t size, Residency residency, void* region,
             size_t region_size)
      : path_(std::move(path)), data_(data), size_(size), residency_(residency), region_(region),
        region_size_(region_size) {}
  std::string path_;
  const uint8_t* data_;
  size_t size_;
  Residency residency_;
  // What munmap releases: the file's mapping, or the anonymous region the copy sits in (data_ is its first
  // 2 MiB boundary).
  void* region_;
  size_t region_size_;
};

// Reads a whole (small) file, e.g. config.json or a tokenizer model.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Writes `bytes` to `path` through a temporary file and rename, so a crash never leaves a torn file.
absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes);
// The same for a file made of `parts` one after another, written straight from their memory (no joined copy).
absl::Status WriteFileAtomically(const std::string& path, std::span<const std::span<const uint8_t>> parts);

}  // namespace qforge
