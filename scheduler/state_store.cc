#include "scheduler/state_store.h"

#include "absl/strings/str_cat.h"

namespace qforge::scheduler {

const char* JobStateName(JobState s) {
  switch (s) {
    case JobState::kRunning: return "running";
    case JobState::kSucceeded: return "succeeded";
    case JobState::kFailed: return "failed";
    case JobState::kCancelled: return "cancelled";
  }
  return "unknown";
}

absl::Status InMemoryStateStore::MaybeFail() {
  if (fail_next_ > 0) {
    --fail_next_;
    return absl::UnavailableError("injected store failure");
  }
  return absl::OkStatus();
}

void InMemoryStateStore::FailNextWrites(int n) {
  std::lock_guard<std::mutex> l(mu_);
  fail_next_ = n;
}

absl::Status InMemoryStateStore::PutJob(JobId id, const std::string& plan, int64_t created_ms) {
  std::lock_guard<std::mutex> l(mu_);
  if (absl::Status s = MaybeFail(); !s.ok()) return s;
  StoredJob& j = jobs_[id];
  j.id = id;
  j.plan = plan;
  j.created_ms = created_ms;
  return absl::OkStatus();
}

absl::Status InMemoryStateStore::PutTaskResult(JobId id, uint32_t task, const std::string& result_ref) {
  std::lock_guard<std::mutex> l(mu_);
  if (absl::Status s = MaybeFail(); !s.ok()) return s;
  if (!jobs_.contains(id)) return absl::NotFoundError(absl::StrCat("job ", id, " not in the store"));
  auto& r = results_[{id, task}];
  r.first = result_ref;
  ++r.second;
  return absl::OkStatus();
}

absl::Status InMemoryStateStore::PutJobState(JobId id, JobState state, const std::string& message, int64_t at_ms) {
  std::lock_guard<std::mutex> l(mu_);
  if (absl::Status s = MaybeFail(); !s.ok()) return s;
  auto it = jobs_.find(id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("job ", id, " not in the store"));
  it->second.state = state;
  it->second.message = message;
  it->second.finished_ms = at_ms;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StoredJob>> InMemoryStateStore::LoadAll() {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<StoredJob> out;
  for (const auto& [id, j] : jobs_) {
    out.push_back(j);
    for (auto it = results_.lower_bound({id, 0}); it != results_.end() && it->first.first == id; ++it) {
      out.back().results.emplace_back(it->first.second, it->second.first);
    }
  }
  return out;
}

int InMemoryStateStore::CommitCount(JobId id, uint32_t task) const {
  std::lock_guard<std::mutex> l(mu_);
  auto it = results_.find({id, task});
  return it == results_.end() ? 0 : it->second.second;
}

}  // namespace qforge::scheduler
