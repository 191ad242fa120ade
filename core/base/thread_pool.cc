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
                             int64_t align) {
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
  int64_t b, e;
  ChunkRange(n, chunks, 0, align, &b, &e);
  if (b < e) fn(b, e);
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
    if (index < chunks) {
      int64_t b, e;
      ChunkRange(job_n_, chunks, index, job_align_, &b, &e);
      if (b < e) (*job_)(b, e);
    }
    pending_.fetch_sub(1, std::memory_order_acq_rel);
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
