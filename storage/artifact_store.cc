#include "storage/artifact_store.h"

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"
#include "storage/chunk_codec.h"

namespace qforge::storage {
namespace {

constexpr char kFormatKey[] = "format";
constexpr char kFormatValue[] = "qforge-artifact-store 1";
constexpr char kNextVersionPrefix[] = "next_version";  // + '\0' + name
constexpr char kLatestAlias[] = "latest";
constexpr size_t kMaxStateIdBytes = 256;
constexpr size_t kManifestChecksumChars = kChunkIdChars;

// Translates a RocksDB status into the canonical space, keeping RocksDB's message after our context.
absl::Status FromRocks(const rocksdb::Status& s, const std::string& context) {
  if (s.ok()) return absl::OkStatus();
  const std::string msg = absl::StrCat(context, ": ", s.ToString());
  if (s.IsNotFound()) return absl::NotFoundError(msg);
  if (s.IsCorruption()) return absl::DataLossError(msg);
  if (s.IsInvalidArgument()) return absl::InvalidArgumentError(msg);
  if (s.IsNoSpace()) return absl::ResourceExhaustedError(msg);
  if (s.IsBusy() || s.IsTryAgain() || s.IsTimedOut() || s.IsIOError()) return absl::UnavailableError(msg);
  if (s.IsNotSupported()) return absl::UnimplementedError(msg);
  return absl::InternalError(msg);
}

std::string EncodeU64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

bool DecodeU64(const rocksdb::Slice& s, uint64_t* v) {
  if (s.size() != 8) return false;
  *v = 0;
  for (int i = 0; i < 8; ++i) *v |= uint64_t{static_cast<uint8_t>(s[i])} << (8 * i);
  return true;
}

// Big-endian so that a name's versions sort numerically under the name prefix.
std::string ManifestKey(const std::string& name, uint64_t version) {
  std::string k = name;
  k.push_back('\0');
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>((version >> (8 * i)) & 0xff));
  return k;
}

bool ParseManifestKey(const rocksdb::Slice& key, std::string* name, uint64_t* version) {
  if (key.size() < 10 || key[key.size() - 9] != '\0') return false;
  name->assign(key.data(), key.size() - 9);
  *version = 0;
  for (size_t i = key.size() - 8; i < key.size(); ++i) *version = (*version << 8) | static_cast<uint8_t>(key[i]);
  return true;
}

std::string NamePrefix(const std::string& name) { return name + std::string(1, '\0'); }
std::string AliasKey(const std::string& name, const std::string& alias) { return NamePrefix(name) + alias; }
std::string NextVersionKey(const std::string& name) {
  return std::string(kNextVersionPrefix) + std::string(1, '\0') + name;
}
std::string TaskKey(const std::string& job_id, const std::string& task_id) { return NamePrefix(job_id) + task_id; }
std::string PinKey(const std::string& holder, const std::string& chunk_id) { return NamePrefix(holder) + chunk_id; }

absl::Status ValidateStateId(const std::string& what, const std::string& id) {
  if (id.empty() || id.size() > kMaxStateIdBytes || id.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(what, " '", id.substr(0, 80), "' must be 1..", kMaxStateIdBytes,
                                                   " bytes without NUL"));
  }
  return absl::OkStatus();
}

rocksdb::WriteOptions SyncedWrite() {
  rocksdb::WriteOptions w;
  w.sync = true;
  return w;
}

rocksdb::ReadOptions VerifiedRead() {
  rocksdb::ReadOptions r;
  r.verify_checksums = true;
  return r;
}

std::string ManifestValue(const qforge::v1::Manifest& m) {
  const std::string body = m.SerializeAsString();
  return ChunkIdOf(std::span(reinterpret_cast<const uint8_t*>(body.data()), body.size())) + body;
}

// Every chunk a manifest names, once: each manifest holds one reference per distinct chunk.
absl::StatusOr<std::set<std::string>> ManifestChunks(const qforge::v1::Manifest& m) {
  std::set<std::string> ids;
  for (const auto& t : m.tensors()) {
    for (const std::string& id : t.chunk_ids()) {
      if (absl::Status s = ValidateChunkId(id); !s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name(), "': ", s.message()));
      }
      ids.insert(id);
    }
  }
  if (!m.vocab_chunk_id().empty()) {
    QF_RETURN_IF_ERROR(ValidateChunkId(m.vocab_chunk_id()));
    ids.insert(m.vocab_chunk_id());
  }
  return ids;
}

}  // namespace

// --- StateBatch ---------------------------------------------------------------------------------------------

void StateBatch::PutJob(std::string job_id, std::string value) {
  ops_.push_back({Kind::kPutJob, std::move(job_id), {}, std::move(value)});
}
void StateBatch::DeleteJob(std::string job_id) { ops_.push_back({Kind::kDeleteJob, std::move(job_id), {}, {}}); }
void StateBatch::PutTask(std::string job_id, std::string task_id, std::string value) {
  ops_.push_back({Kind::kPutTask, std::move(job_id), std::move(task_id), std::move(value)});
}
void StateBatch::DeleteTask(std::string job_id, std::string task_id) {
  ops_.push_back({Kind::kDeleteTask, std::move(job_id), std::move(task_id), {}});
}
void StateBatch::ReleasePins(std::string holder) { ops_.push_back({Kind::kReleasePins, std::move(holder), {}, {}}); }

// Reads StateBatch's private ops: validation and translation into RocksDB writes.
class StateBatchAccess {
 public:
  static absl::Status Validate(const StateBatch& b) {
    for (const auto& op : b.ops_) {
      QF_RETURN_IF_ERROR(ValidateStateId(op.kind == StateBatch::Kind::kReleasePins ? "pin holder" : "job id", op.job_id));
      if (op.kind == StateBatch::Kind::kPutTask || op.kind == StateBatch::Kind::kDeleteTask) {
        QF_RETURN_IF_ERROR(ValidateStateId("task id", op.task_id));
      }
    }
    return absl::OkStatus();
  }
  // Distinct holders: releasing a holder twice in one batch must not count its pins twice.
  static std::set<std::string> PinHolders(const StateBatch& b) {
    std::set<std::string> holders;
    for (const auto& op : b.ops_) {
      if (op.kind == StateBatch::Kind::kReleasePins) holders.insert(op.job_id);
    }
    return holders;
  }
  // Job and task writes only; pin releases need reference counting (ArtifactStore::CollectPinReleases).
  static void Apply(const StateBatch& b, rocksdb::WriteBatch* wb, rocksdb::ColumnFamilyHandle* jobs,
                    rocksdb::ColumnFamilyHandle* tasks) {
    for (const auto& op : b.ops_) {
      switch (op.kind) {
        case StateBatch::Kind::kReleasePins:
          break;
        case StateBatch::Kind::kPutJob:
          wb->Put(jobs, op.job_id, op.value);
          break;
        case StateBatch::Kind::kDeleteJob: {
          wb->Delete(jobs, op.job_id);
          // Task keys are job \0 task, so [job \0, job \1) is exactly the job's tasks.
          wb->DeleteRange(tasks, NamePrefix(op.job_id), op.job_id + std::string(1, '\1'));
          break;
        }
        case StateBatch::Kind::kPutTask:
          wb->Put(tasks, TaskKey(op.job_id, op.task_id), op.value);
          break;
        case StateBatch::Kind::kDeleteTask:
          wb->Delete(tasks, TaskKey(op.job_id, op.task_id));
          break;
      }
    }
  }
};

// --- open / close -------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<ArtifactStore>> ArtifactStore::Open(const std::string& dir, StoreOptions options) {
  if (options.chunk_bytes == 0 || options.chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk_bytes must be in [1, ", kMaxChunkBytes, "], got ", options.chunk_bytes));
  }
  if (options.gc_batch_entries == 0) return absl::InvalidArgumentError("gc_batch_entries must be positive");
  std::error_code ec;
  if (!options.create_if_missing && !std::filesystem::exists(std::filesystem::path(dir) / "CURRENT", ec)) {
    return absl::NotFoundError(absl::StrCat("artifact store ", dir, " does not exist"));
  }

  rocksdb::DBOptions db_options;
  db_options.create_if_missing = options.create_if_missing;
  db_options.create_missing_column_families = true;
  // Refuse to open (rather than silently drop data) when files are missing or inconsistent.
  db_options.paranoid_checks = true;
  // The WAL stays on (RocksDB's default); point-in-time recovery replays it up to the first damaged record,
  // which after a crash can only be the unsynced tail: synced writes are never behind it.
  db_options.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;

  rocksdb::ColumnFamilyOptions table_options;
  // Chunk values are already zstd-compressed; compressing their blocks again only costs CPU.
  rocksdb::ColumnFamilyOptions chunk_options;
  chunk_options.compression = rocksdb::kNoCompression;
  if (options.chunk_blob_min_bytes > 0) {
    // Large chunk values go to blob files, written once at flush; compactions then move only the small
    // index entries instead of rewriting every chunk at each level. Blob garbage collection relocates live
    // blobs out of old files so deleted chunks' space is reclaimed.
    chunk_options.enable_blob_files = true;
    chunk_options.min_blob_size = options.chunk_blob_min_bytes;
    chunk_options.blob_compression_type = rocksdb::kNoCompression;
    chunk_options.enable_blob_garbage_collection = true;
  }

  std::vector<std::string> names = {rocksdb::kDefaultColumnFamilyName, cf::kChunks, cf::kRefs, cf::kManifests,
                                    cf::kAliases, cf::kJobs, cf::kTasks, cf::kMeta, cf::kPins};
  // RocksDB must be given every column family the directory has; keep ones a later version may add.
  std::vector<std::string> existing;
  if (rocksdb::DB::ListColumnFamilies(db_options, dir, &existing).ok()) {
    for (const std::string& n : existing) {
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
  }
  std::vector<rocksdb::ColumnFamilyDescriptor> descriptors;
  for (const std::string& n : names) {
    descriptors.emplace_back(n, n == cf::kChunks ? chunk_options : table_options);
  }

  auto store = std::unique_ptr<ArtifactStore>(new ArtifactStore());
  store->dir_ = dir;
  store->options_ = std::move(options);
  rocksdb::DB* raw = nullptr;
  const rocksdb::Status s = rocksdb::DB::Open(db_options, dir, descriptors, &store->handles_, &raw);
  if (!s.ok()) {
    if (s.IsIOError() && s.ToString().find("lock") != std::string::npos) {
      return absl::FailedPreconditionError(absl::StrCat(
          "artifact store ", dir, " is in use by another process or open handle (", s.ToString(), ")"));
    }
    return FromRocks(s, absl::StrCat("opening artifact store ", dir));
  }
  store->db_.reset(raw);
  store->chunks_ = store->handles_[1];
  store->refs_ = store->handles_[2];
  store->manifests_ = store->handles_[3];
  store->aliases_ = store->handles_[4];
  store->jobs_ = store->handles_[5];
  store->tasks_ = store->handles_[6];
  store->meta_ = store->handles_[7];
  store->pins_ = store->handles_[8];

  std::string format;
  const rocksdb::Status fs = store->db_->Get(VerifiedRead(), store->meta_, kFormatKey, &format);
  if (fs.IsNotFound()) {
    QF_RETURN_IF_ERROR(FromRocks(store->db_->Put(SyncedWrite(), store->meta_, kFormatKey, kFormatValue),
                                 absl::StrCat("initialising artifact store ", dir)));
  } else if (!fs.ok()) {
    return FromRocks(fs, absl::StrCat("reading the format marker of ", dir));
  } else if (format != kFormatValue) {
    return absl::FailedPreconditionError(
        absl::StrCat(dir, " holds '", format.substr(0, 80), "', not a '", kFormatValue, "'"));
  }
  return store;
}

ArtifactStore::~ArtifactStore() {
  if (db_ == nullptr) return;
  for (rocksdb::ColumnFamilyHandle* h : handles_) db_->DestroyColumnFamilyHandle(h);
  db_->Close().PermitUncheckedError();
}

absl::Status ArtifactStore::Flush() {
  rocksdb::FlushOptions f;
  f.wait = true;
  return FromRocks(db_->Flush(f, handles_), absl::StrCat("flushing ", dir_));
}

absl::StatusOr<uint64_t> ArtifactStore::ReadU64(rocksdb::ColumnFamilyHandle* family, const std::string& key,
                                                bool* found) {
  std::string value;
  const rocksdb::Status s = db_->Get(VerifiedRead(), family, key, &value);
  *found = false;
  if (s.IsNotFound()) return 0;
  QF_RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading ", family->GetName(), " entry in ", dir_)));
  uint64_t v = 0;
  if (!DecodeU64(value, &v)) {
    return absl::DataLossError(absl::StrCat(family->GetName(), " entry in ", dir_, " is ", value.size(),
                                            " bytes, not a u64"));
  }
  *found = true;
  return v;
}

// --- chunks -------------------------------------------------------------------------------------------------

absl::StatusOr<std::string> ArtifactStore::PutChunk(std::span<const uint8_t> bytes, const std::string& pin_holder) {
  const std::string id = ChunkIdOf(bytes);
  if (!pin_holder.empty()) QF_RETURN_IF_ERROR(ValidateStateId("pin holder", pin_holder));
  bool found = false;
  QF_ASSIGN_OR_RETURN(uint64_t refs, ReadU64(refs_, id, &found));
  if (found && pin_holder.empty()) return id;
  // Compress before taking the lock: it is the slow part and needs no shared state.
  std::string value;
  if (!found) {
    QF_ASSIGN_OR_RETURN(value, EncodeChunkValue(bytes, options_.zstd_level));
  }

  std::lock_guard<std::mutex> lock(refs_mu_);
  // Re-check under the lock: a concurrent put may have stored it (and a commit referenced it) since, or a
  // delete removed it. Writing a count from the stale read would corrupt it.
  QF_ASSIGN_OR_RETURN(refs, ReadU64(refs_, id, &found));
  bool pinned = false;
  if (!pin_holder.empty()) {
    std::string ignored;
    const rocksdb::Status ps = db_->Get(VerifiedRead(), pins_, PinKey(pin_holder, id), &ignored);
    if (!ps.IsNotFound()) QF_RETURN_IF_ERROR(FromRocks(ps, absl::StrCat("reading the pin on chunk ", id)));
    pinned = ps.ok();
  }
  if (found && (pin_holder.empty() || pinned)) return id;
  rocksdb::WriteBatch wb;
  if (!found) {
    if (value.empty()) {
      QF_ASSIGN_OR_RETURN(value, EncodeChunkValue(bytes, options_.zstd_level));
    }
    wb.Put(chunks_, id, value);
    refs = 0;
  }
  if (!pin_holder.empty()) {
    wb.Put(pins_, PinKey(pin_holder, id), rocksdb::Slice());
    ++refs;
  }
  wb.Put(refs_, id, EncodeU64(refs));
  QF_RETURN_IF_ERROR(FromRocks(db_->Write(rocksdb::WriteOptions(), &wb), absl::StrCat("storing chunk ", id)));
  return id;
}

absl::StatusOr<std::vector<uint8_t>> ArtifactStore::GetChunk(const std::string& id) {
  QF_RETURN_IF_ERROR(ValidateChunkId(id));
  rocksdb::PinnableSlice value;
  const rocksdb::Status s = db_->Get(VerifiedRead(), chunks_, id, &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("chunk ", id, " is not in ", dir_));
  if (s.IsCorruption()) return absl::DataLossError(absl::StrCat("chunk ", id, ": storage corruption: ", s.ToString()));
  QF_RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading chunk ", id)));
  return DecodeChunkValue(id, std::span(reinterpret_cast<const uint8_t*>(value.data()), value.size()));
}

absl::StatusOr<bool> ArtifactStore::HasChunk(const std::string& id) {
  QF_RETURN_IF_ERROR(ValidateChunkId(id));
  bool found = false;
  QF_RETURN_IF_ERROR(ReadU64(refs_, id, &found).status());
  return found;
}

absl::StatusOr<uint64_t> ArtifactStore::ChunkRefCount(const std::string& id) {
  QF_RETURN_IF_ERROR(ValidateChunkId(id));
  bool found = false;
  QF_ASSIGN_OR_RETURN(uint64_t refs, ReadU64(refs_, id, &found));
  if (!found) return absl::NotFoundError(absl::StrCat("chunk ", id, " is not in ", dir_));
  return refs;
}

absl::StatusOr<std::vector<std::string>> ArtifactStore::PutBlob(std::span<const uint8_t> bytes,
                                                                const std::string& pin_holder) {
  std::vector<std::string> ids;
  for (size_t off = 0; off < bytes.size(); off += options_.chunk_bytes) {
    QF_ASSIGN_OR_RETURN(std::string id,
                        PutChunk(bytes.subspan(off, std::min(options_.chunk_bytes, bytes.size() - off)), pin_holder));
    ids.push_back(std::move(id));
  }
  return ids;
}

absl::StatusOr<std::vector<uint8_t>> ArtifactStore::ReadBlob(const std::vector<std::string>& chunk_ids,
                                                              uint64_t nbytes) {
  std::vector<uint8_t> out;
  for (const std::string& id : chunk_ids) {
    QF_ASSIGN_OR_RETURN(std::vector<uint8_t> chunk, GetChunk(id));
    if (chunk.size() > nbytes - out.size()) {
      return absl::DataLossError(absl::StrCat("chunks add up to more than the expected ", nbytes, " bytes at chunk ", id));
    }
    if (out.empty()) out.reserve(nbytes);  // bounded by the caller's size, not by the chunks
    out.insert(out.end(), chunk.begin(), chunk.end());
  }
  if (out.size() != nbytes) {
    return absl::DataLossError(absl::StrCat("chunks add up to ", out.size(), " bytes, expected ", nbytes));
  }
  return out;
}

// --- reference counts ---------------------------------------------------------------------------------------

absl::StatusOr<uint64_t> ArtifactStore::ApplyRefDeltas(const std::map<std::string, int64_t>& deltas,
                                                        rocksdb::WriteBatch* wb) {
  uint64_t deleted = 0;
  for (const auto& [id, delta] : deltas) {
    if (delta == 0) continue;
    bool found = false;
    QF_ASSIGN_OR_RETURN(uint64_t refs, ReadU64(refs_, id, &found));
    if (!found) {
      if (delta > 0) return absl::FailedPreconditionError(absl::StrCat("chunk ", id, " is not in the store"));
      continue;  // nothing left to release
    }
    const int64_t updated = static_cast<int64_t>(refs) + delta;
    if (updated > 0) {
      wb->Put(refs_, id, EncodeU64(static_cast<uint64_t>(updated)));
    } else if (updated == 0) {
      wb->Delete(refs_, id);
      wb->Delete(chunks_, id);
      ++deleted;
    } else {
      // The stored count was already too low. Deleting on a count known to be wrong could drop a referenced
      // chunk; park it at zero and let CollectGarbage's recount decide.
      wb->Put(refs_, id, EncodeU64(0));
    }
  }
  return deleted;
}

absl::Status ArtifactStore::CollectPinReleases(const StateBatch& batch, std::map<std::string, int64_t>* deltas,
                                               rocksdb::WriteBatch* wb) {
  for (const std::string& holder : StateBatchAccess::PinHolders(batch)) {
    const std::string prefix = NamePrefix(holder);
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), pins_));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      rocksdb::Slice id = it->key();
      id.remove_prefix(prefix.size());
      --(*deltas)[id.ToString()];
      wb->Delete(pins_, it->key());
    }
    QF_RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("reading the pins of '", holder, "'")));
  }
  return absl::OkStatus();
}

// --- versions -----------------------------------------------------------------------------------------------

absl::StatusOr<uint64_t> ArtifactStore::CommitVersion(const std::string& name, qforge::v1::Manifest manifest,
                                                      const StateBatch* also) {
  QF_RETURN_IF_ERROR(ValidateModelName(name));
  std::set<std::string> tensor_names;
  for (const auto& t : manifest.tensors()) {
    if (t.name().empty()) return absl::InvalidArgumentError(absl::StrCat("manifest for ", name, " has an unnamed tensor"));
    if (!tensor_names.insert(t.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("manifest for ", name, " lists tensor '", t.name(), "' twice"));
    }
  }
  QF_ASSIGN_OR_RETURN(std::set<std::string> ids, ManifestChunks(manifest));
  if (also != nullptr) QF_RETURN_IF_ERROR(StateBatchAccess::Validate(*also));

  std::lock_guard<std::mutex> lock(refs_mu_);
  rocksdb::WriteBatch wb;
  std::map<std::string, int64_t> deltas;
  for (const std::string& id : ids) {
    // Checked one by one (not through the deltas) because a chunk pinned by a holder released in `also`
    // has a net change of zero and must exist all the same.
    bool found = false;
    QF_RETURN_IF_ERROR(ReadU64(refs_, id, &found).status());
    if (!found) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot commit a version of ", name, ": chunk ", id, " is not in the store"));
    }
    ++deltas[id];
  }
  if (also != nullptr) QF_RETURN_IF_ERROR(CollectPinReleases(*also, &deltas, &wb));
  QF_RETURN_IF_ERROR(ApplyRefDeltas(deltas, &wb).status());
  bool found = false;
  QF_ASSIGN_OR_RETURN(uint64_t next, ReadU64(meta_, NextVersionKey(name), &found));
  const uint64_t version = found ? next : 1;
  manifest.mutable_model()->set_name(name);
  manifest.mutable_model()->set_version(absl::StrCat(version));
  if (manifest.created_unix_ms() == 0) {
    manifest.set_created_unix_ms(std::chrono::duration_cast<std::chrono::milliseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  }
  // Versions are immutable: the counter only grows, so this key has never been written before.
  wb.Put(manifests_, ManifestKey(name, version), ManifestValue(manifest));
  wb.Put(meta_, NextVersionKey(name), EncodeU64(version + 1));
  wb.Put(aliases_, AliasKey(name, kLatestAlias), EncodeU64(version));
  if (also != nullptr) StateBatchAccess::Apply(*also, &wb, jobs_, tasks_);
  QF_RETURN_IF_ERROR(FromRocks(db_->Write(SyncedWrite(), &wb),
                               absl::StrCat("committing ", FormatModelRef(name, version))));
  return version;
}

absl::StatusOr<qforge::v1::Manifest> ArtifactStore::ReadManifest(const std::string& name, uint64_t version) {
  const std::string ref = FormatModelRef(name, version);
  std::string value;
  const rocksdb::Status s = db_->Get(VerifiedRead(), manifests_, ManifestKey(name, version), &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("model version ", ref, " not found"));
  QF_RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading the manifest of ", ref)));
  qforge::v1::Manifest m;
  if (value.size() < kManifestChecksumChars ||
      ChunkIdOf(std::span(reinterpret_cast<const uint8_t*>(value.data()) + kManifestChecksumChars,
                          value.size() - kManifestChecksumChars)) != value.substr(0, kManifestChecksumChars) ||
      !m.ParseFromArray(value.data() + kManifestChecksumChars, static_cast<int>(value.size() - kManifestChecksumChars))) {
    return absl::DataLossError(absl::StrCat("manifest of ", ref, " is corrupt (checksum or encoding)"));
  }
  return m;
}

absl::StatusOr<uint64_t> ArtifactStore::ResolveVersion(const ModelRef& ref) {
  QF_RETURN_IF_ERROR(ValidateModelName(ref.name));
  if (ref.version) return *ref.version;
  bool found = false;
  QF_ASSIGN_OR_RETURN(uint64_t v, ReadU64(aliases_, AliasKey(ref.name, kLatestAlias), &found));
  if (!found) return absl::NotFoundError(absl::StrCat("model '", ref.name, "' has no versions"));
  return v;
}

absl::StatusOr<qforge::v1::Manifest> ArtifactStore::GetManifest(const ModelRef& ref) {
  QF_ASSIGN_OR_RETURN(uint64_t version, ResolveVersion(ref));
  return ReadManifest(ref.name, version);
}

absl::StatusOr<qforge::v1::Manifest> ArtifactStore::GetManifest(const std::string& ref_text) {
  QF_ASSIGN_OR_RETURN(ModelRef ref, ParseModelRef(ref_text));
  return GetManifest(ref);
}

absl::StatusOr<std::vector<ModelVersions>> ArtifactStore::ListModels() {
  std::vector<ModelVersions> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), manifests_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    std::string name;
    uint64_t version = 0;
    if (!ParseManifestKey(it->key(), &name, &version)) {
      return absl::DataLossError(absl::StrCat("malformed manifest key in ", dir_));
    }
    if (out.empty() || out.back().name != name) out.push_back({name, {}, 0});
    out.back().versions.push_back(version);
  }
  QF_RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("listing models in ", dir_)));
  for (ModelVersions& m : out) {
    bool found = false;
    QF_ASSIGN_OR_RETURN(m.latest, ReadU64(aliases_, AliasKey(m.name, kLatestAlias), &found));
  }
  return out;
}

absl::StatusOr<uint64_t> ArtifactStore::DeleteVersion(const std::string& name, uint64_t version) {
  QF_RETURN_IF_ERROR(ValidateModelName(name));
  std::lock_guard<std::mutex> lock(refs_mu_);
  QF_ASSIGN_OR_RETURN(qforge::v1::Manifest manifest, ReadManifest(name, version));
  QF_ASSIGN_OR_RETURN(std::set<std::string> ids, ManifestChunks(manifest));
  rocksdb::WriteBatch wb;
  std::map<std::string, int64_t> deltas;
  for (const std::string& id : ids) deltas[id] = -1;
  QF_ASSIGN_OR_RETURN(const uint64_t collected, ApplyRefDeltas(deltas, &wb));
  wb.Delete(manifests_, ManifestKey(name, version));

  bool found = false;
  QF_ASSIGN_OR_RETURN(uint64_t latest, ReadU64(aliases_, AliasKey(name, kLatestAlias), &found));
  if (found && latest == version) {
    uint64_t highest = 0;
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), manifests_));
    const std::string prefix = NamePrefix(name);
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      std::string n;
      uint64_t v = 0;
      if (ParseManifestKey(it->key(), &n, &v) && n == name && v != version) highest = std::max(highest, v);
    }
    QF_RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("scanning versions of ", name)));
    if (highest == 0) {
      wb.Delete(aliases_, AliasKey(name, kLatestAlias));
    } else {
      wb.Put(aliases_, AliasKey(name, kLatestAlias), EncodeU64(highest));
    }
  }
  QF_RETURN_IF_ERROR(FromRocks(db_->Write(SyncedWrite(), &wb),
                               absl::StrCat("deleting ", FormatModelRef(name, version))));
  return collected;
}

absl::StatusOr<GcStats> ArtifactStore::CollectGarbage() {
  std::lock_guard<std::mutex> lock(refs_mu_);
  // Mark: holding refs_mu_ keeps commits, deletes and pin changes out, so these counts stay true while we
  // sweep.
  std::map<std::string, uint64_t> marked;
  {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), manifests_));
    for (it->SeekToFirst(); it->Valid(); it->Next()) {
      std::string name;
      uint64_t version = 0;
      if (!ParseManifestKey(it->key(), &name, &version)) {
        return absl::DataLossError(absl::StrCat("malformed manifest key in ", dir_, "; garbage collection stopped"));
      }
      auto manifest = ReadManifest(name, version);
      if (!manifest.ok()) {
        return absl::Status(manifest.status().code(),
                            absl::StrCat(manifest.status().message(), "; garbage collection stopped"));
      }
      QF_ASSIGN_OR_RETURN(std::set<std::string> ids, ManifestChunks(*manifest));
      for (const std::string& id : ids) ++marked[id];
    }
    QF_RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("scanning manifests in ", dir_)));
    std::unique_ptr<rocksdb::Iterator> pins(db_->NewIterator(VerifiedRead(), pins_));
    for (pins->SeekToFirst(); pins->Valid(); pins->Next()) {
      const rocksdb::Slice key = pins->key();
      if (key.size() < kChunkIdChars + 2 || key[key.size() - kChunkIdChars - 1] != '\0') {
        return absl::DataLossError(absl::StrCat("malformed pin key in ", dir_, "; garbage collection stopped"));
      }
      ++marked[std::string(key.data() + key.size() - kChunkIdChars, kChunkIdChars)];
    }
    QF_RETURN_IF_ERROR(FromRocks(pins->status(), absl::StrCat("scanning pins in ", dir_)));
  }

  // Sweep in bounded, synced batches; each batch is atomic and only touches unreferenced chunks (or repairs
  // counts to the marked value), so stopping between any two batches loses nothing that is referenced.
  GcStats stats;
  rocksdb::WriteBatch wb;
  size_t pending = 0;
  int batch_index = 0;
  auto write_batch = [&]() -> absl::Status {
    if (pending == 0) return absl::OkStatus();
    if (options_.gc_fault_hook) QF_RETURN_IF_ERROR(options_.gc_fault_hook(batch_index));
    ++batch_index;
    QF_RETURN_IF_ERROR(FromRocks(db_->Write(SyncedWrite(), &wb), absl::StrCat("garbage collection in ", dir_)));
    wb.Clear();
    pending = 0;
    return absl::OkStatus();
  };
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), refs_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    const std::string id = it->key().ToString();
    uint64_t stored = 0;
    const bool well_formed = DecodeU64(it->value(), &stored);
    auto m = marked.find(id);
    const uint64_t want = m == marked.end() ? 0 : m->second;
    if (m != marked.end()) marked.erase(m);
    if (want == 0) {
      wb.Delete(chunks_, id);
      wb.Delete(refs_, id);
      ++stats.chunks_deleted;
      ++pending;
    } else if (!well_formed || stored != want) {
      wb.Put(refs_, id, EncodeU64(want));
      ++stats.refcounts_repaired;
      ++pending;
    }
    if (pending >= options_.gc_batch_entries) QF_RETURN_IF_ERROR(write_batch());
  }
  QF_RETURN_IF_ERROR(FromRocks(it->status(), absl::StrCat("scanning chunk references in ", dir_)));
  // Referenced chunks without a count: give them one if the chunk is there, otherwise report the loss.
  for (const auto& [id, want] : marked) {
    rocksdb::PinnableSlice value;
    const rocksdb::Status s = db_->Get(VerifiedRead(), chunks_, id, &value);
    if (s.ok()) {
      wb.Put(refs_, id, EncodeU64(want));
      ++stats.refcounts_repaired;
      ++pending;
    } else {
      stats.missing_chunks.push_back(id);
    }
    if (pending >= options_.gc_batch_entries) QF_RETURN_IF_ERROR(write_batch());
  }
  QF_RETURN_IF_ERROR(write_batch());
  return stats;
}

// --- job and task state -------------------------------------------------------------------------------------

absl::Status ArtifactStore::PutJob(const std::string& job_id, const std::string& value) {
  StateBatch b;
  b.PutJob(job_id, value);
  return Write(b);
}

absl::StatusOr<std::string> ArtifactStore::GetJob(const std::string& job_id) {
  QF_RETURN_IF_ERROR(ValidateStateId("job id", job_id));
  std::string value;
  const rocksdb::Status s = db_->Get(VerifiedRead(), jobs_, job_id, &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("job '", job_id, "' not found"));
  QF_RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading job '", job_id, "'")));
  return value;
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ArtifactStore::ListJobs() {
  std::vector<std::pair<std::string, std::string>> out;
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), jobs_));
  for (it->SeekToFirst(); it->Valid(); it->Next()) out.emplace_back(it->key().ToString(), it->value().ToString());
  QF_RETURN_IF_ERROR(FromRocks(it->status(), "listing jobs"));
  return out;
}

absl::Status ArtifactStore::DeleteJob(const std::string& job_id) {
  StateBatch b;
  b.DeleteJob(job_id);
  return Write(b);
}

absl::Status ArtifactStore::PutTask(const std::string& job_id, const std::string& task_id, const std::string& value) {
  StateBatch b;
  b.PutTask(job_id, task_id, value);
  return Write(b);
}

absl::StatusOr<std::string> ArtifactStore::GetTask(const std::string& job_id, const std::string& task_id) {
  QF_RETURN_IF_ERROR(ValidateStateId("job id", job_id));
  QF_RETURN_IF_ERROR(ValidateStateId("task id", task_id));
  std::string value;
  const rocksdb::Status s = db_->Get(VerifiedRead(), tasks_, TaskKey(job_id, task_id), &value);
  if (s.IsNotFound()) return absl::NotFoundError(absl::StrCat("task '", task_id, "' of job '", job_id, "' not found"));
  QF_RETURN_IF_ERROR(FromRocks(s, absl::StrCat("reading task '", task_id, "' of job '", job_id, "'")));
  return value;
}

absl::Status ArtifactStore::ScanTasks(
    const std::string& job_id, const std::function<bool(const std::string& task_id, const std::string& value)>& visit) {
  QF_RETURN_IF_ERROR(ValidateStateId("job id", job_id));
  const std::string prefix = NamePrefix(job_id);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(VerifiedRead(), tasks_));
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    rocksdb::Slice key = it->key();
    key.remove_prefix(prefix.size());
    if (!visit(key.ToString(), it->value().ToString())) break;
  }
  return FromRocks(it->status(), absl::StrCat("scanning tasks of job '", job_id, "'"));
}

absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ArtifactStore::ListTasks(const std::string& job_id) {
  std::vector<std::pair<std::string, std::string>> out;
  QF_RETURN_IF_ERROR(ScanTasks(job_id, [&](const std::string& id, const std::string& value) {
    out.emplace_back(id, value);
    return true;
  }));
  return out;
}

absl::Status ArtifactStore::Write(const StateBatch& batch) {
  QF_RETURN_IF_ERROR(StateBatchAccess::Validate(batch));
  rocksdb::WriteBatch wb;
  StateBatchAccess::Apply(batch, &wb, jobs_, tasks_);
  if (StateBatchAccess::PinHolders(batch).empty()) {
    // No reference counts involved: no lock, so concurrent state writes can share WAL syncs.
    return FromRocks(db_->Write(SyncedWrite(), &wb), "writing job/task state");
  }
  std::lock_guard<std::mutex> lock(refs_mu_);
  std::map<std::string, int64_t> deltas;
  QF_RETURN_IF_ERROR(CollectPinReleases(batch, &deltas, &wb));
  QF_RETURN_IF_ERROR(ApplyRefDeltas(deltas, &wb).status());
  return FromRocks(db_->Write(SyncedWrite(), &wb), "writing job/task state");
}

}  // namespace qforge::storage
