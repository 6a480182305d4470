// qcal-worker (DESIGN section 7): register for a lease and keep it alive with heartbeats
// (worker.cc), acquire a task and run it (task.cc): one attempt of a job as one rank of its gang.
// The rank embeds its calibration chunks, runs every block with the engine's JobSession over the
// peer exchange (services/worker/peer: partial statistics to their owners, solved layers to every
// rank), commits the linears it owns, uploads its chunks at boundary checkpoints, and at the end
// either leaves the gang (ranks > 0) or writes the output into the job's temporary directory for
// the coordinator to move into place (rank 0). A single-worker job is a gang of one.
//
// Resume: a task with a checkpoint fetches its chunks' activations at that boundary (and, on rank
// 0, the committed artifacts before it), restores the session there, and recomputes the rest; the
// coordinator compares layers it already has. Checkpoints: every task.checkpoint_every blocks, or
// (0) whenever the blocks since the last checkpoint took at least 19 times what that checkpoint
// cost (checkpoints at most 5% of block time), decided by rank 0 and sent to the other ranks, and
// always after the last block.
//
// Output-adaptive recipes run the gradient pass before block 0 (every rank over its chunks, the
// partials going to each linear's owner), and each owner commits its linears' statistics files
// (UploadGradientFile) before it enters block 0. A task whose job already has the whole pass
// committed (task.gradient_pass_done) fetches the files of the linears its rank owns from its
// resume block on (FetchGradientPass, sha256-checked) and restores them instead.
//
// Failures: a problem with the job itself (bad input found while running, NaN weights, an error
// writing the output) is reported with FailTask and fails the job. A lost lease or an unreachable
// coordinator drops the task without reporting (the coordinator re-plans or requeues it when the
// lease expires); transient RPC errors are retried while the lease can still be alive. A failed
// exchange (a peer refused a message or could not be reached in time) abandons the attempt
// (AbandonTask: the coordinator re-plans the gang). A heartbeat answered with drop_task (the gang
// was re-planned) stops the task at once, waking any wait on a peer.
#pragma once

#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "kernels/backend.h"
#include "qcal/v1/worker_service.pb.h"
#include "services/common/fault_injection.h"
#include "services/common/rpc.h"
#include "services/engine/gang/plan.h"
#include "services/engine/pipeline.h"
#include "services/worker/coordinator_client.h"
#include "services/worker/gang.h"
#include "services/worker/peer/peer_server.h"
#include "services/worker/scratch.h"

namespace qcal::worker {

struct WorkerOptions {
  // The coordinator and how to reach it. Required: coordinator.address.
  rpc::ClientOptions coordinator;
  // The same trees as the coordinator's --input-root and --output-root. Required.
  std::string input_root;
  std::string output_root;
  // Backend device: "cpu", "cuda" or "cuda:N". Default: "cpu".
  std::string device = "cpu";
  // CPU threads; 0 = number of cores. Jobs pinned to another thread count never come here.
  // Default: 0.
  int threads = 0;
  // Where activation checkpoints are staged on their way up or down and finished blocks wait for
  // the export: in the worker's own qcal-worker-XXXXXX subdirectory, which the next worker to
  // start on the same directory removes if this one dies without doing so (scratch.h). Must be
  // local to the machine. Default: $TMPDIR or /tmp.
  std::string scratch_dir;
  // Long-poll for work this long per AcquireTask call. Default: 5 s.
  absl::Duration acquire_wait = absl::Seconds(5);
  // host:port the internal peer service listens on (gang members exchange statistics and layers
  // there); port 0 picks a free one. Default: "127.0.0.1:0".
  std::string peer_listen = "127.0.0.1:0";
  // host:port peers should dial, sent to the coordinator for the gang plan. Default: "" (the bound
  // peer_listen address, a wildcard host 0.0.0.0 or [::] replaced by the hostname; see
  // AdvertiseAddress in services/worker/peer/peer_server.h).
  std::string peer_advertise;
  // How long one message to a peer may take, retries included, before the attempt is given up
  // (plus 100 ms per MiB of payload). Default: 120 s.
  absl::Duration peer_timeout = absl::Seconds(120);
  // Connection limits of the peer server. Default: PeerServerLimits() (peer_server.h).
  rpc::ServerLimits peer_limits = PeerServerLimits();

  absl::Status Validate() const;
};

class Worker {
 public:
  // Resolves the device kind and thread count (a backend is created once to ask). `faults` must
  // outlive the worker.
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const WorkerOptions& options,
                                                        service::FaultInjector* faults);
  ~Worker();

  // Runs until Stop(). Returns an error only when the coordinator refuses the worker for good
  // (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT at registration).
  absl::Status Run();
  // Thread-safe. A running task stops at its next block boundary (its lease then expires and the
  // job moves on).
  void Stop();

  const std::string& device_kind() const { return device_kind_; }
  int threads() const { return threads_; }

 private:
  enum class TaskEnd { kCompleted, kCancelled, kFailed, kDropped };

  Worker() = default;
  // One registration: heartbeats and tasks until the lease is lost or Stop().
  absl::Status RunLease(const v1::RegisterWorkerResponse& registration);
  void HeartbeatLoop();
  TaskEnd RunTask(const v1::Task& task);
  // The gradient pass of an output-adaptive task (task.cc), before block 0: runs it on this rank
  // and uploads the files of the linears it owns; or, when the task says the pass is done, fetches
  // those of its linears from the session's next block on into `scratch` and restores them.
  // nullopt to go on; otherwise how the task ends.
  std::optional<TaskEnd> RunGradientPass(const v1::Task& task, const v1::Lease& lease,
                                         const engine::GangPlan& plan, FaultingTransport* transport,
                                         engine::JobSession& session);
  std::optional<TaskEnd> RestoreGradientPass(const v1::Task& task, const v1::Lease& lease,
                                             const engine::GangPlan& plan,
                                             const std::string& scratch,
                                             engine::JobSession& session);
  // Reports a job error (FailTask) and returns kFailed.
  TaskEnd FailJob(const v1::Task& task, const absl::Status& error);
  // Gives the attempt up (AbandonTask: the gang is re-planned) and returns kDropped.
  TaskEnd AbandonJob(const v1::Task& task, const absl::Status& why);
  // The task the heartbeats name (gang epoch 0: none); a drop_task reply for it clears the peer
  // server's task (waking waits on peers) and marks it dropped.
  void SetTask(const std::string& job_id, uint64_t gang_epoch);
  bool TaskDropped() const;
  // Calls `call` until it succeeds, fails for good, or the lease is lost / Stop().
  absl::Status Retry(const std::string& what, const std::function<absl::Status()>& call);
  void SetProgress(const std::string& job_id, v1::JobStage stage, int block);
  bool LeaseLost() const;

  WorkerOptions options_;  // scratch_dir: scratch_'s path
  std::unique_ptr<ScratchSpace> scratch_;
  service::FaultInjector* faults_ = nullptr;
  std::string device_kind_;
  int threads_ = 0;
  std::string hostname_;
  std::unique_ptr<CoordinatorClient> client_;
  std::unique_ptr<PeerServer> peer_server_;
  std::string peer_address_;  // what peers dial (sent at registration)

  std::atomic<bool> stop_{false};
  mutable absl::Mutex mu_;
  absl::CondVar heartbeat_cv_;
  v1::Lease lease_ ABSL_GUARDED_BY(mu_);
  absl::Duration lease_duration_ ABSL_GUARDED_BY(mu_);
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_);
  absl::Time last_contact_ ABSL_GUARDED_BY(mu_);
  bool lease_lost_ ABSL_GUARDED_BY(mu_) = false;
  bool heartbeat_stop_ ABSL_GUARDED_BY(mu_) = false;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  v1::JobStage stage_ ABSL_GUARDED_BY(mu_) = v1::JOB_STAGE_UNSPECIFIED;
  int block_ ABSL_GUARDED_BY(mu_) = -1;
  // The running job's backend (heartbeats report its memory in use); null between jobs.
  kernels::Backend* backend_ ABSL_GUARDED_BY(mu_) = nullptr;
  // The running task's job and gang epoch (0: none), and whether the coordinator dropped it.
  std::string task_job_ ABSL_GUARDED_BY(mu_);
  uint64_t task_epoch_ ABSL_GUARDED_BY(mu_) = 0;
  bool task_dropped_ ABSL_GUARDED_BY(mu_) = false;
  // Peer exchange of this process so far: payload bytes sent, seconds waiting on peers.
  int64_t exchange_bytes_total_ ABSL_GUARDED_BY(mu_) = 0;
  double reduction_wait_total_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace qcal::worker
