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

// What FetchResume returns: the committed artifacts of blocks [0, checkpoint_block). The
// activation checkpoint goes to a file (it can be gigabytes).
struct ResumeData {
  int checkpoint_block = 0;
  std::vector<std::vector<LayerArtifact>> blocks;
};

class CoordinatorClient {
 public:
  static absl::StatusOr<std::unique_ptr<CoordinatorClient>> Create(
      const rpc::ClientOptions& options);

  absl::StatusOr<v1::RegisterWorkerResponse> RegisterWorker(
      const v1::RegisterWorkerRequest& request);
  absl::Status Heartbeat(const v1::HeartbeatRequest& request);
  // nullopt when no task came within `wait`.
  absl::StatusOr<std::optional<v1::Task>> AcquireTask(const v1::Lease& lease, absl::Duration wait);
  // Cancels an AcquireTask wait in progress (it returns CANCELLED). Thread-safe.
  void CancelWait();
  absl::StatusOr<v1::CommitBlockResponse> CommitBlock(const v1::Lease& lease,
                                                      const std::string& job_id, int block,
                                                      const std::vector<LayerArtifact>& layers,
                                                      const v1::BlockStats& stats);
  // `path`: the SaveActivations file of the boundary before `block`, streamed from disk.
  absl::StatusOr<v1::UploadActivationsResponse> UploadActivations(const v1::Lease& lease,
                                                                  const std::string& job_id,
                                                                  int block,
                                                                  const std::string& path);
  // Writes the activation checkpoint (when there is one) to `activations_path`. DATA_LOSS when a
  // received artifact or the checkpoint does not match its sha256.
  absl::StatusOr<ResumeData> FetchResume(const v1::Lease& lease, const std::string& job_id,
                                         const std::string& activations_path);
  absl::StatusOr<v1::CompleteTaskResponse> CompleteTask(const v1::CompleteTaskRequest& request);
  absl::Status FailTask(const v1::FailTaskRequest& request);

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
