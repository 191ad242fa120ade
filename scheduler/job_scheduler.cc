#include "scheduler/job_scheduler.h"

#include "absl/strings/str_cat.h"
#include "core/base/status_macros.h"

namespace qforge::scheduler {

std::unique_ptr<JobScheduler::Job> JobScheduler::MakeJob(JobId id, Plan plan) {
  auto j = std::make_unique<Job>();
  j->id = id;
  j->plan = std::move(plan);
  const size_t n = j->plan.tasks.size();
  j->task_state.assign(n, TaskState::kBlocked);
  j->attempts.assign(n, 0);
  j->pending_deps.resize(n);
  j->result_pos.assign(n, 0);
  j->dependent_offsets.assign(n + 1, 0);
  for (uint32_t t = 0; t < n; ++t) {
    j->pending_deps[t] = static_cast<uint32_t>(j->plan.DepsOf(t).size());
    for (uint32_t d : j->plan.DepsOf(t)) ++j->dependent_offsets[d + 1];
  }
  for (size_t t = 0; t < n; ++t) j->dependent_offsets[t + 1] += j->dependent_offsets[t];
  j->dependents.resize(j->plan.deps.size());
  std::vector<uint32_t> fill(j->dependent_offsets.begin(), j->dependent_offsets.end() - 1);
  for (uint32_t t = 0; t < n; ++t) {
    for (uint32_t d : j->plan.DepsOf(t)) j->dependents[fill[d]++] = t;
  }
  return j;
}

void JobScheduler::QueueInitiallyReady(Job& job) {
  if (job.state != JobState::kRunning) return;
  for (uint32_t t = 0; t < job.task_state.size(); ++t) {
    if (job.task_state[t] == TaskState::kBlocked && job.pending_deps[t] == 0) {
      job.task_state[t] = TaskState::kReady;
      ready_.push_back({job.id, t});
    }
  }
}

absl::StatusOr<std::unique_ptr<JobScheduler>> JobScheduler::Recover(SchedulerStateStore* store,
                                                                    SchedulerOptions options, int64_t now_ms) {
  if (options.max_attempts < 1 || options.max_attempts > 255 || options.lease_ms <= 0) {
    return absl::InvalidArgumentError("options: max_attempts must be 1..255 and lease_ms positive");
  }
  std::unique_ptr<JobScheduler> s(new JobScheduler(store, options));
  QF_ASSIGN_OR_RETURN(std::vector<StoredJob> stored, store->LoadAll());
  for (StoredJob& sj : stored) {
    absl::StatusOr<Plan> plan = DeserializePlan(sj.plan);
    if (!plan.ok()) return absl::DataLossError(absl::StrCat("job ", sj.id, ": ", plan.status().message()));
    std::unique_ptr<Job> j = MakeJob(sj.id, *std::move(plan));
    j->state = sj.state;
    j->message = sj.message;
    j->created_ms = sj.created_ms;
    j->finished_ms = sj.state == JobState::kRunning ? 0 : sj.finished_ms;
    for (const auto& [t, ref] : sj.results) {
      if (t >= j->task_state.size() || j->task_state[t] == TaskState::kDone) continue;
      j->task_state[t] = TaskState::kDone;
      j->result_pos[t] = (uint64_t{j->result_arena.size()} << 24) | ref.size();
      j->result_arena.append(ref);
      ++j->tasks_done;
      j->bytes_done += j->plan.tasks[t].input_bytes;
      for (uint32_t k = j->dependent_offsets[t]; k < j->dependent_offsets[t + 1]; ++k) --j->pending_deps[j->dependents[k]];
    }
    s->next_id_ = std::max(s->next_id_, sj.id + 1);
    // A crash between the last commit and the job's final state: finish it now.
    if (j->state == JobState::kRunning && j->tasks_done == j->task_state.size()) {
      QF_RETURN_IF_ERROR(store->PutJobState(j->id, JobState::kSucceeded, "", now_ms));
      j->state = JobState::kSucceeded;
      j->finished_ms = now_ms;
    }
    s->QueueInitiallyReady(*j);
    s->jobs_.emplace(sj.id, std::move(j));
  }
  return s;
}

absl::StatusOr<JobId> JobScheduler::SubmitJob(Plan plan, int64_t now_ms) {
  QF_RETURN_IF_ERROR(ValidatePlan(plan));
  if (plan.tasks.empty()) return absl::InvalidArgumentError("plan: no tasks");
  std::lock_guard<std::mutex> l(mu_);
  const JobId id = next_id_;
  QF_RETURN_IF_ERROR(store_->PutJob(id, SerializePlan(plan), now_ms));
  ++next_id_;
  std::unique_ptr<Job> j = MakeJob(id, std::move(plan));
  j->created_ms = now_ms;
  QueueInitiallyReady(*j);
  jobs_.emplace(id, std::move(j));
  return id;
}

JobScheduler::Job* JobScheduler::FindJob(JobId id) const {
  auto it = jobs_.find(id);
  return it == jobs_.end() ? nullptr : it->second.get();
}

absl::Status JobScheduler::CheckRef(TaskRef ref, Job** job) const {
  *job = FindJob(ref.job);
  if (*job == nullptr) return absl::NotFoundError(absl::StrCat("job ", ref.job, " not found"));
  if (ref.task >= (*job)->task_state.size()) {
    return absl::NotFoundError(absl::StrCat("job ", ref.job, " has no task ", ref.task));
  }
  return absl::OkStatus();
}

void JobScheduler::DropLeasesOf(JobId job) {
  for (auto it = leases_.begin(); it != leases_.end();) {
    if (it->first.job == job) {
      leases_.erase(it++);
    } else {
      ++it;
    }
  }
}

absl::Status JobScheduler::FinishJob(Job& job, JobState state, const std::string& message, int64_t now_ms) {
  QF_RETURN_IF_ERROR(store_->PutJobState(job.id, state, message, now_ms));
  job.state = state;
  job.message = message;
  job.finished_ms = now_ms;
  DropLeasesOf(job.id);
  return absl::OkStatus();
}

absl::Status JobScheduler::SpendAttempt(Job& job, uint32_t task, const std::string& why, int64_t now_ms) {
  const int attempts = job.attempts[task] + 1;
  if (attempts >= options_.max_attempts) {
    QF_RETURN_IF_ERROR(FinishJob(job, JobState::kFailed,
                                 absl::StrCat(job.plan.Describe(task), " failed ", attempts, " times; last: ", why),
                                 now_ms));
    job.attempts[task] = static_cast<uint8_t>(attempts);
    return absl::OkStatus();
  }
  job.attempts[task] = static_cast<uint8_t>(attempts);
  leases_.erase({job.id, task});
  job.task_state[task] = TaskState::kReady;
  ready_.push_back({job.id, task});
  return absl::OkStatus();
}

absl::StatusOr<int> JobScheduler::ExpireLocked(int64_t now_ms) {
  int expired = 0;
  while (!expiries_.empty() && expiries_.top().deadline_ms <= now_ms) {
    const Expiry e = expiries_.top();
    auto it = leases_.find(e.ref);
    if (it == leases_.end() || it->second.epoch != e.epoch || it->second.deadline_ms != e.deadline_ms) {
      expiries_.pop();  // stale: heartbeated, completed, failed or cancelled since
      continue;
    }
    Job* job = FindJob(e.ref.job);
    const std::string why = absl::StrCat("lease of worker ", it->second.worker, " expired");
    QF_RETURN_IF_ERROR(SpendAttempt(*job, e.ref.task, why, now_ms));  // on error the entry stays for a retry
    expiries_.pop();
    ++expired;
    ++counters_.expired;
  }
  return expired;
}

absl::StatusOr<int> JobScheduler::ExpireLeases(int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  return ExpireLocked(now_ms);
}

absl::StatusOr<std::optional<LeasedTask>> JobScheduler::Lease(const std::string& worker, int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  QF_RETURN_IF_ERROR(ExpireLocked(now_ms).status());
  while (!ready_.empty()) {
    const TaskRef ref = ready_.front();
    ready_.pop_front();
    Job* job = FindJob(ref.job);
    if (job == nullptr || job->state != JobState::kRunning || job->task_state[ref.task] != TaskState::kReady) {
      continue;
    }
    job->task_state[ref.task] = TaskState::kLeased;
    ++counters_.leased;
    const uint32_t epoch = next_epoch_++;
    const int64_t deadline = now_ms + options_.lease_ms;
    leases_[ref] = LeaseInfo{worker, deadline, epoch};
    expiries_.push({deadline, ref, epoch});

    LeasedTask out;
    out.ref = ref;
    out.deadline_ms = deadline;
    out.attempt = job->attempts[ref.task];
    const PlanTask& p = job->plan.tasks[ref.task];
    TaskSpec& s = out.spec;
    s.kind = p.kind;
    s.source_uri = job->plan.model.source_uri;
    s.layer = p.layer;
    s.input_bytes = p.input_bytes;
    if (p.kind == TaskKind::kQuantize) {
      const TensorDesc& t = job->plan.model.tensors[p.tensor];
      s.tensor = std::string(job->plan.model.name(p.tensor));
      s.rows = t.rows;
      s.cols = t.cols;
      s.row_begin = p.row_begin;
      s.row_end = p.row_end;
      s.config = &job->plan.configs[p.config];
    }
    return std::optional<LeasedTask>(std::move(out));
  }
  return std::optional<LeasedTask>();
}

absl::StatusOr<int64_t> JobScheduler::Heartbeat(const std::string& worker, TaskRef ref, int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  Job* job;
  QF_RETURN_IF_ERROR(CheckRef(ref, &job));
  if (job->state == JobState::kCancelled) return absl::CancelledError(absl::StrCat("job ", ref.job, " was cancelled"));
  if (job->state == JobState::kFailed) return absl::AbortedError(absl::StrCat("job ", ref.job, " failed"));
  auto it = leases_.find(ref);
  // A lease past its deadline is lost even if ExpireLeases has not run yet: another worker may get it next.
  if (it == leases_.end() || it->second.worker != worker || it->second.deadline_ms < now_ms) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", worker, " does not hold the lease of task ",
                                                      ref.task, " of job ", ref.job));
  }
  it->second.deadline_ms = now_ms + options_.lease_ms;
  expiries_.push({it->second.deadline_ms, ref, it->second.epoch});
  return it->second.deadline_ms;
}

absl::StatusOr<CompleteOutcome> JobScheduler::Complete(const std::string& worker, TaskRef ref,
                                                       const std::string& result_ref, int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  Job* job;
  QF_RETURN_IF_ERROR(CheckRef(ref, &job));
  if (job->state != JobState::kRunning) return CompleteOutcome::kJobNotRunning;
  TaskState& st = job->task_state[ref.task];
  if (st == TaskState::kDone) {
    ++counters_.duplicates;
    return CompleteOutcome::kDuplicate;
  }
  if (st == TaskState::kBlocked) {
    return absl::FailedPreconditionError(
        absl::StrCat("task ", ref.task, " of job ", ref.job, " was never leased: its dependencies are not done"));
  }
  if (result_ref.size() >= (size_t{1} << 24)) return absl::InvalidArgumentError("result_ref: longer than 16 MiB");
  QF_RETURN_IF_ERROR(store_->PutTaskResult(ref.job, ref.task, result_ref));
  st = TaskState::kDone;  // a stale ready_ entry or expiry entry for it is skipped later
  ++counters_.committed;
  leases_.erase(ref);
  job->result_pos[ref.task] = (uint64_t{job->result_arena.size()} << 24) | result_ref.size();
  job->result_arena.append(result_ref);
  ++job->tasks_done;
  if (job->rate_start_ms < 0) {
    job->rate_start_ms = now_ms;
    job->rate_start_bytes = job->bytes_done;
  }
  job->bytes_done += job->plan.tasks[ref.task].input_bytes;
  job->last_ms = now_ms;
  for (uint32_t k = job->dependent_offsets[ref.task]; k < job->dependent_offsets[ref.task + 1]; ++k) {
    const uint32_t d = job->dependents[k];
    if (--job->pending_deps[d] == 0 && job->task_state[d] == TaskState::kBlocked) {
      job->task_state[d] = TaskState::kReady;
      ready_.push_back({job->id, d});
    }
  }
  if (job->tasks_done == job->task_state.size()) {
    // The commit above is durable; if this write fails, Recover() finishes the job.
    (void)FinishJob(*job, JobState::kSucceeded, "", now_ms);
    job->state = JobState::kSucceeded;
    job->finished_ms = now_ms;
  }
  return CompleteOutcome::kCommitted;
}

absl::Status JobScheduler::Fail(const std::string& worker, TaskRef ref, const std::string& error, int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  Job* job;
  QF_RETURN_IF_ERROR(CheckRef(ref, &job));
  if (job->state != JobState::kRunning) return absl::OkStatus();
  auto it = leases_.find(ref);
  if (it == leases_.end() || it->second.worker != worker) return absl::OkStatus();  // stale report
  ++counters_.failed;
  return SpendAttempt(*job, ref.task, absl::StrCat("worker ", worker, ": ", error), now_ms);
}

absl::Status JobScheduler::CancelJob(JobId id, int64_t now_ms) {
  std::lock_guard<std::mutex> l(mu_);
  Job* job = FindJob(id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  if (job->state != JobState::kRunning) return absl::OkStatus();
  return FinishJob(*job, JobState::kCancelled, "cancelled", now_ms);
}

absl::StatusOr<JobProgress> JobScheduler::Progress(JobId id, int64_t now_ms) const {
  std::lock_guard<std::mutex> l(mu_);
  Job* job = FindJob(id);
  if (job == nullptr) return absl::NotFoundError(absl::StrCat("job ", id, " not found"));
  JobProgress p;
  p.state = job->state;
  p.message = job->message;
  p.tasks_done = job->tasks_done;
  p.tasks_total = job->task_state.size();
  p.bytes_done = job->bytes_done;
  p.bytes_total = job->plan.total_input_bytes;
  p.created_ms = job->created_ms;
  p.finished_ms = job->finished_ms;
  if (job->state == JobState::kSucceeded) {
    p.eta_seconds = 0;
  } else if (job->rate_start_ms >= 0 && now_ms > job->rate_start_ms && job->bytes_done > job->rate_start_bytes) {
    // Throughput since this process saw its first completion of the job (recovered bytes do not count).
    const double rate = static_cast<double>(job->bytes_done - job->rate_start_bytes) /
                        static_cast<double>(now_ms - job->rate_start_ms);
    p.eta_seconds = static_cast<double>(p.bytes_total - p.bytes_done) / rate / 1000.0;
  }
  return p;
}

absl::StatusOr<std::string> JobScheduler::ResultRef(TaskRef ref) const {
  std::lock_guard<std::mutex> l(mu_);
  Job* job;
  QF_RETURN_IF_ERROR(CheckRef(ref, &job));
  if (job->task_state[ref.task] != TaskState::kDone) return absl::NotFoundError("task not committed");
  const uint64_t pos = job->result_pos[ref.task];
  return job->result_arena.substr(pos >> 24, pos & 0xffffff);
}

const Plan* JobScheduler::PlanOf(JobId id) const {
  std::lock_guard<std::mutex> l(mu_);
  const Job* job = FindJob(id);
  return job == nullptr ? nullptr : &job->plan;
}

std::vector<JobId> JobScheduler::Jobs() const {
  std::lock_guard<std::mutex> l(mu_);
  std::vector<JobId> out;
  for (const auto& [id, j] : jobs_) out.push_back(id);
  return out;
}

size_t JobScheduler::LeasedCount() const {
  std::lock_guard<std::mutex> l(mu_);
  return leases_.size();
}

QueueCounters JobScheduler::counters() const {
  std::lock_guard<std::mutex> l(mu_);
  return counters_;
}

TaskStateCounts JobScheduler::TaskCounts() const {
  std::lock_guard<std::mutex> l(mu_);
  TaskStateCounts c;
  for (const auto& [id, j] : jobs_) {
    if (j->state != JobState::kRunning) continue;
    for (const TaskState s : j->task_state) {
      switch (s) {
        case TaskState::kBlocked: ++c.blocked; break;
        case TaskState::kReady: ++c.ready; break;
        case TaskState::kLeased: ++c.leased; break;
        case TaskState::kDone: ++c.done; break;
      }
    }
  }
  return c;
}

size_t JobScheduler::MemoryBytes() const {
  std::lock_guard<std::mutex> l(mu_);
  size_t n = sizeof(*this) + ready_.size() * sizeof(TaskRef) + expiries_.size() * sizeof(Expiry) +
             leases_.capacity() * (sizeof(TaskRef) + sizeof(LeaseInfo) + 1);
  for (const auto& [id, j] : jobs_) {
    n += sizeof(Job) + j->plan.MemoryBytes() + j->task_state.capacity() + j->attempts.capacity() +
         (j->pending_deps.capacity() + j->dependent_offsets.capacity() + j->dependents.capacity()) * 4 +
         j->result_pos.capacity() * 8 + j->result_arena.capacity();
  }
  return n;
}

}  // namespace qforge::scheduler
