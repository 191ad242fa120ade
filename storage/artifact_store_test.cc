#include "storage/artifact_store.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "storage/chunk_codec.h"
#include "storage/test_util.h"

namespace qforge::storage {
namespace {

using testing::RandomBytes;
using testing::RawDb;
using testing::StoreTest;

// A manifest with one tensor per chunk list.
qforge::v1::Manifest ManifestOf(const std::vector<std::vector<std::string>>& tensors) {
  qforge::v1::Manifest m;
  for (size_t i = 0; i < tensors.size(); ++i) {
    auto* t = m.add_tensors();
    t->set_name(absl::StrCat("t", i));
    t->set_format("f32");
    for (const auto& id : tensors[i]) t->add_chunk_ids(id);
  }
  return m;
}

std::string MustPut(ArtifactStore& store, const std::vector<uint8_t>& bytes) {
  auto id = store.PutChunk(bytes);
  EXPECT_TRUE(id.ok()) << id.status();
  return id.ok() ? *id : std::string();
}

using ArtifactStoreTest = StoreTest;

TEST_F(ArtifactStoreTest, ChunksRoundTripEmptySmallAndLarge) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  for (size_t n : {size_t{0}, size_t{1}, size_t{4096}, size_t{3} << 20}) {
    const auto bytes = RandomBytes(n, n + 1);
    auto id = store->PutChunk(bytes);
    ASSERT_TRUE(id.ok()) << id.status();
    EXPECT_EQ(*id, ChunkIdOf(bytes));
    auto back = store->GetChunk(*id);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, bytes);
  }
}

TEST_F(ArtifactStoreTest, LargeBlobsAreSplitIntoBoundedChunks) {
  auto store = OpenStore();  // default 16 MiB chunks
  ASSERT_NE(store, nullptr);
  const auto bytes = RandomBytes((size_t{40} << 20) + 123, 9);
  auto ids = store->PutBlob(bytes);
  ASSERT_TRUE(ids.ok()) << ids.status();
  ASSERT_EQ(ids->size(), 3u);
  auto first = store->GetChunk((*ids)[0]);
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->size(), size_t{16} << 20);
  auto back = store->ReadBlob(*ids, bytes.size());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == bytes);
  // The expected size is enforced both ways.
  EXPECT_EQ(store->ReadBlob(*ids, bytes.size() - 1).status().code(), absl::StatusCode::kDataLoss);
  EXPECT_EQ(store->ReadBlob(*ids, bytes.size() + 1).status().code(), absl::StatusCode::kDataLoss);
  auto empty = store->PutBlob({});
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST_F(ArtifactStoreTest, PutChunkIsIdempotentAndContentAddressed) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const auto a = RandomBytes(1000, 1);
  auto b = a;
  b[999] ^= 1;
  const std::string id_a = MustPut(*store, a);
  EXPECT_EQ(MustPut(*store, a), id_a);
  const std::string id_b = MustPut(*store, b);
  EXPECT_NE(id_a, id_b);
  auto refs = store->ChunkRefCount(id_a);
  ASSERT_TRUE(refs.ok());
  EXPECT_EQ(*refs, 0u);
  EXPECT_TRUE(*store->HasChunk(id_a));
  auto missing = store->GetChunk(std::string(32, '0'));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find(std::string(32, '0')), std::string::npos);
  EXPECT_FALSE(*store->HasChunk(std::string(32, '0')));
  EXPECT_EQ(store->GetChunk("nothex").status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ArtifactStoreTest, VersionsCountUpAndLatestMoves) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  const std::string b = MustPut(*store, RandomBytes(100, 2));
  auto v1 = store->CommitVersion("llama", ManifestOf({{a}}));
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(*v1, 1u);
  auto latest = store->GetManifest("llama");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->model().version(), "1");
  auto v2 = store->CommitVersion("llama", ManifestOf({{b}, {a, b}}));
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(*v2, 2u);
  latest = store->GetManifest("llama@latest");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(latest->model().name(), "llama");
  EXPECT_EQ(latest->model().version(), "2");
  EXPECT_EQ(latest->tensors_size(), 2);
  EXPECT_GT(latest->created_unix_ms(), 0);

  // Version 1 is unchanged by the later commit.
  auto m1 = store->GetManifest("llama@1");
  ASSERT_TRUE(m1.ok());
  ASSERT_EQ(m1->tensors_size(), 1);
  EXPECT_EQ(m1->tensors(0).chunk_ids(0), a);
  EXPECT_EQ(*store->ChunkRefCount(a), 2u);
  EXPECT_EQ(*store->ChunkRefCount(b), 1u);

  ASSERT_TRUE(store->CommitVersion("other", ManifestOf({{b}})).ok());
  auto models = store->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 2u);
  EXPECT_EQ((*models)[0].name, "llama");
  EXPECT_EQ((*models)[0].versions, (std::vector<uint64_t>{1, 2}));
  EXPECT_EQ((*models)[0].latest, 2u);
  EXPECT_EQ((*models)[1].name, "other");
  EXPECT_EQ((*models)[1].latest, 1u);
}

TEST_F(ArtifactStoreTest, DeletedVersionNumbersAreNeverReused) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  ASSERT_EQ(*store->CommitVersion("m", ManifestOf({{a}})), 1u);
  ASSERT_EQ(*store->CommitVersion("m", ManifestOf({{a}})), 2u);
  ASSERT_TRUE(store->DeleteVersion("m", 2).ok());
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), 1u);
  // The next commit is 3: "m@2" keeps meaning the deleted version, never a new one.
  EXPECT_EQ(*store->CommitVersion("m", ManifestOf({{a}})), 3u);
  EXPECT_EQ(store->GetManifest("m@2").status().code(), absl::StatusCode::kNotFound);
  // The counter survives a reopen.
  store.reset();
  store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->CommitVersion("m", ManifestOf({{a}})), 4u);
}

TEST_F(ArtifactStoreTest, CommitWithAMissingChunkFailsAndLeavesNothingVisible) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  const std::string missing = ChunkIdOf(RandomBytes(100, 2));
  StateBatch also;
  also.PutTask("job1", "assemble", "done");
  auto v = store->CommitVersion("llama", ManifestOf({{a}, {a, missing}}), &also);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(v.status().message().find(missing), std::string::npos) << v.status();
  EXPECT_TRUE(store->ListModels()->empty());
  auto latest = store->GetManifest("llama");
  EXPECT_EQ(latest.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(latest.status().message().find("llama"), std::string::npos);
  EXPECT_EQ(store->GetManifest("llama@1").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(*store->ChunkRefCount(a), 0u);
  EXPECT_EQ(store->GetTask("job1", "assemble").status().code(), absl::StatusCode::kNotFound);
  // The failed attempt consumed no version number.
  EXPECT_EQ(*store->CommitVersion("llama", ManifestOf({{a}})), 1u);
}

TEST_F(ArtifactStoreTest, CommitRejectsBadNamesAndManifests) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  for (const char* bad : {"", "Llama", "a@1", "a/b", "-a"}) {
    EXPECT_EQ(store->CommitVersion(bad, ManifestOf({{a}})).status().code(), absl::StatusCode::kInvalidArgument)
        << bad;
  }
  EXPECT_EQ(store->CommitVersion("m", ManifestOf({{"not-a-chunk-id"}})).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto dup = ManifestOf({{a}, {a}});
  dup.mutable_tensors(1)->set_name("t0");
  EXPECT_EQ(store->CommitVersion("m", dup).status().code(), absl::StatusCode::kInvalidArgument);
  auto unknown = store->GetManifest("nosuch@7");
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown.status().message().find("nosuch@7"), std::string::npos) << unknown.status();
  auto unknown_latest = store->GetManifest("nosuch");
  EXPECT_EQ(unknown_latest.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(unknown_latest.status().message().find("nosuch"), std::string::npos);
  EXPECT_EQ(store->GetManifest("a@").status().code(), absl::StatusCode::kInvalidArgument);
  auto del = store->DeleteVersion("nosuch", 3);
  EXPECT_EQ(del.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(del.status().message().find("nosuch@3"), std::string::npos);
}

TEST_F(ArtifactStoreTest, ConcurrentCommitsGetDistinctVersions) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  constexpr int kThreads = 4, kCommits = 8;
  std::vector<std::vector<uint64_t>> got(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCommits; ++i) {
        // Each thread uploads its own chunk and a shared one, racing on the shared chunk's count too.
        auto own = store->PutChunk(RandomBytes(64, 1000 * t + i));
        auto shared = store->PutChunk(RandomBytes(64, 7));
        if (!own.ok() || !shared.ok()) return;
        auto v = store->CommitVersion("m", ManifestOf({{*own, *shared}}));
        if (v.ok()) got[t].push_back(*v);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::set<uint64_t> all;
  for (const auto& g : got) {
    EXPECT_EQ(g.size(), static_cast<size_t>(kCommits));
    all.insert(g.begin(), g.end());
  }
  ASSERT_EQ(all.size(), static_cast<size_t>(kThreads * kCommits));
  EXPECT_EQ(*all.begin(), 1u);
  EXPECT_EQ(*all.rbegin(), static_cast<uint64_t>(kThreads * kCommits));
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), static_cast<uint64_t>(kThreads * kCommits));
  EXPECT_EQ(*store->ChunkRefCount(ChunkIdOf(RandomBytes(64, 7))), static_cast<uint64_t>(kThreads * kCommits));
}

TEST_F(ArtifactStoreTest, DeleteCollectsOnlyChunksNoOtherVersionReferences) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  const std::string b = MustPut(*store, RandomBytes(100, 2));
  const std::string c = MustPut(*store, RandomBytes(100, 3));
  ASSERT_EQ(*store->CommitVersion("m", ManifestOf({{a, b}})), 1u);
  ASSERT_EQ(*store->CommitVersion("m", ManifestOf({{b}, {c}})), 2u);

  auto collected = store->DeleteVersion("m", 1);
  ASSERT_TRUE(collected.ok()) << collected.status();
  EXPECT_EQ(*collected, 1u);
  EXPECT_EQ(store->GetChunk(a).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->GetChunk(b).ok());
  EXPECT_TRUE(store->GetChunk(c).ok());
  EXPECT_EQ(*store->ChunkRefCount(b), 1u);
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), 2u);
  EXPECT_EQ(store->GetManifest("m@1").status().code(), absl::StatusCode::kNotFound);

  collected = store->DeleteVersion("m", 2);
  ASSERT_TRUE(collected.ok());
  EXPECT_EQ(*collected, 2u);
  EXPECT_FALSE(*store->HasChunk(b));
  EXPECT_FALSE(*store->HasChunk(c));
  EXPECT_EQ(store->GetManifest("m").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->ListModels()->empty());
}

TEST_F(ArtifactStoreTest, DeletingTheLatestVersionMovesTheAliasDown) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string a = MustPut(*store, RandomBytes(100, 1));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{a}})).ok());
  ASSERT_TRUE(store->DeleteVersion("m", 3).ok());
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), 2u);
  ASSERT_TRUE(store->DeleteVersion("m", 1).ok());  // not the latest: alias stays
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), 2u);
  EXPECT_EQ(*store->ChunkRefCount(a), 1u);
}

TEST_F(ArtifactStoreTest, CollectGarbageRemovesUncommittedChunksAndKeepsReferencedOnes) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const std::string kept = MustPut(*store, RandomBytes(100, 1));
  const std::string orphan = MustPut(*store, RandomBytes(100, 2));
  ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{kept}})).ok());
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->chunks_deleted, 1u);
  EXPECT_EQ(stats->refcounts_repaired, 0u);
  EXPECT_TRUE(stats->missing_chunks.empty());
  EXPECT_FALSE(*store->HasChunk(orphan));
  EXPECT_TRUE(store->GetChunk(kept).ok());
  EXPECT_EQ(*store->ChunkRefCount(kept), 1u);
}

TEST_F(ArtifactStoreTest, CollectGarbageRepairsWrongReferenceCounts) {
  std::string kept, orphan;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    kept = MustPut(*store, RandomBytes(100, 1));
    orphan = MustPut(*store, RandomBytes(100, 2));
    ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{kept}})).ok());
  }
  {
    // Damage the counts: the referenced chunk claims none, the orphan claims five.
    RawDb raw(dir_);
    raw.Put(cf::kRefs, kept, std::string(8, '\0'));
    raw.Put(cf::kRefs, orphan, std::string("\5\0\0\0\0\0\0\0", 8));
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->chunks_deleted, 1u);
  EXPECT_EQ(stats->refcounts_repaired, 1u);
  EXPECT_FALSE(*store->HasChunk(orphan));
  EXPECT_EQ(*store->ChunkRefCount(kept), 1u);
  EXPECT_TRUE(store->GetChunk(kept).ok());
}

TEST_F(ArtifactStoreTest, GcFaultStopsCleanlyWithoutDeletingReferencedChunks) {
  StoreOptions options;
  options.gc_batch_entries = 2;
  options.gc_fault_hook = [](int batch) {
    return batch == 1 ? absl::UnavailableError("injected fault") : absl::OkStatus();
  };
  auto store = OpenStore(options);
  ASSERT_NE(store, nullptr);
  const std::string kept = MustPut(*store, RandomBytes(100, 1));
  ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{kept}})).ok());
  std::vector<std::string> orphans;
  for (int i = 0; i < 10; ++i) orphans.push_back(MustPut(*store, RandomBytes(100, 100 + i)));
  auto stats = store->CollectGarbage();
  EXPECT_EQ(stats.status().code(), absl::StatusCode::kUnavailable);
  int left = 0;
  for (const auto& o : orphans) left += *store->HasChunk(o) ? 1 : 0;
  EXPECT_EQ(left, 8);  // exactly the first batch went through
  EXPECT_TRUE(store->GetChunk(kept).ok());
}

TEST_F(ArtifactStoreTest, PinsKeepInFlightUploadsAliveUntilTheCommitReleasesThem) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  const auto bytes_a = RandomBytes(100, 1);
  const std::string a = MustPut(*store, bytes_a);
  ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{a}})).ok());
  // A job re-uploads A (deduplicated) and a new B, pinned under its id.
  ASSERT_EQ(*store->PutChunk(bytes_a, "job-7"), a);
  ASSERT_EQ(*store->PutChunk(bytes_a, "job-7"), a);  // one pin per holder and chunk
  auto b = store->PutChunk(RandomBytes(100, 2), "job-7");
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*store->ChunkRefCount(a), 2u);
  EXPECT_EQ(*store->ChunkRefCount(*b), 1u);
  // Neither deleting the only version naming A nor a collection touches the pinned chunks.
  EXPECT_EQ(*store->DeleteVersion("m", 1), 0u);
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->chunks_deleted, 0u);
  EXPECT_EQ(stats->refcounts_repaired, 0u);
  EXPECT_TRUE(store->GetChunk(a).ok());
  // The commit takes over the references and drops the pins in one write.
  StateBatch also;
  also.ReleasePins("job-7");
  also.ReleasePins("job-7");  // releasing twice in a batch counts once
  also.PutTask("job-7", "assemble", "done");
  ASSERT_EQ(*store->CommitVersion("m", ManifestOf({{a, *b}}), &also), 2u);
  EXPECT_EQ(*store->ChunkRefCount(a), 1u);
  EXPECT_EQ(*store->ChunkRefCount(*b), 1u);
  stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok());
  EXPECT_EQ(stats->chunks_deleted, 0u);
  EXPECT_EQ(stats->refcounts_repaired, 0u);
}

TEST_F(ArtifactStoreTest, ReleasingPinsOfAnAbandonedUploadDeletesItsChunks) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto c = store->PutChunk(RandomBytes(100, 3), "job-1");
  ASSERT_TRUE(c.ok());
  ASSERT_EQ(*store->PutChunk(RandomBytes(100, 3), "job-2"), *c);
  EXPECT_EQ(*store->ChunkRefCount(*c), 2u);
  StateBatch release1;
  release1.ReleasePins("job-1");
  ASSERT_TRUE(store->Write(release1).ok());
  EXPECT_EQ(*store->ChunkRefCount(*c), 1u);
  StateBatch release2;
  release2.ReleasePins("job-2");
  ASSERT_TRUE(store->Write(release2).ok());
  EXPECT_FALSE(*store->HasChunk(*c));
  EXPECT_EQ(store->GetChunk(*c).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(store->PutChunk(RandomBytes(1, 1), std::string(300, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Runs `body` in a forked child that ends with _exit (no destructors, no RocksDB shutdown: as kill -9 leaves
// things) and returns the child's exit code.
int RunInCrashingChild(const std::function<int()>& body) {
  const pid_t pid = fork();
  if (pid == 0) _exit(body());
  int status = 0;
  EXPECT_EQ(waitpid(pid, &status, 0), pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST_F(ArtifactStoreTest, CommittedVersionSurvivesAProcessKilledWithoutClosing) {
  const auto bytes = RandomBytes(200000, 11);
  const int rc = RunInCrashingChild([&] {
    auto store = ArtifactStore::Open(dir_);
    if (!store.ok()) return 10;
    auto ids = (*store)->PutBlob(bytes);
    if (!ids.ok()) return 11;
    qforge::v1::Manifest m;
    auto* t = m.add_tensors();
    t->set_name("w");
    for (const auto& id : *ids) t->add_chunk_ids(id);
    StateBatch also;
    also.PutJob("job1", "succeeded");
    auto v = (*store)->CommitVersion("m", m, &also);
    if (!v.ok() || *v != 1) return 12;
    (void)store->release();  // leak the store: the process ends with the DB open
    return 0;
  });
  ASSERT_EQ(rc, 0);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto m = store->GetManifest("m@latest");
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_EQ(m->tensors_size(), 1);
  std::vector<std::string> ids(m->tensors(0).chunk_ids().begin(), m->tensors(0).chunk_ids().end());
  auto back = store->ReadBlob(ids, bytes.size());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == bytes);
  EXPECT_EQ(*store->GetJob("job1"), "succeeded");
}

TEST_F(ArtifactStoreTest, KillNineDuringCommitsNeverLeavesAHalfMadeVersion) {
  int ready[2];
  ASSERT_EQ(pipe(ready), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    auto store = ArtifactStore::Open(dir_);
    if (!store.ok()) _exit(1);
    for (uint64_t i = 0;; ++i) {
      // Every version has its own chunks plus one shared by all, so a torn commit would show up as a
      // manifest naming a chunk that is absent or a count that disagrees.
      const std::string job = absl::StrCat("job", i);
      auto own = (*store)->PutBlob(RandomBytes(50000, 1000 + i), job);
      auto shared = (*store)->PutChunk(RandomBytes(1000, 1), job);
      if (!own.ok() || !shared.ok()) _exit(2);
      own->push_back(*shared);
      StateBatch also;
      also.ReleasePins(job);
      also.PutTask(job, "assemble", "done");
      if (!(*store)->CommitVersion("m", ManifestOf({*own}), &also).ok()) _exit(3);
      if (i == 4 && write(ready[1], "x", 1) != 1) _exit(4);
    }
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);  // at least five versions are committed
  ASSERT_EQ(kill(pid, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status));
  close(ready[0]);
  close(ready[1]);

  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto models = store->ListModels();
  ASSERT_TRUE(models.ok());
  ASSERT_EQ(models->size(), 1u);
  const auto& versions = (*models)[0].versions;
  ASSERT_GE(versions.size(), 5u);
  // Versions are 1..n without gaps, and latest is the newest.
  for (size_t i = 0; i < versions.size(); ++i) EXPECT_EQ(versions[i], i + 1);
  EXPECT_EQ((*models)[0].latest, versions.back());
  for (uint64_t v : versions) {
    auto m = store->GetManifest(ModelRef{"m", v});
    ASSERT_TRUE(m.ok()) << m.status();
    for (const auto& id : m->tensors(0).chunk_ids()) EXPECT_TRUE(store->GetChunk(id).ok()) << "m@" << v << " " << id;
    EXPECT_EQ(*store->GetTask(absl::StrCat("job", v - 1), "assemble"), "done");
  }
  // Counts match the manifests exactly; the only things to collect are uploads of the interrupted commit.
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->refcounts_repaired, 0u);
  EXPECT_TRUE(stats->missing_chunks.empty());
}

TEST_F(ArtifactStoreTest, CrashMidGcNeverLosesAReferencedChunk) {
  std::string kept_a, kept_b;
  std::vector<std::string> orphans;
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    kept_a = MustPut(*store, RandomBytes(1000, 1));
    kept_b = MustPut(*store, RandomBytes(1000, 2));
    ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{kept_a, kept_b}})).ok());
    ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{kept_b}})).ok());
    for (int i = 0; i < 10; ++i) orphans.push_back(MustPut(*store, RandomBytes(1000, 100 + i)));
    ASSERT_TRUE(store->DeleteVersion("m", 2).ok());
  }
  const int rc = RunInCrashingChild([&] {
    StoreOptions options;
    options.gc_batch_entries = 3;
    // The process dies just before writing its third batch.
    options.gc_fault_hook = [](int batch) {
      if (batch == 2) _exit(42);
      return absl::OkStatus();
    };
    auto store = ArtifactStore::Open(dir_, options);
    if (!store.ok()) return 10;
    (void)(*store)->CollectGarbage();
    return 11;
  });
  ASSERT_EQ(rc, 42);
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  int left = 0;
  for (const auto& o : orphans) left += *store->HasChunk(o) ? 1 : 0;
  EXPECT_EQ(left, 4);  // two batches of three were written before the crash
  for (const auto& id : {kept_a, kept_b}) {
    EXPECT_TRUE(store->GetChunk(id).ok()) << id;
    EXPECT_EQ(*store->ChunkRefCount(id), 1u);
  }
  auto stats = store->CollectGarbage();
  ASSERT_TRUE(stats.ok()) << stats.status();
  EXPECT_EQ(stats->chunks_deleted, 4u);
  EXPECT_EQ(stats->refcounts_repaired, 0u);
  for (const auto& o : orphans) EXPECT_FALSE(*store->HasChunk(o));
  EXPECT_TRUE(store->GetChunk(kept_a).ok());
}

TEST_F(ArtifactStoreTest, SecondOpenOfALockedDirectoryFailsNamingIt) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  auto second = ArtifactStore::Open(dir_);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_NE(second.status().message().find(dir_), std::string::npos) << second.status();
  store.reset();
  EXPECT_TRUE(ArtifactStore::Open(dir_).ok());
}

TEST_F(ArtifactStoreTest, OpenWhileAnotherProcessHoldsTheStoreFailsNamingIt) {
  int ready[2], done[2];
  ASSERT_EQ(pipe(ready), 0);
  ASSERT_EQ(pipe(done), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    auto store = ArtifactStore::Open(dir_);
    const char c = store.ok() ? 'y' : 'n';
    if (write(ready[1], &c, 1) != 1) _exit(2);
    char wait_for_parent;
    if (read(done[0], &wait_for_parent, 1) != 1) _exit(3);
    _exit(store.ok() ? 0 : 1);
  }
  char c = 0;
  ASSERT_EQ(read(ready[0], &c, 1), 1);
  ASSERT_EQ(c, 'y');
  auto second = ArtifactStore::Open(dir_);
  EXPECT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), absl::StatusCode::kFailedPrecondition) << second.status();
  EXPECT_NE(second.status().message().find(dir_), std::string::npos) << second.status();
  ASSERT_EQ(write(done[1], "x", 1), 1);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  for (int fd : {ready[0], ready[1], done[0], done[1]}) close(fd);
  // The lock goes with the process.
  EXPECT_TRUE(ArtifactStore::Open(dir_).ok());
}

TEST_F(ArtifactStoreTest, OpenWithoutCreateOnAMissingDirectoryIsNotFound) {
  StoreOptions options;
  options.create_if_missing = false;
  auto s = ArtifactStore::Open(dir_, options);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  options.create_if_missing = true;
  options.chunk_bytes = kMaxChunkBytes + 1;
  EXPECT_EQ(ArtifactStore::Open(dir_, options).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ArtifactStoreTest, JobAndTaskStateRoundTripsAndScansByJob) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->PutJob("a", "job a").ok());
  ASSERT_TRUE(store->PutJob("ab", "job ab").ok());
  ASSERT_TRUE(store->PutTask("a", "t2", "x2").ok());
  ASSERT_TRUE(store->PutTask("a", "t1", "x1").ok());
  ASSERT_TRUE(store->PutTask("ab", "t1", "other").ok());
  EXPECT_EQ(*store->GetJob("a"), "job a");
  EXPECT_EQ(*store->GetTask("a", "t1"), "x1");
  auto jobs = store->ListJobs();
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(*jobs, (std::vector<std::pair<std::string, std::string>>{{"a", "job a"}, {"ab", "job ab"}}));
  auto tasks = store->ListTasks("a");
  ASSERT_TRUE(tasks.ok());
  EXPECT_EQ(*tasks, (std::vector<std::pair<std::string, std::string>>{{"t1", "x1"}, {"t2", "x2"}}));
  int visited = 0;
  ASSERT_TRUE(store->ScanTasks("a", [&](const std::string&, const std::string&) { return ++visited < 1; }).ok());
  EXPECT_EQ(visited, 1);

  ASSERT_TRUE(store->DeleteJob("a").ok());
  EXPECT_EQ(store->GetJob("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(store->ListTasks("a")->empty());
  EXPECT_EQ(*store->GetTask("ab", "t1"), "other");
  EXPECT_EQ(store->GetTask("a", "t1").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ArtifactStoreTest, StateBatchIsAllOrNothing) {
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  StateBatch bad;
  bad.PutTask("job", "t1", "done");
  bad.PutJob(std::string("a\0b", 3), "x");
  EXPECT_EQ(store->Write(bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->GetTask("job", "t1").status().code(), absl::StatusCode::kNotFound);

  StateBatch good;
  good.PutTask("job", "t1", "done");
  good.PutJob("job", "running");
  good.DeleteTask("job", "t0");
  ASSERT_TRUE(store->Write(good).ok());
  EXPECT_EQ(*store->GetTask("job", "t1"), "done");
  EXPECT_EQ(*store->GetJob("job"), "running");
  EXPECT_EQ(store->PutJob("", "x").code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(store->PutTask("job", std::string(257, 'x'), "x").code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ArtifactStoreTest, StateIsDurableAcrossReopen) {
  {
    auto store = OpenStore();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->PutJob("j", "v").ok());
    const std::string a = MustPut(*store, RandomBytes(10, 1));
    StateBatch also;
    also.PutTask("j", "assemble", "done");
    ASSERT_TRUE(store->CommitVersion("m", ManifestOf({{a}}), &also).ok());
  }
  auto store = OpenStore();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(*store->GetJob("j"), "v");
  EXPECT_EQ(*store->GetTask("j", "assemble"), "done");
  EXPECT_EQ(*store->ResolveVersion(ModelRef{"m", std::nullopt}), 1u);
}

}  // namespace
}  // namespace qforge::storage
