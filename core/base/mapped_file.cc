#include "core/base/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qforge {
namespace {
absl::Status ErrnoStatus(const std::string& what, const std::string& path) {
  const int err = errno;
  const std::string msg = absl::StrCat(what, " ", path, ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(msg);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
  return absl::InternalError(msg);
}
// Every live mapping (address -> length), for DropResidentPages.
std::mutex& MappingsMutex() {
  static std::mutex mu;
  return mu;
}
std::map<const uint8_t*, size_t>& Mappings() {
  static auto* m = new std::map<const uint8_t*, size_t>();
  return *m;
}
}  // namespace

void MappedFile::DropResidentPages() {
  std::lock_guard<std::mutex> l(MappingsMutex());
  for (const auto& [data, size] : Mappings()) {
    ::madvise(const_cast<uint8_t*>(data), size, MADV_DONTNEED);  // advisory: nothing to do on failure
  }
}

namespace {

// The copy of kHugePages: an anonymous region with room to start at a 2 MiB boundary, advised for huge pages
// before the first touch, filled by pread and then made read-only. Fills *region / *region_size with what to
// unmap and returns the copy's first byte.
absl::StatusOr<const uint8_t*> ReadIntoHugePages(int fd, const std::string& path, size_t size, void** region,
                                                 size_t* region_size) {
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t length = (size + kHuge - 1) / kHuge * kHuge + kHuge;
  void* raw = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return ErrnoStatus("cannot allocate memory to read", path);
  auto* data = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(uintptr_t{kHuge} - 1));
  ::madvise(data, length - kHuge, MADV_HUGEPAGE);  // advice only: 4 KiB pages where the kernel says no
  for (size_t done = 0; done < size;) {
    const ssize_t got = ::pread(fd, data + done, size - done, static_cast<off_t>(done));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) {
      absl::Status s = got < 0 ? ErrnoStatus("cannot read", path)
                               : absl::DataLossError(absl::StrCat(path, " ended at byte ", done, " of ", size,
                                                                  " while it was read"));
      ::munmap(raw, length);
      return s;
    }
    done += static_cast<size_t>(got);
  }
  ::mprotect(raw, length, PROT_READ);  // a stray write faults, as it would on the mapping
  *region = raw;
  *region_size = length;
  return data;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const MappedFile>> MappedFile::Open(const std::string& path, Residency residency) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("cannot open", path);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    auto s = ErrnoStatus("cannot stat", path);
    ::close(fd);
    return s;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file"));
  }
  const size_t size = static_cast<size_t>(st.st_size);
  const uint8_t* data = nullptr;
  void* region = nullptr;
  size_t region_size = 0;
  absl::Status status;
  if (size > 0 && residency == Residency::kHugePages) {
    absl::StatusOr<const uint8_t*> copy = ReadIntoHugePages(fd, path, size, &region, &region_size);
    if (copy.ok()) data = *copy;
    status = copy.status();
  } else if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      status = ErrnoStatus("cannot mmap", path);
    } else {
      data = static_cast<const uint8_t*>(p);
      region = p;
      region_size = size;
      std::lock_guard<std::mutex> l(MappingsMutex());
      Mappings()[data] = size;
    }
  }
  ::close(fd);
  if (!status.ok()) return status;
  return std::shared_ptr<const MappedFile>(new MappedFile(path, data, size, residency, region, region_size));
}

MappedFile::~MappedFile() {
  if (region_ == nullptr) return;
  if (residency_ == Residency::kMapped) {
    std::lock_guard<std::mutex> l(MappingsMutex());
    Mappings().erase(data_);
  }
  ::munmap(region_, region_size_);
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("read error on ", path));
  return ss.str();
}

absl::Status WriteFileAtomically(const std::string& path, std::span<const uint8_t> bytes) {
  const std::span<const uint8_t> parts[] = {bytes};
  return WriteFileAtomically(path, parts);
}

absl::Status WriteFileAtomically(const std::string& path, std::span<const std::span<const uint8_t>> parts) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoStatus("cannot create", tmp);
  // Writeback of each 32 MiB written is started at once (sync_file_range only queues it), so the disk works
  // while the rest is copied and the fsync below waits for the tail, not for the whole file.
  constexpr off_t kWritebackChunk = off_t{32} << 20;
  off_t written = 0, queued = 0;
  for (const std::span<const uint8_t>& bytes : parts) {
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(fd, bytes.data() + done, std::min<size_t>(bytes.size() - done, kWritebackChunk));
      if (n < 0) {
        if (errno == EINTR) continue;
        auto s = ErrnoStatus("cannot write", tmp);
        ::close(fd);
        ::unlink(tmp.c_str());
        return s;
      }
      done += static_cast<size_t>(n);
      written += n;
      if (written - queued >= kWritebackChunk) {
        ::sync_file_range(fd, queued, written - queued, SYNC_FILE_RANGE_WRITE);  // a hint: errors surface at fsync
        queued = written;
      }
    }
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    auto s = ErrnoStatus("cannot flush", tmp);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    auto s = ErrnoStatus("cannot rename into", path);
    ::unlink(tmp.c_str());
    return s;
  }
  return absl::OkStatus();
}

}  // namespace qforge
