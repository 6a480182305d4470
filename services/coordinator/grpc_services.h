// The coordinator's gRPC layer: QuantService (public) and WorkerService (internal). Each method
// identifies the caller, turns the request into a Coordinator call (assembling or splitting
// chunked streams), and maps absl::Status to grpc::Status with the same code. No business logic
// lives here.
#pragma once

#include "qcal/v1/quant_service.grpc.pb.h"
#include "qcal/v1/worker_service.grpc.pb.h"
#include "services/coordinator/auth.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/metrics.h"

namespace qcal::coordinator {

class QuantGrpcService final : public v1::QuantService::Service {
 public:
  // All three must outlive the service.
  QuantGrpcService(Coordinator* coordinator, const Authenticator* auth, Metrics* metrics)
      : coordinator_(coordinator), auth_(auth), metrics_(metrics) {}

  grpc::Status SubmitJob(grpc::ServerContext* context, const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override;
  grpc::Status GetJob(grpc::ServerContext* context, const v1::GetJobRequest* request,
                      v1::Job* response) override;
  grpc::Status ListJobs(grpc::ServerContext* context, const v1::ListJobsRequest* request,
                        v1::ListJobsResponse* response) override;
  grpc::Status CancelJob(grpc::ServerContext* context, const v1::CancelJobRequest* request,
                         v1::Job* response) override;
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::ProgressEvent>* writer) override;

 private:
  Coordinator* const coordinator_;
  const Authenticator* const auth_;
  Metrics* const metrics_;
};

class WorkerGrpcService final : public v1::WorkerService::Service {
 public:
  WorkerGrpcService(Coordinator* coordinator, const Authenticator* auth, Metrics* metrics)
      : coordinator_(coordinator), auth_(auth), metrics_(metrics) {}

  grpc::Status RegisterWorker(grpc::ServerContext* context,
                              const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override;
  grpc::Status AcquireTask(grpc::ServerContext* context, const v1::AcquireTaskRequest* request,
                           v1::AcquireTaskResponse* response) override;
  grpc::Status CommitBlock(grpc::ServerContext* context,
                           grpc::ServerReader<v1::CommitBlockChunk>* reader,
                           v1::CommitBlockResponse* response) override;
  grpc::Status UploadActivations(grpc::ServerContext* context,
                                 grpc::ServerReader<v1::ActivationsChunk>* reader,
                                 v1::UploadActivationsResponse* response) override;
  grpc::Status FetchResume(grpc::ServerContext* context, const v1::FetchResumeRequest* request,
                           grpc::ServerWriter<v1::ResumeChunk>* writer) override;
  grpc::Status UploadGradientFile(grpc::ServerContext* context,
                                  grpc::ServerReader<v1::GradientFileChunk>* reader,
                                  v1::UploadGradientFileResponse* response) override;
  grpc::Status FetchGradientPass(grpc::ServerContext* context,
                                 const v1::FetchGradientPassRequest* request,
                                 grpc::ServerWriter<v1::GradientPassChunk>* writer) override;
  grpc::Status CompleteTask(grpc::ServerContext* context, const v1::CompleteTaskRequest* request,
                            v1::CompleteTaskResponse* response) override;
  grpc::Status FailTask(grpc::ServerContext* context, const v1::FailTaskRequest* request,
                        v1::FailTaskResponse* response) override;
  grpc::Status AbandonTask(grpc::ServerContext* context, const v1::AbandonTaskRequest* request,
                           v1::AbandonTaskResponse* response) override;

 private:
  Coordinator* const coordinator_;
  const Authenticator* const auth_;
  Metrics* const metrics_;
};

}  // namespace qcal::coordinator
