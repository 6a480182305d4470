// The worker API (WorkerService) apart from commits and uploads: registration and heartbeats,
// task acquisition, lease and gang-membership checks, and the end of a task (rank 0's export
// commit, member_done, fail, abandon).
#include <algorithm>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/gang/plan.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::WorkerRecord;

constexpr absl::Duration kMaxAcquireWait = absl::Seconds(30);

// The job id recorded in <dir>/qcal_run.json, "" when there is none.
std::string RunJobId(const fs::path& dir) {
  absl::StatusOr<std::string> text = ReadFileToString((dir / "qcal_run.json").string());
  if (!text.ok()) return "";
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("job_id") || !j["job_id"].is_string()) return "";
  return j["job_id"].get<std::string>();
}

}  // namespace

absl::StatusOr<v1::RegisterWorkerResponse> Coordinator::RegisterWorker(
    const v1::RegisterWorkerRequest& request) {
  if (request.device_kind().empty()) return absl::InvalidArgumentError("device_kind is required");
  if (request.threads() < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("threads must be >= 1, got ", request.threads()));
  }
  absl::MutexLock lock(&mu_);
  QCAL_RETURN_IF_ERROR(CheckServing());
  store::v1::Counters counters = counters_;
  const uint64_t epoch = counters.next_epoch();
  counters.set_next_epoch(epoch + 1);
  WorkerRecord w;
  w.set_worker_id(absl::StrCat("w-", epoch));
  w.set_epoch(epoch);
  w.set_device_kind(request.device_kind());
  w.set_threads(request.threads());
  w.set_hostname(request.hostname());
  w.set_peer_address(request.peer_address());
  WriteBatch batch;
  batch.Put(Column::kWorkers, w.worker_id(), Encode(w));
  batch.Put(Column::kJobs, kCountersKey, Encode(counters));
  QCAL_RETURN_IF_ERROR(Commit(batch));
  counters_ = counters;
  scheduler_.WorkerJoined(w.worker_id(), epoch, {w.device_kind(), w.threads()}, clock_->Now());
  peer_addresses_[w.worker_id()] = w.peer_address();
  spdlog::info("coordinator: worker {} registered ({}, {} threads, host {}, peers at {})",
               w.worker_id(), w.device_kind(), w.threads(), w.hostname(), w.peer_address());
  UpdateGauges();
  v1::RegisterWorkerResponse response;
  response.mutable_lease()->set_worker_id(w.worker_id());
  response.mutable_lease()->set_epoch(epoch);
  response.set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
  response.set_lease_ms(absl::ToInt64Milliseconds(options_.scheduler.lease));
  return response;
}

absl::StatusOr<v1::HeartbeatResponse> Coordinator::Heartbeat(const v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mu_);
  const v1::Lease& lease = request.lease();
  QCAL_RETURN_IF_ERROR(scheduler_.Heartbeat(lease.worker_id(), lease.epoch(), clock_->Now()));
  device_memory_[lease.worker_id()] = request.device_memory_bytes();
  PublishDeviceMemory();
  v1::HeartbeatResponse response;
  if (request.job_id().empty()) return response;
  if (scheduler_.ShouldDrop(lease.worker_id(), request.job_id(), request.gang_epoch())) {
    response.set_drop_task(true);
    return response;
  }
  JobRecord& rec = jobs_.at(request.job_id());
  // Exchange totals are cumulative per worker process: the metrics take the increase (all of a
  // value that went down, from a restarted process).
  int rank = 0;
  for (const v1::GangMember& m : rec.job().gang()) {
    if (m.worker_id() == lease.worker_id()) rank = m.rank();
  }
  auto& [bytes, wait] = exchange_[lease.worker_id()];
  const int64_t bytes_delta = request.exchange_bytes_total() >= bytes
                                  ? request.exchange_bytes_total() - bytes
                                  : request.exchange_bytes_total();
  const double wait_delta = request.reduction_wait_seconds_total() >= wait
                                ? request.reduction_wait_seconds_total() - wait
                                : request.reduction_wait_seconds_total();
  bytes = request.exchange_bytes_total();
  wait = request.reduction_wait_seconds_total();
  if (bytes_delta > 0 || wait_delta > 0) metrics_->AddExchange(rank, bytes_delta, wait_delta);
  Live& live = live_[request.job_id()];
  // Rank 0 reports the job's progress (the others run the same blocks).
  if (rank == 0 && (rec.job().stage() != request.stage() || live.block != request.block())) {
    // Stage changes live in memory only: they are progress, not state.
    rec.mutable_job()->set_stage(request.stage());
    live.block = request.block();
    Emit(rec, request.block() >= 0 ? absl::StrCat(service::JobStageName(request.stage()), " block ",
                                                  request.block() + 1, "/", rec.job().num_blocks())
                                   : service::JobStageName(request.stage()));
  }
  return response;
}

v1::Task Coordinator::MakeTask(const JobRecord& rec, int rank) const {
  const v1::Job& job = rec.job();
  v1::Task task;
  task.set_job_id(job.job_id());
  *task.mutable_spec() = job.spec();
  task.set_threads(job.threads());
  task.set_num_blocks(job.num_blocks());
  task.set_blocks_done(job.blocks_done());
  task.set_checkpoint_block(job.checkpoint_block());
  task.set_checkpoint_every(options_.checkpoint_every);
  task.set_temp_output_name(
      service::TempOutputName(job.spec().output_name(), job.job_id(), job.gang_epoch()));
  task.set_attempt(job.attempts());
  task.set_gradient_pass_done(job.gradient_pass_done());
  v1::GangPlan& plan = *task.mutable_gang();
  plan.set_gang_epoch(job.gang_epoch());
  plan.set_rank(rank);
  plan.set_world(job.gang_size());
  plan.set_total_chunks(engine::NumChunks(job.spec().samples()));
  *plan.mutable_members() = job.gang();
  return task;
}

absl::StatusOr<v1::AcquireTaskResponse> Coordinator::AcquireTask(
    const v1::AcquireTaskRequest& request, absl::Time deadline) {
  const v1::Lease& lease = request.lease();
  const absl::Time until = std::min(
      deadline,
      absl::Now() + std::min(absl::Milliseconds(std::max(0, request.wait_ms())), kMaxAcquireWait));
  absl::MutexLock lock(&mu_);
  for (;;) {
    QCAL_RETURN_IF_ERROR(CheckServing());
    QCAL_ASSIGN_OR_RETURN(std::optional<Action> action,
                          scheduler_.Acquire(lease.worker_id(), lease.epoch()));
    if (action.has_value()) {
      QCAL_RETURN_IF_ERROR(Apply(*action));
      auto it = jobs_.find(action->job_id);
      const bool assigned = action->kind == Action::Kind::kAssign ||
                            action->kind == Action::Kind::kReplan ||
                            action->kind == Action::Kind::kDeliver;
      // A job failed, cancelled or requeued instead (or whose plan failed): look again.
      if (!assigned || action->rank < 0 || it == jobs_.end() ||
          it->second.job().state() != v1::JOB_STATE_RUNNING) {
        continue;
      }
      v1::AcquireTaskResponse response;
      *response.mutable_task() = MakeTask(it->second, action->rank);
      return response;
    }
    if (shutdown_ || work_cv_.WaitWithDeadline(&mu_, until)) return v1::AcquireTaskResponse();
  }
}

absl::StatusOr<Coordinator::JobRecord*> Coordinator::HeldJob(const v1::Lease& lease,
                                                             const std::string& job_id) {
  QCAL_RETURN_IF_ERROR(CheckServing());
  QCAL_RETURN_IF_ERROR(scheduler_.CheckHolds(lease.worker_id(), lease.epoch(), job_id));
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second.job().state() != v1::JOB_STATE_RUNNING) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job_id, " is not running"));
  }
  return &it->second;
}

absl::Status Coordinator::CheckHolds(const v1::Lease& lease, const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  return HeldJob(lease, job_id).status();
}

absl::StatusOr<int> Coordinator::GangRank(const v1::Lease& lease, const std::string& job_id,
                                          uint64_t gang_epoch) {
  QCAL_RETURN_IF_ERROR(HeldJob(lease, job_id).status());
  return scheduler_.CheckGang(lease.worker_id(), lease.epoch(), job_id, gang_epoch);
}

absl::StatusOr<v1::CompleteTaskResponse> Coordinator::CompleteTask(
    const v1::CompleteTaskRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(const int rank,
                        GangRank(request.lease(), request.job_id(), request.gang_epoch()));
  JobRecord* rec = &jobs_.at(request.job_id());
  if (request.member_done()) {
    QCAL_RETURN_IF_ERROR(scheduler_.MemberDone(request.lease().worker_id(), request.lease().epoch(),
                                               request.job_id(), request.gang_epoch()));
    Emit(*rec, absl::StrCat("rank ", rank, " (", request.lease().worker_id(),
                            ") finished its part and left the gang"));
    v1::CompleteTaskResponse response;
    response.set_state(rec->job().state());
    return response;
  }
  if (rank != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("job ", request.job_id(), ": rank ", rank,
                     " may only report member_done; rank 0 completes the job"));
  }
  // Copied: FinishJob replaces *rec's Job message.
  const v1::Job job = rec->job();
  const fs::path root(options_.output_root);
  const fs::path tmp =
      root / service::TempOutputName(job.spec().output_name(), job.job_id(), request.gang_epoch());
  const fs::path target = root / job.spec().output_name();
  v1::CompleteTaskResponse response;
  std::error_code ec;
  if (job.cancel_requested()) {
    fs::remove_all(tmp, ec);
    QCAL_RETURN_IF_ERROR(
        FinishJob(*rec, v1::JOB_STATE_CANCELLED, "cancelled by a client", nullptr));
    response.set_state(v1::JOB_STATE_CANCELLED);
    return response;
  }
  if (job.blocks_done() != job.num_blocks()) {
    return absl::FailedPreconditionError(absl::StrCat("job ", job.job_id(), ": only ",
                                                      job.blocks_done(), " of ", job.num_blocks(),
                                                      " blocks are committed"));
  }
  if (RunJobId(tmp) != job.job_id()) {
    return absl::FailedPreconditionError(
        absl::StrCat(tmp.string(), " does not hold this job's output"));
  }
  if (fs::exists(target, ec)) {
    // A target carrying this job's id is an earlier attempt's commit (DESIGN section 5).
    if (RunJobId(target) == job.job_id() || job.spec().overwrite() ||
        !internal::IsNonEmptyDir(target)) {
      fs::remove_all(target, ec);
    } else {
      const std::string error = absl::StrCat("output \"", job.spec().output_name(),
                                             "\" appeared under the output root while the job ran");
      fs::remove_all(tmp, ec);
      QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr));
      response.set_state(v1::JOB_STATE_FAILED);
      return response;
    }
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot move ", tmp.string(), " to ", target.string(), ": ", ec.message()));
  }
  internal::SyncDir(root);
  QCAL_RETURN_IF_ERROR(faults_->Hit("complete", job.num_blocks()));
  metrics_->ObserveStage("finish", request.finish_seconds());
  metrics_->SetJobPeakMemory(request.peak_rss_bytes(), request.peak_device_bytes());
  QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_SUCCEEDED, "",
                                 request.has_result() ? &request.result() : nullptr));
  response.set_state(v1::JOB_STATE_SUCCEEDED);
  return response;
}

absl::Status Coordinator::FailTask(const v1::FailTaskRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(JobRecord * rec, HeldJob(request.lease(), request.job_id()));
  const std::string error = request.error().empty() ? "the worker failed the job" : request.error();
  spdlog::warn("coordinator: {} fails job {}: {}", request.lease().worker_id(), request.job_id(),
               error);
  return FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr);
}

absl::Status Coordinator::AbandonTask(const v1::AbandonTaskRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_RETURN_IF_ERROR(HeldJob(request.lease(), request.job_id()).status());
  const std::string reason =
      request.reason().empty() ? std::string("no reason given") : request.reason();
  QCAL_ASSIGN_OR_RETURN(Action action,
                        scheduler_.Abandon(request.lease().worker_id(), request.lease().epoch(),
                                           request.job_id(), request.gang_epoch(), reason));
  return Apply(action);
}

}  // namespace qcal::coordinator
