// The artifact store: one RocksDB directory holding content-addressed chunks, immutable model versions
// (manifests), aliases, and the scheduler's job/task state. docs/storage.md describes the key layout and the
// durability and garbage-collection guarantees; the short version:
//
//  * Chunks are keyed by the XXH3-128 of their uncompressed bytes and stored zstd-compressed with a header
//    (storage/chunk_codec.h). Every read re-verifies the hash: a corrupt chunk is DATA_LOSS naming its id,
//    never wrong bytes.
//  * A version is committed in one synced WriteBatch (manifest + version counter + `latest` alias + chunk
//    reference counts), after checking that every chunk it names is stored. A reader sees all of a version
//    or none of it; version numbers are never reused, and a committed manifest is never rewritten.
//  * A chunk's reference count is the number of manifests naming it plus the number of pins on it. A pin is
//    held by a named holder (e.g. a job id) from upload until the holder releases it, normally in the same
//    atomic write that commits the version using the chunk; pins keep in-flight uploads safe from deletes
//    and garbage collection. Deleting a version or releasing pins decrements counts and deletes chunks
//    reaching zero in the same synced batch. CollectGarbage() recomputes every count from manifests and pins
//    and removes chunks with none (e.g. unpinned uploads whose commit never came).
//  * Job and task state are opaque values (typically serialized protobufs); StateBatch groups several
//    writes into one atomic, synced write.
//
// Every method is thread-safe. One process (one ArtifactStore) may hold a directory at a time: RocksDB's
// LOCK file enforces it and a second Open fails with FAILED_PRECONDITION naming the directory.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "qforge/v1/artifacts.pb.h"
#include "storage/model_ref.h"

namespace rocksdb {
class DB;
class ColumnFamilyHandle;
class WriteBatch;
}  // namespace rocksdb

namespace qforge::storage {

// Column family names (also what a tool opening the directory with plain RocksDB must list).
namespace cf {
inline constexpr char kChunks[] = "chunks";        // chunk id -> chunk value (chunk_codec.h)
inline constexpr char kRefs[] = "refs";            // chunk id -> u64 LE manifests naming it + pins on it
inline constexpr char kPins[] = "pins";            // holder \0 chunk id -> empty
inline constexpr char kManifests[] = "manifests";  // name \0 u64 BE version -> checksummed Manifest
inline constexpr char kAliases[] = "aliases";      // name \0 alias -> u64 LE version
inline constexpr char kJobs[] = "jobs";            // job id -> opaque value
inline constexpr char kTasks[] = "tasks";          // job id \0 task id -> opaque value
inline constexpr char kMeta[] = "meta";            // store format marker, per-model version counters
}  // namespace cf

struct StoreOptions {
  bool create_if_missing = true;
  // PutBlob splits its input into chunks of this many bytes (at most kMaxChunkBytes).
  size_t chunk_bytes = size_t{16} << 20;
  int zstd_level = 3;
  // Chunk values of at least this many bytes are kept in RocksDB blob files rather than in the SST files
  // (0: everything in SST files). See docs/storage.md.
  uint64_t chunk_blob_min_bytes = 64 * 1024;
  // CollectGarbage writes its deletions in synced batches of this many entries.
  size_t gc_batch_entries = 1024;
  // Fault injection for tests: called before each CollectGarbage batch is written, with the batch index.
  // A non-OK status stops the collection right there, as a crash would.
  std::function<absl::Status(int batch_index)> gc_fault_hook;
};

struct ModelVersions {
  std::string name;
  std::vector<uint64_t> versions;  // ascending
  uint64_t latest = 0;             // what `name@latest` resolves to
};

struct GcStats {
  uint64_t chunks_deleted = 0;
  uint64_t refcounts_repaired = 0;           // stored counts that disagreed with the manifests
  std::vector<std::string> missing_chunks;  // referenced by a manifest but not stored (data already lost)
};

// Job/task writes (and pin releases) applied together by ArtifactStore::Write or with a commit: all or none
// of them become visible, in one synced write. Ids are 1..256 bytes without NUL, checked when written.
class StateBatch {
 public:
  void PutJob(std::string job_id, std::string value);
  void DeleteJob(std::string job_id);  // also deletes every task of the job
  void PutTask(std::string job_id, std::string task_id, std::string value);
  void DeleteTask(std::string job_id, std::string task_id);
  // Drops every pin `holder` holds (see ArtifactStore::PutChunk); chunks left with no reference are deleted.
  void ReleasePins(std::string holder);
  bool empty() const { return ops_.empty(); }

 private:
  friend class StateBatchAccess;
  enum class Kind { kPutJob, kDeleteJob, kPutTask, kDeleteTask, kReleasePins };
  struct Op {
    Kind kind;
    std::string job_id, task_id, value;
  };
  std::vector<Op> ops_;
};

class ArtifactStore {
 public:
  // Opens (or creates) the store in `dir`. FAILED_PRECONDITION if another process or handle holds it,
  // DATA_LOSS if RocksDB finds the directory corrupt, NOT_FOUND if it does not exist and !create_if_missing.
  static absl::StatusOr<std::unique_ptr<ArtifactStore>> Open(const std::string& dir, StoreOptions options = {});
  ~ArtifactStore();
  ArtifactStore(const ArtifactStore&) = delete;
  ArtifactStore& operator=(const ArtifactStore&) = delete;

  const std::string& dir() const { return dir_; }
  const StoreOptions& options() const { return options_; }

  // --- chunks ---------------------------------------------------------------------------------------------
  // Stores `bytes` (at most kMaxChunkBytes) and returns its id. Idempotent: storing existing content writes
  // nothing new. With a `pin_holder`, the chunk is also pinned by that holder (once per holder and chunk, in
  // the same atomic write), so no delete or garbage collection removes it until the holder's pins are
  // released; without one, an unreferenced chunk may be collected before a version referencing it commits.
  // Not synced by itself: the synced commit (or state write) that records the id makes it durable, because
  // syncing RocksDB's WAL persists every earlier write as well.
  absl::StatusOr<std::string> PutChunk(std::span<const uint8_t> bytes, const std::string& pin_holder = {});
  // The chunk's bytes, verified. NOT_FOUND if absent, DATA_LOSS naming the id if the stored value is corrupt.
  absl::StatusOr<std::vector<uint8_t>> GetChunk(const std::string& id);
  absl::StatusOr<bool> HasChunk(const std::string& id);
  // Committed manifests naming the chunk plus pins on it (0 for an unpinned, not yet referenced upload).
  absl::StatusOr<uint64_t> ChunkRefCount(const std::string& id);

  // Splits `bytes` into chunks of options().chunk_bytes and stores (and pins) them; empty input gives none.
  absl::StatusOr<std::vector<std::string>> PutBlob(std::span<const uint8_t> bytes, const std::string& pin_holder = {});
  // Concatenates verified chunks; fails (DATA_LOSS) unless they add up to exactly `nbytes`, checked before
  // anything beyond `nbytes` is allocated.
  absl::StatusOr<std::vector<uint8_t>> ReadBlob(const std::vector<std::string>& chunk_ids, uint64_t nbytes);

  // --- versions -------------------------------------------------------------------------------------------
  // Commits `manifest` as the next version of `name` and returns its number (1, 2, ...). Sets the manifest's
  // model ref (and created_unix_ms when 0). FAILED_PRECONDITION naming the chunk if any referenced chunk is
  // not stored. `also` (optional) is applied in the same atomic write, e.g. to mark the assembling task done
  // and release the pins that protected the version's chunks while they were uploaded.
  absl::StatusOr<uint64_t> CommitVersion(const std::string& name, qforge::v1::Manifest manifest,
                                         const StateBatch* also = nullptr);
  // NOT_FOUND naming the model (and version) if absent; DATA_LOSS if the stored manifest fails its checksum.
  absl::StatusOr<qforge::v1::Manifest> GetManifest(const ModelRef& ref);
  absl::StatusOr<qforge::v1::Manifest> GetManifest(const std::string& ref_text);  // ParseModelRef, then above
  // The concrete version a reference names (resolves `latest`).
  absl::StatusOr<uint64_t> ResolveVersion(const ModelRef& ref);
  absl::StatusOr<std::vector<ModelVersions>> ListModels();
  // Deletes one version; `latest` moves to the highest remaining version (or disappears with the last one).
  // Chunks no other version references are deleted in the same synced write. Returns how many were deleted.
  // The number is not reused: the next commit of `name` still gets a new, higher version.
  absl::StatusOr<uint64_t> DeleteVersion(const std::string& name, uint64_t version);
  // Mark and sweep: recomputes every chunk's reference count from all manifests and pins, repairs stored
  // counts that disagree, and deletes chunks with none, including unpinned uploads that were never
  // committed. Fails without deleting anything if a manifest cannot be read (its references would be
  // unknown).
  absl::StatusOr<GcStats> CollectGarbage();

  // --- job and task state (opaque values) ---------------------------------------------------------------------
  // Single writes are synced. List* return (id, value) pairs in id order.
  absl::Status PutJob(const std::string& job_id, const std::string& value);
  absl::StatusOr<std::string> GetJob(const std::string& job_id);
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListJobs();
  absl::Status DeleteJob(const std::string& job_id);  // and its tasks
  absl::Status PutTask(const std::string& job_id, const std::string& task_id, const std::string& value);
  absl::StatusOr<std::string> GetTask(const std::string& job_id, const std::string& task_id);
  // Visits the job's tasks in task-id order until `visit` returns false; for jobs too large to list.
  absl::Status ScanTasks(const std::string& job_id,
                         const std::function<bool(const std::string& task_id, const std::string& value)>& visit);
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ListTasks(const std::string& job_id);
  // Applies every write of `batch` atomically in one synced write. INVALID_ARGUMENT (nothing written) if an
  // id is invalid.
  absl::Status Write(const StateBatch& batch);

  // Flushes memtables to SST files (tests use it to corrupt table files; also useful before backups).
  absl::Status Flush();

 private:
  ArtifactStore() = default;
  absl::StatusOr<qforge::v1::Manifest> ReadManifest(const std::string& name, uint64_t version);
  absl::StatusOr<uint64_t> ReadU64(rocksdb::ColumnFamilyHandle* family, const std::string& key, bool* found);
  // With refs_mu_ held: adds `deltas` to stored reference counts in `wb`; a count reaching zero deletes the
  // chunk. Returns the number of chunks deleted.
  absl::StatusOr<uint64_t> ApplyRefDeltas(const std::map<std::string, int64_t>& deltas, rocksdb::WriteBatch* wb);
  // With refs_mu_ held: adds the pin releases of `batch` to `deltas` and their key deletions to `wb`.
  absl::Status CollectPinReleases(const StateBatch& batch, std::map<std::string, int64_t>* deltas,
                                  rocksdb::WriteBatch* wb);

  std::string dir_;
  StoreOptions options_;
  std::unique_ptr<rocksdb::DB> db_;
  std::vector<rocksdb::ColumnFamilyHandle*> handles_;
  rocksdb::ColumnFamilyHandle* chunks_ = nullptr;
  rocksdb::ColumnFamilyHandle* refs_ = nullptr;
  rocksdb::ColumnFamilyHandle* manifests_ = nullptr;
  rocksdb::ColumnFamilyHandle* aliases_ = nullptr;
  rocksdb::ColumnFamilyHandle* jobs_ = nullptr;
  rocksdb::ColumnFamilyHandle* tasks_ = nullptr;
  rocksdb::ColumnFamilyHandle* meta_ = nullptr;
  rocksdb::ColumnFamilyHandle* pins_ = nullptr;
  // Serialises everything that reads then writes reference counts, version counters or aliases: commits,
  // deletes, GC and the check-then-insert of a new chunk. Reads take no lock.
  std::mutex refs_mu_;
};

}  // namespace qforge::storage
