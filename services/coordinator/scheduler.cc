#include "services/coordinator/scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qcal::coordinator {

absl::Status SchedulerOptions::Validate() const {
  if (lease <= absl::ZeroDuration()) return absl::InvalidArgumentError("the lease must be > 0");
  if (max_attempts < 1) return absl::InvalidArgumentError("max_attempts must be >= 1");
  return absl::OkStatus();
}

void Scheduler::SetNextGangEpoch(uint64_t next) {
  next_gang_epoch_ = std::max(next_gang_epoch_, next);
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

absl::StatusOr<int> Scheduler::CheckGang(const std::string& worker_id, uint64_t epoch,
                                         const std::string& job_id, uint64_t gang_epoch) const {
  if (absl::Status s = CheckHolds(worker_id, epoch, job_id); !s.ok()) return s;
  const JobState& j = jobs_.at(job_id);
  if (gang_epoch != j.gang_epoch) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job_id, ": gang epoch ", gang_epoch,
                                                      " is stale (the job runs under ",
                                                      j.gang_epoch, "); ask for the task again"));
  }
  const auto it = std::find(j.members.begin(), j.members.end(), worker_id);
  return static_cast<int>(it - j.members.begin());
}

bool Scheduler::ShouldDrop(const std::string& worker_id, const std::string& job_id,
                           uint64_t gang_epoch) const {
  auto it = workers_.find(worker_id);
  if (it == workers_.end() || it->second.job_id != job_id || !it->second.delivered) return true;
  return gang_epoch != 0 && gang_epoch != jobs_.at(job_id).gang_epoch;
}

absl::Status Scheduler::Heartbeat(const std::string& worker_id, uint64_t epoch, absl::Time now) {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  workers_[worker_id].deadline = now + options_.lease;
  return absl::OkStatus();
}

void Scheduler::JobQueued(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                          int attempts, GangSize size, bool export_only) {
  JobState& j = jobs_[job_id];
  j.seq = seq;
  j.requirement = requirement;
  j.attempts = attempts;
  j.size = size;
  j.export_only = export_only;
  j.members.clear();
  j.gang_epoch = 0;
  queue_.insert({seq, job_id});
}

Action Scheduler::JobRestored(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                              int attempts, GangSize size, bool export_only,
                              const std::vector<std::string>& members) {
  JobState& j = jobs_[job_id];
  j.seq = seq;
  j.requirement = requirement;
  j.attempts = attempts;
  j.size = size;
  j.export_only = export_only;
  j.members.clear();
  std::vector<std::string> live;
  for (const std::string& m : members) {
    auto it = workers_.find(m);
    if (it != workers_.end() && it->second.job_id.empty()) live.push_back(m);
  }
  return Recover(job_id, std::move(live), "", "", "the coordinator restarted",
                 /*count_attempt=*/false);
}

bool Scheduler::Matches(const WorkerCaps& requirement, const WorkerCaps& worker) {
  return (requirement.device_kind.empty() || requirement.device_kind == worker.device_kind) &&
         (requirement.threads == 0 || requirement.threads == worker.threads);
}

GangSize Scheduler::EffectiveSize(const JobState& j) const {
  return j.export_only ? GangSize{1, 1} : j.size;
}

Action Scheduler::Plan(Action::Kind kind, const std::string& job_id,
                       std::vector<std::string> members, const std::string& asker) {
  std::sort(members.begin(), members.end());
  JobState& j = jobs_.at(job_id);
  j.members = members;
  j.gang_epoch = next_gang_epoch_++;
  j.requirement = workers_.at(members.front()).caps;  // pinned from now on
  Action a;
  a.kind = kind;
  a.job_id = job_id;
  a.gang_epoch = j.gang_epoch;
  a.members = members;
  a.attempt = j.attempts;
  a.caps = j.requirement;
  for (size_t r = 0; r < members.size(); ++r) {
    WorkerState& w = workers_.at(members[r]);
    w.job_id = job_id;
    w.delivered = members[r] == asker;
    if (w.delivered) {
      a.worker_id = asker;
      a.epoch = w.epoch;
      a.rank = static_cast<int>(r);
    }
  }
  return a;
}

void Scheduler::FreeMembers(const std::string& job_id, JobState& j) {
  for (const std::string& m : j.members) {
    auto it = workers_.find(m);
    if (it != workers_.end() && it->second.job_id == job_id) {
      it->second.job_id.clear();
      it->second.delivered = false;
    }
  }
  j.members.clear();
  j.gang_epoch = 0;
}

Action Scheduler::Recover(const std::string& job_id, std::vector<std::string> members,
                          const std::string& asker, const std::string& culprit,
                          const std::string& reason, bool count_attempt) {
  JobState& j = jobs_.at(job_id);
  Action a;
  a.job_id = job_id;
  a.worker_id = culprit;
  if (auto it = workers_.find(culprit); it != workers_.end()) a.epoch = it->second.epoch;
  a.attempt = j.attempts;
  a.caps = j.requirement;
  const GangSize size = EffectiveSize(j);
  const bool replan = !members.empty() && static_cast<int>(members.size()) >= size.min;
  if (j.cancel || (count_attempt && j.attempts >= options_.max_attempts)) {
    a.kind = j.cancel ? Action::Kind::kCancelJob : Action::Kind::kFailJob;
    a.reason = j.cancel ? absl::StrCat("cancelled (", reason, ")")
                        : absl::StrCat("attempted ", j.attempts, " times (max_attempts ",
                                       options_.max_attempts, "); last: ", reason);
    FreeMembers(job_id, j);
    queue_.erase({j.seq, job_id});
    jobs_.erase(job_id);
    return a;
  }
  if (!replan) {
    FreeMembers(job_id, j);
    queue_.insert({j.seq, job_id});
    a.kind = Action::Kind::kRequeue;
    a.reason = reason;
    return a;
  }
  if (j.export_only) {
    std::sort(members.begin(), members.end());
    const bool asker_in = std::find(members.begin(), members.end(), asker) != members.end();
    members = {asker_in ? asker : members.front()};
  }
  FreeMembers(job_id, j);
  if (count_attempt) j.attempts += 1;
  Action plan = Plan(Action::Kind::kReplan, job_id, std::move(members), asker);
  plan.reason = absl::StrCat("re-planned on ", plan.members.size(),
                             plan.members.size() == 1 ? " worker: " : " workers: ", reason);
  if (plan.worker_id.empty()) {
    plan.worker_id = a.worker_id;
    plan.epoch = a.epoch;
  }
  return plan;
}

absl::StatusOr<std::optional<Action>> Scheduler::Acquire(const std::string& worker_id,
                                                         uint64_t epoch) {
  if (absl::Status s = CheckLease(worker_id, epoch); !s.ok()) return s;
  WorkerState& w = workers_.at(worker_id);
  if (!w.job_id.empty()) {
    const std::string job_id = w.job_id;
    const JobState& j = jobs_.at(job_id);
    if (!w.delivered) {
      w.delivered = true;
      Action a;
      a.kind = Action::Kind::kDeliver;
      a.job_id = job_id;
      a.worker_id = worker_id;
      a.epoch = w.epoch;
      a.gang_epoch = j.gang_epoch;
      a.members = j.members;
      a.rank = static_cast<int>(std::find(j.members.begin(), j.members.end(), worker_id) -
                                j.members.begin());
      a.attempt = j.attempts;
      a.caps = j.requirement;
      return std::optional<Action>(std::move(a));
    }
    // It asks again while its task's job runs: it dropped the task (or lost the reply).
    std::vector<std::string> members;
    for (const std::string& m : j.members) {
      auto it = workers_.find(m);
      if (it != workers_.end() && it->second.job_id == job_id) members.push_back(m);
    }
    return std::optional<Action>(Recover(job_id, std::move(members), worker_id, worker_id,
                                         absl::StrCat(worker_id, " dropped its task"),
                                         /*count_attempt=*/true));
  }
  for (const auto& [seq, queued_id] : queue_) {
    const JobState& j = jobs_.at(queued_id);
    if (!Matches(j.requirement, w.caps)) continue;
    const GangSize size = EffectiveSize(j);
    std::vector<std::string> members = {worker_id};
    for (const auto& [id, other] : workers_) {
      if (static_cast<int>(members.size()) >= size.max) break;
      if (id != worker_id && other.job_id.empty() && other.caps == w.caps) members.push_back(id);
    }
    if (static_cast<int>(members.size()) < size.min) continue;
    // Copied: erasing the queue entry destroys queued_id.
    const std::string job_id = queued_id;
    queue_.erase({seq, job_id});
    jobs_.at(job_id).attempts += 1;
    return std::optional<Action>(
        Plan(Action::Kind::kAssign, job_id, std::move(members), worker_id));
  }
  return std::optional<Action>();
}

absl::StatusOr<Action> Scheduler::Abandon(const std::string& worker_id, uint64_t epoch,
                                          const std::string& job_id, uint64_t gang_epoch,
                                          const std::string& reason) {
  absl::StatusOr<int> rank = CheckGang(worker_id, epoch, job_id, gang_epoch);
  if (!rank.ok()) return rank.status();
  std::vector<std::string> members;
  for (const std::string& m : jobs_.at(job_id).members) {
    if (workers_.at(m).job_id == job_id) members.push_back(m);
  }
  return Recover(job_id, std::move(members), "", worker_id,
                 absl::StrCat(worker_id, " abandoned the attempt: ", reason),
                 /*count_attempt=*/true);
}

absl::Status Scheduler::MemberDone(const std::string& worker_id, uint64_t epoch,
                                   const std::string& job_id, uint64_t gang_epoch) {
  absl::StatusOr<int> rank = CheckGang(worker_id, epoch, job_id, gang_epoch);
  if (!rank.ok()) return rank.status();
  if (*rank == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job_id, ": rank 0 completes the job; it cannot leave the gang"));
  }
  WorkerState& w = workers_.at(worker_id);
  w.job_id.clear();
  w.delivered = false;
  return absl::OkStatus();
}

void Scheduler::SetExportOnly(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) it->second.export_only = true;
}

void Scheduler::RequestCancel(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) it->second.cancel = true;
}

void Scheduler::JobFinished(const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return;
  queue_.erase({it->second.seq, job_id});
  FreeMembers(job_id, it->second);
  jobs_.erase(it);
}

std::vector<Action> Scheduler::Tick(absl::Time now) {
  std::vector<Action> actions;
  // Jobs that lost members, in the order of their first lost member, with the lost ones.
  std::vector<std::pair<std::string, std::vector<std::string>>> hit;
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
      auto h = std::find_if(hit.begin(), hit.end(),
                            [&](const auto& p) { return p.first == it->second.job_id; });
      if (h == hit.end()) h = hit.insert(hit.end(), {it->second.job_id, {}});
      h->second.push_back(it->first);
    }
    it = workers_.erase(it);
  }
  for (const auto& [job_id, lost] : hit) {
    std::vector<std::string> members;
    for (const std::string& m : jobs_.at(job_id).members) {
      auto it = workers_.find(m);
      if (it != workers_.end() && it->second.job_id == job_id) members.push_back(m);
    }
    const std::string reason =
        lost.size() == 1 ? absl::StrCat("the lease of ", lost[0], " expired")
                         : absl::StrCat("the leases of ", absl::StrJoin(lost, ", "), " expired");
    Action a = Recover(job_id, std::move(members), "", lost[0], reason, /*count_attempt=*/true);
    if (a.kind != Action::Kind::kReplan) a.worker_id = lost[0];
    actions.push_back(std::move(a));
  }
  return actions;
}

std::string Scheduler::JobOf(const std::string& worker_id) const {
  auto it = workers_.find(worker_id);
  return it == workers_.end() ? std::string() : it->second.job_id;
}

}  // namespace qcal::coordinator
