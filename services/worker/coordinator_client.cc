#include "services/worker/coordinator_client.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/status.h"

namespace qcal::worker {

absl::StatusOr<std::unique_ptr<CoordinatorClient>> CoordinatorClient::Create(
    const rpc::ClientOptions& options) {
  auto c = std::unique_ptr<CoordinatorClient>(new CoordinatorClient());
  QCAL_ASSIGN_OR_RETURN(c->connection_, rpc::Connection::Open(options));
  c->stub_ = v1::WorkerService::NewStub(c->connection_->channel());
  return c;
}

absl::Duration CoordinatorClient::BulkTimeout(size_t bytes) const {
  return connection_->options().timeout + absl::Seconds(static_cast<double>(bytes) / (16 << 20));
}

absl::StatusOr<v1::RegisterWorkerResponse> CoordinatorClient::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::RegisterWorkerResponse response;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->RegisterWorker(&context, request, &response)));
  return response;
}

absl::StatusOr<bool> CoordinatorClient::Heartbeat(const v1::HeartbeatRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::HeartbeatResponse response;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->Heartbeat(&context, request, &response)));
  return response.drop_task();
}

absl::StatusOr<std::optional<v1::Task>> CoordinatorClient::AcquireTask(const v1::Lease& lease,
                                                                       absl::Duration wait) {
  grpc::ClientContext context;
  connection_->Prepare(&context, connection_->options().timeout + wait);
  v1::AcquireTaskRequest request;
  *request.mutable_lease() = lease;
  request.set_wait_ms(static_cast<int32_t>(absl::ToInt64Milliseconds(wait)));
  v1::AcquireTaskResponse response;
  {
    absl::MutexLock lock(&mu_);
    if (cancelled_) return absl::CancelledError("the worker is stopping");
    waiting_ = &context;
  }
  const grpc::Status s = stub_->AcquireTask(&context, request, &response);
  {
    absl::MutexLock lock(&mu_);
    waiting_ = nullptr;
  }
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(s));
  if (!response.has_task()) return std::optional<v1::Task>();
  return std::optional<v1::Task>(response.task());
}

void CoordinatorClient::CancelWait() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  if (waiting_ != nullptr) waiting_->TryCancel();
}

absl::StatusOr<v1::CommitBlockResponse> CoordinatorClient::CommitBlock(
    const v1::Lease& lease, const std::string& job_id, int block, uint64_t gang_epoch,
    const std::vector<OwnedLayer>& layers, const v1::BlockStats& stats) {
  size_t total = 0;
  v1::CommitBlockChunk header_chunk;
  v1::CommitBlockHeader& h = *header_chunk.mutable_header();
  *h.mutable_lease() = lease;
  h.set_job_id(job_id);
  h.set_block(block);
  h.set_gang_epoch(gang_epoch);
  *h.mutable_stats() = stats;
  // Sent only for a block with experts, as a dense block's commit always was.
  const bool experts = std::any_of(layers.begin(), layers.end(),
                                   [](const OwnedLayer& owned) { return owned.expert != -1; });
  for (const OwnedLayer& owned : layers) {
    const LayerArtifact& l = owned.artifact;
    h.add_layer_index(owned.index);
    if (experts) h.add_layer_expert(owned.expert);
    v1::LayerManifest& m = *h.add_layers();
    m.set_name(l.name);
    m.set_sha256(Sha256Hex(l.quantized));
    m.set_size(static_cast<int64_t>(l.quantized.size()));
    m.set_report_json(l.report_json);
    m.set_solve_seconds(l.solve_seconds);
    total += l.quantized.size();
  }
  grpc::ClientContext context;
  connection_->Prepare(&context, BulkTimeout(total));
  v1::CommitBlockResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::CommitBlockChunk>> writer =
      stub_->CommitBlock(&context, &response);
  bool ok = writer->Write(header_chunk);
  for (size_t l = 0; ok && l < layers.size(); ++l) {
    const std::string& bytes = layers[l].artifact.quantized;
    for (size_t off = 0; ok && off < bytes.size(); off += rpc::kChunkBytes) {
      v1::CommitBlockChunk c;
      v1::ArtifactChunk& a = *c.mutable_artifact();
      a.set_block(block);
      a.set_layer(static_cast<int32_t>(l));
      a.set_offset(static_cast<int64_t>(off));
      a.set_data(bytes.substr(off, std::min(rpc::kChunkBytes, bytes.size() - off)));
      ok = writer->Write(c);
    }
  }
  if (ok) writer->WritesDone();
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(writer->Finish()));
  return response;
}

absl::StatusOr<v1::UploadActivationsResponse> CoordinatorClient::UploadActivations(
    const v1::Lease& lease, const std::string& job_id, int block, int chunk, uint64_t gang_epoch,
    const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(path));
  std::ifstream in(path, std::ios::binary);
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (!in || ec) return absl::InternalError(absl::StrCat(path, ": cannot read the checkpoint"));
  grpc::ClientContext context;
  connection_->Prepare(&context, BulkTimeout(size));
  v1::UploadActivationsResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::ActivationsChunk>> writer =
      stub_->UploadActivations(&context, &response);
  v1::ActivationsChunk header_chunk;
  v1::ActivationsHeader& h = *header_chunk.mutable_header();
  *h.mutable_lease() = lease;
  h.set_job_id(job_id);
  h.set_block(block);
  h.set_chunk(chunk);
  h.set_gang_epoch(gang_epoch);
  h.set_sha256(sha);
  h.set_size(static_cast<int64_t>(size));
  bool ok = writer->Write(header_chunk);
  std::string buf(rpc::kChunkBytes, '\0');
  while (ok && in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    v1::ActivationsChunk c;
    c.set_data(buf.substr(0, static_cast<size_t>(n)));
    ok = writer->Write(c);
  }
  if (ok) writer->WritesDone();
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(writer->Finish()));
  return response;
}

absl::StatusOr<ResumeData> CoordinatorClient::FetchResume(const v1::Lease& lease,
                                                          const std::string& job_id,
                                                          int chunk_begin, int chunk_end,
                                                          bool artifacts, const std::string& dir) {
  grpc::ClientContext context;
  // The size is unknown before the header arrives; allow for a large model's artifacts.
  connection_->Prepare(&context, BulkTimeout(size_t{64} << 30));
  v1::FetchResumeRequest request;
  *request.mutable_lease() = lease;
  request.set_job_id(job_id);
  request.set_chunk_begin(chunk_begin);
  request.set_chunk_end(chunk_end);
  request.set_artifacts(artifacts);
  std::unique_ptr<grpc::ClientReader<v1::ResumeChunk>> reader =
      stub_->FetchResume(&context, request);
  v1::ResumeChunk chunk;
  v1::ResumeHeader header;
  ResumeData data;
  bool have_header = false;
  absl::Status bad;
  std::ofstream out;
  int open_chunk = -1;  // the chunk `out` writes
  int64_t written = 0;  // bytes of it so far
  int next_file = 0;    // index into header.chunks of the next chunk to open
  while (bad.ok() && reader->Read(&chunk)) {
    switch (chunk.part_case()) {
      case v1::ResumeChunk::kHeader:
        if (have_header) {
          bad = absl::DataLossError("FetchResume: a second header");
          break;
        }
        header = chunk.header();
        have_header = true;
        data.checkpoint_block = header.checkpoint_block();
        data.blocks.assign(header.blocks_size(), {});
        for (int b = 0; b < header.blocks_size(); ++b) {
          for (const v1::LayerManifest& m : header.blocks(b).layers()) {
            data.blocks[b].push_back({m.name(), "", m.report_json(), 0});
          }
        }
        for (const v1::ChunkFile& f : header.chunks()) {
          data.chunk_paths.push_back(
              (std::filesystem::path(dir) / absl::StrFormat("chunk-%06d.safetensors", f.chunk()))
                  .string());
        }
        break;
      case v1::ResumeChunk::kArtifact: {
        const v1::ArtifactChunk& a = chunk.artifact();
        if (!have_header || a.block() < 0 || a.block() >= static_cast<int>(data.blocks.size()) ||
            a.layer() < 0 || a.layer() >= static_cast<int>(data.blocks[a.block()].size())) {
          bad = absl::DataLossError("FetchResume: an artifact chunk outside the manifest");
          break;
        }
        data.blocks[a.block()][a.layer()].quantized += a.data();
        break;
      }
      case v1::ResumeChunk::kChunkData: {
        const v1::ChunkData& d = chunk.chunk_data();
        if (have_header && d.chunk() != open_chunk && next_file < header.chunks_size() &&
            header.chunks(next_file).chunk() == d.chunk() && d.offset() == 0) {
          out.close();
          out.open(data.chunk_paths[static_cast<size_t>(next_file)],
                   std::ios::binary | std::ios::trunc);
          if (!out) {
            bad = absl::InternalError(
                absl::StrCat(data.chunk_paths[static_cast<size_t>(next_file)], ": cannot create"));
            break;
          }
          open_chunk = d.chunk();
          written = 0;
          ++next_file;
        }
        if (d.chunk() != open_chunk || d.offset() != written) {
          bad = absl::DataLossError(absl::StrCat("FetchResume: chunk ", d.chunk(), " data at ",
                                                 d.offset(), " is out of order"));
          break;
        }
        out.write(d.data().data(), static_cast<std::streamsize>(d.data().size()));
        written += static_cast<int64_t>(d.data().size());
        break;
      }
      case v1::ResumeChunk::PART_NOT_SET:
        break;
    }
  }
  out.close();
  if (!bad.ok()) context.TryCancel();
  const absl::Status finished = rpc::FromGrpcStatus(reader->Finish());
  QCAL_RETURN_IF_ERROR(bad);
  QCAL_RETURN_IF_ERROR(finished);
  if (!have_header) return absl::DataLossError("FetchResume: no header");
  for (int b = 0; b < header.blocks_size(); ++b) {
    for (int l = 0; l < header.blocks(b).layers_size(); ++l) {
      const v1::LayerManifest& m = header.blocks(b).layers(l);
      if (Sha256Hex(data.blocks[b][l].quantized) != m.sha256()) {
        return absl::DataLossError(
            absl::StrCat("FetchResume: ", m.name(), " does not match its sha256"));
      }
    }
  }
  for (int i = 0; i < header.chunks_size(); ++i) {
    const std::string& path = data.chunk_paths[static_cast<size_t>(i)];
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    absl::StatusOr<std::string> sha = Sha256File(path);
    if (ec || static_cast<int64_t>(size) != header.chunks(i).size() || !sha.ok() ||
        *sha != header.chunks(i).sha256()) {
      return absl::DataLossError(absl::StrCat("FetchResume: the checkpoint of chunk ",
                                              header.chunks(i).chunk(),
                                              " does not match its size and sha256"));
    }
  }
  return data;
}

absl::StatusOr<v1::UploadGradientFileResponse> CoordinatorClient::UploadGradientFile(
    const v1::Lease& lease, const std::string& job_id, uint64_t gang_epoch,
    const GradientFile& file, bool last, double pass_seconds) {
  std::ifstream in(file.path, std::ios::binary);
  if (!in) return absl::InternalError(absl::StrCat(file.path, ": cannot read the statistics"));
  grpc::ClientContext context;
  connection_->Prepare(&context, BulkTimeout(static_cast<size_t>(file.size)));
  v1::UploadGradientFileResponse response;
  std::unique_ptr<grpc::ClientWriter<v1::GradientFileChunk>> writer =
      stub_->UploadGradientFile(&context, &response);
  v1::GradientFileChunk header_chunk;
  v1::GradientFileHeader& h = *header_chunk.mutable_header();
  *h.mutable_lease() = lease;
  h.set_job_id(job_id);
  h.set_gang_epoch(gang_epoch);
  v1::GradientFileManifest& m = *h.mutable_file();
  m.set_block(file.block);
  m.set_linear(file.linear);
  m.set_sha256(file.sha256);
  m.set_size(file.size);
  h.set_last(last);
  h.set_pass_seconds(pass_seconds);
  bool ok = writer->Write(header_chunk);
  std::string buf(rpc::kChunkBytes, '\0');
  while (ok && in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const std::streamsize n = in.gcount();
    if (n <= 0) break;
    v1::GradientFileChunk c;
    c.set_data(buf.substr(0, static_cast<size_t>(n)));
    ok = writer->Write(c);
  }
  if (ok) writer->WritesDone();
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(writer->Finish()));
  return response;
}

absl::StatusOr<std::vector<GradientFile>> CoordinatorClient::FetchGradientPass(
    const v1::Lease& lease, const std::string& job_id, int from_block,
    const std::vector<int>& linears, const std::string& dir) {
  grpc::ClientContext context;
  // The size is unknown before the header arrives; allow for a large model's statistics.
  connection_->Prepare(&context, BulkTimeout(size_t{64} << 30));
  v1::FetchGradientPassRequest request;
  *request.mutable_lease() = lease;
  request.set_job_id(job_id);
  request.set_from_block(from_block);
  for (int l : linears) request.add_linears(l);
  std::unique_ptr<grpc::ClientReader<v1::GradientPassChunk>> reader =
      stub_->FetchGradientPass(&context, request);
  v1::GradientPassChunk chunk;
  std::vector<GradientFile> files;
  bool have_header = false;
  absl::Status bad;
  std::ofstream out;
  int open_file = -1;   // the file `out` writes
  int64_t written = 0;  // bytes of it so far
  while (bad.ok() && reader->Read(&chunk)) {
    if (chunk.has_header()) {
      if (have_header) {
        bad = absl::DataLossError("FetchGradientPass: a second header");
        break;
      }
      have_header = true;
      for (const v1::GradientFileManifest& m : chunk.header().files()) {
        files.push_back({m.block(), m.linear(),
                         (std::filesystem::path(dir) /
                          absl::StrFormat("oac-%06d-%02d.safetensors", m.block(), m.linear()))
                             .string(),
                         m.sha256(), m.size()});
      }
      continue;
    }
    const v1::GradientFileData& d = chunk.data();
    // Files arrive in order, each from offset 0; the next one starts where the last ended.
    if (have_header && d.file() == open_file + 1 && d.offset() == 0 &&
        d.file() < static_cast<int>(files.size())) {
      out.close();
      open_file = d.file();
      written = 0;
      out.open(files[static_cast<size_t>(open_file)].path, std::ios::binary | std::ios::trunc);
      if (!out) {
        bad = absl::InternalError(
            absl::StrCat(files[static_cast<size_t>(open_file)].path, ": cannot create"));
        break;
      }
    }
    if (!have_header || d.file() != open_file || d.offset() != written) {
      bad = absl::DataLossError(absl::StrCat("FetchGradientPass: file ", d.file(), " data at ",
                                             d.offset(), " is out of order"));
      break;
    }
    out.write(d.data().data(), static_cast<std::streamsize>(d.data().size()));
    written += static_cast<int64_t>(d.data().size());
  }
  out.close();
  if (!bad.ok()) context.TryCancel();
  const absl::Status finished = rpc::FromGrpcStatus(reader->Finish());
  QCAL_RETURN_IF_ERROR(bad);
  QCAL_RETURN_IF_ERROR(finished);
  if (!have_header) return absl::DataLossError("FetchGradientPass: no header");
  for (const GradientFile& f : files) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(f.path, ec);
    absl::StatusOr<std::string> sha = Sha256File(f.path);
    if (ec || static_cast<int64_t>(size) != f.size || !sha.ok() || *sha != f.sha256) {
      return absl::DataLossError(absl::StrCat("FetchGradientPass: the statistics of block ",
                                              f.block, " linear ", f.linear,
                                              " do not match their size and sha256"));
    }
  }
  return files;
}

absl::StatusOr<v1::CompleteTaskResponse> CoordinatorClient::CompleteTask(
    const v1::CompleteTaskRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::CompleteTaskResponse response;
  QCAL_RETURN_IF_ERROR(rpc::FromGrpcStatus(stub_->CompleteTask(&context, request, &response)));
  return response;
}

absl::Status CoordinatorClient::AbandonTask(const v1::AbandonTaskRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::AbandonTaskResponse response;
  return rpc::FromGrpcStatus(stub_->AbandonTask(&context, request, &response));
}

absl::Status CoordinatorClient::FailTask(const v1::FailTaskRequest& request) {
  grpc::ClientContext context;
  connection_->Prepare(&context);
  v1::FailTaskResponse response;
  return rpc::FromGrpcStatus(stub_->FailTask(&context, request, &response));
}

}  // namespace qcal::worker
