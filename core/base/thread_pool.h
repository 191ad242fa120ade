// A fixed pool of worker threads for data-parallel loops (matmul rows, attention heads, quantizing rows).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace qforge {

class ThreadPool {
 public:
  // `threads` <= 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over disjoint chunks covering [0, n), on the pool and the calling thread,
  // and returns when all are done. Chunks are at least `min_chunk` long, and every chunk boundary but n is a
  // multiple of `align`. Not reentrant.
  //
  // units_per_chunk > 1: each thread's chunk is cut into up to that many units (each at least min_chunk long
  // but a chunk's last, boundaries still multiples of align); a thread runs its own units front to back, and
  // once they are done takes units from the back of the others' chunks. Each thread still streams one
  // contiguous range, and a thread slowed by a neighbour on a shared host (or by a longer share of the work)
  // no longer leaves the others spinning at the end: without it, a 2-thread decode spent ~14 % of its time
  // in the spin-wait at the end of each matmul, with it ~6 %.
  void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn,
                   int64_t align = 1, int units_per_chunk = 1);

 private:
  void WorkerLoop(int index);
  // Runs the current job's units for thread `index`: its own chunk's from the front, then the others' from the back.
  void RunUnits(int index);

  // A chunk's units not yet taken: [front, back) in its low and high 32 bits, changed only by compare-exchange.
  // One cache line each, so a thread taking its own units does not disturb the others'.
  struct alignas(64) ChunkUnits {
    std::atomic<uint64_t> span{0};
    int64_t begin = 0, end = 0;
  };
  std::vector<ChunkUnits> chunk_units_;
  int64_t job_unit_ = 0;  // the length of a unit, a multiple of the job's align; 0: one unit per chunk

  std::vector<std::thread> workers_;
  // Workers spin on generation_ for a while after each job and then sleep on start_cv_ (counted in sleepers_,
  // so that ParallelFor takes the mutex only to wake sleepers); the caller spins on pending_ for the others.
  std::mutex mu_;
  std::condition_variable start_cv_;
  // The current job, written before generation_ is bumped and read by workers after they see the new value.
  const std::function<void(int64_t, int64_t)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int job_chunks_ = 0;
  int64_t job_align_ = 1;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
};

// pool->ParallelFor(n, min_chunk, fn), or fn(0, n) on the calling thread when there is no pool (or one thread).
void ParallelForOrInline(ThreadPool* pool, int64_t n, int64_t min_chunk,
                         const std::function<void(int64_t, int64_t)>& fn);

}  // namespace qforge
