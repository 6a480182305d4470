#include "services/coordinator/grpc_services.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "services/common/rpc.h"

namespace qcal::coordinator {

namespace {

// Largest block upload accepted (a block's quantized linears, an MoE block's experts included),
// bytes.
constexpr int64_t kMaxBlockUploadBytes = int64_t{16} << 30;

// Records latency and outcome of one RPC on destruction.
class RpcScope {
 public:
  RpcScope(Metrics* metrics, const char* method)
      : metrics_(metrics), method_(method), start_(absl::Now()) {}
  ~RpcScope() {
    metrics_->ObserveRpc(method_, absl::StatusCodeToString(code_),
                         absl::ToDoubleSeconds(absl::Now() - start_));
  }
  grpc::Status Done(const absl::Status& status) {
    code_ = status.code();
    return rpc::ToGrpcStatus(status);
  }

 private:
  Metrics* const metrics_;
  const char* const method_;
  const absl::Time start_;
  absl::StatusCode code_ = absl::StatusCode::kOk;
};

absl::Time DeadlineOf(const grpc::ServerContext& context) {
  return absl::FromChrono(context.deadline());
}

// Reads the file at `path` in pieces of at most rpc::kChunkBytes, calling `send(offset, bytes)`
// for each; a false return stops (CANCELLED: the peer went away). DATA_LOSS names the file when it
// cannot be read.
absl::Status StreamFile(const std::string& path,
                        const std::function<bool(int64_t, std::string)>& send) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::DataLossError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  std::string buf(rpc::kChunkBytes, '\0');
  int64_t offset = 0;
  for (;;) {
    const ssize_t n = read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      close(fd);
      return absl::DataLossError(absl::StrCat(path, ": read failed: ", std::strerror(err)));
    }
    if (n == 0) break;
    if (!send(offset, buf.substr(0, static_cast<size_t>(n)))) {
      close(fd);
      return absl::CancelledError("the worker went away");
    }
    offset += n;
  }
  close(fd);
  return absl::OkStatus();
}

}  // namespace

// --- QuantService -----------------------------------------------------------------------------

grpc::Status QuantGrpcService::SubmitJob(grpc::ServerContext* context,
                                         const v1::SubmitJobRequest* request,
                                         v1::SubmitJobResponse* response) {
  RpcScope scope(metrics_, "SubmitJob");
  absl::StatusOr<std::string> client = auth_->Identify(*context);
  if (!client.ok()) return scope.Done(client.status());
  absl::StatusOr<v1::SubmitJobResponse> r = coordinator_->SubmitJob(*client, *request);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status QuantGrpcService::GetJob(grpc::ServerContext* context,
                                      const v1::GetJobRequest* request, v1::Job* response) {
  RpcScope scope(metrics_, "GetJob");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::Job> r = coordinator_->GetJob(request->job_id());
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status QuantGrpcService::ListJobs(grpc::ServerContext* context,
                                        const v1::ListJobsRequest* request,
                                        v1::ListJobsResponse* response) {
  RpcScope scope(metrics_, "ListJobs");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::ListJobsResponse> r = coordinator_->ListJobs(*request);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status QuantGrpcService::CancelJob(grpc::ServerContext* context,
                                         const v1::CancelJobRequest* request, v1::Job* response) {
  RpcScope scope(metrics_, "CancelJob");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::Job> r = coordinator_->CancelJob(request->job_id());
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status QuantGrpcService::WatchJob(grpc::ServerContext* context,
                                        const v1::WatchJobRequest* request,
                                        grpc::ServerWriter<v1::ProgressEvent>* writer) {
  RpcScope scope(metrics_, "WatchJob");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  int64_t cursor = 0;
  absl::StatusOr<v1::ProgressEvent> first = coordinator_->Snapshot(request->job_id(), &cursor);
  if (!first.ok()) return scope.Done(first.status());
  if (!writer->Write(*first)) return scope.Done(absl::CancelledError("the client went away"));
  const absl::Time deadline = DeadlineOf(*context);
  for (;;) {
    if (context->IsCancelled()) return scope.Done(absl::CancelledError("the client went away"));
    // Short waits so that a cancelled client is noticed.
    const absl::Time until = std::min(deadline, absl::Now() + absl::Seconds(1));
    std::vector<v1::ProgressEvent> events;
    bool done = false;
    if (absl::Status s =
            coordinator_->WaitForEvents(request->job_id(), &cursor, until, &events, &done);
        !s.ok()) {
      return scope.Done(s);
    }
    for (const v1::ProgressEvent& e : events) {
      if (!writer->Write(e)) return scope.Done(absl::CancelledError("the client went away"));
    }
    if (done) return scope.Done(absl::OkStatus());
    if (absl::Now() >= deadline) return scope.Done(absl::DeadlineExceededError("watch deadline"));
  }
}

// --- WorkerService ----------------------------------------------------------------------------

grpc::Status WorkerGrpcService::RegisterWorker(grpc::ServerContext* context,
                                               const v1::RegisterWorkerRequest* request,
                                               v1::RegisterWorkerResponse* response) {
  RpcScope scope(metrics_, "RegisterWorker");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::RegisterWorkerResponse> r = coordinator_->RegisterWorker(*request);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::Heartbeat(grpc::ServerContext* context,
                                          const v1::HeartbeatRequest* request,
                                          v1::HeartbeatResponse* response) {
  RpcScope scope(metrics_, "Heartbeat");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::HeartbeatResponse> r = coordinator_->Heartbeat(*request);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::AcquireTask(grpc::ServerContext* context,
                                            const v1::AcquireTaskRequest* request,
                                            v1::AcquireTaskResponse* response) {
  RpcScope scope(metrics_, "AcquireTask");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::AcquireTaskResponse> r =
      coordinator_->AcquireTask(*request, DeadlineOf(*context));
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::CommitBlock(grpc::ServerContext* context,
                                            grpc::ServerReader<v1::CommitBlockChunk>* reader,
                                            v1::CommitBlockResponse* response) {
  RpcScope scope(metrics_, "CommitBlock");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  v1::CommitBlockChunk chunk;
  if (!reader->Read(&chunk) || !chunk.has_header()) {
    return scope.Done(absl::InvalidArgumentError("CommitBlock must start with a header"));
  }
  const v1::CommitBlockHeader header = chunk.header();
  if (absl::Status s = coordinator_->CheckHolds(header.lease(), header.job_id()); !s.ok()) {
    return scope.Done(s);
  }
  // Artifact chunks name the layer by its position in the header (not its layer_index).
  int64_t total = 0;
  for (const v1::LayerManifest& m : header.layers()) {
    if (m.size() < 0) return scope.Done(absl::InvalidArgumentError("negative artifact size"));
    total += m.size();
  }
  if (total > kMaxBlockUploadBytes) {
    return scope.Done(absl::ResourceExhaustedError(
        absl::StrCat("block upload of ", total, " bytes exceeds ", kMaxBlockUploadBytes)));
  }
  std::vector<std::string> artifacts(header.layers_size());
  for (int l = 0; l < header.layers_size(); ++l) artifacts[l].reserve(header.layers(l).size());
  while (reader->Read(&chunk)) {
    if (!chunk.has_artifact()) {
      return scope.Done(absl::InvalidArgumentError("CommitBlock: a second header"));
    }
    const v1::ArtifactChunk& a = chunk.artifact();
    if (a.block() != header.block() || a.layer() < 0 || a.layer() >= header.layers_size() ||
        a.offset() != static_cast<int64_t>(artifacts[a.layer()].size()) ||
        a.offset() + static_cast<int64_t>(a.data().size()) > header.layers(a.layer()).size()) {
      return scope.Done(absl::InvalidArgumentError(
          absl::StrCat("CommitBlock: chunk for block ", a.block(), " layer ", a.layer(),
                       " at offset ", a.offset(), " does not fit the manifest")));
    }
    artifacts[a.layer()] += a.data();
  }
  absl::StatusOr<v1::CommitBlockResponse> r = coordinator_->CommitBlock(header, artifacts);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::UploadActivations(grpc::ServerContext* context,
                                                  grpc::ServerReader<v1::ActivationsChunk>* reader,
                                                  v1::UploadActivationsResponse* response) {
  RpcScope scope(metrics_, "UploadActivations");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  v1::ActivationsChunk chunk;
  if (!reader->Read(&chunk) || !chunk.has_header()) {
    return scope.Done(absl::InvalidArgumentError("UploadActivations must start with a header"));
  }
  absl::StatusOr<std::unique_ptr<ActivationUpload>> upload =
      coordinator_->BeginActivations(chunk.header());
  if (!upload.ok()) return scope.Done(upload.status());
  while (reader->Read(&chunk)) {
    if (chunk.part_case() != v1::ActivationsChunk::kData) {
      return scope.Done(absl::InvalidArgumentError("UploadActivations: a second header"));
    }
    if (absl::Status s = (*upload)->Append(chunk.data()); !s.ok()) return scope.Done(s);
  }
  absl::StatusOr<v1::UploadActivationsResponse> r = coordinator_->CommitActivations(**upload);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::FetchResume(grpc::ServerContext* context,
                                            const v1::FetchResumeRequest* request,
                                            grpc::ServerWriter<v1::ResumeChunk>* writer) {
  RpcScope scope(metrics_, "FetchResume");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<ResumePlan> plan = coordinator_->PrepareResume(*request);
  if (!plan.ok()) return scope.Done(plan.status());
  const absl::Status gone = absl::CancelledError("the worker went away");
  v1::ResumeChunk chunk;
  *chunk.mutable_header() = plan->header;
  if (!writer->Write(chunk)) return scope.Done(gone);
  for (const v1::BlockManifest& block : plan->header.blocks()) {
    for (int l = 0; l < block.layers_size(); ++l) {
      absl::StatusOr<std::string> bytes =
          coordinator_->ReadArtifact(request->job_id(), block.block(), l);
      if (!bytes.ok()) return scope.Done(bytes.status());
      size_t off = 0;
      do {
        const size_t n = std::min(rpc::kChunkBytes, bytes->size() - off);
        v1::ResumeChunk c;
        v1::ArtifactChunk& a = *c.mutable_artifact();
        a.set_block(block.block());
        a.set_layer(l);
        a.set_offset(static_cast<int64_t>(off));
        a.set_data(bytes->substr(off, n));
        if (!writer->Write(c)) return scope.Done(gone);
        off += n;
      } while (off < bytes->size());
    }
  }
  for (int i = 0; i < plan->header.chunks_size(); ++i) {
    const std::string& path = plan->chunk_paths[static_cast<size_t>(i)];
    const int c = plan->header.chunks(i).chunk();
    const absl::Status s = StreamFile(path, [&](int64_t offset, std::string bytes) {
      v1::ResumeChunk r;
      v1::ChunkData& d = *r.mutable_chunk_data();
      d.set_chunk(c);
      d.set_offset(offset);
      d.set_data(std::move(bytes));
      return writer->Write(r);
    });
    if (!s.ok()) return scope.Done(s);
  }
  return scope.Done(absl::OkStatus());
}

grpc::Status WorkerGrpcService::UploadGradientFile(
    grpc::ServerContext* context, grpc::ServerReader<v1::GradientFileChunk>* reader,
    v1::UploadGradientFileResponse* response) {
  RpcScope scope(metrics_, "UploadGradientFile");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  v1::GradientFileChunk chunk;
  if (!reader->Read(&chunk) || !chunk.has_header()) {
    return scope.Done(absl::InvalidArgumentError("UploadGradientFile must start with a header"));
  }
  absl::StatusOr<std::unique_ptr<GradientUpload>> upload =
      coordinator_->BeginGradientFile(chunk.header());
  if (!upload.ok()) return scope.Done(upload.status());
  while (reader->Read(&chunk)) {
    if (chunk.part_case() != v1::GradientFileChunk::kData) {
      return scope.Done(absl::InvalidArgumentError("UploadGradientFile: a second header"));
    }
    if (absl::Status s = (*upload)->Append(chunk.data()); !s.ok()) return scope.Done(s);
  }
  absl::StatusOr<v1::UploadGradientFileResponse> r = coordinator_->CommitGradientFile(**upload);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::FetchGradientPass(
    grpc::ServerContext* context, const v1::FetchGradientPassRequest* request,
    grpc::ServerWriter<v1::GradientPassChunk>* writer) {
  RpcScope scope(metrics_, "FetchGradientPass");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<GradientFetchPlan> plan = coordinator_->PrepareGradientFetch(*request);
  if (!plan.ok()) return scope.Done(plan.status());
  v1::GradientPassChunk first;
  *first.mutable_header() = plan->header;
  if (!writer->Write(first)) return scope.Done(absl::CancelledError("the worker went away"));
  for (size_t i = 0; i < plan->paths.size(); ++i) {
    const absl::Status s = StreamFile(plan->paths[i], [&](int64_t offset, std::string bytes) {
      v1::GradientPassChunk c;
      v1::GradientFileData& d = *c.mutable_data();
      d.set_file(static_cast<int32_t>(i));
      d.set_offset(offset);
      d.set_data(std::move(bytes));
      return writer->Write(c);
    });
    if (!s.ok()) return scope.Done(s);
  }
  return scope.Done(absl::OkStatus());
}

grpc::Status WorkerGrpcService::CompleteTask(grpc::ServerContext* context,
                                             const v1::CompleteTaskRequest* request,
                                             v1::CompleteTaskResponse* response) {
  RpcScope scope(metrics_, "CompleteTask");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  absl::StatusOr<v1::CompleteTaskResponse> r = coordinator_->CompleteTask(*request);
  if (r.ok()) *response = *std::move(r);
  return scope.Done(r.status());
}

grpc::Status WorkerGrpcService::FailTask(grpc::ServerContext* context,
                                         const v1::FailTaskRequest* request,
                                         v1::FailTaskResponse* response) {
  RpcScope scope(metrics_, "FailTask");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  return scope.Done(coordinator_->FailTask(*request));
}

grpc::Status WorkerGrpcService::AbandonTask(grpc::ServerContext* context,
                                            const v1::AbandonTaskRequest* request,
                                            v1::AbandonTaskResponse* response) {
  RpcScope scope(metrics_, "AbandonTask");
  if (absl::Status s = auth_->Identify(*context).status(); !s.ok()) return scope.Done(s);
  return scope.Done(coordinator_->AbandonTask(*request));
}

}  // namespace qcal::coordinator
