// The coordinator's scheduler and lease state machine: deterministic, with no I/O, clock or
// threads of its own. Events come in as calls (a worker joined, a heartbeat, a job queued, a
// worker asks for work, a job finished, a tick carrying the current time); what the coordinator
// must then do comes out as Actions, which it persists and applies. The same events in the same
// order give the same actions, so unit tests drive it with a simulated clock and no network.
//
// Leases: a worker's lease (worker id, epoch) lives while heartbeats arrive within
// `lease` of each other. Anything under an expired or unknown lease is refused
// (FAILED_PRECONDITION). When a lease expires, the job it held is requeued, or failed once it has
// been attempted max_attempts times, or cancelled when a cancel was pending.
//
// Placement: one worker runs a job at a time. A job goes only to a worker whose device kind and
// thread count match the job's requirement; an unpinned requirement (empty / 0) is pinned to the
// first worker that takes the job. Among the queued jobs a worker matches, the oldest (lowest
// sequence number) goes first.
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

struct SchedulerOptions {
  // A lease expires this long after its last heartbeat (or its grant). Default: 10 s.
  absl::Duration lease = absl::Seconds(10);
  // A job whose worker was lost this many times fails instead of being requeued. Default: 5.
  int max_attempts = 5;
  absl::Status Validate() const;
};

struct Action {
  enum class Kind {
    kAssign,       // job_id now runs on (worker_id, epoch) as attempt `attempt`, pinned to `caps`
    kExpireLease,  // the lease (worker_id, epoch) expired
    kRequeue,      // job_id lost its worker and waits in the queue again
    kFailJob,      // job_id lost its worker `attempt` times: FAILED with `reason`
    kCancelJob,    // job_id lost its worker while a cancel was pending: CANCELLED
  };
  Kind kind = Kind::kAssign;
  std::string job_id;
  std::string worker_id;
  uint64_t epoch = 0;
  int attempt = 0;
  WorkerCaps caps;
  std::string reason;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options) : options_(options) {}

  // A lease was granted (or restored after a coordinator restart); it runs from `now`.
  void WorkerJoined(const std::string& worker_id, uint64_t epoch, const WorkerCaps& caps,
                    absl::Time now);
  // Renews a live lease; FAILED_PRECONDITION when (worker_id, epoch) holds none.
  absl::Status Heartbeat(const std::string& worker_id, uint64_t epoch, absl::Time now);
  // FAILED_PRECONDITION when (worker_id, epoch) holds no live lease. Does not renew it.
  absl::Status CheckLease(const std::string& worker_id, uint64_t epoch) const;
  // FAILED_PRECONDITION unless the live lease (worker_id, epoch) holds job_id.
  absl::Status CheckHolds(const std::string& worker_id, uint64_t epoch,
                          const std::string& job_id) const;

  // A job waits for a worker: submitted, or restored as QUEUED after a restart. `attempts`:
  // how many times it was taken before. `requirement`: empty / 0 fields are not pinned yet.
  void JobQueued(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                 int attempts);
  // A job restored as running under the live lease (worker_id, epoch) after a restart.
  // FAILED_PRECONDITION when that lease is not live or already holds another job (the caller
  // then queues the job instead).
  absl::Status JobHeld(const std::string& job_id, int64_t seq, const WorkerCaps& requirement,
                       int attempts, const std::string& worker_id, uint64_t epoch);

  // A worker asks for work. The job it already holds comes back (a lost reply, or a worker that
  // dropped its task) as a new attempt; otherwise the oldest matching queued job. nullopt when
  // nothing matches; FAILED_PRECONDITION when the lease is not live.
  absl::StatusOr<std::optional<Action>> Acquire(const std::string& worker_id, uint64_t epoch);

  // A cancel is pending for a running job (it matters when its lease expires).
  void RequestCancel(const std::string& job_id);
  // The job reached a final state: it leaves the queue, and its worker is free.
  void JobFinished(const std::string& job_id);

  // Expires the leases whose deadline is at or before `now`, in worker id order: for each, a
  // kExpireLease followed, when it held a job, by kRequeue, kFailJob or kCancelJob.
  std::vector<Action> Tick(absl::Time now);

  int live_leases() const { return static_cast<int>(workers_.size()); }
  int queued_jobs() const { return static_cast<int>(queue_.size()); }
  // The job a live lease holds, "" when none (or no such lease).
  std::string JobOf(const std::string& worker_id) const;

 private:
  struct WorkerState {
    uint64_t epoch = 0;
    WorkerCaps caps;
    absl::Time deadline;
    std::string job_id;  // "" when idle
  };
  struct JobState {
    int64_t seq = 0;
    WorkerCaps requirement;
    int attempts = 0;
    std::string worker_id;  // "" while queued
    bool cancel = false;
  };
  static bool Matches(const WorkerCaps& requirement, const WorkerCaps& worker);
  // By value: callers pass strings owned by the containers Assign modifies.
  Action Assign(std::string job_id, std::string worker_id);

  SchedulerOptions options_;
  std::map<std::string, WorkerState> workers_;
  std::map<std::string, JobState> jobs_;
  std::set<std::pair<int64_t, std::string>> queue_;  // (seq, job_id)
};

}  // namespace qcal::coordinator
