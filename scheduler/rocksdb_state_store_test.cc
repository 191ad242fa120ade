// RocksDbStateStore: round trips through reopen, chunked plans, corruption, and a real crash (fork + _exit /
// SIGKILL) of a process running a JobScheduler over it.
#include "scheduler/rocksdb_state_store.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>

#include "core/formats/formats.h"
#include "core/model/synthetic.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rocksdb/db.h"
#include "scheduler/job_scheduler.h"
#include "scheduler/model_description.h"
#include "scheduler/plan.h"
#include "storage/artifact_store.h"

namespace qforge::scheduler {
namespace {

using ::testing::HasSubstr;
using storage::ArtifactStore;
using storage::StoreOptions;

std::string RandomString(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>(rng() & 0xFF);
  return s;
}

class RocksDbStateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    dir_ = (std::filesystem::temp_directory_path() /
            (std::string("qforge_rss_") + info->name() + "_" + std::to_string(::getpid())))
               .string();
    std::filesystem::remove_all(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::unique_ptr<ArtifactStore> Open(StoreOptions o = {}) {
    auto s = ArtifactStore::Open(dir_, std::move(o));
    EXPECT_TRUE(s.ok()) << s.status();
    return s.ok() ? *std::move(s) : nullptr;
  }

  // Overwrites one value through plain RocksDB (its own checksums stay valid; only ours can notice).
  void RawPut(const std::string& family, const std::string& key, const std::string& value) {
    rocksdb::DBOptions dbo;
    std::vector<std::string> names;
    ASSERT_TRUE(rocksdb::DB::ListColumnFamilies(dbo, dir_, &names).ok());
    std::vector<rocksdb::ColumnFamilyDescriptor> cfs;
    for (const auto& n : names) cfs.emplace_back(n, rocksdb::ColumnFamilyOptions());
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    rocksdb::DB* raw = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(dbo, dir_, cfs, &handles, &raw).ok());
    std::unique_ptr<rocksdb::DB> db(raw);
    rocksdb::ColumnFamilyHandle* h = nullptr;
    for (size_t i = 0; i < names.size(); ++i) {
      if (names[i] == family) h = handles[i];
    }
    ASSERT_NE(h, nullptr);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    ASSERT_TRUE(db->Put(wo, h, key, value).ok());
    for (auto* hh : handles) ASSERT_TRUE(db->DestroyColumnFamilyHandle(hh).ok());
    ASSERT_TRUE(db->Close().ok());
  }

  std::string dir_;
};

TEST_F(RocksDbStateStoreTest, RoundTripThroughReopen) {
  {
    auto as = Open();
    RocksDbStateStore s(as.get());
    ASSERT_TRUE(s.PutJob(2, "plan-two", 200).ok());
    ASSERT_TRUE(s.PutJob(10, std::string("plan\0ten", 8), 1000).ok());  // 10 sorts after 2
    ASSERT_TRUE(s.PutJob(3, "", 300).ok());
    ASSERT_TRUE(s.PutTaskResult(2, 0, "ref-a").ok());
    ASSERT_TRUE(s.PutTaskResult(2, 7, "ref-b").ok());
    ASSERT_TRUE(s.PutTaskResult(2, 7, "ref-b").ok());  // re-commit with the same reference is fine
    ASSERT_TRUE(s.PutTaskResult(10, 100000, "").ok());
    ASSERT_TRUE(s.PutJobState(2, JobState::kSucceeded, "", 250).ok());
    ASSERT_TRUE(s.PutJobState(3, JobState::kFailed, "quantize x failed 3 times", 350).ok());
    EXPECT_TRUE(absl::IsNotFound(s.PutTaskResult(99, 0, "r")));
    EXPECT_TRUE(absl::IsNotFound(s.PutJobState(99, JobState::kCancelled, "", 1)));
  }
  auto as = Open();
  RocksDbStateStore s(as.get());
  auto all = s.LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 3u);
  const StoredJob& a = (*all)[0];
  EXPECT_EQ(a.id, 2u);
  EXPECT_EQ(a.plan, "plan-two");
  EXPECT_EQ(a.created_ms, 200);
  EXPECT_EQ(a.state, JobState::kSucceeded);
  EXPECT_EQ(a.finished_ms, 250);
  EXPECT_EQ(a.results, (std::vector<std::pair<uint32_t, std::string>>{{0, "ref-a"}, {7, "ref-b"}}));
  const StoredJob& b = (*all)[1];
  EXPECT_EQ(b.id, 3u);
  EXPECT_EQ(b.plan, "");
  EXPECT_EQ(b.state, JobState::kFailed);
  EXPECT_EQ(b.message, "quantize x failed 3 times");
  EXPECT_EQ(b.finished_ms, 350);
  EXPECT_TRUE(b.results.empty());
  const StoredJob& c = (*all)[2];
  EXPECT_EQ(c.id, 10u);
  EXPECT_EQ(c.plan, std::string("plan\0ten", 8));
  EXPECT_EQ(c.state, JobState::kRunning);
  EXPECT_EQ(c.results, (std::vector<std::pair<uint32_t, std::string>>{{100000, ""}}));
}

TEST_F(RocksDbStateStoreTest, LargePlanIsChunkedPinnedAndSurvivesGarbageCollection) {
  // A 40 MiB plan: three 16 MiB chunks (the default chunk size), so never one huge RocksDB value.
  const std::string plan = RandomString(size_t{40} << 20, 5);
  std::vector<std::string> ids;
  {
    auto as = Open();
    RocksDbStateStore s(as.get());
    ASSERT_TRUE(s.PutJob(1, plan, 11).ok());
    ASSERT_TRUE(s.PutTaskResult(1, 3, "r3").ok());
    ASSERT_TRUE(s.PutJobState(1, JobState::kCancelled, "", 12).ok());  // rewrites the record, keeps the chunks
    auto raw = as->GetJob(RocksDbStateStore::JobKey(1));
    ASSERT_TRUE(raw.ok());
    EXPECT_LT(raw->size(), 1024u);  // the record holds chunk ids, not the plan
  }
  auto as = Open();
  // The job's pin is its reference: garbage collection must not take the plan.
  auto gc = as->CollectGarbage();
  ASSERT_TRUE(gc.ok()) << gc.status();
  EXPECT_EQ(gc->chunks_deleted, 0u);
  RocksDbStateStore s(as.get());
  auto all = s.LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  ASSERT_EQ(all->size(), 1u);
  EXPECT_TRUE((*all)[0].plan == plan);
  EXPECT_EQ((*all)[0].created_ms, 11);
  EXPECT_EQ((*all)[0].state, JobState::kCancelled);
  EXPECT_EQ((*all)[0].results.size(), 1u);
}

TEST_F(RocksDbStateStoreTest, InlineThresholdChoosesStorage) {
  StoreOptions so;
  so.chunk_bytes = 4096;
  auto as = Open(so);
  RocksDbStateStoreOptions o;
  o.inline_plan_max_bytes = 1000;
  RocksDbStateStore s(as.get(), o);
  const std::string small = RandomString(1000, 1), big = RandomString(10000, 2);
  ASSERT_TRUE(s.PutJob(1, small, 0).ok());
  ASSERT_TRUE(s.PutJob(2, big, 0).ok());
  EXPECT_GT(as->GetJob(RocksDbStateStore::JobKey(1))->size(), 1000u);  // inline
  EXPECT_LT(as->GetJob(RocksDbStateStore::JobKey(2))->size(), 1000u);  // 3 chunk ids
  auto all = s.LoadAll();
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_TRUE((*all)[0].plan == small);
  EXPECT_TRUE((*all)[1].plan == big);
}

TEST_F(RocksDbStateStoreTest, CorruptRecordsAreDataLossNamingJobOrTask) {
  const std::string jk = RocksDbStateStore::JobKey(4);
  std::string good_job, good_task;
  {
    auto as = Open();
    RocksDbStateStore s(as.get());
    ASSERT_TRUE(s.PutJob(4, "plan", 1).ok());
    ASSERT_TRUE(s.PutJob(5, "other", 1).ok());
    ASSERT_TRUE(s.PutTaskResult(4, 9, "ref").ok());
    ASSERT_TRUE(s.PutTaskResult(5, 9, "ref").ok());
    good_job = *as->GetJob(jk);
    good_task = *as->GetTask(jk, RocksDbStateStore::TaskKey(9));
  }
  auto expect_loss = [&](const std::string& what, const std::string& needle) {
    auto as = Open();
    RocksDbStateStore s(as.get());
    auto all = s.LoadAll();
    ASSERT_FALSE(all.ok()) << what;
    EXPECT_TRUE(absl::IsDataLoss(all.status())) << what << ": " << all.status();
    EXPECT_THAT(std::string(all.status().message()), HasSubstr(needle)) << what;
  };
  // Every single-byte flip and every truncation of the job record.
  for (size_t i = 0; i < good_job.size(); ++i) {
    std::string v = good_job;
    v[i] ^= 0x20;
    RawPut("jobs", jk, v);
    expect_loss("job flip " + std::to_string(i), "job 4");
  }
  for (size_t n = 0; n < good_job.size(); ++n) {
    RawPut("jobs", jk, good_job.substr(0, n));
    expect_loss("job truncated to " + std::to_string(n), "job 4");
  }
  // Another job's valid record under this key.
  {
    auto as = Open();
    const std::string other = *as->GetJob(RocksDbStateStore::JobKey(5));
    as.reset();
    RawPut("jobs", jk, other);
    expect_loss("job 5's record", "job 4");
  }
  RawPut("jobs", jk, good_job);
  const std::string tk = jk + std::string(1, '\0') + RocksDbStateStore::TaskKey(9);
  for (size_t i = 0; i < good_task.size(); ++i) {
    std::string v = good_task;
    v[i] ^= 0x01;
    RawPut("tasks", tk, v);
    expect_loss("task flip " + std::to_string(i), "job 4 task 9");
  }
  RawPut("tasks", tk, good_task.substr(0, good_task.size() - 1));
  expect_loss("task truncated", "job 4 task 9");
  RawPut("tasks", tk, good_task);
  {
    auto as = Open();
    RocksDbStateStore s(as.get());
    auto all = s.LoadAll();
    ASSERT_TRUE(all.ok()) << all.status();  // repaired: loads again
    // A write to a job whose record is corrupt is refused, not papered over.
  }
  RawPut("jobs", jk, "junk");
  {
    auto as = Open();
    RocksDbStateStore s(as.get());
    const absl::Status st = s.PutJobState(4, JobState::kSucceeded, "", 2);
    EXPECT_TRUE(absl::IsDataLoss(st)) << st;
  }
}

TEST_F(RocksDbStateStoreTest, MissingPlanChunkIsDataLoss) {
  StoreOptions so;
  so.chunk_bytes = 4096;
  {
    auto as = Open(so);
    RocksDbStateStoreOptions o;
    o.inline_plan_max_bytes = 100;
    RocksDbStateStore s(as.get(), o);
    ASSERT_TRUE(s.PutJob(6, RandomString(9000, 3), 0).ok());
    // Releasing the job's pin deletes its chunks (nothing else references them).
    storage::StateBatch b;
    b.ReleasePins(RocksDbStateStore::PlanPinHolder(6));
    ASSERT_TRUE(as->Write(b).ok());
  }
  auto as = Open(so);
  RocksDbStateStore s(as.get());
  auto all = s.LoadAll();
  ASSERT_FALSE(all.ok());
  EXPECT_TRUE(absl::IsDataLoss(all.status())) << all.status();
  EXPECT_THAT(std::string(all.status().message()), HasSubstr("job 6"));
}

// --- a real crash -------------------------------------------------------------------------------------------

Plan TinyPlan() {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("qforge_rss_" + std::to_string(::getpid()) + ".gguf")).string();
  const Model m = MakeSyntheticModel(TinyTestConfig(), 7);
  EXPECT_TRUE(formats::WriteGguf(m, path).ok());
  auto d = DescribeModel(path);
  std::remove(path.c_str());
  EXPECT_TRUE(d.ok()) << d.status();
  JobRecipe r;
  r.method = "rtn";
  r.params = quant::QuantParams{4, 32, true, false};
  auto plan = PlanJob(*d, r, PlanOptions{4096, false});  // row slices: a few hundred tasks
  EXPECT_TRUE(plan.ok()) << plan.status();
  return *std::move(plan);
}

enum class CrashMode { kExit, kSigkill };

// Child: submit the job, commit tasks one by one, writing each task index to `ack_fd` only after Complete
// returned kCommitted (the acknowledgement). kExit: after `stop_after` commits, lease three more (in flight)
// and _exit without closing anything. kSigkill: keep committing (the parent kills it at some point) and, if it
// gets that far, block before the last two tasks so the job is always unfinished when it dies.
[[noreturn]] void RunChild(const std::string& dir, const Plan& plan, CrashMode mode, size_t stop_after,
                           int ack_fd, int block_fd) {
  auto fail = [](int code) { _exit(code); };
  auto as = ArtifactStore::Open(dir);
  if (!as.ok()) fail(10);
  RocksDbStateStoreOptions o;
  o.inline_plan_max_bytes = 256;  // exercise the chunked plan path too
  RocksDbStateStore store(as->get(), o);
  SchedulerOptions so;
  so.lease_ms = 50;
  auto sched = JobScheduler::Recover(&store, so, 0);
  if (!sched.ok()) fail(11);
  auto job = (*sched)->SubmitJob(plan, 0);
  if (!job.ok()) fail(12);
  const size_t n = plan.tasks.size();
  int64_t now = 0;
  for (size_t done = 0;; ++done) {
    if (mode == CrashMode::kExit && done == stop_after) {
      for (int i = 0; i < 3; ++i) {
        auto t = (*sched)->Lease("child", now);
        if (!t.ok() || !t->has_value()) fail(13);
      }
      _exit(0);
    }
    if (mode == CrashMode::kSigkill && done + 2 == n) {
      char c;
      while (read(block_fd, &c, 1) != 0) {
      }
      _exit(14);  // only if the parent closed the pipe without killing us
    }
    auto t = (*sched)->Lease("child", ++now);
    if (!t.ok() || !t->has_value()) fail(15);
    const TaskRef ref = (*t)->ref;
    auto c = (*sched)->Complete("child", ref, "child:" + std::to_string(ref.task), now);
    if (!c.ok() || *c != CompleteOutcome::kCommitted) fail(16);
    const uint32_t ack = ref.task;
    if (write(ack_fd, &ack, sizeof ack) != sizeof ack) fail(17);
  }
}

void CrashAndRecover(const std::string& dir, CrashMode mode) {
  const Plan plan = TinyPlan();
  const size_t n = plan.tasks.size();
  ASSERT_GT(n, 20u);
  const size_t half = n / 2;
  int ack[2], block[2];
  ASSERT_EQ(pipe(ack), 0);
  ASSERT_EQ(pipe(block), 0);
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    close(ack[0]);
    close(block[1]);
    RunChild(dir, plan, mode, half, ack[1], block[0]);
  }
  close(ack[1]);
  close(block[0]);
  std::set<uint32_t> acknowledged;
  uint32_t task = 0;
  bool killed = false;
  while (read(ack[0], &task, sizeof task) == static_cast<ssize_t>(sizeof task)) {
    EXPECT_TRUE(acknowledged.insert(task).second) << "task " << task << " acknowledged twice";
    if (mode == CrashMode::kSigkill && !killed && acknowledged.size() == half) {
      ASSERT_EQ(kill(pid, SIGKILL), 0);  // the child is mid-job, possibly mid-write
      killed = true;
    }
  }
  close(ack[0]);  // EOF: the child is gone; every acknowledgement it sent has been read
  close(block[1]);
  int wstatus = 0;
  ASSERT_EQ(waitpid(pid, &wstatus, 0), pid);
  if (mode == CrashMode::kExit) {
    ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << wstatus;
    EXPECT_EQ(acknowledged.size(), half);
  } else {
    ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << wstatus;
    EXPECT_GE(acknowledged.size(), half);
    EXPECT_LE(acknowledged.size(), n - 2);
  }

  // The parent: reopen, recover, finish the job.
  auto as = ArtifactStore::Open(dir);
  ASSERT_TRUE(as.ok()) << as.status();
  RocksDbStateStore store(as->get());
  SchedulerOptions so;
  so.lease_ms = 50;
  auto loaded = store.LoadAll();
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->size(), 1u);
  const JobId job = (*loaded)[0].id;
  EXPECT_EQ((*loaded)[0].state, JobState::kRunning);
  // Everything acknowledged is stored; anything else stored was committed just before the crash.
  std::map<uint32_t, std::string> before;
  for (const auto& [t, ref] : (*loaded)[0].results) before[t] = ref;
  for (uint32_t t : acknowledged) EXPECT_EQ(before[t], "child:" + std::to_string(t)) << t;

  auto sched = JobScheduler::Recover(&store, so, 1000);
  ASSERT_TRUE(sched.ok()) << sched.status();
  EXPECT_EQ((*sched)->Progress(job, 1000)->tasks_done, before.size());
  std::set<uint32_t> parent_ran;
  int64_t now = 1000;
  for (;;) {
    auto t = (*sched)->Lease("parent", ++now);
    ASSERT_TRUE(t.ok()) << t.status();
    if (!t->has_value()) break;
    const TaskRef ref = (*t)->ref;
    EXPECT_FALSE(acknowledged.contains(ref.task)) << "acknowledged task " << ref.task << " ran again";
    EXPECT_FALSE(before.contains(ref.task)) << "committed task " << ref.task << " ran again";
    parent_ran.insert(ref.task);
    auto c = (*sched)->Complete("parent", ref, "parent:" + std::to_string(ref.task), now);
    ASSERT_TRUE(c.ok()) << c.status();
    ASSERT_EQ(*c, CompleteOutcome::kCommitted);
  }
  EXPECT_EQ((*sched)->Progress(job, now)->state, JobState::kSucceeded);
  if (mode == CrashMode::kExit) {
    EXPECT_EQ(parent_ran.size(), n - half);
  }
  sched->reset();
  as->reset();

  // Reopen once more: the job is succeeded and every task ran exactly once, as its stored reference shows.
  as = ArtifactStore::Open(dir);
  ASSERT_TRUE(as.ok()) << as.status();
  RocksDbStateStore again(as->get());
  auto final_state = again.LoadAll();
  ASSERT_TRUE(final_state.ok()) << final_state.status();
  ASSERT_EQ(final_state->size(), 1u);
  EXPECT_EQ((*final_state)[0].state, JobState::kSucceeded);
  ASSERT_EQ((*final_state)[0].results.size(), n);
  EXPECT_TRUE((*final_state)[0].plan == SerializePlan(plan));
  for (const auto& [t, ref] : (*final_state)[0].results) {
    const bool by_child = before.contains(t);
    EXPECT_NE(by_child, parent_ran.contains(t)) << t;
    EXPECT_EQ(ref, (by_child ? "child:" : "parent:") + std::to_string(t)) << t;
  }
}

TEST_F(RocksDbStateStoreTest, ChildExitsMidJobParentRecoversWithoutRerunningCommittedTasks) {
  CrashAndRecover(dir_, CrashMode::kExit);
}

TEST_F(RocksDbStateStoreTest, ChildKilledMidJobParentRecoversWithoutRerunningCommittedTasks) {
  CrashAndRecover(dir_, CrashMode::kSigkill);
}

}  // namespace
}  // namespace qforge::scheduler
