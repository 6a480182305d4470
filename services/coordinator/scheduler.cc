#include "services/coordinator/scheduler.h"

#include "absl/strings/str_cat.h"

namespace qcal::coordinator {

absl::Status SchedulerOptions::Validate() const {
  if (lease <= absl::ZeroDuration()) return absl::InvalidArgumentError("the lease must be > 0");
  if (max_attempts < 1) return absl::InvalidArgumentError("max_attempts must be >= 1");
  return absl::OkStatus();
}

void Scheduler::WorkerJoined(const std::string& worker_id, uint64_t epoch, const WorkerCaps& caps,
                             absl::Time now) {
  WorkerState& w = workers_[worker_id];
  w.epoch = epoch;
  w.caps = caps;
  w.deadline = now + options_.lease;
}

absl::Status Scheduler::CheckLease(const std::string& worker_id, uint64_t epoch) const {
  auto it = workers_.find(worker_id);
  if (it == workers_.end() || it->second.epoch != epoch) {
    return absl::FailedPreconditionError(absl::StrCat(
        "lease ", worker_id, "@", epoch, " is not live (expired or superseded); register again"));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::CheckHolds(const std::string& worker_id, uint64_t epoch,
                                   const std::string& job_id) const {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  if (workers_.at(worker_id).job_id != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("lease ", worker_id, "@", epoch, " does not hold job ", job_id));
  }
  return absl::OkStatus();
}

absl::Status Scheduler::Heartbeat(const std::string& worker_id, uint64_t epoch, absl::Time now) {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  workers_[worker_id].deadline = now + options_.lease;
  return absl::OkStatus();
}

void Scheduler::JobQueued(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                          int attempts) {
  JobState& j = jobs_[job_id];
  j.seq = seq;
  j.requirement = requirement;
  j.attempts = attempts;
  j.worker_id.clear();
  queue_.insert({seq, job_id});
}

absl::Status Scheduler::JobHeld(const std::string& job_id, int64_t seq,
                                const WorkerCaps& requirement, int attempts,
                                const std::string& worker_id, uint64_t epoch) {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  WorkerState& w = workers_[worker_id];
  if (!w.job_id.empty() && w.job_id != job_id) {
    return absl::FailedPreconditionError(
        absl::StrCat("lease ", worker_id, "@", epoch, " already holds job ", w.job_id));
  }
  JobState& j = jobs_[job_id];
  j.seq = seq;
  j.requirement = requirement;
  j.attempts = attempts;
  j.worker_id = worker_id;
  w.job_id = job_id;
  return absl::OkStatus();
}

bool Scheduler::Matches(const WorkerCaps& requirement, const WorkerCaps& worker) {
  return (requirement.device_kind.empty() || requirement.device_kind == worker.device_kind) &&
         (requirement.threads == 0 || requirement.threads == worker.threads);
}

Action Scheduler::Assign(std::string job_id, std::string worker_id) {
  JobState& j = jobs_[job_id];
  WorkerState& w = workers_[worker_id];
  queue_.erase({j.seq, job_id});
  j.worker_id = worker_id;
  j.attempts += 1;
  j.requirement = w.caps;  // pinned from now on
  w.job_id = job_id;
  Action a;
  a.kind = Action::Kind::kAssign;
  a.job_id = job_id;
  a.worker_id = worker_id;
  a.epoch = w.epoch;
  a.attempt = j.attempts;
  a.caps = w.caps;
  return a;
}

absl::StatusOr<std::optional<Action>> Scheduler::Acquire(const std::string& worker_id,
                                                         uint64_t epoch) {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  const WorkerState& w = workers_.at(worker_id);
  if (!w.job_id.empty()) return std::optional<Action>(Assign(w.job_id, worker_id));
  for (const auto& [seq, job_id] : queue_) {
    if (Matches(jobs_.at(job_id).requirement, w.caps)) {
      return std::optional<Action>(Assign(job_id, worker_id));
    }
  }
  return std::optional<Action>();
}

void Scheduler::RequestCancel(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) it->second.cancel = true;
}

void Scheduler::JobFinished(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  queue_.erase({it->second.seq, job_id});
  if (!it->second.worker_id.empty()) {
    auto w = workers_.find(it->second.worker_id);
    if (w != workers_.end() && w->second.job_id == job_id) w->second.job_id.clear();
  }
  jobs_.erase(it);
}

std::vector<Action> Scheduler::Tick(absl::Time now) {
  std::vector<Action> actions;
  for (auto it = workers_.begin(); it != workers_.end();) {
    if (it->second.deadline > now) {
      ++it;
      continue;
    }
    Action expire;
    expire.kind = Action::Kind::kExpireLease;
    expire.worker_id = it->first;
    expire.epoch = it->second.epoch;
    expire.job_id = it->second.job_id;
    actions.push_back(expire);
    if (!it->second.job_id.empty()) {
      const std::string job_id = it->second.job_id;
      JobState& j = jobs_.at(job_id);
      j.worker_id.clear();
      Action a;
      a.job_id = job_id;
      a.worker_id = it->first;
      a.epoch = it->second.epoch;
      a.attempt = j.attempts;
      if (j.cancel) {
        a.kind = Action::Kind::kCancelJob;
        a.reason = "cancelled (its worker was lost)";
        jobs_.erase(job_id);
      } else if (j.attempts >= options_.max_attempts) {
        a.kind = Action::Kind::kFailJob;
        a.reason = absl::StrCat("lost its worker ", j.attempts, " times (max_attempts ",
                                options_.max_attempts, "); last lease ", it->first);
        jobs_.erase(job_id);
      } else {
        a.kind = Action::Kind::kRequeue;
        a.reason = absl::StrCat("the lease of ", it->first, " expired");
        queue_.insert({j.seq, job_id});
      }
      actions.push_back(a);
    }
    it = workers_.erase(it);
  }
  return actions;
}

std::string Scheduler::JobOf(const std::string& worker_id) const {
  auto it = workers_.find(worker_id);
  return it == workers_.end() ? std::string() : it->second.job_id;
}

}  // namespace qcal::coordinator
