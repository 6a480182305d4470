// The worker's side of WorkerService (proto/qcal/v1/worker_service.proto): one method per RPC,
// each with a deadline, bulk data split into chunks of at most rpc::kChunkBytes and reassembled
// with every hash checked. No retries here: the worker loop decides what to retry.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "qcal/v1/worker_service.grpc.pb.h"
#include "services/common/rpc.h"

namespace qcal::worker {

// One layer's artifact as the worker uploads or receives it.
struct LayerArtifact {
  std::string name;
  std::string quantized;    // SerializeQuantizedLinear bytes
  std::string report_json;  // LayerReportJson text
  double solve_seconds = 0;
};

// One layer of a commit: its kind by position in forward order (q 0 ... down 6), its expert in an
// MoE block (CommitBlockHeader.layer_expert: -1 none, -2 the shared expert, j routed expert j) and
// its artifact.
struct OwnedLayer {
  int index = 0;
  int expert = -1;
  LayerArtifact artifact;
};

// What FetchResume returns: the checkpoint boundary, the committed artifacts of blocks
// [0, checkpoint_block) when asked for, and the files the requested chunks' activations were
// written to (chunk order; none when checkpoint_block is 0).
struct ResumeData {
  int checkpoint_block = 0;
  std::vector<std::vector<LayerArtifact>> blocks;
  std::vector<std::string> chunk_paths;
};

// One linear's gradient-pass statistics file as the worker uploads or receives it.
struct GradientFile {
  int block = 0;
  int linear = 0;  // position in forward order (q 0 ... down 6)
  std::string path;
  std::string sha256;  // hex
  int64_t size = 0;
};

class CoordinatorClient {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Create(
      const rpc::ClientOptions& options);

  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  // The reply's drop_task: the task the request names is no longer this worker's.
  absl::StatusOr<bool> Heartbeat(const v1::HeartbeatRequest& request);
  // nullopt when no task came within `wait`.
  absl::StatusOr<std::optional<v1::Task>> AcquireTask(const v1::Lease& lease, absl::Duration wait);
  // Cancels an AcquireTask wait in progress (it returns CANCELLED). Thread-safe.
  void CancelWait();
  // The sender's layers of `block` (those its rank owns) under `gang_epoch`.
  absl::StatusOr<v1::CommitBlockResponse> CommitBlock(const v1::Lease& lease,
                                                      const std::string& job_id, int block,
                                                      uint64_t gang_epoch,
                                                      const std::vector<OwnedLayer>& layers,
                                                      const v1::BlockStats& stats);
  // `path`: the SaveActivations file of calibration chunk `chunk` at the boundary before
  // `block`, streamed from disk.
  absl::StatusOr<v1::UploadActivationsResponse> UploadActivations(const v1::Lease& lease,
                                                                  const std::string& job_id,
                                                                  int block, int chunk,
                                                                  uint64_t gang_epoch,
                                                                  const std::string& path);
  // Fetches the checkpoint of chunks [chunk_begin, chunk_end) (and, with `artifacts`, the
  // committed artifacts before it), writing chunk c to <dir>/chunk-<c, 6 digits>.safetensors.
  // DATA_LOSS when a received artifact or chunk file does not match its sha256.
  absl::StatusOr<ResumeData> FetchResume(const v1::Lease& lease, const std::string& job_id,
                                         int chunk_begin, int chunk_end, bool artifacts,
                                         const std::string& dir);
  // Commits `file` (streamed from disk; its sha256 and size as given) under `gang_epoch`. `last`:
  // the rank's last file of the pass, which carries the pass's wall time.
  absl::StatusOr<v1::UploadGradientFileResponse> UploadGradientFile(const v1::Lease& lease,
                                                                    const std::string& job_id,
                                                                    uint64_t gang_epoch,
                                                                    const GradientFile& file,
                                                                    bool last, double pass_seconds);
  // Fetches the committed gradient-pass files of blocks [from_block, num_blocks) for `linears`,
  // writing each to <dir>/oac-<block, 6 digits>-<linear, 2 digits>.safetensors. DATA_LOSS when a
  // received file does not match its size and sha256.
  absl::StatusOr<std::vector<GradientFile>> FetchGradientPass(const v1::Lease& lease,
                                                              const std::string& job_id,
                                                              int from_block,
                                                              const std::vector<int>& linears,
                                                              const std::string& dir);
  absl::StatusOr<v1::CompleteTaskResponse> CompleteTask(const v1::CompleteTaskRequest& request);
  absl::Status FailTask(const v1::FailTaskRequest& request);
  absl::Status AbandonTask(const v1::AbandonTaskRequest& request);

 private:
  CoordinatorClient() = default;
  // A deadline long enough to move `bytes` at a modest 16 MiB/s on top of the call timeout.
  absl::Duration BulkTimeout(size_t bytes) const;

  std::unique_ptr<rpc::Connection> connection_;
  std::unique_ptr<v1::WorkerService::Stub> stub_;
  absl::Mutex mu_;
  grpc::ClientContext* waiting_ ABSL_GUARDED_BY(mu_) = nullptr;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace qcal::worker
