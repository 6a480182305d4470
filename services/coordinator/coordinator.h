// The coordinator's core (DESIGN section 7): jobs and their state machine (QUEUED -> RUNNING ->
// SUCCEEDED / FAILED / CANCELLED) on the store, submit validation, worker leases and gangs
// through the Scheduler, per-owner layer commits, per-chunk activation checkpoints, resume, and
// progress events. The gRPC service classes (grpc_services.h) only translate to and from these
// calls.
//
// Gangs: a RUNNING job has a plan (Job.gang, Job.gang_epoch) computed with engine::MakeGangPlan
// from the model's config.json; every member's Task carries it. Commits, uploads, member_done and
// AbandonTask name the gang epoch and are refused (FAILED_PRECONDITION) under a stale one.
//
// Commit points: every state change is one synced WriteBatch, written before memory is updated.
// Each committed layer is stored with its digest as it arrives (only by its owner under the
// current plan); the block's done mark goes in the same batch as the last of its layers (a dense
// block's seven; an MoE block's q, k, v, o and every expert unit's gate, up and down, each from
// the unit's owner; engine::BlockLinears order gives each layer its store index). A
// layer committed before (an earlier attempt) is compared instead: a different digest fails the
// job as a determinism error. Boundary checkpoints are per calibration chunk, files in the data
// directory referenced and hashed from the store; a boundary is usable once all C chunks are in,
// and Job.checkpoint_block is the latest usable boundary at or below blocks_done (older
// boundaries are then deleted).
//
// The gradient pass (output-adaptive recipes) is job state too: each linear's statistics file is
// committed by its owner (UploadGradientFile) as a file under
// <data_dir>/artifacts/<job_id>/oac/, referenced and hashed from the store, and the write that
// brings in the model's last linear also sets Job.gradient_pass_done. A file committed before is
// compared instead (a different sha256 is a determinism error). A block commits only after every
// owner has committed its files (owners upload before they enter block 0, and block 0 needs every
// owner), so any checkpoint boundary > 0 implies a complete pass. After a restart (or a store
// reopen) everything is rebuilt from the store: QUEUED jobs queue again; RUNNING jobs are
// re-planned under a new gang epoch on their members whose leases were restored (at least
// workers.min), else requeued, and resume at their checkpoint. The old plan's members see drop_task
// in heartbeat replies and refusals.
//
// Store failures: a failed write makes the coordinator refuse further writes (UNAVAILABLE, health
// NOT_SERVING) until Tick reopens the store and reloads the state from it.
//
// Thread-safe: every public method may be called from any gRPC thread.
//
// The implementation is one file per room: coordinator.cc (construction, state loading, the store,
// events, Tick), job_state_machine.cc (scheduler actions applied, final states), job_api.cc
// (QuantService), worker_api.cc (registration, heartbeats, tasks, gang membership, completion),
// block_commits.cc (layer commits, checkpoint boundaries, resume) and uploads.cc (activation and
// gradient-pass uploads); coordinator_internal.h holds the helpers they share.
#pragma once

#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/hf_config.h"
#include "qcal/store/v1/records.pb.h"
#include "qcal/v1/quant_service.pb.h"
#include "qcal/v1/worker_service.pb.h"
#include "services/common/fault_injection.h"
#include "services/common/input_paths.h"
#include "services/coordinator/clock.h"
#include "services/coordinator/kv_store.h"
#include "services/coordinator/metrics.h"
#include "services/coordinator/scheduler.h"

namespace qcal::coordinator {

struct CoordinatorOptions {
  // State directory: the store in <data_dir>/store, activation checkpoints in
  // <data_dir>/activations/<job_id>/block-<6 digits>/chunk-<6 digits>.safetensors. Required.
  std::string data_dir;
  // Job inputs are confined beneath this directory. Required.
  std::string input_root;
  // Outputs are created as <output_root>/<output_name>. Required.
  std::string output_root;
  // Lease duration and attempts per job (see SchedulerOptions).
  SchedulerOptions scheduler;
  // How often workers heartbeat; less than the lease. Default: 2 s.
  absl::Duration heartbeat_interval = absl::Seconds(2);
  // Jobs a client may have QUEUED or RUNNING at once; more is RESOURCE_EXHAUSTED. Default: 64.
  int max_active_jobs_per_client = 64;
  // Told to workers: checkpoint activations every this many blocks; 0 lets the worker choose
  // (at most 5% of block time). Default: 0.
  int checkpoint_every = 0;
  // After a store write error, try to reopen the store this often. Default: 2 s.
  absl::Duration store_reopen_interval = absl::Seconds(2);

  absl::Status Validate() const;
};

// Opens (or reopens) the store.
using StoreOpener = std::function<absl::StatusOr<std::unique_ptr<KvStore>>()>;

// What a resuming worker is sent: the header (the requested chunks' files at the checkpoint and,
// when asked, the artifact manifests of the blocks before it) and the chunk files to stream, in
// chunk order (none when checkpoint_block is 0).
struct ResumePlan {
  v1::ResumeHeader header;
  std::vector<std::string> chunk_paths;  // aligned with header.chunks
};

// What FetchGradientPass streams: the manifests and the files' absolute paths (aligned).
struct GradientFetchPlan {
  v1::GradientPassHeader header;
  std::vector<std::string> paths;
};

class Coordinator;

// An upload's staging file in the data directory, owned with its descriptor: written, synced and
// closed, then renamed into place by Commit; destroyed before that, it is closed and removed.
class StagingFile {
 public:
  StagingFile() = default;
  StagingFile(const StagingFile&) = delete;
  StagingFile& operator=(const StagingFile&) = delete;
  ~StagingFile();

  // Creates (or truncates) `path`; UNAVAILABLE if it cannot.
  absl::Status Open(std::string path);
  // Appends `data`. INVALID_ARGUMENT "<what> exceeds its declared size <declared_size>" when the
  // file would grow past `declared_size` bytes (nothing is written); UNAVAILABLE on a write error.
  absl::Status Append(const std::string& data, int64_t declared_size, absl::string_view what);
  // fsyncs and closes the file; UNAVAILABLE if the fsync fails.
  absl::Status SyncAndClose();
  // Renames the closed file to `final_path` (whose directory must exist), then syncs that directory
  // and its parent; UNAVAILABLE if the rename fails. Once committed, the file is not removed.
  absl::Status Commit(const std::filesystem::path& final_path);

  // The staging path; empty once committed.
  const std::string& path() const { return path_; }
  // Bytes appended so far.
  int64_t written() const { return written_; }

 private:
  std::string path_;
  int fd_ = -1;
  int64_t written_ = 0;
};

// One chunk's activation checkpoint being received (UploadActivations): bytes go to a staging file
// in the data directory; Coordinator::CommitActivations checks size and hash and commits it.
class ActivationUpload {
 public:
  // Appends the next bytes; INVALID_ARGUMENT past the declared size.
  absl::Status Append(const std::string& data);
  const v1::ActivationsHeader& header() const { return header_; }

 private:
  friend class Coordinator;
  ActivationUpload() = default;
  v1::ActivationsHeader header_;
  StagingFile staging_;
  absl::Time started_;
};

// One gradient-pass file being received (UploadGradientFile), staged like an ActivationUpload;
// Coordinator::CommitGradientFile checks size and hash and commits it.
class GradientUpload {
 public:
  // Appends the next bytes; INVALID_ARGUMENT past the declared size.
  absl::Status Append(const std::string& data);
  const v1::GradientFileHeader& header() const { return header_; }

 private:
  friend class Coordinator;
  GradientUpload() = default;
  v1::GradientFileHeader header_;
  StagingFile staging_;
};

class Coordinator {
 public:
  // Opens the store through `open_store` and loads the state. `clock`, `metrics` and `faults`
  // must outlive the coordinator.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options,
                                                             StoreOpener open_store, Clock* clock,
                                                             Metrics* metrics,
                                                             service::FaultInjector* faults);
  ~Coordinator();

  // False after a store write error, until the store is reopened.
  bool serving() const;
  // Called with the new value whenever serving() changes (health checking).
  void SetServingCallback(std::function<void(bool serving)> callback);

  // --- QuantService (job_api.cc). `client` is the caller's identity.
  absl::StatusOr<v1::SubmitJobResponse> SubmitJob(const std::string& client,
                                                  const v1::SubmitJobRequest& request);
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(const v1::ListJobsRequest& request);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);
  // The job's current state as an event; *cursor is set to the index of the next event.
  absl::StatusOr<v1::ProgressEvent> Snapshot(const std::string& job_id, int64_t* cursor);
  // Waits until `deadline` for events at index >= *cursor, appends them to `events` and advances
  // *cursor. *done: the job is final and every event was delivered (or the coordinator is
  // shutting down).
  absl::Status WaitForEvents(const std::string& job_id, int64_t* cursor, absl::Time deadline,
                             std::vector<v1::ProgressEvent>* events, bool* done);

  // --- WorkerService (worker_api.cc; CommitBlock, PrepareResume and ReadArtifact in
  // block_commits.cc; the activation and gradient-pass uploads in uploads.cc).
  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  absl::StatusOr<v1::HeartbeatResponse> Heartbeat(const v1::HeartbeatRequest& request);
  // Waits until `deadline` (at most 30 s) for a task.
  absl::StatusOr<v1::AcquireTaskResponse> AcquireTask(const v1::AcquireTaskRequest& request,
                                                      absl::Time deadline);
  // FAILED_PRECONDITION unless `lease` is live and holds job_id (early check of streamed uploads).
  absl::Status CheckHolds(const v1::Lease& lease, const std::string& job_id);
  // Some of a block's layers (quantized bytes, in manifest order), already assembled from chunks.
  absl::StatusOr<v1::CommitBlockResponse> CommitBlock(const v1::CommitBlockHeader& header,
                                                      const std::vector<std::string>& artifacts);
  absl::StatusOr<std::unique_ptr<ActivationUpload>> BeginActivations(
      const v1::ActivationsHeader& header);
  absl::StatusOr<v1::UploadActivationsResponse> CommitActivations(ActivationUpload& upload);
  absl::StatusOr<ResumePlan> PrepareResume(const v1::FetchResumeRequest& request);
  // One linear's gradient-pass statistics from its owner under the current gang epoch.
  absl::StatusOr<std::unique_ptr<GradientUpload>> BeginGradientFile(
      const v1::GradientFileHeader& header);
  absl::StatusOr<v1::UploadGradientFileResponse> CommitGradientFile(GradientUpload& upload);
  // The committed files a resuming worker asks for (FAILED_PRECONDITION unless the pass is done;
  // DATA_LOSS when a file or its record is missing or of the wrong size).
  absl::StatusOr<GradientFetchPlan> PrepareGradientFetch(
      const v1::FetchGradientPassRequest& request);
  // One committed artifact's quantized bytes; DATA_LOSS when they no longer match the digest.
  absl::StatusOr<std::string> ReadArtifact(const std::string& job_id, int block, int layer);
  absl::StatusOr<v1::CompleteTaskResponse> CompleteTask(const v1::CompleteTaskRequest& request);
  absl::Status FailTask(const v1::FailTaskRequest& request);
  absl::Status AbandonTask(const v1::AbandonTaskRequest& request);

  // Expires leases, reopens a failed store, refreshes gauges. Call every ~100 ms.
  void Tick();
  // Wakes every waiter (server shutdown); later waits return at once.
  void Shutdown();

 private:
  using JobRecord = store::v1::JobRecord;
  // Per-job state that lives only in memory: events and timings.
  struct Live {
    std::deque<v1::ProgressEvent> events;
    int64_t first_index = 0;   // index of events.front()
    double block_seconds = 0;  // sum over the blocks timed in this process
    int blocks_timed = 0;
    double tokens_per_second = 0;
    int block = -1;
  };

  Coordinator(const CoordinatorOptions& options, StoreOpener open_store, Clock* clock,
              Metrics* metrics, service::FaultInjector* faults, service::InputRoot input_root);

  absl::Status LoadState() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status CheckServing() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  absl::Status Commit(const WriteBatch& batch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetServing(bool serving) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The RUNNING job that `lease` holds.
  absl::StatusOr<JobRecord*> HeldJob(const v1::Lease& lease, const std::string& job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves a job to a final state (one batch: record, artifacts and checkpoint dropped).
  absl::Status FinishJob(JobRecord& rec, v1::JobState state, const std::string& error,
                         const v1::JobResult* result) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Emit(const JobRecord& rec, const std::string& message) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  v1::ProgressEvent MakeEvent(const JobRecord& rec) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void UpdateGauges() ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The model config of a job (read through the input root once, then cached).
  absl::StatusOr<const ModelConfig*> ConfigOf(const JobRecord& rec)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Persists and announces a scheduler action: kAssign / kReplan (the plan is computed and
  // stored; a job whose plan cannot be computed fails), kRequeue, kFailJob, kCancelJob.
  absl::Status Apply(const Action& action) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The Task of `rank` under the job's current plan.
  v1::Task MakeTask(const JobRecord& rec, int rank) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The sender's rank when `lease` holds job_id under gang_epoch (and the job runs).
  absl::StatusOr<int> GangRank(const v1::Lease& lease, const std::string& job_id,
                               uint64_t gang_epoch) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Moves updated.job().checkpoint_block to the latest usable boundary at or below blocks_done,
  // counting `added` (not yet stored) too; deletes the records of older boundaries in `batch` and
  // appends their files (to remove after the commit) to *stale_files.
  absl::Status AdvanceCheckpoint(JobRecord& updated, const store::v1::ActivationRecord* added,
                                 WriteBatch& batch, std::vector<std::string>* stale_files)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // qcal_device_memory_bytes from the workers' last heartbeats.
  void PublishDeviceMemory() ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::string NewJobId() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::string ActivationDir(const std::string& job_id) const;
  // Removes every temporary output directory (service::TempOutputName) of these jobs.
  void RemoveTempOutputs(const std::set<std::string>& job_ids) const;
  // Where a job's committed artifacts live (files referenced from the store), and one layer's
  // file relative to the data directory.
  std::string ArtifactDir(const std::string& job_id) const;
  static std::string ArtifactFile(const std::string& job_id, int block, int layer);
  // A gradient-pass file relative to the data directory, and the directory of a job's.
  static std::string GradientFile(const std::string& job_id, int block, int layer);
  std::string GradientDir(const std::string& job_id) const;
  // FAILED_PRECONDITION unless the job's recipe runs the gradient pass, `block` and `layer` are in
  // range and `rank` owns `layer` under the job's plan.
  absl::Status CheckGradientOwner(const JobRecord& rec, int rank, int block, int layer) const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The quantized bytes of a stored artifact (file or inline), checked against `sha256`.
  absl::StatusOr<std::string> ArtifactBytes(const store::v1::ArtifactRecord& artifact,
                                            const std::string& sha256,
                                            const std::string& key) const;
  int64_t NowMs() const;

  const CoordinatorOptions options_;
  const StoreOpener open_store_;
  Clock* const clock_;
  Metrics* const metrics_;
  service::FaultInjector* const faults_;
  const service::InputRoot input_root_;

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;    // a job became assignable
  absl::CondVar events_cv_;  // an event was emitted
  std::unique_ptr<KvStore> store_ ABSL_GUARDED_BY(mu_);
  bool serving_ ABSL_GUARDED_BY(mu_) = true;
  absl::Time store_failed_at_ ABSL_GUARDED_BY(mu_);
  std::function<void(bool)> serving_callback_ ABSL_GUARDED_BY(mu_);
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  store::v1::Counters counters_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, JobRecord> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, std::string> by_seq_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Live> live_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> device_memory_ ABSL_GUARDED_BY(mu_);       // per worker
  std::map<std::string, std::string> peer_addresses_ ABSL_GUARDED_BY(mu_);  // per worker
  // Per worker: the cumulative exchange bytes and reduction wait its last heartbeat reported.
  std::map<std::string, std::pair<int64_t, double>> exchange_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, ModelConfig> configs_ ABSL_GUARDED_BY(mu_);  // per job
  Scheduler scheduler_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qcal::coordinator
