// Streamed uploads: activation checkpoint chunks (UploadActivations) and gradient-pass files
// (UploadGradientFile), staged, checked and committed, and the gradient-pass files fetched back.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/model.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::ActivationRecord;

constexpr int64_t kMaxActivationBytes = int64_t{1} << 40;
// Largest gradient-pass file accepted: a 70B down projection's packed Hessian and Fisher are
// about 2.5 GB.
constexpr int64_t kMaxGradientFileBytes = int64_t{64} << 30;

}  // namespace

StagingFile::~StagingFile() {
  if (fd_ >= 0) close(fd_);
  if (!path_.empty()) {
    std::error_code ec;
    fs::remove(path_, ec);
  }
}

absl::Status StagingFile::Open(std::string path) {
  path_ = std::move(path);
  fd_ = open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    return absl::UnavailableError(absl::StrCat(path_, ": cannot create: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status StagingFile::Append(const std::string& data, int64_t declared_size,
                                 absl::string_view what) {
  if (written_ + static_cast<int64_t>(data.size()) > declared_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " exceeds its declared size ", declared_size));
  }
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = write(fd_, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat(path_, ": write failed: ", std::strerror(errno)));
    }
    off += static_cast<size_t>(n);
  }
  written_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::Status StagingFile::SyncAndClose() {
  if (fsync(fd_) != 0) {
    return absl::UnavailableError(absl::StrCat(path_, ": fsync failed: ", std::strerror(errno)));
  }
  close(fd_);
  fd_ = -1;
  return absl::OkStatus();
}

absl::Status StagingFile::Commit(const fs::path& final_path) {
  std::error_code ec;
  fs::rename(path_, final_path, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat(final_path.string(), ": rename failed: ", ec.message()));
  }
  path_.clear();
  // Makes the rename durable, and the file's directory too where it was just created.
  internal::SyncDir(final_path.parent_path());
  internal::SyncDir(final_path.parent_path().parent_path());
  return absl::OkStatus();
}

absl::Status ActivationUpload::Append(const std::string& data) {
  return staging_.Append(data, header_.size(), "activation upload");
}

absl::StatusOr<std::unique_ptr<ActivationUpload>> Coordinator::BeginActivations(
    const v1::ActivationsHeader& header) {
  if (header.size() < 0 || header.size() > kMaxActivationBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation size ", header.size(), " is out of range"));
  }
  {
    absl::MutexLock lock(&mu_);
    QCAL_ASSIGN_OR_RETURN(const int rank,
                          GangRank(header.lease(), header.job_id(), header.gang_epoch()));
    const v1::Job& job = jobs_.at(header.job_id()).job();
    const v1::GangMember& me = job.gang(rank);
    if (header.chunk() < me.chunk_begin() || header.chunk() >= me.chunk_end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", header.job_id(), ": chunk ", header.chunk(), " is not in rank ",
                       rank, "'s chunks [", me.chunk_begin(), ", ", me.chunk_end(),
                       ") under gang epoch ", job.gang_epoch()));
    }
    const int ahead = job.gang_size() > 1 ? 1 : 0;
    if (header.block() < 1 || header.block() > job.num_blocks() ||
        header.block() > job.blocks_done() + ahead) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", header.job_id(), ": no checkpoint at block ", header.block(), " (",
                       job.blocks_done(), " blocks committed)"));
    }
  }
  std::error_code ec;
  const fs::path dir = ActivationDir(header.job_id());
  fs::create_directories(dir, ec);
  auto upload = std::unique_ptr<ActivationUpload>(new ActivationUpload());
  upload->header_ = header;
  upload->started_ = absl::Now();
  QCAL_RETURN_IF_ERROR(
      upload->staging_.Open((dir / absl::StrCat(".upload-", header.block(), "-", header.chunk(),
                                                "-", header.lease().epoch()))
                                .string()));
  return upload;
}

absl::StatusOr<v1::UploadActivationsResponse> Coordinator::CommitActivations(
    ActivationUpload& upload) {
  const v1::ActivationsHeader& header = upload.header();
  if (upload.staging_.written() != header.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation upload ended at ", upload.staging_.written(), " of ", header.size(), " bytes"));
  }
  QCAL_RETURN_IF_ERROR(upload.staging_.SyncAndClose());
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(upload.staging_.path()));
  if (sha != header.sha256()) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation upload does not match its sha256 (got ", sha, ")"));
  }

  absl::MutexLock lock(&mu_);
  // Checked again: the gang may have been re-planned while the bytes arrived.
  QCAL_RETURN_IF_ERROR(GangRank(header.lease(), header.job_id(), header.gang_epoch()).status());
  JobRecord* rec = &jobs_.at(header.job_id());
  v1::UploadActivationsResponse response;
  const std::string& job_id = header.job_id();
  if (rec->job().cancel_requested()) {
    QCAL_RETURN_IF_ERROR(
        FinishJob(*rec, v1::JOB_STATE_CANCELLED, "cancelled by a client", nullptr));
    response.set_cancel_job(true);
    return response;
  }
  // Older than the usable checkpoint: those boundaries are gone, nothing to keep.
  if (header.block() < rec->job().checkpoint_block()) return response;
  const std::string key = ActivationKey(job_id, header.block(), header.chunk());
  QCAL_ASSIGN_OR_RETURN(auto previous,
                        GetRecord<ActivationRecord>(*store_, Column::kActivations, key));
  if (previous.has_value()) {
    // A resumed attempt re-uploads boundaries it passes again: the bytes must not change.
    if (previous->sha256() != sha) {
      const std::string error = absl::StrCat(
          "determinism error: activations of chunk ", header.chunk(), " at block ", header.block(),
          " recomputed with sha256 ", sha, " but checkpointed with ", previous->sha256());
      QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr));
      return absl::AbortedError(error);
    }
    return response;
  }
  const fs::path final_path = fs::path(ActivationDir(job_id)) /
                              absl::StrFormat("block-%06d", header.block()) /
                              absl::StrFormat("chunk-%06d.safetensors", header.chunk());
  std::error_code ec;
  fs::create_directories(final_path.parent_path(), ec);
  QCAL_RETURN_IF_ERROR(upload.staging_.Commit(final_path));
  ActivationRecord a;
  a.set_block(header.block());
  a.set_chunk(header.chunk());
  a.set_file(fs::relative(final_path, options_.data_dir).string());
  a.set_sha256(sha);
  a.set_size(header.size());
  JobRecord updated = *rec;
  WriteBatch batch;
  batch.Put(Column::kActivations, key, Encode(a));
  std::vector<std::string> stale_files;
  QCAL_RETURN_IF_ERROR(AdvanceCheckpoint(updated, &a, batch, &stale_files));
  const bool advanced = updated.job().checkpoint_block() != rec->job().checkpoint_block();
  if (advanced) batch.Put(Column::kJobs, JobKey(job_id), Encode(updated));
  QCAL_RETURN_IF_ERROR(Commit(batch));
  *rec = updated;
  for (const std::string& f : stale_files) fs::remove(f, ec);
  internal::RemoveEmptyDirs(ActivationDir(job_id));
  metrics_->ObserveStage("checkpoint", absl::ToDoubleSeconds(absl::Now() - upload.started_));
  if (advanced) {
    Emit(*rec, absl::StrCat("checkpoint at block ", rec->job().checkpoint_block(), "/",
                            rec->job().num_blocks()));
  }
  return response;
}

absl::Status GradientUpload::Append(const std::string& data) {
  return staging_.Append(data, header_.file().size(), "gradient file upload");
}

absl::Status Coordinator::CheckGradientOwner(const JobRecord& rec, int rank, int block,
                                             int layer) const {
  const v1::Job& job = rec.job();
  if (!internal::RunsGradientPass(job.spec())) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job.job_id(), ": recipe hessian \"",
                                                      job.spec().recipe().hessian(),
                                                      "\" has no gradient pass"));
  }
  if (block < 0 || block >= job.num_blocks() || layer < 0 || layer >= engine::kNumLinears) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.job_id(), ": no gradient-pass file for block ", block, " linear ",
                     layer, " (", job.num_blocks(), " blocks)"));
  }
  const v1::GangMember& me = job.gang(rank);
  if (std::find(me.owned_linears().begin(), me.owned_linears().end(), layer) ==
      me.owned_linears().end()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "job ", job.job_id(), ": rank ", rank, " (", me.worker_id(), ") does not own ",
        engine::LinearPrefix(block, engine::kAllLinears[static_cast<size_t>(layer)]),
        " under gang epoch ", job.gang_epoch(), "; only its owner commits its statistics"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GradientUpload>> Coordinator::BeginGradientFile(
    const v1::GradientFileHeader& header) {
  const v1::GradientFileManifest& f = header.file();
  if (f.size() < 1 || f.size() > kMaxGradientFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gradient file size ", f.size(), " is out of range (1..", kMaxGradientFileBytes, ")"));
  }
  if (f.sha256().size() != 64) {
    return absl::InvalidArgumentError("gradient file sha256 must be 64 hex digits");
  }
  {
    absl::MutexLock lock(&mu_);
    QCAL_ASSIGN_OR_RETURN(const int rank,
                          GangRank(header.lease(), header.job_id(), header.gang_epoch()));
    QCAL_RETURN_IF_ERROR(
        CheckGradientOwner(jobs_.at(header.job_id()), rank, f.block(), f.linear()));
  }
  const fs::path dir = GradientDir(header.job_id());
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::UnavailableError(absl::StrCat(dir.string(), ": ", ec.message()));
  auto upload = std::unique_ptr<GradientUpload>(new GradientUpload());
  upload->header_ = header;
  QCAL_RETURN_IF_ERROR(upload->staging_.Open(
      (dir / absl::StrCat(".upload-", f.block(), "-", f.linear(), "-", header.lease().epoch()))
          .string()));
  return upload;
}

absl::StatusOr<v1::UploadGradientFileResponse> Coordinator::CommitGradientFile(
    GradientUpload& upload) {
  const v1::GradientFileHeader& header = upload.header();
  const v1::GradientFileManifest& f = header.file();
  const std::string name =
      engine::LinearPrefix(f.block(), engine::kAllLinears[static_cast<size_t>(f.linear())]);
  if (upload.staging_.written() != f.size()) {
    return absl::InvalidArgumentError(absl::StrCat("gradient file of ", name, " ended at ",
                                                   upload.staging_.written(), " of ", f.size(),
                                                   " bytes"));
  }
  QCAL_RETURN_IF_ERROR(upload.staging_.SyncAndClose());
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(upload.staging_.path()));
  if (sha != f.sha256()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "gradient file of ", name, " does not match its sha256 ", f.sha256(), " (got ", sha, ")"));
  }

  absl::MutexLock lock(&mu_);
  // Checked again: the gang may have been re-planned while the bytes arrived.
  QCAL_ASSIGN_OR_RETURN(const int rank,
                        GangRank(header.lease(), header.job_id(), header.gang_epoch()));
  JobRecord* rec = &jobs_.at(header.job_id());
  QCAL_RETURN_IF_ERROR(CheckGradientOwner(*rec, rank, f.block(), f.linear()));
  const std::string id = header.job_id();
  v1::UploadGradientFileResponse response;
  if (rec->job().cancel_requested()) {
    QCAL_RETURN_IF_ERROR(
        FinishJob(*rec, v1::JOB_STATE_CANCELLED, "cancelled by a client", nullptr));
    response.set_cancel_job(true);
    return response;
  }
  if (header.last()) metrics_->ObserveStage("gradient", header.pass_seconds());
  const std::string key = GradientFileKey(id, f.block(), f.linear());
  QCAL_ASSIGN_OR_RETURN(auto previous,
                        GetRecord<store::v1::GradientFileRecord>(*store_, Column::kTasks, key));
  if (previous.has_value()) {
    // An earlier attempt committed this linear's statistics: the pass must reproduce them.
    if (previous->sha256() != sha) {
      const std::string error =
          absl::StrCat("determinism error: gradient-pass statistics of ", name,
                       " recomputed with sha256 ", sha, " but committed with ", previous->sha256());
      QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr));
      return absl::AbortedError(error);
    }
    spdlog::info("coordinator: job {}: gradient-pass statistics of {} recomputed by rank {}: match",
                 id, name, rank);
    response.set_already_committed(true);
    response.set_pass_complete(rec->job().gradient_pass_done());
    if (header.last()) {
      Emit(*rec, absl::StrCat("gradient pass recomputed: matches the committed statistics (rank ",
                              rank, ")"));
    }
    return response;
  }
  int committed = 0;
  absl::Status decode_error;
  QCAL_RETURN_IF_ERROR(store_->Scan(
      Column::kTasks, GradientFilePrefix(id), [&](const std::string& k, const std::string& v) {
        absl::StatusOr<store::v1::GradientFileRecord> r =
            Decode<store::v1::GradientFileRecord>(Column::kTasks, k, v);
        if (!r.ok()) {
          decode_error = r.status();
          return false;
        }
        ++committed;
        return true;
      }));
  QCAL_RETURN_IF_ERROR(decode_error);
  const fs::path final_path = fs::path(options_.data_dir) / GradientFile(id, f.block(), f.linear());
  QCAL_RETURN_IF_ERROR(upload.staging_.Commit(final_path));
  store::v1::GradientFileRecord g;
  g.set_block(f.block());
  g.set_layer(f.linear());
  g.set_file(GradientFile(id, f.block(), f.linear()));
  g.set_sha256(sha);
  g.set_size(f.size());
  g.set_worker_id(header.lease().worker_id());
  g.set_gang_epoch(header.gang_epoch());
  WriteBatch batch;
  batch.Put(Column::kTasks, key, Encode(g));
  const bool complete = committed + 1 == rec->job().num_blocks() * engine::kNumLinears;
  JobRecord updated = *rec;
  if (complete) {
    updated.mutable_job()->set_gradient_pass_done(true);
    batch.Put(Column::kJobs, JobKey(id), Encode(updated));
  }
  QCAL_RETURN_IF_ERROR(Commit(batch));
  *rec = updated;
  response.set_pass_complete(rec->job().gradient_pass_done());
  if (complete) {
    QCAL_RETURN_IF_ERROR(faults_->Hit("gradient_done", 0));
    Emit(*rec, absl::StrCat("gradient pass committed (", committed + 1, " files)"));
  } else if (header.last()) {
    Emit(*rec, absl::StrCat("gradient pass: rank ", rank, "'s statistics committed"));
  }
  return response;
}

absl::StatusOr<GradientFetchPlan> Coordinator::PrepareGradientFetch(
    const v1::FetchGradientPassRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(JobRecord * rec, HeldJob(request.lease(), request.job_id()));
  const v1::Job& job = rec->job();
  const std::string& id = job.job_id();
  if (!job.gradient_pass_done()) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", id, ": the gradient pass is not complete"));
  }
  if (request.from_block() < 0 || request.from_block() > job.num_blocks()) {
    return absl::InvalidArgumentError(absl::StrCat("from_block ", request.from_block(),
                                                   " is not within [0, ", job.num_blocks(), "]"));
  }
  std::set<int> linears;
  for (int l : request.linears()) {
    if (l < 0 || l >= engine::kNumLinears || !linears.insert(l).second) {
      return absl::InvalidArgumentError(absl::StrCat("linear ", l, " is out of range or repeated"));
    }
  }
  GradientFetchPlan plan;
  for (int b = request.from_block(); b < job.num_blocks(); ++b) {
    for (int l : linears) {
      const std::string key = GradientFileKey(id, b, l);
      QCAL_ASSIGN_OR_RETURN(auto g,
                            GetRecord<store::v1::GradientFileRecord>(*store_, Column::kTasks, key));
      const std::string path =
          g.has_value() ? (fs::path(options_.data_dir) / g->file()).string() : "";
      std::error_code ec;
      const uintmax_t size = path.empty() ? 0 : fs::file_size(path, ec);
      if (!g.has_value() || ec || static_cast<int64_t>(size) != g->size()) {
        return absl::DataLossError(
            absl::StrCat("store: gradient-pass file ", key, " is missing or truncated"));
      }
      v1::GradientFileManifest& m = *plan.header.add_files();
      m.set_block(b);
      m.set_linear(l);
      m.set_sha256(g->sha256());
      m.set_size(g->size());
      plan.paths.push_back(path);
    }
  }
  return plan;
}

}  // namespace qcal::coordinator
