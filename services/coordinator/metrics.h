// The coordinator's metrics (DESIGN section 7), as an interface so that the coordinator never sees
// the Prometheus client library; PrometheusMetrics (prometheus_metrics.h) implements it.
//
// Exported series (prefix qcal_; label values are bounded sets, never job ids):
//   qcal_jobs{state}                      gauge      jobs per state (queued, running, succeeded,
//                                                    failed, cancelled)
//   qcal_job_duration_seconds{state}      histogram  submit to final state, by final state
//   qcal_stage_duration_seconds{stage}    histogram  stage wall time: gradient (one rank's
//                                                    gradient pass, output-adaptive recipes),
//                                                    block (one block's statistics, solves and
//                                                    push), checkpoint (activation upload),
//                                                    finish (export + eval)
//   qcal_job_blocks_done                  gauge      committed blocks, summed over active jobs
//   qcal_job_blocks_total                 gauge      blocks, summed over active jobs
//   qcal_blocks_committed_total           counter    block commits (new, not re-verified ones)
//   qcal_calibration_tokens_per_second    gauge      calibration tokens/s through the last block
//   qcal_hessian_flops_per_second         gauge      Hessian accumulation rate of the last block
//                                                    (useful FLOPs: n·k² per linear input)
//   qcal_layer_solve_seconds              histogram  per-layer solve time
//   qcal_layer_rel_error{kind}            histogram  per-layer relative output error: kind=rtn
//                                                    (plain RTN, the "before"), kind=recipe (the
//                                                    recipe's quantizer), kind=reconstructed
//                                                    (after error reconstruction, when the recipe
//                                                    has it)
//   qcal_worker_leases                    gauge      live worker leases
//   qcal_lease_expiries_total             counter    leases that expired
//   qcal_task_retries_total               counter    job attempts after the first
//   qcal_rpc_duration_seconds{method}     histogram  server-side RPC latency
//   qcal_rpcs_total{method,code}          counter    RPCs by final status code
//   qcal_store_write_seconds              histogram  synced store write latency
//   qcal_store_write_bytes_total          counter    bytes written to the store
//   qcal_store_write_errors_total         counter    failed store writes
//   qcal_store_writable                   gauge      1 while the store accepts writes, else 0
//   qcal_device_memory_bytes              gauge      accelerator memory in use, summed over workers
//   qcal_job_peak_rss_bytes               gauge      peak host RSS of the last job to succeed
//   qcal_job_peak_device_memory_bytes     gauge      peak device memory of the last job to succeed
//   qcal_exchange_bytes_total{rank}       counter    peer exchange payload bytes sent, by gang
//                                                    rank (from heartbeats' cumulative totals)
//   qcal_reduction_wait_seconds_total{rank} counter  time gang members waited at reductions
//   qcal_block_exchange_bytes{rank}       histogram  bytes a rank sent for one block (commits)
//   qcal_block_reduction_wait_seconds{rank} histogram reduction wait of a rank in one block
// `rank` is a gang rank (0..63), never a worker id.
// Per-job values (blocks i/N, ETA, tokens/s) are in WatchJob events and `qcal status`.
//
// Implementations are thread-safe.
#pragma once

#include <cstdint>
#include <map>
#include <string>

namespace qcal::coordinator {

class Metrics {
 public:
  virtual ~Metrics() = default;
  // Jobs per state name ("queued", ...); states absent from the map are set to 0.
  virtual void SetJobs(const std::map<std::string, int>& by_state) = 0;
  virtual void ObserveJobDuration(const std::string& final_state, double seconds) = 0;
  virtual void ObserveStage(const std::string& stage, double seconds) = 0;
  virtual void SetBlocks(int64_t done, int64_t total) = 0;
  virtual void AddBlockCommitted() = 0;
  virtual void SetCalibrationTokensPerSecond(double tokens_per_second) = 0;
  virtual void SetHessianFlopsPerSecond(double flops_per_second) = 0;
  // rel_error_er < 0: the layer has no error reconstruction.
  virtual void ObserveLayer(double solve_seconds, double rel_error_rtn, double rel_error,
                            double rel_error_er) = 0;
  virtual void SetWorkerLeases(int leases) = 0;
  virtual void AddLeaseExpiry() = 0;
  virtual void AddTaskRetry() = 0;
  // `code`: the canonical status code name ("OK", "INVALID_ARGUMENT", ...).
  virtual void ObserveRpc(const std::string& method, const std::string& code, double seconds) = 0;
  virtual void ObserveStoreWrite(double seconds, int64_t bytes, bool ok) = 0;
  virtual void SetStoreWritable(bool writable) = 0;
  virtual void SetDeviceMemory(int64_t bytes) = 0;
  // The peaks a job reported when it succeeded (bytes).
  virtual void SetJobPeakMemory(int64_t rss_bytes, int64_t device_bytes) = 0;
  // Peer exchange of gang rank `rank`: increments of the cumulative totals, and one block's.
  virtual void AddExchange(int rank, int64_t bytes, double wait_seconds) = 0;
  virtual void ObserveBlockExchange(int rank, int64_t bytes, double wait_seconds) = 0;
};

}  // namespace qcal::coordinator
