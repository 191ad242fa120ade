#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include "core/base/half.h"
#include "core/base/mapped_file.h"
#include "core/base/thread_pool.h"
#include "gtest/gtest.h"

namespace qforge {
namespace {

TEST(Half, EveryHalfRoundTripsThroughFloat) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
      continue;
    }
    EXPECT_EQ(FloatToHalf(f), h) << "half bits " << h;
  }
}

__attribute__((target("f16c"))) uint16_t HardwareFloatToHalf(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}
__attribute__((target("f16c"))) float HardwareHalfToFloat(uint16_t h) { return _cvtsh_ss(h); }

TEST(Half, MatchesF16cHardwareRounding) {
  if (!__builtin_cpu_supports("f16c")) GTEST_SKIP() << "CPU has no F16C";
  std::mt19937 rng(7);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2'000'000; ++i) {
    const float f = BitsToFloat(bits(rng));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToHalf(f), HardwareFloatToHalf(f)) << "float bits " << FloatBits(f);
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = HalfToFloat(static_cast<uint16_t>(h)), b = HardwareHalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(a)) {
      EXPECT_TRUE(std::isnan(b));
    } else {
      EXPECT_EQ(FloatBits(a), FloatBits(b)) << h;
    }
  }
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to the even one (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + 1.0f / 256), 0x3f80);
  EXPECT_EQ(FloatToBf16(1.0f + 3.0f / 256), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
}

TEST(ThreadPool, CoversEveryIndexExactlyOnce) {
  ThreadPool pool(3);
  for (int64_t n : {1, 2, 7, 100, 1001}) {
    std::vector<std::atomic<int>> hits(n);
    pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
  }
}

// Jobs with fewer chunks than workers between jobs with one chunk per worker, many times over, on more threads
// than this machine has cores: a worker that had not looked at a small job yet once read its generation with
// the next job's parameters, ran a chunk twice and let ParallelFor return while another chunk still ran.
TEST(ThreadPool, EveryChunkRunsOnceAndFinishesBeforeParallelForReturns) {
  ThreadPool pool(6);
  std::vector<std::atomic<int>> hits(6);
  for (int job = 0; job < 3000; ++job) {
    const int64_t n = job % 3 == 0 ? 2 : 6;
    for (auto& h : hits) h.store(0);
    pool.ParallelFor(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
    });
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "job " << job << " chunk " << i;
  }
}

TEST(ThreadPool, RespectsMinimumChunk) {
  ThreadPool pool(4);
  std::atomic<int> calls{0};
  pool.ParallelFor(10, 100, [&](int64_t b, int64_t e) {
    EXPECT_EQ(b, 0);
    EXPECT_EQ(e, 10);
    calls++;
  });
  EXPECT_EQ(calls.load(), 1);
}

// Units: every index once, every boundary but n a multiple of align, and each thread's own units in order,
// across sizes that leave a short last unit and chunks with no unit at all.
TEST(ThreadPool, UnitsCoverEveryIndexOnceOnAlignedBoundaries) {
  ThreadPool pool(3);
  for (int64_t n : {1, 15, 16, 17, 100, 1001, 4096}) {
    for (int units : {2, 3, 8}) {
      std::vector<std::atomic<int>> hits(n);
      std::mutex mu;
      std::vector<std::pair<int64_t, int64_t>> calls;
      pool.ParallelFor(n, 16, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        std::lock_guard<std::mutex> lock(mu);
        calls.emplace_back(b, e);
      }, /*align=*/16, units);
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " units=" << units << " i=" << i;
      for (const auto& [b, e] : calls) {
        EXPECT_LT(b, e);
        EXPECT_EQ(b % 16, 0) << "n=" << n << " units=" << units;
        EXPECT_TRUE(e == n || e % 16 == 0) << "n=" << n << " units=" << units << " end " << e;
      }
    }
  }
}

// A thread held up in its first unit (here: the calling thread, waiting) has its other units taken by the others.
TEST(ThreadPool, UnitsOfASlowThreadAreTakenByTheOthers) {
  ThreadPool pool(2);
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<int> units_by_worker{0}, units_by_caller{0};
  pool.ParallelFor(64, 1, [&](int64_t b, int64_t) {
    if (std::this_thread::get_id() != caller) {
      units_by_worker++;
      return;
    }
    // The caller's first unit is [0, 4): it waits there (10 s at most) while the worker runs its own eight
    // units and then the caller's seven others, from the back.
    if (b == 0) {
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (units_by_worker.load() < 15 && std::chrono::steady_clock::now() < give_up) std::this_thread::yield();
    }
    units_by_caller++;
  }, /*align=*/1, /*units_per_chunk=*/8);
  EXPECT_EQ(units_by_worker.load(), 15);
  EXPECT_EQ(units_by_caller.load(), 1);
}

class MappedFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    path_ = ::testing::TempDir() + "/mapped_file_test_" + std::to_string(::getpid()) + ".bin";
    std::mt19937 rng(5);
    bytes_.resize((size_t{5} << 20) + 12345);  // more than two huge pages, not a multiple of any page
    for (auto& b : bytes_) b = static_cast<uint8_t>(rng());
    std::ofstream(path_, std::ios::binary).write(reinterpret_cast<const char*>(bytes_.data()), bytes_.size());
  }
  void TearDown() override { std::remove(path_.c_str()); }
  std::string path_;
  std::vector<uint8_t> bytes_;
};

TEST_F(MappedFileTest, HugePageCopyHoldsTheFileAt2MiBAndSurvivesDropResidentPages) {
  auto copy = MappedFile::Open(path_, MappedFile::Residency::kHugePages);
  ASSERT_TRUE(copy.ok()) << copy.status();
  EXPECT_EQ((*copy)->residency(), MappedFile::Residency::kHugePages);
  ASSERT_EQ((*copy)->size(), bytes_.size());
  EXPECT_EQ(reinterpret_cast<uintptr_t>((*copy)->data()) % (uintptr_t{2} << 20), 0u);
  EXPECT_TRUE(std::equal(bytes_.begin(), bytes_.end(), (*copy)->data()));
  // A worker hands mapped pages back after each task; doing that to the anonymous copy would zero it.
  MappedFile::DropResidentPages();
  EXPECT_TRUE(std::equal(bytes_.begin(), bytes_.end(), (*copy)->data()));
  auto mapped = MappedFile::Open(path_);
  ASSERT_TRUE(mapped.ok()) << mapped.status();
  EXPECT_EQ((*mapped)->residency(), MappedFile::Residency::kMapped);
  EXPECT_TRUE(std::equal(bytes_.begin(), bytes_.end(), (*mapped)->data()));
}

TEST_F(MappedFileTest, HugePageCopyOfAMissingOrEmptyFile) {
  auto missing = MappedFile::Open(path_ + ".missing", MappedFile::Residency::kHugePages);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(".missing"), std::string::npos);
  std::ofstream(path_, std::ios::binary | std::ios::trunc).flush();
  auto empty = MappedFile::Open(path_, MappedFile::Residency::kHugePages);
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_EQ((*empty)->size(), 0u);
  EXPECT_TRUE((*empty)->bytes().empty());
}

}  // namespace
}  // namespace qforge
