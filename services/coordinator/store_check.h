// A consistency check of the coordinator's own records and the files they reference
// (`qcal-coordinator --check-store`, the chaos soak's last check). It reads the store through
// KvStore only (open it read-only, with the coordinator stopped) and the data directory; it
// changes nothing. What it verifies (store_schema.h has the keys and records):
//   - every record parses and sits under the key its content implies (job/<id>, <id>/block/<b>,
//     ...); no key of an unknown shape;
//   - the counters are ahead of what they handed out: next_seq above every job's seq (and seqs
//     are unique), next_epoch above every lease epoch, next_gang_epoch above every job's;
//   - idempotency records name an existing job of the same client with the same spec sha256;
//   - a job's numbers agree: blocks_done within [0, num_blocks], checkpoint_block within
//     [0, blocks_done], a SUCCEEDED job has every block done;
//   - a final job keeps no per-job records (tasks, artifacts, activations) and no files
//     (artifacts/<id>/, activations/<id>/);
//   - a live job has a done mark for every block below blocks_done, each mark's digests equal
//     its layers' records, every layer record has its artifact record, and every artifact's
//     file has the digest's size and sha256; per-job records name a job that exists;
//   - activation records: at or after the checkpoint (older ones are deleted with the advance),
//     all chunks present at the checkpoint, each file with its recorded size and sha256;
//     gradient-pass records likewise;
//   - no file under activations/ that no record references, no upload staging file, and no
//     artifacts/<id>/ of a job that is final or unknown. (A live job may hold an artifact file
//     whose batch never landed; it is counted, not a problem: the next commit overwrites it.)
// Problems are collected, not returned as errors; an error means the check could not run.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/coordinator/kv_store.h"

namespace qcal::coordinator {

struct StoreCheckResult {
  int64_t jobs = 0;        // job records
  int64_t final_jobs = 0;  // of which SUCCEEDED, FAILED or CANCELLED
  int64_t idempotency_keys = 0;
  int64_t workers = 0;                      // lease records
  int64_t layers = 0;                       // layer records of live jobs
  int64_t files_checked = 0;                // artifact, activation and gradient files hashed
  int64_t unreferenced_artifact_files = 0;  // of live jobs (allowed, see above)
  // One line per inconsistency, naming the record key or file.
  std::vector<std::string> problems;

  bool ok() const { return problems.empty(); }
  // {"ok", "jobs", "final_jobs", ..., "problems": [...]}, one line.
  std::string ToJson() const;
};

// Checks `store` and the files under `data_dir` (the coordinator's --data-dir).
absl::StatusOr<StoreCheckResult> CheckStore(KvStore& store, const std::string& data_dir);

}  // namespace qcal::coordinator
