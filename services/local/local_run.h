// `qcal quantize` through the real service code path (DESIGN section 7): one process hosts a
// coordinator with a temporary RocksDB store, its worker service on a loopback port, and N workers
// (each with the job's thread count and device), and runs one job through them: submit, gang
// assignment, block commits, boundary checkpoints, export by the coordinator's commit. Local mode
// uses paths as given (the input root is "/", so any readable file can be named) and the output
// goes exactly to JobOptions::out_dir (its parent is the output root).
//
// The store and checkpoints live in a private directory under JobOptions::scratch_dir ($TMPDIR or
// /tmp by default) that is removed at the end, whatever the outcome.
//
// A build without the service (QCAL_SERVICE=OFF, the engine-only GPU bundle) has no local run:
// `qcal quantize` calls engine::RunQuantizeJob there, and the two give byte-identical outputs.
#pragma once

#include "absl/status/statusor.h"
#include "services/engine/pipeline.h"

namespace qcal::local {

struct LocalRunOptions {
  // The job, as `qcal quantize` has it. Its threads and device are every worker's.
  engine::JobOptions job;
  // In-process workers sharing the job (a gang of this size). Default: 1.
  int workers = 1;
  absl::Status Validate() const;
};

// Runs the job to its end. The result carries the report (read back from the output) and the
// perplexities; errors are the job's (INVALID_ARGUMENT for a bad request, the job's failure reason
// otherwise).
absl::StatusOr<engine::JobResult> RunLocalJob(const LocalRunOptions& options,
                                              const engine::JobLogFn& log = nullptr);

}  // namespace qcal::local
