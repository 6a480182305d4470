// A worker's private scratch directory under --scratch-dir, and the reclaiming of those that dead
// workers left behind. Everything a worker stages on local disk (a task's activation chunks on
// their way up or down, the engine's finished blocks waiting for the export: 70 GB for a 70B
// model, gradient-pass statistics) goes under its own <scratch-dir>/qcal-worker-XXXXXX/. A worker
// that ends normally removes it; one that is SIGKILLed (or loses its machine) cannot, so every
// worker, as it starts, removes the qcal-worker-* directories whose owner is gone.
//
// Ownership is an flock on <dir>/lock held for the life of the process: the kernel releases it
// when the process dies, however it dies, so "the lock can be taken" means "the owner is gone"
// (pid reuse cannot fool it). A directory is created as .qcal-worker-XXXXXX, locked, then renamed
// to qcal-worker-XXXXXX, so that no sweeper ever sees a visible directory whose lock is not yet
// held; a hidden one left by a crash inside those few calls is removed once it is a minute old.
// The scratch directory must be local to the machine (flock over NFS is not to be relied on).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace qcal::worker {

class ScratchSpace {
 public:
  // Reclaims the directories of dead workers under `parent` (see ReclaimScratch), then creates
  // and locks this worker's. UNAVAILABLE naming the path when `parent` is not writable.
  static absl::StatusOr<std::unique_ptr<ScratchSpace>> Create(const std::string& parent);
  // Removes the directory (and releases the lock).
  ~ScratchSpace();

  // <parent>/qcal-worker-XXXXXX.
  const std::string& path() const { return path_; }

 private:
  ScratchSpace() = default;
  std::string path_;
  int lock_fd_ = -1;
};

// Removes every <parent>/qcal-worker-* directory whose lock no live process holds, and every
// <parent>/.qcal-worker-* directory older than a minute; returns how many it removed.
int ReclaimScratch(const std::string& parent);

}  // namespace qcal::worker
