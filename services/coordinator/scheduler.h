// The coordinator's scheduler and lease state machine: deterministic, with no I/O, clock or
// threads of its own. Events come in as calls (a worker joined, a heartbeat, a job queued, a
// worker asks for work, a member abandons or finishes its part, a job finished, a tick carrying
// the current time); what the coordinator must then do comes out as Actions, which it persists
// and applies. The same events in the same order give the same actions, so unit tests drive it
// with a simulated clock and no network.
//
// Leases: a worker's lease (worker id, epoch) lives while heartbeats arrive within `lease` of
// each other. Anything under an expired or unknown lease is refused (FAILED_PRECONDITION).
//
// Gangs (DESIGN section 7): a job runs on a gang of between `min` and `max` workers whose device
// kind and thread count match the job's requirement and each other; an unpinned requirement
// (empty / 0) is pinned to the gang's caps when it first starts. A queued job starts when a
// matching idle worker asks (Acquire) and at least `min` matching idle workers are live, the
// asker included; it takes the asker plus further idle matching workers in worker id order
// (string order) up to `max`. Members are ranked in worker id order. Among the queued jobs that
// can start, the oldest (lowest sequence number) goes first; one that cannot (too few workers)
// does not block younger ones. A job whose blocks are all committed (SetExportOnly) needs one
// worker, for its export.
//
// Gang epochs: every plan of a job (a start, or a re-plan) gets a new gang epoch from one counter
// that only grows (the coordinator persists next_gang_epoch()). Members other than the asker get
// their part of a plan when they next call Acquire (kDeliver); a member that asks again after
// its part was delivered dropped its task: the gang is re-planned (new epoch, same members, an
// attempt counted). AbandonTask re-plans the same way. When members' leases expire, the job is
// re-planned on the remaining members when at least `min` remain (ranks recomputed, an attempt
// counted), else requeued (every member freed). A job that reaches max_attempts when an attempt
// would be counted fails; one with a cancel pending is cancelled when it loses a member. A
// member other than rank 0 that finished its part (MemberDone) leaves the gang without a re-plan.
//
// Not thread-safe: the coordinator calls it under its lock.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace qcal::coordinator {

// What a worker runs jobs with: Backend::DeviceKind() and its thread count.
struct WorkerCaps {
  std::string device_kind;
  int threads = 0;
  bool operator==(const WorkerCaps&) const = default;
};

// A job's gang size (JobSpec.workers, normalized): 1 <= min <= max.
struct GangSize {
  int min = 1;
  int max = 1;
};

struct SchedulerOptions {
  // A lease expires this long after its last heartbeat (or its grant). Default: 10 s.
  absl::Duration lease = absl::Seconds(10);
  // A job fails instead of being requeued or re-planned once it has been attempted this many
  // times. Default: 5.
  int max_attempts = 5;
  absl::Status Validate() const;
};

struct Action {
  enum class Kind {
    kAssign,       // job_id starts from the queue on `members` under gang_epoch, as `attempt`
    kReplan,       // running job_id has a new plan: `members` under gang_epoch (`reason` says why)
    kDeliver,      // Acquire only: the asker's part of the job's current plan (no state change)
    kExpireLease,  // the lease (worker_id, epoch) expired
    kRequeue,      // job_id lost too many members and waits in the queue again
    kFailJob,      // job_id ran out of attempts: FAILED with `reason`
    kCancelJob,    // job_id lost a member while a cancel was pending: CANCELLED
  };
  Kind kind = Kind::kAssign;
  std::string job_id;
  // The lease concerned: the asker (Acquire), the expired lease, or the member that caused a
  // re-plan / requeue / failure ("" when several did).
  std::string worker_id;
  uint64_t epoch = 0;
  // kAssign, kReplan, kDeliver: the plan's gang epoch, its members in rank order, and the rank
  // of `worker_id` in it (-1 when it is not a member).
  uint64_t gang_epoch = 0;
  std::vector<std::string> members;
  int rank = -1;
  int attempt = 0;
  WorkerCaps caps;
  std::string reason;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options) : options_(options) {}

  // The gang epoch counter: the next plan gets next_gang_epoch(). Set after a restart to the
  // persisted value (never lowered).
  void SetNextGangEpoch(uint64_t next);
  uint64_t next_gang_epoch() const { return next_gang_epoch_; }

  // A lease was granted (or restored after a coordinator restart); it runs from `now`.
  void WorkerJoined(const std::string& worker_id, uint64_t epoch, const WorkerCaps& caps,
                    absl::Time now);
  // Renews a live lease; FAILED_PRECONDITION when (worker_id, epoch) holds none.
  absl::Status Heartbeat(const std::string& worker_id, uint64_t epoch, absl::Time now);
  // FAILED_PRECONDITION when (worker_id, epoch) holds no live lease. Does not renew it.
  absl::Status CheckLease(const std::string& worker_id, uint64_t epoch) const;
  // FAILED_PRECONDITION unless the live lease (worker_id, epoch) is a member of job_id's gang.
  absl::Status CheckHolds(const std::string& worker_id, uint64_t epoch,
                          const std::string& job_id) const;
  // CheckHolds, and gang_epoch is the job's current one: the member's rank. FAILED_PRECONDITION
  // naming both epochs otherwise.
  absl::StatusOr<int> CheckGang(const std::string& worker_id, uint64_t epoch,
                                const std::string& job_id, uint64_t gang_epoch) const;
  // Whether a heartbeat naming (job_id, gang_epoch) describes a task the worker no longer has:
  // not a member, another gang epoch (0 matches any), or a newer part not yet delivered.
  bool ShouldDrop(const std::string& worker_id, const std::string& job_id,
                  uint64_t gang_epoch) const;

  // A job waits for a gang: submitted, or restored as QUEUED after a restart. `attempts`: how
  // many times it was attempted before. `requirement`: empty / 0 fields are not pinned yet.
  void JobQueued(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                 int attempts, GangSize size = {}, bool export_only = false);
  // A job that was RUNNING on `members` before a coordinator restart: re-planned under a new
  // gang epoch on the members whose leases were restored (an attempt is not counted: the restart
  // is not the job's failure) when at least `min` are, else queued. Returns kReplan or kRequeue.
  Action JobRestored(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                     int attempts, GangSize size, bool export_only,
                     const std::vector<std::string>& members);

  // A worker asks for work: its undelivered part of a plan (kDeliver); a re-plan when it asks
  // again while its delivered task's job runs (kReplan, or kFailJob out of attempts); otherwise
  // the oldest queued job that a gang can start with it (kAssign). nullopt when nothing starts;
  // FAILED_PRECONDITION when the lease is not live.
  absl::StatusOr<std::optional<Action>> Acquire(const std::string& worker_id, uint64_t epoch);
  // A member gives up the current attempt (AbandonTask): kReplan, or kFailJob out of attempts.
  // FAILED_PRECONDITION under a stale lease or gang epoch.
  absl::StatusOr<Action> Abandon(const std::string& worker_id, uint64_t epoch,
                                 const std::string& job_id, uint64_t gang_epoch,
                                 const std::string& reason);
  // A member other than rank 0 finished its part: it leaves the gang and is free.
  // FAILED_PRECONDITION under a stale lease or gang epoch, or from rank 0.
  absl::Status MemberDone(const std::string& worker_id, uint64_t epoch, const std::string& job_id,
                          uint64_t gang_epoch);
  // Every block of the job is committed: from now on it needs one worker.
  void SetExportOnly(const std::string& job_id);

  // A cancel is pending for a running job (it matters when it loses a member).
  void RequestCancel(const std::string& job_id);
  // The job reached a final state: it leaves the queue, and its members are free.
  void JobFinished(const std::string& job_id);

  // Expires the leases whose deadline is at or before `now`: a kExpireLease per lease (worker id
  // order), then for each job that lost members (in the order of its first lost member) one of
  // kReplan, kRequeue, kFailJob or kCancelJob.
  std::vector<Action> Tick(absl::Time now);

  int live_leases() const { return static_cast<int>(workers_.size()); }
  int queued_jobs() const { return static_cast<int>(queue_.size()); }
  // The job a live lease is a member of, "" when none (or no such lease).
  std::string JobOf(const std::string& worker_id) const;

 private:
  struct WorkerState {
    uint64_t epoch = 0;
    WorkerCaps caps;
    absl::Time deadline;
    std::string job_id;      // "" when idle
    bool delivered = false;  // its part of the job's current plan was handed out
  };
  struct JobState {
    int64_t seq = 0;
    WorkerCaps requirement;
    int attempts = 0;
    GangSize size;
    bool export_only = false;
    std::vector<std::string> members;  // rank order; empty while queued
    uint64_t gang_epoch = 0;
    bool cancel = false;
  };
  static bool Matches(const WorkerCaps& requirement, const WorkerCaps& worker);
  GangSize EffectiveSize(const JobState& j) const;
  // Installs `members` (sorted here) as job_id's plan under a new gang epoch; `asker` (possibly
  // "") gets its part delivered at once. Fills the plan fields of an action of `kind`.
  Action Plan(Action::Kind kind, const std::string& job_id, std::vector<std::string> members,
              const std::string& asker);
  // Frees every member of job_id (they become idle) and clears its plan.
  void FreeMembers(const std::string& job_id, JobState& j);
  // job_id needs a new plan on `members` (the lost ones removed): re-planned, requeued, failed or
  // cancelled. `count_attempt`: a re-plan counts an attempt.
  Action Recover(const std::string& job_id, std::vector<std::string> members,
                 const std::string& asker, const std::string& culprit, const std::string& reason,
                 bool count_attempt);

  SchedulerOptions options_;
  uint64_t next_gang_epoch_ = 1;
  std::map<std::string, WorkerState> workers_;
  std::map<std::string, JobState> jobs_;
  std::set<std::pair<int64_t, std::string>> queue_;  // (seq, job_id)
};

}  // namespace qcal::coordinator
