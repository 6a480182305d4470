// Test-only fault injection (DESIGN section 7), so that kill tests hit exact points: a process
// reads QCAL_FAULT at start-up and, when it reaches a named point, kills itself with SIGKILL, makes
// the point fail, or stops itself so that a test can act on the world at that exact point.
//
// QCAL_FAULT = FAULT[,FAULT...]; FAULT = PROCESS[:block=N][:stage=NAME]:ACTION
//   PROCESS  worker | coordinator (faults for the other process are ignored)
//   block=N  only at block N (any block when absent)
//   stage=S  the point's name (required). Worker: open (session opened), solve (block computed,
//            not uploaded; in a gang of more than one: an owner about to send a layer it solved),
//            exchange (a gang member about to send partial or completed statistics), gradient
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
//            reply), store (the block's store write fails), gradient_done (the store write that
//            completed a job's gradient pass is done, before the reply; block = 0), complete
//            (output renamed, state not yet written), replan (a gang's new plan was persisted,
//            before its members hear of it; block = the job's checkpoint block).
//   ACTION   kill (SIGKILL this process) | error (the point returns INTERNAL) | stop (the process
//            sends itself SIGSTOP; once a test has done what it needed to while every thread is
//            frozen, SIGCONT resumes it and the point passes as if no fault were set)
// Examples: QCAL_FAULT=worker:block=2:stage=solve:kill; QCAL_FAULT=worker:block=1:stage=commit:stop
// (a test sees the stop as state 'T' in /proc/PID/stat, or waitpid with WUNTRACED).
// Each fault fires at most once per process. Builds configured with QCAL_TESTS=OFF ignore the
// variable (and log that they do).
#pragma once

#include <memory>
#include <string>
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

  // Reached point (stage, block): when a fault that has not fired matches, SIGKILLs the process,
  // returns INTERNAL, or SIGSTOPs the process and returns OK once it is continued; OK otherwise.
  // Thread-safe.
  absl::Status Hit(const std::string& stage, int block);
  bool empty() const { return faults_.empty(); }

 private:
  enum class Action { kKill, kError, kStop };
  struct Fault {
    std::string stage;
    int block = -1;  // -1: any
    Action action = Action::kError;
    bool fired = false;
  };
  absl::Mutex mu_;
  std::vector<Fault> faults_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qcal::service
