// Large output buffers backed by transparent huge pages where the kernel allows it.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <vector>

namespace qforge {

class ThreadPool;

// Asks the kernel to back the page-aligned interior of [p, p + bytes) with transparent huge pages (the
// system default here is THP on madvise only). Zero-filling a fresh 4 KiB page costs one fault, and on the
// paravirtualised machines qforge runs on a fault costs microseconds: quantizing a 0.5 GB Q8_0 model spent more
// time faulting its output in than quantizing it. A 2 MiB page takes one fault for 512. Advice only: no error.
void AdviseHugePages(void* p, size_t bytes);

// Faults [p, p + bytes) in (MADV_POPULATE_WRITE, Linux 5.14+) split over the pool's threads, so the kernel's
// zero-filling of fresh pages, which costs more than the encoders that then fill them, runs on every core
// rather than in the one thread that allocated them. Advice only: where the kernel lacks it, nothing happens.
void PopulatePages(void* p, size_t bytes, ThreadPool* pool);

// A zero-filled vector of n elements whose storage was advised for huge pages before it was first touched
// (and, given a pool, faulted in by its threads). Below 4 MiB it is a plain vector (a huge page would not fit,
// and small blocks share malloc's heap).
template <typename T>
std::vector<T> LargeZeroedVector(size_t n, ThreadPool* pool = nullptr) {
  std::vector<T> v;
  v.reserve(n);  // allocates without touching: large blocks come straight from mmap
  if (n * sizeof(T) >= (size_t{4} << 20)) {
    AdviseHugePages(v.data(), n * sizeof(T));
    if (pool != nullptr) PopulatePages(v.data(), n * sizeof(T), pool);
  }
  v.resize(n);
  return v;
}

}  // namespace qforge
