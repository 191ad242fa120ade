#include "scheduler/rocksdb_state_store.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <span>
#include <utility>

#include "absl/strings/str_cat.h"
#include "storage/artifact_store.h"

namespace qforge::scheduler {
namespace {

constexpr uint8_t kJobRecordVersion = 1;
constexpr uint8_t kTaskRecordVersion = 1;
constexpr uint8_t kPlanInline = 0;
constexpr uint8_t kPlanChunks = 1;

// CRC-32 (IEEE 802.3, reflected), table built at compile time.
constexpr std::array<uint32_t, 256> MakeCrcTable() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrcTable = MakeCrcTable();

uint32_t Crc32(const char* p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = kCrcTable[(c ^ static_cast<uint8_t>(p[i])) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void PutU8(std::string* s, uint8_t v) { s->push_back(static_cast<char>(v)); }
void PutU32(std::string* s, uint32_t v) {
  for (int i = 0; i < 4; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void PutU64(std::string* s, uint64_t v) {
  for (int i = 0; i < 8; ++i) s->push_back(static_cast<char>(v >> (8 * i)));
}
void Seal(std::string* s) { PutU32(s, Crc32(s->data(), s->size())); }

// Bounds-checked little-endian reader over a record whose CRC has been verified.
class Reader {
 public:
  Reader(const char* p, size_t n) : p_(p), n_(n) {}
  bool U8(uint8_t* v) {
    if (n_ - pos_ < 1) return false;
    *v = static_cast<uint8_t>(p_[pos_++]);
    return true;
  }
  bool U32(uint32_t* v) {
    if (n_ - pos_ < 4) return false;
    *v = 0;
    for (int i = 0; i < 4; ++i) *v |= uint32_t{static_cast<uint8_t>(p_[pos_ + i])} << (8 * i);
    pos_ += 4;
    return true;
  }
  bool U64(uint64_t* v) {
    if (n_ - pos_ < 8) return false;
    *v = 0;
    for (int i = 0; i < 8; ++i) *v |= uint64_t{static_cast<uint8_t>(p_[pos_ + i])} << (8 * i);
    pos_ += 8;
    return true;
  }
  bool Bytes(uint64_t len, std::string* out) {  // length checked before allocating
    if (len > n_ - pos_) return false;
    out->assign(p_ + pos_, len);
    pos_ += len;
    return true;
  }
  bool AtEnd() const { return pos_ == n_; }

 private:
  const char* p_;
  size_t n_;
  size_t pos_ = 0;
};

// Verifies the trailing CRC; on success `*body_len` is the length without it.
bool CheckCrc(const std::string& v, size_t* body_len) {
  if (v.size() < 5) return false;
  const size_t n = v.size() - 4;
  Reader r(v.data() + n, 4);
  uint32_t stored = 0;
  r.U32(&stored);
  *body_len = n;
  return stored == Crc32(v.data(), n);
}

struct JobRecord {
  JobId id = 0;
  JobState state = JobState::kRunning;
  int64_t created_ms = 0, finished_ms = 0;
  std::string message;
  uint8_t plan_kind = kPlanInline;
  std::string plan;                     // inline
  uint64_t plan_bytes = 0;              // chunks
  std::vector<std::string> plan_chunks;
};

std::string EncodeJob(const JobRecord& j) {
  std::string s;
  s.reserve(64 + j.message.size() + j.plan.size() + 40 * j.plan_chunks.size());
  PutU8(&s, kJobRecordVersion);
  PutU64(&s, j.id);
  PutU8(&s, static_cast<uint8_t>(j.state));
  PutU64(&s, static_cast<uint64_t>(j.created_ms));
  PutU64(&s, static_cast<uint64_t>(j.finished_ms));
  PutU32(&s, static_cast<uint32_t>(j.message.size()));
  s += j.message;
  PutU8(&s, j.plan_kind);
  if (j.plan_kind == kPlanInline) {
    PutU64(&s, j.plan.size());
    s += j.plan;
  } else {
    PutU64(&s, j.plan_bytes);
    PutU32(&s, static_cast<uint32_t>(j.plan_chunks.size()));
    for (const std::string& c : j.plan_chunks) {
      PutU8(&s, static_cast<uint8_t>(c.size()));
      s += c;
    }
  }
  Seal(&s);
  return s;
}

absl::Status JobCorrupt(JobId id, absl::string_view why) {
  return absl::DataLossError(absl::StrCat("job ", id, ": corrupt job record: ", why));
}

absl::StatusOr<JobRecord> DecodeJob(JobId id, const std::string& v) {
  size_t n = 0;
  if (!CheckCrc(v, &n)) return JobCorrupt(id, absl::StrCat("checksum mismatch or truncated (", v.size(), " bytes)"));
  Reader r(v.data(), n);
  JobRecord j;
  uint8_t version = 0, state = 0;
  uint64_t created = 0, finished = 0;
  uint32_t msg_len = 0;
  if (!r.U8(&version)) return JobCorrupt(id, "truncated");
  if (version != kJobRecordVersion) return JobCorrupt(id, absl::StrCat("unknown format version ", version));
  if (!r.U64(&j.id) || !r.U8(&state) || !r.U64(&created) || !r.U64(&finished) || !r.U32(&msg_len) ||
      !r.Bytes(msg_len, &j.message) || !r.U8(&j.plan_kind)) {
    return JobCorrupt(id, "truncated header");
  }
  if (j.id != id) return JobCorrupt(id, absl::StrCat("record belongs to job ", j.id));
  if (state < static_cast<uint8_t>(JobState::kRunning) || state > static_cast<uint8_t>(JobState::kCancelled)) {
    return JobCorrupt(id, absl::StrCat("invalid state ", state));
  }
  j.state = static_cast<JobState>(state);
  j.created_ms = static_cast<int64_t>(created);
  j.finished_ms = static_cast<int64_t>(finished);
  if (j.plan_kind == kPlanInline) {
    uint64_t len = 0;
    if (!r.U64(&len) || !r.Bytes(len, &j.plan)) return JobCorrupt(id, "truncated inline plan");
  } else if (j.plan_kind == kPlanChunks) {
    uint32_t count = 0;
    if (!r.U64(&j.plan_bytes) || !r.U32(&count)) return JobCorrupt(id, "truncated chunk list");
    if (count > n) return JobCorrupt(id, absl::StrCat("chunk count ", count, " exceeds the record"));
    j.plan_chunks.resize(count);
    for (std::string& c : j.plan_chunks) {
      uint8_t len = 0;
      if (!r.U8(&len) || len == 0 || !r.Bytes(len, &c)) return JobCorrupt(id, "truncated chunk id");
    }
  } else {
    return JobCorrupt(id, absl::StrCat("unknown plan storage ", j.plan_kind));
  }
  if (!r.AtEnd()) return JobCorrupt(id, "trailing bytes");
  return j;
}

std::string EncodeTask(JobId id, uint32_t task, const std::string& ref) {
  std::string s;
  s.reserve(21 + ref.size());
  PutU8(&s, kTaskRecordVersion);
  PutU64(&s, id);
  PutU32(&s, task);
  PutU32(&s, static_cast<uint32_t>(ref.size()));
  s += ref;
  Seal(&s);
  return s;
}

absl::StatusOr<std::string> DecodeTask(JobId id, uint32_t task, const std::string& v) {
  auto corrupt = [&](absl::string_view why) {
    return absl::DataLossError(absl::StrCat("job ", id, " task ", task, ": corrupt task record: ", why));
  };
  size_t n = 0;
  if (!CheckCrc(v, &n)) return corrupt(absl::StrCat("checksum mismatch or truncated (", v.size(), " bytes)"));
  Reader r(v.data(), n);
  uint8_t version = 0;
  uint64_t rid = 0;
  uint32_t rtask = 0, len = 0;
  std::string ref;
  if (!r.U8(&version)) return corrupt("truncated");
  if (version != kTaskRecordVersion) return corrupt(absl::StrCat("unknown format version ", version));
  if (!r.U64(&rid) || !r.U32(&rtask) || !r.U32(&len) || !r.Bytes(len, &ref) || !r.AtEnd()) {
    return corrupt("truncated or trailing bytes");
  }
  if (rid != id || rtask != task) return corrupt(absl::StrCat("record belongs to job ", rid, " task ", rtask));
  return ref;
}

// Parses a fixed-width decimal key; false unless it is exactly `width` digits.
bool ParseKey(const std::string& key, size_t width, uint64_t* out) {
  if (key.size() != width) return false;
  uint64_t v = 0;
  for (char c : key) {
    if (c < '0' || c > '9') return false;
    const uint64_t d = static_cast<uint64_t>(c - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  *out = v;
  return true;
}

absl::Status Prefixed(const absl::Status& s, absl::string_view prefix) {
  return absl::Status(s.code(), absl::StrCat(prefix, s.message()));
}

}  // namespace

std::string RocksDbStateStore::JobKey(JobId id) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "%020llu", static_cast<unsigned long long>(id));
  return buf;
}

std::string RocksDbStateStore::TaskKey(uint32_t task) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%010u", task);
  return buf;
}

std::string RocksDbStateStore::PlanPinHolder(JobId id) { return "qforge-scheduler-plan-" + JobKey(id); }

absl::Status RocksDbStateStore::PutJob(JobId id, const std::string& plan, int64_t created_ms) {
  std::lock_guard<std::mutex> l(mu_);
  const std::string key = JobKey(id);
  JobRecord j;
  // Rewriting a job keeps its state, as InMemoryStateStore does.
  absl::StatusOr<std::string> old = store_->GetJob(key);
  if (old.ok()) {
    absl::StatusOr<JobRecord> prev = DecodeJob(id, *old);
    if (prev.ok()) {
      j.state = prev->state;
      j.message = prev->message;
      j.finished_ms = prev->finished_ms;
    }
  } else if (!absl::IsNotFound(old.status())) {
    return Prefixed(old.status(), absl::StrCat("job ", id, ": "));
  }
  j.id = id;
  j.created_ms = created_ms;
  if (plan.size() > options_.inline_plan_max_bytes) {
    // Chunks are written unsynced and pinned; the synced job write below makes them durable. The pin is kept
    // for the life of the job (it is the job's reference to them).
    const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(plan.data()), plan.size());
    absl::StatusOr<std::vector<std::string>> ids = store_->PutBlob(bytes, PlanPinHolder(id));
    if (!ids.ok()) return Prefixed(ids.status(), absl::StrCat("job ", id, ": storing the plan: "));
    for (const std::string& c : *ids) {
      if (c.empty() || c.size() > 255) return absl::InternalError(absl::StrCat("job ", id, ": bad chunk id ", c));
    }
    j.plan_kind = kPlanChunks;
    j.plan_bytes = plan.size();
    j.plan_chunks = *std::move(ids);
  } else {
    j.plan_kind = kPlanInline;
    j.plan = plan;
  }
  if (absl::Status s = store_->PutJob(key, EncodeJob(j)); !s.ok()) {
    return Prefixed(s, absl::StrCat("job ", id, ": "));
  }
  return absl::OkStatus();
}

absl::Status RocksDbStateStore::PutTaskResult(JobId id, uint32_t task, const std::string& result_ref) {
  const std::string key = JobKey(id);
  absl::StatusOr<std::string> job = store_->GetJob(key);
  if (absl::IsNotFound(job.status())) return absl::NotFoundError(absl::StrCat("job ", id, " not in the store"));
  if (!job.ok()) return Prefixed(job.status(), absl::StrCat("job ", id, ": "));
  if (absl::Status s = store_->PutTask(key, TaskKey(task), EncodeTask(id, task, result_ref)); !s.ok()) {
    return Prefixed(s, absl::StrCat("job ", id, " task ", task, ": "));
  }
  return absl::OkStatus();
}

absl::Status RocksDbStateStore::PutJobState(JobId id, JobState state, const std::string& message, int64_t at_ms) {
  std::lock_guard<std::mutex> l(mu_);
  const std::string key = JobKey(id);
  absl::StatusOr<std::string> old = store_->GetJob(key);
  if (absl::IsNotFound(old.status())) return absl::NotFoundError(absl::StrCat("job ", id, " not in the store"));
  if (!old.ok()) return Prefixed(old.status(), absl::StrCat("job ", id, ": "));
  absl::StatusOr<JobRecord> j = DecodeJob(id, *old);
  if (!j.ok()) return j.status();
  j->state = state;
  j->message = message;
  j->finished_ms = at_ms;
  if (absl::Status s = store_->PutJob(key, EncodeJob(*j)); !s.ok()) return Prefixed(s, absl::StrCat("job ", id, ": "));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StoredJob>> RocksDbStateStore::LoadAll() {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> jobs = store_->ListJobs();
  if (!jobs.ok()) return Prefixed(jobs.status(), "loading scheduler jobs: ");
  std::vector<StoredJob> out;
  out.reserve(jobs->size());
  for (auto& [key, value] : *jobs) {
    uint64_t id = 0;
    if (!ParseKey(key, 20, &id)) {
      return absl::DataLossError(absl::StrCat("jobs family holds key '", key, "', not a scheduler job id"));
    }
    absl::StatusOr<JobRecord> rec = DecodeJob(id, value);
    value.clear();
    value.shrink_to_fit();
    if (!rec.ok()) return rec.status();
    StoredJob j;
    j.id = id;
    j.created_ms = rec->created_ms;
    j.state = rec->state;
    j.message = std::move(rec->message);
    j.finished_ms = rec->finished_ms;
    if (rec->plan_kind == kPlanInline) {
      j.plan = std::move(rec->plan);
    } else {
      absl::StatusOr<std::vector<uint8_t>> bytes = store_->ReadBlob(rec->plan_chunks, rec->plan_bytes);
      if (!bytes.ok()) {
        // A pinned chunk that is gone is lost data, whatever the store calls it.
        const absl::Status s = absl::IsNotFound(bytes.status()) ? absl::DataLossError(bytes.status().message())
                                                                : bytes.status();
        return Prefixed(s, absl::StrCat("job ", id, ": reading the plan: "));
      }
      j.plan.assign(reinterpret_cast<const char*>(bytes->data()), bytes->size());
    }
    absl::Status bad;
    uint64_t prev_task = 0;
    bool first = true;
    absl::Status scan = store_->ScanTasks(key, [&](const std::string& task_key, const std::string& v) {
      uint64_t task = 0;
      if (!ParseKey(task_key, 10, &task) || task > UINT32_MAX) {
        bad = absl::DataLossError(absl::StrCat("job ", id, ": task key '", task_key, "' is not a task index"));
        return false;
      }
      absl::StatusOr<std::string> ref = DecodeTask(id, static_cast<uint32_t>(task), v);
      if (!ref.ok()) {
        bad = ref.status();
        return false;
      }
      if (!first && task <= prev_task) {
        bad = absl::InternalError(absl::StrCat("job ", id, ": tasks out of order at ", task));
        return false;
      }
      first = false;
      prev_task = task;
      j.results.emplace_back(static_cast<uint32_t>(task), *std::move(ref));
      return true;
    });
    if (!bad.ok()) return bad;
    if (!scan.ok()) return Prefixed(scan, absl::StrCat("job ", id, ": "));
    out.push_back(std::move(j));
  }
  return out;
}

}  // namespace qforge::scheduler
