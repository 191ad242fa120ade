#include "core/base/large_buffer.h"

#include "core/base/thread_pool.h"

namespace qforge {

void AdviseHugePages(void* p, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

void PopulatePages(void* p, size_t bytes, ThreadPool* pool) {
#ifdef MADV_POPULATE_WRITE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end <= begin) return;
  ParallelForOrInline(pool, static_cast<int64_t>((end - begin) / kHuge), 1, [&](int64_t h0, int64_t h1) {
    ::madvise(reinterpret_cast<void*>(begin + h0 * kHuge), (h1 - h0) * kHuge, MADV_POPULATE_WRITE);
  });
#else
  (void)p;
  (void)bytes;
  (void)pool;
#endif
}

}  // namespace qforge
