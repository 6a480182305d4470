// The job state machine: scheduler actions persisted and announced (a job assigned or re-planned
// onto a gang, requeued, failed, cancelled) and the move of a job to a final state.
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/gang/plan.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

// A final job keeps only its last events (late watchers get the snapshot anyway).
constexpr size_t kMaxEventsPerFinalJob = 16;

// One line describing a plan, for events and logs.
std::string GangSummary(const v1::Job& job) {
  std::string out = absl::StrCat("gang epoch ", job.gang_epoch(), ":");
  for (const v1::GangMember& m : job.gang()) {
    absl::StrAppend(&out, m.rank() == 0 ? " " : "; ", "rank ", m.rank(), " ", m.worker_id(),
                    " chunks [", m.chunk_begin(), ",", m.chunk_end(), ") linears ",
                    service::OwnedLinearsText(m));
  }
  return out;
}

}  // namespace

absl::StatusOr<const ModelConfig*> Coordinator::ConfigOf(const JobRecord& rec) {
  const std::string& id = rec.job().job_id();
  auto it = configs_.find(id);
  if (it != configs_.end()) return &it->second;
  const std::string rel = (fs::path(rec.job().spec().model()) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(service::ScopedFd fd, input_root_.OpenFile(rel, "spec.model"));
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(fd.ProcPath()));
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, rel));
  return &(configs_[id] = std::move(config));
}

absl::Status Coordinator::Apply(const Action& a) {
  auto it = jobs_.find(a.job_id);
  if (it == jobs_.end()) return absl::OkStatus();
  JobRecord& rec = it->second;
  switch (a.kind) {
    case Action::Kind::kFailJob:
      return FinishJob(rec, v1::JOB_STATE_FAILED, a.reason, nullptr);
    case Action::Kind::kCancelJob:
      return FinishJob(rec, v1::JOB_STATE_CANCELLED, a.reason, nullptr);
    case Action::Kind::kRequeue: {
      JobRecord updated = rec;
      v1::Job& job = *updated.mutable_job();
      job.set_state(v1::JOB_STATE_QUEUED);
      job.set_stage(v1::JOB_STAGE_QUEUED);
      job.clear_worker_id();
      job.clear_gang();
      job.set_gang_epoch(0);
      WriteBatch batch;
      batch.Put(Column::kJobs, JobKey(a.job_id), Encode(updated));
      QCAL_RETURN_IF_ERROR(Commit(batch));
      rec = updated;
      Emit(rec, absl::StrCat("requeued: ", a.reason, "; resumes at block ",
                             rec.job().checkpoint_block(), "/", rec.job().num_blocks()));
      work_cv_.SignalAll();
      return absl::OkStatus();
    }
    case Action::Kind::kAssign:
    case Action::Kind::kReplan:
      break;
    case Action::Kind::kDeliver:
    case Action::Kind::kExpireLease:
      return absl::OkStatus();
  }
  absl::StatusOr<const ModelConfig*> config = ConfigOf(rec);
  if (!config.ok()) {
    return FinishJob(rec, v1::JOB_STATE_FAILED,
                     absl::StrCat("cannot plan the job: ", config.status().message()), nullptr);
  }
  const int world = static_cast<int>(a.members.size());
  const engine::GangPlan plan =
      engine::MakeGangPlan(**config, rec.job().spec().samples(), world, 0, a.gang_epoch);
  JobRecord updated = rec;
  v1::Job& job = *updated.mutable_job();
  job.set_state(v1::JOB_STATE_RUNNING);
  job.set_stage(v1::JOB_STAGE_LOADING);
  job.set_worker_id(a.members.front());
  job.set_attempts(a.attempt);
  job.set_device_kind(a.caps.device_kind);
  job.set_threads(a.caps.threads);
  if (job.started_unix_ms() == 0) job.set_started_unix_ms(NowMs());
  job.set_gang_epoch(a.gang_epoch);
  job.clear_gang();
  for (int r = 0; r < world; ++r) {
    v1::GangMember& m = *job.add_gang();
    m.set_rank(r);
    m.set_worker_id(a.members[static_cast<size_t>(r)]);
    m.set_peer_address(peer_addresses_[m.worker_id()]);
    m.set_chunk_begin(plan.chunks[static_cast<size_t>(r)].begin);
    m.set_chunk_end(plan.chunks[static_cast<size_t>(r)].end);
    for (int l = 0; l < engine::kNumLinears; ++l) {
      if (plan.owners[static_cast<size_t>(l)] == r) m.add_owned_linears(l);
    }
    for (size_t u = 0; u < plan.expert_owners.size(); ++u) {
      if (plan.expert_owners[u] == r) m.add_owned_expert_units(static_cast<int>(u));
    }
  }
  store::v1::Counters counters = counters_;
  counters.set_next_gang_epoch(scheduler_.next_gang_epoch());
  WriteBatch batch;
  batch.Put(Column::kJobs, JobKey(a.job_id), Encode(updated));
  batch.Put(Column::kJobs, kCountersKey, Encode(counters));
  QCAL_RETURN_IF_ERROR(Commit(batch));
  const int previous_attempts = rec.job().attempts();
  rec = updated;
  counters_ = counters;
  // A restart's re-plan counts no attempt (and is no retry).
  if (a.attempt > 1 && a.attempt > previous_attempts) metrics_->AddTaskRetry();
  Live& live = live_[a.job_id];
  live.block = -1;
  live.block_seconds = 0;
  live.blocks_timed = 0;
  std::string members;
  for (const std::string& m : a.members) absl::StrAppend(&members, members.empty() ? "" : ", ", m);
  const std::string resume = absl::StrCat("resuming at block ", job.checkpoint_block(), "/",
                                          job.num_blocks(), "; ", GangSummary(job));
  if (a.kind == Action::Kind::kAssign) {
    Emit(rec, absl::StrCat("attempt ", a.attempt, " on ", members, " (", job.device_kind(), ", ",
                           job.threads(), " threads), ", resume));
  } else {
    Emit(rec, absl::StrCat(a.reason, "; attempt ", a.attempt, ", ", resume));
  }
  UpdateGauges();
  work_cv_.SignalAll();
  if (a.kind == Action::Kind::kReplan) {
    QCAL_RETURN_IF_ERROR(faults_->Hit("replan", job.checkpoint_block()));
  }
  return absl::OkStatus();
}

absl::Status Coordinator::FinishJob(JobRecord& rec, v1::JobState state, const std::string& error,
                                    const v1::JobResult* result) {
  JobRecord updated = rec;
  v1::Job& job = *updated.mutable_job();
  const std::string id = job.job_id();
  job.set_state(state);
  job.set_stage(v1::JOB_STAGE_DONE);
  job.set_error(error);
  job.set_finished_unix_ms(NowMs());
  job.clear_worker_id();
  job.clear_gang();
  job.set_gang_epoch(0);
  if (result != nullptr) *job.mutable_result() = *result;
  WriteBatch batch;
  batch.Put(Column::kJobs, JobKey(id), Encode(updated));
  batch.DeletePrefix(Column::kArtifacts, JobScopedPrefix(id));
  batch.DeletePrefix(Column::kTasks, JobScopedPrefix(id));
  batch.DeletePrefix(Column::kActivations, JobScopedPrefix(id));
  QCAL_RETURN_IF_ERROR(Commit(batch));
  rec = updated;
  scheduler_.JobFinished(id);
  configs_.erase(id);
  std::error_code ec;
  fs::remove_all(ActivationDir(id), ec);
  fs::remove_all(ArtifactDir(id), ec);
  RemoveTempOutputs({id});
  metrics_->ObserveJobDuration(
      internal::StateLabel(state),
      static_cast<double>(job.finished_unix_ms() - job.created_unix_ms()) / 1e3);
  Emit(rec, error.empty() ? service::JobStateName(state)
                          : absl::StrCat(service::JobStateName(state), ": ", error));
  Live& live = live_[id];
  while (live.events.size() > kMaxEventsPerFinalJob) {
    live.events.pop_front();
    ++live.first_index;
  }
  UpdateGauges();
  return absl::OkStatus();
}

}  // namespace qcal::coordinator
