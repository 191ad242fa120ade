#include "core/base/thread_pool.h"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QF_CPU_RELAX() _mm_pause()
#else
#define QF_CPU_RELAX() std::this_thread::yield()
#endif

namespace qforge {
namespace {

// How long an idle worker spins before it sleeps, and how long the caller spins for its workers before it
// yields: a decode step runs a few dozen matmuls back to back, each a fraction of a millisecond, and waking a
// sleeping thread through the kernel costs tens of microseconds.
constexpr int kSpinBeforeSleep = 1 << 14;

// Chunk `index` of `chunks` near-equal parts of [0, n), inner boundaries rounded down to multiples of align.
inline void ChunkRange(int64_t n, int chunks, int index, int64_t align, int64_t* begin, int64_t* end) {
  auto boundary = [&](int i) { return i == chunks ? n : std::min(n, n * i / chunks / align * align); };
  *begin = boundary(index);
  *end = boundary(index + 1);
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  chunk_units_ = std::vector<ChunkUnits>(static_cast<size_t>(threads));
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn,
                             int64_t align, int units_per_chunk) {
  if (n <= 0) return;
  align = std::max<int64_t>(1, align);
  const int64_t max_chunks = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
  const int chunks = static_cast<int>(std::min<int64_t>(size(), max_chunks));
  if (chunks <= 1) {
    fn(0, n);
    return;
  }
  job_ = &fn;
  job_n_ = n;
  job_chunks_ = chunks;
  job_align_ = align;
  job_unit_ = 0;
  if (units_per_chunk > 1) {
    // Units of about a chunk / units_per_chunk but no shorter than min_chunk (each is a call of fn, with its
    // own set-up), rounded up to align; chunk starts are multiples of align, so every unit boundary but a
    // chunk's end is too.
    const int64_t per_unit = std::max(min_chunk, (n + int64_t{chunks} * units_per_chunk - 1) /
                                                     (int64_t{chunks} * units_per_chunk));
    job_unit_ = std::max<int64_t>(1, (per_unit + align - 1) / align) * align;
    for (int k = 0; k < chunks; ++k) {
      ChunkUnits& c = chunk_units_[static_cast<size_t>(k)];
      ChunkRange(n, chunks, k, align, &c.begin, &c.end);
      const int64_t units = (c.end - c.begin + job_unit_ - 1) / job_unit_;
      c.span.store(static_cast<uint64_t>(units) << 32, std::memory_order_relaxed);
    }
  }
  // Every worker acknowledges every job, also those with no chunk of it: a worker that had not yet looked at the
  // previous job could otherwise read that job's generation with this job's parameters, run a chunk twice and
  // let the count reach zero early (the caller returned with a chunk still running, then hung or crashed on a
  // later job: seen in MoE forward passes with more threads than cores).
  pending_.store(size() - 1);
  // Publishes the job (the stores above happen before it); spinning workers see it without any lock.
  generation_.fetch_add(1);
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mu_);
    start_cv_.notify_all();
  }
  if (job_unit_ > 0) {
    RunUnits(0);
  } else {
    int64_t b, e;
    ChunkRange(n, chunks, 0, align, &b, &e);
    if (b < e) fn(b, e);
  }
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < kSpinBeforeSleep) {
      QF_CPU_RELAX();
    } else {
      std::this_thread::yield();
    }
  }
  job_ = nullptr;
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spins = 0; gen == seen && spins < kSpinBeforeSleep && !stop_.load(); ++spins) {
      QF_CPU_RELAX();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      start_cv_.wait(lock, [&] { return stop_.load() || generation_.load() != seen; });
      sleepers_.fetch_sub(1);
      gen = generation_.load();
    }
    if (stop_.load()) return;
    seen = gen;
    const int chunks = job_chunks_;
    if (job_unit_ > 0) {
      RunUnits(index);
    } else if (index < chunks) {
      int64_t b, e;
      ChunkRange(job_n_, chunks, index, job_align_, &b, &e);
      if (b < e) (*job_)(b, e);
    }
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::RunUnits(int index) {
  const int chunks = job_chunks_;
  // Takes unit `front` (own chunk) or `back - 1` (another's) of chunk k; false once the chunk has none left.
  auto take = [&](int k, bool from_front) {
    ChunkUnits& c = chunk_units_[static_cast<size_t>(k)];
    uint64_t span = c.span.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t front = span & 0xffffffffu, back = span >> 32;
      if (front >= back) return false;
      const uint64_t taken = from_front ? front : back - 1;
      const uint64_t next = from_front ? (back << 32 | (front + 1)) : ((back - 1) << 32 | front);
      if (c.span.compare_exchange_weak(span, next, std::memory_order_acq_rel, std::memory_order_acquire)) {
        const int64_t b = c.begin + static_cast<int64_t>(taken) * job_unit_;
        (*job_)(b, std::min(c.end, b + job_unit_));
        return true;
      }
    }
  };
  if (index < chunks) {
    while (take(index, /*from_front=*/true)) {
    }
  }
  for (int i = 1; i <= chunks; ++i) {
    const int k = (index + i) % chunks;
    if (k == index) continue;
    while (take(k, /*from_front=*/false)) {
    }
  }
}

void ParallelForOrInline(ThreadPool* pool, int64_t n, int64_t min_chunk,
                         const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (pool == nullptr || pool->size() <= 1) {
    fn(0, n);
    return;
  }
  pool->ParallelFor(n, min_chunk, fn);
}

}  // namespace qforge
