// Large output buffers backed by transparent huge pages where the kernel allows it.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qforge {

// Asks the kernel to back the page-aligned interior of [p, p + bytes) with transparent huge pages (the
// system default here is THP on madvise only). Zero-filling a fresh 4 KiB page costs one fault, and on the
// paravirtualised machines qforge runs on a fault costs microseconds: quantizing a 0.5 GB Q8_0 model spent more
// time faulting its output in than quantizing it. A 2 MiB page takes one fault for 512. Advice only: no error.
void AdviseHugePages(void* p, size_t bytes);

// A zero-filled vector of n elements whose storage was advised for huge pages before it was first touched.
// Below 4 MiB it is a plain vector (a huge page would not fit, and small blocks share malloc's heap).
template <typename T>
std::vector<T> LargeZeroedVector(size_t n) {
  std::vector<T> v;
  v.reserve(n);  // allocates without touching: large blocks come straight from mmap
  if (n * sizeof(T) >= (size_t{4} << 20)) AdviseHugePages(v.data(), n * sizeof(T));
  v.resize(n);
  return v;
}

}  // namespace qforge
