// Test-only fault injection (DESIGN section 7), so that kill tests hit exact points: a process
// reads QCAL_FAULT at start-up and, when it reaches a named point, kills itself with SIGKILL or
// makes the point fail.
//
// QCAL_FAULT = FAULT[,FAULT...]; FAULT = PROCESS[:block=N][:stage=NAME]:ACTION
//   PROCESS  worker | coordinator (faults for the other process are ignored)
//   block=N  only at block N (any block when absent)
//   stage=S  the point's name (required). Worker: open (session opened), solve (block computed,
//            not uploaded), commit (block committed), checkpoint (activations uploaded), finish
//            (output written, not reported). Coordinator: precommit (before a block's store
//            write), commit (after it, before the reply), store (the block's store write fails),
//            complete (output renamed, state not yet written).
//   ACTION   kill (SIGKILL this process) | error (the point returns INTERNAL)
// Example: QCAL_FAULT=worker:block=2:stage=solve:kill
// Each fault fires at most once per process. Builds configured with QCAL_TESTS=OFF ignore the
// variable (and log that they do).
#pragma once

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

  // Reached point (stage, block): SIGKILLs the process or returns INTERNAL when a fault that has
  // not fired matches; OK otherwise. Thread-safe.
  absl::Status Hit(const std::string& stage, int block);
  bool empty() const { return faults_.empty(); }

 private:
  struct Fault {
    std::string stage;
    int block = -1;  // -1: any
    bool kill = false;
    bool fired = false;
  };
  absl::Mutex mu_;
  std::vector<Fault> faults_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qcal::service
