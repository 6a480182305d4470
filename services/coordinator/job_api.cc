// The job API (QuantService): submit with its validation, idempotency and quotas, get, list,
// cancel, and the progress-event stream.
#include <sys/statvfs.h>

#include <filesystem>
#include <optional>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/oac/oac_statistics.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::IdempotencyRecord;

}  // namespace

std::string Coordinator::NewJobId() const {
  std::random_device rd;
  for (;;) {
    const uint64_t r = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    std::string id = absl::StrFormat("job-%016x", r);
    if (jobs_.count(id) == 0) return id;
  }
}

absl::StatusOr<v1::SubmitJobResponse> Coordinator::SubmitJob(const std::string& client,
                                                             const v1::SubmitJobRequest& request) {
  const std::string& key = request.idempotency_key();
  if (key.size() > service::kMaxIdempotencyKeyBytes) {
    return absl::InvalidArgumentError(absl::StrCat("idempotency_key is longer than ",
                                                   service::kMaxIdempotencyKeyBytes, " bytes"));
  }
  QCAL_ASSIGN_OR_RETURN(v1::JobSpec spec, service::NormalizeJobSpec(request.spec()));
  const std::string spec_sha = service::SpecSha256(spec);
  // An earlier submit with the same key answers without re-validating the inputs (they may have
  // changed since).
  // Called with mu_ held.
  auto existing = [&]() -> absl::StatusOr<std::optional<v1::SubmitJobResponse>> {
    if (key.empty()) return std::optional<v1::SubmitJobResponse>();
    QCAL_ASSIGN_OR_RETURN(auto idem, GetRecord<IdempotencyRecord>(*store_, Column::kJobs,
                                                                  IdempotencyKey(client, key)));
    if (!idem.has_value()) return std::optional<v1::SubmitJobResponse>();
    if (idem->spec_sha256() != spec_sha) {
      return absl::AlreadyExistsError(absl::StrCat("idempotency key \"", key,
                                                   "\" was used for job ", idem->job_id(),
                                                   " with a different spec"));
    }
    auto it = jobs_.find(idem->job_id());
    if (it == jobs_.end()) {
      return absl::DataLossError(absl::StrCat("idempotency key \"", key, "\" names job ",
                                              idem->job_id(), ", which the store lacks"));
    }
    v1::SubmitJobResponse r;
    *r.mutable_job() = it->second.job();
    r.set_existing(true);
    return std::optional<v1::SubmitJobResponse>(std::move(r));
  };
  {
    absl::MutexLock lock(&mu_);
    QCAL_RETURN_IF_ERROR(CheckServing());
    QCAL_ASSIGN_OR_RETURN(auto found, existing());
    if (found.has_value()) return *std::move(found);
  }
  QCAL_ASSIGN_OR_RETURN(service::ModelFacts facts, service::ValidateJobInputs(input_root_, spec));
  QCAL_ASSIGN_OR_RETURN(engine::Recipe recipe, service::RecipeFromProto(spec.recipe()));
  // A recipe the model cannot take is refused here, naming the key (the worker resolves it again
  // when it opens the job); an MoE model's recipe gets its moe defaults, so that the job's
  // recipe_sha256 is its report's.
  QCAL_RETURN_IF_ERROR(Annotate(recipe.ResolveForModel(facts.config), "spec.recipe"));
  if (internal::RunsGradientPass(recipe)) {
    // The pass's files of every linear end up in the data directory: refuse at the start, with
    // the numbers, a job they could not fit (DESIGN section 2, "Memory"). A Fisher is stored
    // beside each Hessian where the recipe needs one.
    const int64_t bytes = engine::ModelOacBytes(facts.config, recipe.NeedsFisher());
    struct statvfs st;
    if (statvfs(options_.data_dir.c_str(), &st) == 0) {
      const int64_t free_bytes =
          static_cast<int64_t>(st.f_bavail) * static_cast<int64_t>(st.f_frsize);
      if (bytes > free_bytes) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "recipe key \"hessian\" is %s: the gradient pass stores %d bytes (%.2f GiB) of "
            "statistics in the coordinator's data directory %s, which has %d bytes (%.2f GiB) free",
            engine::RecipeName(recipe.hessian), bytes, static_cast<double>(bytes) / (1 << 30),
            options_.data_dir, free_bytes, static_cast<double>(free_bytes) / (1 << 30)));
      }
    }
  }

  absl::MutexLock lock(&mu_);
  QCAL_RETURN_IF_ERROR(CheckServing());
  QCAL_ASSIGN_OR_RETURN(auto found, existing());
  if (found.has_value()) return *std::move(found);
  int active = 0;
  for (const auto& [id, rec] : jobs_) {
    if (service::IsFinal(rec.job().state())) continue;
    if (rec.job().client() == client) ++active;
    if (rec.job().spec().output_name() == spec.output_name()) {
      return absl::AlreadyExistsError(
          absl::StrCat("output name \"", spec.output_name(), "\" is in use by job ", id));
    }
  }
  if (!spec.overwrite() &&
      internal::IsNonEmptyDir(fs::path(options_.output_root) / spec.output_name())) {
    return absl::AlreadyExistsError(absl::StrCat(
        "output \"", spec.output_name(), "\" exists under the output root (set overwrite)"));
  }
  if (active >= options_.max_active_jobs_per_client) {
    return absl::ResourceExhaustedError(absl::StrCat("client \"", client, "\" has ", active,
                                                     " active jobs (quota ",
                                                     options_.max_active_jobs_per_client, ")"));
  }

  JobRecord rec;
  v1::Job& job = *rec.mutable_job();
  job.set_job_id(NewJobId());
  *job.mutable_spec() = spec;
  job.set_state(v1::JOB_STATE_QUEUED);
  job.set_stage(v1::JOB_STAGE_QUEUED);
  job.set_client(client);
  job.set_num_blocks(facts.num_blocks);
  job.set_recipe_sha256(recipe.Sha256());
  job.set_created_unix_ms(NowMs());
  if (spec.has_threads()) job.set_threads(spec.threads());
  rec.set_seq(counters_.next_seq());
  rec.set_spec_sha256(spec_sha);
  store::v1::Counters counters = counters_;
  counters.set_next_seq(counters.next_seq() + 1);

  WriteBatch batch;
  batch.Put(Column::kJobs, JobKey(job.job_id()), Encode(rec));
  batch.Put(Column::kJobs, kCountersKey, Encode(counters));
  if (!key.empty()) {
    IdempotencyRecord idem;
    idem.set_client(client);
    idem.set_key(key);
    idem.set_spec_sha256(spec_sha);
    idem.set_job_id(job.job_id());
    batch.Put(Column::kJobs, IdempotencyKey(client, key), Encode(idem));
  }
  QCAL_RETURN_IF_ERROR(Commit(batch));
  counters_ = counters;
  const std::string id = job.job_id();
  by_seq_[rec.seq()] = id;
  jobs_[id] = rec;
  configs_[id] = facts.config;
  scheduler_.JobQueued(id, rec.seq(), {"", job.threads()}, 0, internal::GangSizeOf(spec));
  Emit(rec, absl::StrCat("submitted by ", client, ": ", spec.model(), " -> ", spec.output_name(),
                         " (", facts.num_blocks, " blocks, ", spec.workers().min(), "..",
                         spec.workers().max(), " workers)"));
  UpdateGauges();
  work_cv_.SignalAll();
  v1::SubmitJobResponse response;
  *response.mutable_job() = job;
  return response;
}

absl::StatusOr<v1::Job> Coordinator::GetJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", job_id, "\""));
  return it->second.job();
}

absl::StatusOr<v1::ListJobsResponse> Coordinator::ListJobs(const v1::ListJobsRequest& request) {
  int page_size = request.page_size() == 0 ? 100 : request.page_size();
  if (page_size < 1 || page_size > 1000) {
    return absl::InvalidArgumentError(
        absl::StrCat("page_size must be in 1..1000, got ", request.page_size()));
  }
  int64_t after = 0;
  if (!request.page_token().empty() && !absl::SimpleAtoi(request.page_token(), &after)) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad page_token \"", request.page_token(), "\""));
  }
  absl::MutexLock lock(&mu_);
  v1::ListJobsResponse response;
  for (auto it = by_seq_.upper_bound(after); it != by_seq_.end(); ++it) {
    const v1::Job& job = jobs_.at(it->second).job();
    if (request.state() != v1::JOB_STATE_UNSPECIFIED && job.state() != request.state()) continue;
    if (response.jobs_size() == page_size) {
      response.set_next_page_token(absl::StrCat(std::prev(it)->first));
      break;
    }
    *response.add_jobs() = job;
  }
  return response;
}

absl::StatusOr<v1::Job> Coordinator::CancelJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", job_id, "\""));
  JobRecord& rec = it->second;
  if (service::IsFinal(rec.job().state()) || rec.job().cancel_requested()) return rec.job();
  QCAL_RETURN_IF_ERROR(CheckServing());
  if (rec.job().state() == v1::JOB_STATE_QUEUED) {
    QCAL_RETURN_IF_ERROR(
        FinishJob(rec, v1::JOB_STATE_CANCELLED, "cancelled while queued", nullptr));
    return rec.job();
  }
  JobRecord updated = rec;
  updated.mutable_job()->set_cancel_requested(true);
  WriteBatch batch;
  batch.Put(Column::kJobs, JobKey(job_id), Encode(updated));
  QCAL_RETURN_IF_ERROR(Commit(batch));
  rec = updated;
  scheduler_.RequestCancel(job_id);
  Emit(rec, "cancel requested; the job stops at the next block boundary");
  return rec.job();
}

absl::StatusOr<v1::ProgressEvent> Coordinator::Snapshot(const std::string& job_id,
                                                        int64_t* cursor) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", job_id, "\""));
  const Live& live = live_[job_id];
  *cursor = live.first_index + static_cast<int64_t>(live.events.size());
  v1::ProgressEvent e = MakeEvent(it->second);
  e.set_message(absl::StrCat("state ", service::JobStateName(it->second.job().state())));
  return e;
}

absl::Status Coordinator::WaitForEvents(const std::string& job_id, int64_t* cursor,
                                        absl::Time deadline, std::vector<v1::ProgressEvent>* events,
                                        bool* done) {
  absl::MutexLock lock(&mu_);
  *done = false;
  for (;;) {
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return absl::NotFoundError(absl::StrCat("no job \"", job_id, "\""));
    const Live& live = live_[job_id];
    const int64_t end = live.first_index + static_cast<int64_t>(live.events.size());
    if (*cursor < live.first_index) *cursor = live.first_index;
    for (; *cursor < end; ++*cursor) events->push_back(live.events[*cursor - live.first_index]);
    if (service::IsFinal(it->second.job().state()) || shutdown_) {
      *done = true;
      return absl::OkStatus();
    }
    if (!events->empty()) return absl::OkStatus();
    if (events_cv_.WaitWithDeadline(&mu_, deadline)) return absl::OkStatus();
  }
}

}  // namespace qcal::coordinator
