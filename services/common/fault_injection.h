// Test-only fault injection (DESIGN section 7), so that kill tests hit exact points: a process
// reads QCAL_FAULT at start-up and, when it reaches a named point, kills itself with SIGKILL, makes
// the point fail, or stops itself so that a test can act on the world at that exact point.
//
// QCAL_FAULT = FAULT[,FAULT...]; FAULT = PROCESS[:block=N][:stage=NAME][:p=P[:seed=S]]:ACTION
//   PROCESS  worker | coordinator (faults for the other process are ignored)
//   block=N  only at block N (any block when absent)
//   stage=S  the point's name (required; * matches every point of the process). Worker: open
//            (session opened), solve (block computed,
//            not uploaded; in a gang of more than one: an owner about to send a layer it solved),
//            exchange (a gang member about to send partial or completed statistics), expert
//            (a gang member about to send an MoE block's expert-unit partials to the unit's
//            owner; the point after that message's exchange point), gradient
//            (mid gradient pass, as it reaches block N's statistics: in a gang, the partials about
//            to go to a linear's owner; alone, before the block's files are written; the pass
//            runs from the last block down), gradient_upload
//            (the pass is computed; this rank's statistics files of block N are about to be
//            committed, those of earlier blocks are in), gradient_done (every file of this rank's
//            pass is committed, block 0 not started; block = 0), retrain (a recipe that
//            retrains: the training rank has block N's inputs and targets and is about to train
//            it), commit (block committed),
//            checkpoint (activations uploaded), finish (output written, not reported).
//            Coordinator: precommit (before a block's store write), commit (after it, before the
//            reply), store (the block's store write fails), write (any synced store write, of
//            any request or tick, is about to be made; block = -1, so block= never matches it),
//            gradient_done (the store write that
//            completed a job's gradient pass is done, before the reply; block = 0), complete
//            (output renamed, state not yet written), replan (a gang's new plan was persisted,
//            before its members hear of it; block = the job's checkpoint block).
//   p=P      probabilistic: the fault fires at each matching point with probability P in (0, 1],
//            any number of times, instead of once. Whether it fires is a pure function of the
//            seed, the point (stage, block) and how many times this process has reached that
//            point before, so the same seed replays the same decisions for the same sequence of
//            points, however threads interleave different points.
//   seed=S   the seed of p= (an unsigned 64-bit integer). Default: 0.
//   ACTION   kill (SIGKILL this process) | error (the point returns INTERNAL) | stop (the process
//            sends itself SIGSTOP; once a test has done what it needed to while every thread is
//            frozen, SIGCONT resumes it and the point passes as if no fault were set)
// Examples: QCAL_FAULT=worker:block=2:stage=solve:kill; QCAL_FAULT=worker:block=1:stage=commit:stop
// (a test sees the stop as state 'T' in /proc/PID/stat, or waitpid with WUNTRACED);
// QCAL_FAULT=coordinator:stage=write:p=0.02:seed=7:error (about one store write in fifty fails);
// QCAL_FAULT=worker:stage=*:p=0.01:seed=3:kill (the soak's worker kills at random points).
// A fault without p= fires at most once per process; the first matching fault that fires wins.
// Builds configured with QCAL_TESTS=OFF ignore the variable (and log that they do).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace qcal::service {

class FaultInjector {
 public:
  // No faults.
  FaultInjector() = default;
  // Parses `spec` keeping the faults of `process`; INVALID_ARGUMENT names the malformed part.
  static absl::StatusOr<std::unique_ptr<FaultInjector>> Parse(const std::string& spec,
                                                              const std::string& process);
  // Parses the QCAL_FAULT environment variable (unset or empty: no faults).
  static absl::StatusOr<std::unique_ptr<FaultInjector>> FromEnv(const std::string& process);

  // Reached point (stage, block): when a fault matches and fires (a one-shot fault that has not
  // fired yet; a probabilistic one whose draw for this visit is below its p), SIGKILLs the
  // process, returns INTERNAL, or SIGSTOPs the process and returns OK once it is continued; OK
  // otherwise. Thread-safe.
  absl::Status Hit(const std::string& stage, int block);
  bool empty() const { return faults_.empty(); }

  // Whether a probabilistic fault fires at the `visit`-th time (0 first) that a process reaches
  // point (stage, block): a keyed hash of the four, compared with p. Exposed for tests.
  static bool Draw(uint64_t seed, double p, const std::string& stage, int block, int64_t visit);

 private:
  enum class Action { kKill, kError, kStop };
  struct Fault {
    std::string stage;  // "*": any
    int block = -1;     // -1: any
    Action action = Action::kError;
    bool fired = false;
    double p = 0;  // 0: one-shot; else the probability per visit
    uint64_t seed = 0;
  };
  absl::Mutex mu_;
  std::vector<Fault> faults_ ABSL_GUARDED_BY(mu_);
  // How many times each point (stage, block) was reached so far (the draws' visit numbers).
  std::map<std::pair<std::string, int>, int64_t> visits_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qcal::service
