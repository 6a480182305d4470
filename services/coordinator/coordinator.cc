#include "services/coordinator/coordinator.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"
#include "services/engine/oac/oac_job.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/pipeline.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::ActivationRecord;
using store::v1::ArtifactRecord;
using store::v1::BlockRecord;
using store::v1::IdempotencyRecord;
using store::v1::LayerDigest;
using store::v1::WorkerRecord;

constexpr size_t kMaxEventsPerJob = 1000;
// A final job keeps only its last events (late watchers get the snapshot anyway).
constexpr size_t kMaxEventsPerFinalJob = 16;
constexpr absl::Duration kMaxAcquireWait = absl::Seconds(30);
constexpr int64_t kMaxActivationBytes = int64_t{1} << 40;
// Largest gradient-pass file accepted: a 70B down projection's packed Hessian and Fisher are
// about 2.5 GB.
constexpr int64_t kMaxGradientFileBytes = int64_t{64} << 30;

std::string StateLabel(v1::JobState state) {
  std::string s = service::JobStateName(state);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// fsyncs a directory so that a rename inside it is durable.
void SyncDir(const fs::path& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
}

// Appends `data` to the staging file `fd` (`path` names it in errors); UNAVAILABLE on a write
// error.
absl::Status AppendToFd(int fd, const std::string& path, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    const ssize_t n = write(fd, data.data() + off, data.size() - off);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::UnavailableError(absl::StrCat(path, ": write failed: ", std::strerror(errno)));
    }
    off += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Whether a job runs the gradient pass: for output-adaptive Hessians, or for the Fisher that
// saliency retraining needs (an unset hessian, from a spec stored before the key existed, is the
// default "layer").
bool RunsGradientPass(const engine::Recipe& recipe) {
  return recipe.NeedsGradientPass() || recipe.NeedsFisher();
}
bool RunsGradientPass(const v1::JobSpec& spec) {
  absl::StatusOr<engine::Recipe> recipe = service::RecipeFromProto(spec.recipe());
  return recipe.ok() && RunsGradientPass(*recipe);
}

// Writes `bytes` to `path` through a temporary file, fsynced (WriteStringToFile), renamed into
// place. Errors are UNAVAILABLE, so that the committing worker retries.
absl::Status WriteFileSynced(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  if (absl::Status s = WriteStringToFile(tmp, bytes); !s.ok()) {
    return absl::UnavailableError(s.message());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat(path, ": rename failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// The job id recorded in <dir>/qcal_run.json, "" when there is none.
std::string RunJobId(const fs::path& dir) {
  absl::StatusOr<std::string> text = ReadFileToString((dir / "qcal_run.json").string());
  if (!text.ok()) return "";
  const nlohmann::json j = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("job_id") || !j["job_id"].is_string()) return "";
  return j["job_id"].get<std::string>();
}

bool IsNonEmptyDir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && !fs::is_empty(p, ec);
}

GangSize GangSizeOf(const v1::JobSpec& spec) {
  const int min = std::max(1, spec.workers().min());
  return {min, std::max(min, spec.workers().max())};
}

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

// Removes the directories left empty under `dir` (deepest first), not `dir` itself.
void RemoveEmptyDirs(const fs::path& dir) {
  std::error_code ec;
  std::vector<fs::path> dirs;
  for (const auto& e : fs::recursive_directory_iterator(dir, ec)) {
    if (e.is_directory()) dirs.push_back(e.path());
  }
  std::sort(dirs.rbegin(), dirs.rend());
  for (const fs::path& d : dirs) {
    if (fs::is_empty(d, ec)) fs::remove(d, ec);
  }
}

}  // namespace

absl::Status CoordinatorOptions::Validate() const {
  if (data_dir.empty()) return absl::InvalidArgumentError("--data-dir is required");
  if (input_root.empty()) return absl::InvalidArgumentError("--input-root is required");
  if (output_root.empty()) return absl::InvalidArgumentError("--output-root is required");
  QCAL_RETURN_IF_ERROR(scheduler.Validate());
  if (heartbeat_interval <= absl::ZeroDuration() || heartbeat_interval >= scheduler.lease) {
    return absl::InvalidArgumentError("the heartbeat interval must be > 0 and less than the lease");
  }
  if (max_active_jobs_per_client < 1) {
    return absl::InvalidArgumentError("max_active_jobs_per_client must be >= 1");
  }
  if (checkpoint_every < 0) return absl::InvalidArgumentError("checkpoint_every must be >= 0");
  if (store_reopen_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("the store reopen interval must be > 0");
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Construction and state loading.

Coordinator::Coordinator(const CoordinatorOptions& options, StoreOpener open_store, Clock* clock,
                         Metrics* metrics, service::FaultInjector* faults,
                         service::InputRoot input_root)
    : options_(options),
      open_store_(std::move(open_store)),
      clock_(clock),
      metrics_(metrics),
      faults_(faults),
      input_root_(std::move(input_root)),
      scheduler_(options.scheduler) {}

Coordinator::~Coordinator() = default;

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(const CoordinatorOptions& options,
                                                                 StoreOpener open_store,
                                                                 Clock* clock, Metrics* metrics,
                                                                 service::FaultInjector* faults) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_ASSIGN_OR_RETURN(service::InputRoot root, service::InputRoot::Open(options.input_root));
  std::error_code ec;
  if (!fs::is_directory(options.output_root, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("output root \"", options.output_root, "\" is not a directory"));
  }
  fs::create_directories(fs::path(options.data_dir) / "activations", ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("data dir \"", options.data_dir, "\" cannot be created: ", ec.message()));
  }
  auto c = std::unique_ptr<Coordinator>(
      new Coordinator(options, std::move(open_store), clock, metrics, faults, std::move(root)));
  absl::MutexLock lock(&c->mu_);
  QCAL_ASSIGN_OR_RETURN(c->store_, c->open_store_());
  if (absl::Status s = c->LoadState(); !s.ok()) {
    // A store write that failed while the state was restored (the re-plans of running jobs) is
    // what it is at any other time: NOT_SERVING until Tick reopens the store and loads again.
    // Any other error (a record that does not parse) stops the start.
    if (c->serving_) return s;
    spdlog::error("coordinator: a store write failed while loading the state: {}", s.ToString());
  }
  return c;
}

absl::Status Coordinator::LoadState() {
  jobs_.clear();
  by_seq_.clear();
  scheduler_ = Scheduler(options_.scheduler);
  const absl::Time now = clock_->Now();

  QCAL_ASSIGN_OR_RETURN(auto counters,
                        GetRecord<store::v1::Counters>(*store_, Column::kJobs, kCountersKey));
  counters_ = counters.value_or(store::v1::Counters());
  if (counters_.next_epoch() == 0) counters_.set_next_epoch(1);
  if (counters_.next_seq() == 0) counters_.set_next_seq(1);
  if (counters_.next_gang_epoch() == 0) counters_.set_next_gang_epoch(1);
  peer_addresses_.clear();

  absl::Status decode_error;
  QCAL_RETURN_IF_ERROR(
      store_->Scan(Column::kWorkers, "", [&](const std::string& key, const std::string& value) {
        absl::StatusOr<WorkerRecord> w = Decode<WorkerRecord>(Column::kWorkers, key, value);
        if (!w.ok()) {
          decode_error = w.status();
          return false;
        }
        // Restored leases get a fresh period: a live gang goes on under a new plan.
        scheduler_.WorkerJoined(w->worker_id(), w->epoch(), {w->device_kind(), w->threads()}, now);
        peer_addresses_[w->worker_id()] = w->peer_address();
        return true;
      }));
  QCAL_RETURN_IF_ERROR(decode_error);
  QCAL_RETURN_IF_ERROR(store_->Scan(
      Column::kJobs, kJobKeyPrefix, [&](const std::string& key, const std::string& value) {
        absl::StatusOr<JobRecord> rec = Decode<JobRecord>(Column::kJobs, key, value);
        if (!rec.ok()) {
          decode_error = rec.status();
          return false;
        }
        by_seq_[rec->seq()] = rec->job().job_id();
        // Gang epochs only grow, whatever the counter says.
        counters_.set_next_gang_epoch(
            std::max(counters_.next_gang_epoch(), rec->job().gang_epoch() + 1));
        jobs_[rec->job().job_id()] = *std::move(rec);
        return true;
      }));
  QCAL_RETURN_IF_ERROR(decode_error);
  scheduler_.SetNextGangEpoch(counters_.next_gang_epoch());

  std::vector<Action> restored;
  for (auto& [id, rec] : jobs_) {
    const v1::Job& job = rec.job();
    const WorkerCaps req{job.device_kind(), job.threads()};
    const bool export_only = job.num_blocks() > 0 && job.blocks_done() == job.num_blocks();
    if (job.state() == v1::JOB_STATE_RUNNING) {
      std::vector<std::string> members;
      for (const v1::GangMember& m : job.gang()) members.push_back(m.worker_id());
      restored.push_back(scheduler_.JobRestored(id, rec.seq(), req, job.attempts(),
                                                GangSizeOf(job.spec()), export_only, members));
    } else if (job.state() == v1::JOB_STATE_QUEUED) {
      scheduler_.JobQueued(id, rec.seq(), req, job.attempts(), GangSizeOf(job.spec()), export_only);
    }
    if (!service::IsFinal(job.state()) && job.cancel_requested()) scheduler_.RequestCancel(id);
  }
  for (const Action& a : restored) QCAL_RETURN_IF_ERROR(Apply(a));

  // Activation files that no record references (a crash between writing one and committing it,
  // or between committing a newer one and deleting the older) are removed.
  std::set<std::string> referenced;
  QCAL_RETURN_IF_ERROR(
      store_->Scan(Column::kActivations, "", [&](const std::string& key, const std::string& value) {
        absl::StatusOr<ActivationRecord> a =
            Decode<ActivationRecord>(Column::kActivations, key, value);
        if (a.ok()) referenced.insert(a->file());
        return true;
      }));
  std::error_code ec;
  const fs::path act_root = fs::path(options_.data_dir) / "activations";
  for (const auto& e : fs::recursive_directory_iterator(act_root, ec)) {
    if (!e.is_regular_file()) continue;
    const std::string rel = fs::relative(e.path(), options_.data_dir).string();
    if (referenced.count(rel) == 0) fs::remove(e.path(), ec);
  }
  RemoveEmptyDirs(act_root);
  // What a crash left of final jobs: artifact directories (removed after the batch that ended the
  // job) and temporary outputs (an attempt killed or stopped while it exported).
  std::set<std::string> final_jobs;
  for (const auto& [id, rec] : jobs_) {
    if (!service::IsFinal(rec.job().state())) continue;
    final_jobs.insert(id);
    fs::remove_all(ArtifactDir(id), ec);
  }
  RemoveTempOutputs(final_jobs);
  // Gradient-pass uploads cut off by a crash leave staging files; committed files stay (their
  // records name them).
  for (const auto& e :
       fs::recursive_directory_iterator(fs::path(options_.data_dir) / "artifacts", ec)) {
    if (e.is_regular_file() && e.path().parent_path().filename() == "oac" &&
        e.path().filename().string().rfind(".upload-", 0) == 0) {
      fs::remove(e.path(), ec);
    }
  }
  spdlog::info("coordinator: loaded {} jobs, {} worker leases, {} queued", jobs_.size(),
               scheduler_.live_leases(), scheduler_.queued_jobs());
  UpdateGauges();
  work_cv_.SignalAll();
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Store, serving state, events.

bool Coordinator::serving() const {
  absl::MutexLock lock(&mu_);
  return serving_;
}

void Coordinator::SetServingCallback(std::function<void(bool)> callback) {
  absl::MutexLock lock(&mu_);
  serving_callback_ = std::move(callback);
  if (serving_callback_) serving_callback_(serving_);
}

void Coordinator::SetServing(bool serving) {
  if (serving_ == serving) return;
  serving_ = serving;
  metrics_->SetStoreWritable(serving);
  if (serving_callback_) serving_callback_(serving);
}

absl::Status Coordinator::CheckServing() const {
  if (shutdown_) return absl::UnavailableError("the coordinator is shutting down");
  if (!serving_) {
    return absl::UnavailableError("the coordinator's store is not writable; it is being reopened");
  }
  return absl::OkStatus();
}

absl::Status Coordinator::Commit(const WriteBatch& batch) {
  const absl::Time t0 = absl::Now();
  // An injected failure (fault point "write") takes the path of a failed store write.
  absl::Status s = faults_->Hit("write", -1);
  if (s.ok()) s = store_->Write(batch);
  metrics_->ObserveStoreWrite(absl::ToDoubleSeconds(absl::Now() - t0),
                              static_cast<int64_t>(batch.bytes()), s.ok());
  if (!s.ok()) {
    spdlog::error("coordinator: store write failed, refusing writes until reopened: {}",
                  s.ToString());
    store_failed_at_ = clock_->Now();
    SetServing(false);
    return absl::UnavailableError(absl::StrCat("store write failed: ", s.message()));
  }
  return absl::OkStatus();
}

int64_t Coordinator::NowMs() const { return absl::ToUnixMillis(clock_->Now()); }

void Coordinator::RemoveTempOutputs(const std::set<std::string>& job_ids) const {
  if (job_ids.empty()) return;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(options_.output_root, ec)) {
    if (job_ids.count(service::JobOfTempOutputName(e.path().filename().string())) > 0) {
      fs::remove_all(e.path(), ec);
    }
  }
}

std::string Coordinator::ActivationDir(const std::string& job_id) const {
  return (fs::path(options_.data_dir) / "activations" / job_id).string();
}

std::string Coordinator::ArtifactDir(const std::string& job_id) const {
  return (fs::path(options_.data_dir) / "artifacts" / job_id).string();
}

std::string Coordinator::ArtifactFile(const std::string& job_id, int block, int layer) {
  return absl::StrFormat("artifacts/%s/%06d-%02d.bin", job_id, block, layer);
}

std::string Coordinator::GradientFile(const std::string& job_id, int block, int layer) {
  return absl::StrFormat("artifacts/%s/oac/%06d-%02d.safetensors", job_id, block, layer);
}

std::string Coordinator::GradientDir(const std::string& job_id) const {
  return (fs::path(ArtifactDir(job_id)) / "oac").string();
}

absl::StatusOr<std::string> Coordinator::ArtifactBytes(const ArtifactRecord& artifact,
                                                       const std::string& sha256,
                                                       const std::string& key) const {
  std::string bytes = artifact.quantized();
  if (!artifact.file().empty()) {
    absl::StatusOr<std::string> read =
        ReadFileToString((fs::path(options_.data_dir) / artifact.file()).string());
    if (!read.ok()) {
      return absl::DataLossError(
          absl::StrCat("store: artifact ", key, ": ", read.status().message()));
    }
    bytes = *std::move(read);
  }
  if (Sha256Hex(bytes) != sha256) {
    return absl::DataLossError(absl::StrCat("store: artifact ", key, " is corrupt"));
  }
  return bytes;
}

v1::ProgressEvent Coordinator::MakeEvent(const JobRecord& rec) const {
  const v1::Job& job = rec.job();
  v1::ProgressEvent e;
  e.set_job_id(job.job_id());
  e.set_state(job.state());
  e.set_stage(job.stage());
  e.set_num_blocks(job.num_blocks());
  e.set_blocks_done(job.blocks_done());
  e.set_error(job.error());
  e.set_unix_ms(NowMs());
  e.set_block(-1);
  e.set_eta_seconds(-1);
  auto it = live_.find(job.job_id());
  if (it != live_.end()) {
    const Live& live = it->second;
    e.set_block(live.block);
    e.set_tokens_per_second(live.tokens_per_second);
    if (live.blocks_timed > 0 && job.state() == v1::JOB_STATE_RUNNING) {
      e.set_eta_seconds(live.block_seconds / live.blocks_timed *
                        (job.num_blocks() - job.blocks_done()));
    }
  }
  return e;
}

void Coordinator::Emit(const JobRecord& rec, const std::string& message) {
  v1::ProgressEvent e = MakeEvent(rec);
  e.set_message(message);
  Live& live = live_[rec.job().job_id()];
  live.events.push_back(std::move(e));
  if (live.events.size() > kMaxEventsPerJob) {
    live.events.pop_front();
    ++live.first_index;
  }
  spdlog::info("job {}: {}", rec.job().job_id(), message);
  events_cv_.SignalAll();
}

void Coordinator::UpdateGauges() {
  std::map<std::string, int> by_state;
  int64_t done = 0, total = 0;
  for (const auto& [id, rec] : jobs_) {
    by_state[StateLabel(rec.job().state())]++;
    if (!service::IsFinal(rec.job().state())) {
      done += rec.job().blocks_done();
      total += rec.job().num_blocks();
    }
  }
  metrics_->SetJobs(by_state);
  metrics_->SetBlocks(done, total);
  metrics_->SetWorkerLeases(scheduler_.live_leases());
  PublishDeviceMemory();
}

void Coordinator::PublishDeviceMemory() {
  int64_t memory = 0;
  for (const auto& [w, bytes] : device_memory_) memory += bytes;
  metrics_->SetDeviceMemory(memory);
}

std::string Coordinator::NewJobId() const {
  std::random_device rd;
  for (;;) {
    const uint64_t r = (static_cast<uint64_t>(rd()) << 32) ^ rd();
    std::string id = absl::StrFormat("job-%016x", r);
    if (jobs_.count(id) == 0) return id;
  }
}

// ---------------------------------------------------------------------------------------------
// QuantService.

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
  if (RunsGradientPass(recipe)) {
    // The pass's files of every linear end up in the data directory: refuse at the start, with
    // the numbers, a job they could not fit (DESIGN section 2, "Memory").
    const int64_t bytes = engine::ModelOacBytes(
        facts.config, engine::GradientPassOptionsOf(recipe, options_.data_dir).fisher);
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
  if (!spec.overwrite() && IsNonEmptyDir(fs::path(options_.output_root) / spec.output_name())) {
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
  scheduler_.JobQueued(id, rec.seq(), {"", job.threads()}, 0, GangSizeOf(spec));
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

// ---------------------------------------------------------------------------------------------
// WorkerService.

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

absl::StatusOr<v1::CommitBlockResponse> Coordinator::CommitBlock(
    const v1::CommitBlockHeader& header, const std::vector<std::string>& artifacts) {
  const int b = header.block();
  const int n = header.layers_size();
  // The content checks need no lock.
  if (n < 1 || static_cast<int>(artifacts.size()) != n || header.layer_index_size() != n ||
      (header.layer_expert_size() != 0 && header.layer_expert_size() != n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", b, ": ", n, " layers with ", header.layer_index_size(),
                     " layer indices and ", header.layer_expert_size(),
                     " experts (at least one layer, one index each, and one "
                     "expert each or none)"));
  }
  // Each layer as the engine names it: its kind and, in an MoE block, its expert.
  std::vector<engine::LinearId> ids;
  std::vector<LayerDigest> digests;
  std::vector<engine::LayerReport> reports;
  for (int i = 0; i < n; ++i) {
    const v1::LayerManifest& m = header.layers(i);
    const int l = header.layer_index(i);
    const int expert = header.layer_expert_size() == n ? header.layer_expert(i) : engine::kNoExpert;
    if (l < 0 || l >= engine::kNumLinears || expert < engine::kSharedExpert) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": layer index ", l, " (expert ", expert, ") is out of range"));
    }
    ids.emplace_back(engine::kAllLinears[static_cast<size_t>(l)], expert);
    const std::string sha = Sha256Hex(artifacts[i]);
    if (sha != m.sha256() || static_cast<int64_t>(artifacts[i].size()) != m.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(m.name(), ": the upload does not match its manifest (sha256 ", sha, ")"));
    }
    const nlohmann::json report_json =
        nlohmann::json::parse(m.report_json(), nullptr, /*allow_exceptions=*/false);
    absl::StatusOr<engine::LayerReport> report =
        report_json.is_object() ? engine::LayerReportFromJson(report_json)
                                : absl::InvalidArgumentError("not a JSON object");
    if (!report.ok() || report->name != m.name()) {
      return absl::InvalidArgumentError(absl::StrCat(m.name(), ": malformed report entry"));
    }
    reports.push_back(*report);
    LayerDigest& d = digests.emplace_back();
    d.set_name(m.name());
    d.set_sha256(sha);
    d.set_size(m.size());
    d.set_report_sha256(Sha256Hex(m.report_json()));
  }

  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(const int rank,
                        GangRank(header.lease(), header.job_id(), header.gang_epoch()));
  JobRecord* rec = &jobs_.at(header.job_id());
  // Copied: assigning *rec below replaces its Job message.
  const v1::Job job = rec->job();
  const std::string& id = job.job_id();
  v1::CommitBlockResponse response;
  if (job.cancel_requested()) {
    QCAL_RETURN_IF_ERROR(
        FinishJob(*rec, v1::JOB_STATE_CANCELLED, "cancelled by a client", nullptr));
    response.set_cancel_job(true);
    return response;
  }
  // A gang's owners commit independently: one block past the committed prefix may arrive while
  // another owner's layers of the block before are still on their way.
  const int ahead = job.gang_size() > 1 ? 1 : 0;
  if (b < 0 || b >= job.num_blocks() || b > job.blocks_done() + ahead) {
    return absl::FailedPreconditionError(absl::StrCat("job ", id, ": block ", b,
                                                      " is out of order (", job.blocks_done(),
                                                      " of ", job.num_blocks(), " committed)"));
  }
  QCAL_ASSIGN_OR_RETURN(const ModelConfig* config, ConfigOf(*rec));
  // The block's linears (engine::BlockLinears order: the store's layer indices), and each
  // committed layer's place among them.
  const std::vector<engine::LinearId> linears = engine::BlockLinears(*config, b);
  std::vector<int> slots;
  const v1::GangMember& me = job.gang(rank);
  for (int i = 0; i < n; ++i) {
    const engine::LinearId& lid = ids[static_cast<size_t>(i)];
    const auto at = std::find(linears.begin(), linears.end(), lid);
    const std::string expected = at == linears.end() ? "" : engine::LinearPrefix(*config, b, lid);
    const int slot = static_cast<int>(at - linears.begin());
    if (at == linears.end() || std::find(slots.begin(), slots.end(), slot) != slots.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", b, ": layer ", header.layers(i).name(), " (index ", static_cast<int>(lid.kind),
          ", expert ", lid.expert, ") is not a linear of the block or repeated"));
    }
    if (header.layers(i).name() != expected) {
      return absl::InvalidArgumentError(absl::StrCat("block ", b, " layer ", slot, " is \"",
                                                     header.layers(i).name(), "\", expected \"",
                                                     expected, "\""));
    }
    slots.push_back(slot);
    // Dense linears by their kind; an expert's by its unit, whose three linears have one owner.
    const bool owned =
        lid.expert == engine::kNoExpert
            ? std::find(me.owned_linears().begin(), me.owned_linears().end(),
                        static_cast<int>(lid.kind)) != me.owned_linears().end()
            : std::find(me.owned_expert_units().begin(), me.owned_expert_units().end(),
                        engine::ExpertUnitOf(*config, lid.expert)) != me.owned_expert_units().end();
    if (!owned) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, ": rank ", rank, " (", me.worker_id(), ") does not own ",
                       digests[static_cast<size_t>(i)].name(), " under gang epoch ",
                       job.gang_epoch(), "; only its owner commits it"));
    }
  }

  // Layers committed before (an earlier attempt) must be reproduced exactly.
  std::vector<bool> fresh(static_cast<size_t>(n), false);
  std::vector<std::optional<LayerDigest>> in(linears.size());
  for (int l = 0; l < static_cast<int>(linears.size()); ++l) {
    QCAL_ASSIGN_OR_RETURN(auto stored, GetRecord<store::v1::LayerRecord>(*store_, Column::kTasks,
                                                                         LayerKey(id, b, l)));
    if (stored.has_value()) in[static_cast<size_t>(l)] = stored->digest();
  }
  for (int i = 0; i < n; ++i) {
    const LayerDigest& now = digests[static_cast<size_t>(i)];
    const std::optional<LayerDigest>& then = in[static_cast<size_t>(slots[static_cast<size_t>(i)])];
    if (!then.has_value()) {
      fresh[static_cast<size_t>(i)] = true;
      continue;
    }
    if (now.sha256() != then->sha256() || now.report_sha256() != then->report_sha256()) {
      const std::string error =
          absl::StrCat("determinism error: ", now.name(), " recomputed with sha256 ", now.sha256(),
                       " (report ", now.report_sha256(), ") but committed with ", then->sha256(),
                       " (report ", then->report_sha256(), ")");
      QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr));
      return absl::AbortedError(error);
    }
  }
  const bool any_fresh = std::find(fresh.begin(), fresh.end(), true) != fresh.end();
  QCAL_ASSIGN_OR_RETURN(auto done_mark,
                        GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(id, b)));
  if (!any_fresh) {
    response.set_already_committed(true);
    response.set_block_complete(done_mark.has_value());
    Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(),
                            " recomputed: matches the committed artifacts (rank ", rank, ")"));
    return response;
  }

  QCAL_RETURN_IF_ERROR(faults_->Hit("precommit", b));
  // The artifacts' bytes go to files first (synced); the batch then records them. A crash between
  // the two leaves files that no record names, which the next commit of the block overwrites.
  {
    std::error_code ec;
    fs::create_directories(ArtifactDir(id), ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat(ArtifactDir(id), ": ", ec.message()));
    }
    for (int i = 0; i < n; ++i) {
      if (!fresh[static_cast<size_t>(i)]) continue;
      const fs::path path =
          fs::path(options_.data_dir) / ArtifactFile(id, b, slots[static_cast<size_t>(i)]);
      QCAL_RETURN_IF_ERROR(WriteFileSynced(path.string(), artifacts[static_cast<size_t>(i)]));
    }
    SyncDir(ArtifactDir(id));
  }
  WriteBatch batch;
  for (int i = 0; i < n; ++i) {
    if (!fresh[static_cast<size_t>(i)]) continue;
    const int l = slots[static_cast<size_t>(i)];
    ArtifactRecord a;
    a.set_name(header.layers(i).name());
    a.set_file(ArtifactFile(id, b, l));
    a.set_report_json(header.layers(i).report_json());
    batch.Put(Column::kArtifacts, ArtifactKey(id, b, l), Encode(a));
    store::v1::LayerRecord lr;
    *lr.mutable_digest() = digests[static_cast<size_t>(i)];
    lr.set_worker_id(header.lease().worker_id());
    lr.set_gang_epoch(header.gang_epoch());
    batch.Put(Column::kTasks, LayerKey(id, b, l), Encode(lr));
    in[static_cast<size_t>(l)] = digests[static_cast<size_t>(i)];
  }
  const bool complete =
      std::all_of(in.begin(), in.end(), [](const auto& d) { return d.has_value(); });
  JobRecord updated = *rec;
  updated.mutable_job()->set_stage(v1::JOB_STAGE_QUANTIZING);
  std::vector<std::string> stale_files;
  if (complete && !done_mark.has_value()) {
    BlockRecord block;
    block.set_block(b);
    block.set_worker_id(header.lease().worker_id());
    block.set_epoch(header.lease().epoch());
    for (const auto& d : in) *block.add_layers() = *d;
    batch.Put(Column::kTasks, BlockKey(id, b), Encode(block));
    // The committed prefix grows over this block and any later one already done.
    int done = job.blocks_done();
    while (done < job.num_blocks()) {
      if (done != b) {
        QCAL_ASSIGN_OR_RETURN(auto mark,
                              GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(id, done)));
        if (!mark.has_value()) break;
      }
      ++done;
    }
    updated.mutable_job()->set_blocks_done(done);
    QCAL_RETURN_IF_ERROR(AdvanceCheckpoint(updated, nullptr, batch, &stale_files));
  }
  batch.Put(Column::kJobs, JobKey(id), Encode(updated));
  if (absl::Status injected = faults_->Hit("store", b); !injected.ok()) {
    // Behave exactly as a failed store write does.
    metrics_->ObserveStoreWrite(0, 0, false);
    store_failed_at_ = clock_->Now();
    SetServing(false);
    return absl::UnavailableError(absl::StrCat("store write failed: ", injected.message()));
  }
  QCAL_RETURN_IF_ERROR(Commit(batch));
  *rec = updated;
  std::error_code ec;
  for (const std::string& f : stale_files) fs::remove(f, ec);
  QCAL_RETURN_IF_ERROR(faults_->Hit("commit", b));
  response.set_block_complete(complete);
  if (rec->job().blocks_done() == rec->job().num_blocks()) scheduler_.SetExportOnly(id);

  for (int i = 0; i < n; ++i) {
    if (!fresh[static_cast<size_t>(i)]) continue;
    const engine::LayerReport& r = reports[static_cast<size_t>(i)];
    metrics_->ObserveLayer(header.layers(i).solve_seconds(), r.rel_error_rtn, r.rel_error,
                           r.reconstructed ? r.rel_error_er : -1.0);
  }
  metrics_->ObserveBlockExchange(rank, header.stats().exchange_bytes(),
                                 header.stats().reduction_wait_seconds());
  Live& live = live_[id];
  if (!complete || done_mark.has_value()) {
    // The dense linears by name, then the experts whose linears these are ("q_proj,o_proj,
    // experts 0,3,shared").
    std::string names;
    std::vector<std::string> experts;
    for (int i = 0; i < n; ++i) {
      if (!fresh[static_cast<size_t>(i)]) continue;
      const engine::LinearId& lid = ids[static_cast<size_t>(i)];
      if (lid.expert == engine::kNoExpert) {
        absl::StrAppend(&names, names.empty() ? "" : ",", engine::LinearName(lid.kind));
        continue;
      }
      const std::string e =
          lid.expert == engine::kSharedExpert ? "shared" : absl::StrCat(lid.expert);
      if (std::find(experts.begin(), experts.end(), e) == experts.end()) experts.push_back(e);
    }
    if (!experts.empty()) {
      absl::StrAppend(&names, names.empty() ? "" : ",", "experts ", absl::StrJoin(experts, ","));
    }
    Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(), ": ", names,
                            " committed by rank ", rank));
    return response;
  }
  metrics_->AddBlockCommitted();
  metrics_->ObserveStage("block", header.stats().seconds());
  live.block = b;
  if (header.stats().seconds() > 0) {
    live.block_seconds += header.stats().seconds();
    live.blocks_timed += 1;
    live.tokens_per_second =
        static_cast<double>(job.spec().samples()) * job.spec().seq_len() / header.stats().seconds();
    metrics_->SetCalibrationTokensPerSecond(live.tokens_per_second);
  }
  if (header.stats().hessian_seconds() > 0) {
    metrics_->SetHessianFlopsPerSecond(header.stats().hessian_flops() /
                                       header.stats().hessian_seconds());
  }
  Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(), " committed"));
  UpdateGauges();
  return response;
}

ActivationUpload::~ActivationUpload() {
  if (fd_ >= 0) close(fd_);
  if (!staging_path_.empty()) {
    std::error_code ec;
    fs::remove(staging_path_, ec);
  }
}

absl::Status ActivationUpload::Append(const std::string& data) {
  if (written_ + static_cast<int64_t>(data.size()) > header_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation upload exceeds its declared size ", header_.size()));
  }
  QCAL_RETURN_IF_ERROR(AppendToFd(fd_, staging_path_, data));
  written_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
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
  upload->staging_path_ = (dir / absl::StrCat(".upload-", header.block(), "-", header.chunk(), "-",
                                              header.lease().epoch()))
                              .string();
  upload->fd_ = open(upload->staging_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (upload->fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat(upload->staging_path_, ": cannot create: ", std::strerror(errno)));
  }
  return upload;
}

absl::Status Coordinator::AdvanceCheckpoint(JobRecord& updated, const ActivationRecord* added,
                                            WriteBatch& batch,
                                            std::vector<std::string>* stale_files) {
  v1::Job& job = *updated.mutable_job();
  const int total = engine::NumChunks(job.spec().samples());
  std::map<int, int> chunks;  // boundary -> chunks in
  std::vector<std::pair<std::string, ActivationRecord>> records;
  absl::Status decode_error;
  QCAL_RETURN_IF_ERROR(store_->Scan(Column::kActivations, JobScopedPrefix(job.job_id()),
                                    [&](const std::string& key, const std::string& value) {
                                      absl::StatusOr<ActivationRecord> a = Decode<ActivationRecord>(
                                          Column::kActivations, key, value);
                                      if (!a.ok()) {
                                        decode_error = a.status();
                                        return false;
                                      }
                                      chunks[a->block()]++;
                                      records.emplace_back(key, *std::move(a));
                                      return true;
                                    }));
  QCAL_RETURN_IF_ERROR(decode_error);
  if (added != nullptr) chunks[added->block()]++;
  int best = job.checkpoint_block();
  for (const auto& [block, count] : chunks) {
    if (count == total && block <= job.blocks_done()) best = std::max(best, block);
  }
  if (best == job.checkpoint_block()) return absl::OkStatus();
  job.set_checkpoint_block(best);
  for (const auto& [key, a] : records) {
    if (a.block() >= best) continue;
    batch.Delete(Column::kActivations, key);
    stale_files->push_back((fs::path(options_.data_dir) / a.file()).string());
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::UploadActivationsResponse> Coordinator::CommitActivations(
    ActivationUpload& upload) {
  const v1::ActivationsHeader& header = upload.header();
  if (upload.written_ != header.size()) {
    return absl::InvalidArgumentError(absl::StrCat("activation upload ended at ", upload.written_,
                                                   " of ", header.size(), " bytes"));
  }
  if (fsync(upload.fd_) != 0) {
    return absl::UnavailableError(
        absl::StrCat(upload.staging_path_, ": fsync failed: ", std::strerror(errno)));
  }
  close(upload.fd_);
  upload.fd_ = -1;
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(upload.staging_path_));
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
  fs::rename(upload.staging_path_, final_path, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat(final_path.string(), ": rename failed: ", ec.message()));
  }
  upload.staging_path_.clear();
  SyncDir(final_path.parent_path());
  SyncDir(final_path.parent_path().parent_path());
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
  RemoveEmptyDirs(ActivationDir(job_id));
  metrics_->ObserveStage("checkpoint", absl::ToDoubleSeconds(absl::Now() - upload.started_));
  if (advanced) {
    Emit(*rec, absl::StrCat("checkpoint at block ", rec->job().checkpoint_block(), "/",
                            rec->job().num_blocks()));
  }
  return response;
}

absl::StatusOr<ResumePlan> Coordinator::PrepareResume(const v1::FetchResumeRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(JobRecord * rec, HeldJob(request.lease(), request.job_id()));
  const std::string& job_id = request.job_id();
  const int total = engine::NumChunks(rec->job().spec().samples());
  if (request.chunk_begin() < 0 || request.chunk_begin() > request.chunk_end() ||
      request.chunk_end() > total) {
    return absl::InvalidArgumentError(absl::StrCat("chunks [", request.chunk_begin(), ", ",
                                                   request.chunk_end(), ") are not within [0, ",
                                                   total, ")"));
  }
  ResumePlan plan;
  const int k = rec->job().checkpoint_block();
  plan.header.set_checkpoint_block(k);
  if (k == 0) return plan;
  for (int c = request.chunk_begin(); c < request.chunk_end(); ++c) {
    const std::string key = ActivationKey(job_id, k, c);
    QCAL_ASSIGN_OR_RETURN(auto act,
                          GetRecord<ActivationRecord>(*store_, Column::kActivations, key));
    if (!act.has_value()) {
      return absl::DataLossError(
          absl::StrCat("job ", job_id, ": checkpoint at block ", k, " lacks chunk ", c));
    }
    v1::ChunkFile& f = *plan.header.add_chunks();
    f.set_chunk(c);
    f.set_sha256(act->sha256());
    f.set_size(act->size());
    plan.chunk_paths.push_back((fs::path(options_.data_dir) / act->file()).string());
  }
  if (!request.artifacts()) return plan;
  for (int b = 0; b < k; ++b) {
    QCAL_ASSIGN_OR_RETURN(auto block,
                          GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(job_id, b)));
    if (!block.has_value()) {
      return absl::DataLossError(absl::StrCat("job ", job_id, ": block ", b, " has no record"));
    }
    v1::BlockManifest& bm = *plan.header.add_blocks();
    bm.set_block(b);
    for (int l = 0; l < block->layers_size(); ++l) {
      const std::string key = ArtifactKey(job_id, b, l);
      QCAL_ASSIGN_OR_RETURN(auto artifact,
                            GetRecord<ArtifactRecord>(*store_, Column::kArtifacts, key));
      if (!artifact.has_value() ||
          Sha256Hex(artifact->report_json()) != block->layers(l).report_sha256()) {
        return absl::DataLossError(absl::StrCat("store: artifact ", key, " is missing or corrupt"));
      }
      v1::LayerManifest& m = *bm.add_layers();
      m.set_name(block->layers(l).name());
      m.set_sha256(block->layers(l).sha256());
      m.set_size(block->layers(l).size());
      m.set_report_json(artifact->report_json());
    }
  }
  return plan;
}

absl::StatusOr<std::string> Coordinator::ReadArtifact(const std::string& job_id, int block,
                                                      int layer) {
  absl::MutexLock lock(&mu_);
  const std::string key = ArtifactKey(job_id, block, layer);
  QCAL_ASSIGN_OR_RETURN(auto digest,
                        GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(job_id, block)));
  QCAL_ASSIGN_OR_RETURN(auto artifact, GetRecord<ArtifactRecord>(*store_, Column::kArtifacts, key));
  if (!digest.has_value() || !artifact.has_value() || layer < 0 || layer >= digest->layers_size()) {
    return absl::DataLossError(absl::StrCat("store: artifact ", key, " is missing"));
  }
  return ArtifactBytes(*artifact, digest->layers(layer).sha256(), key);
}

GradientUpload::~GradientUpload() {
  if (fd_ >= 0) close(fd_);
  if (!staging_path_.empty()) {
    std::error_code ec;
    fs::remove(staging_path_, ec);
  }
}

absl::Status GradientUpload::Append(const std::string& data) {
  if (written_ + static_cast<int64_t>(data.size()) > header_.file().size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("gradient file upload exceeds its declared size ", header_.file().size()));
  }
  QCAL_RETURN_IF_ERROR(AppendToFd(fd_, staging_path_, data));
  written_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::Status Coordinator::CheckGradientOwner(const JobRecord& rec, int rank, int block,
                                             int layer) const {
  const v1::Job& job = rec.job();
  if (!RunsGradientPass(job.spec())) {
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
  upload->staging_path_ =
      (dir / absl::StrCat(".upload-", f.block(), "-", f.linear(), "-", header.lease().epoch()))
          .string();
  upload->fd_ = open(upload->staging_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (upload->fd_ < 0) {
    return absl::UnavailableError(
        absl::StrCat(upload->staging_path_, ": cannot create: ", std::strerror(errno)));
  }
  return upload;
}

absl::StatusOr<v1::UploadGradientFileResponse> Coordinator::CommitGradientFile(
    GradientUpload& upload) {
  const v1::GradientFileHeader& header = upload.header();
  const v1::GradientFileManifest& f = header.file();
  const std::string name =
      engine::LinearPrefix(f.block(), engine::kAllLinears[static_cast<size_t>(f.linear())]);
  if (upload.written_ != f.size()) {
    return absl::InvalidArgumentError(absl::StrCat("gradient file of ", name, " ended at ",
                                                   upload.written_, " of ", f.size(), " bytes"));
  }
  if (fsync(upload.fd_) != 0) {
    return absl::UnavailableError(
        absl::StrCat(upload.staging_path_, ": fsync failed: ", std::strerror(errno)));
  }
  close(upload.fd_);
  upload.fd_ = -1;
  QCAL_ASSIGN_OR_RETURN(std::string sha, Sha256File(upload.staging_path_));
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
  std::error_code ec;
  fs::rename(upload.staging_path_, final_path, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat(final_path.string(), ": rename failed: ", ec.message()));
  }
  upload.staging_path_.clear();
  SyncDir(final_path.parent_path());
  SyncDir(final_path.parent_path().parent_path());
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
    if (RunJobId(target) == job.job_id() || job.spec().overwrite() || !IsNonEmptyDir(target)) {
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
  SyncDir(root);
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
      StateLabel(state), static_cast<double>(job.finished_unix_ms() - job.created_unix_ms()) / 1e3);
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

// ---------------------------------------------------------------------------------------------
// Time-driven work.

void Coordinator::Tick() {
  absl::MutexLock lock(&mu_);
  const absl::Time now = clock_->Now();
  if (!serving_) {
    if (now - store_failed_at_ < options_.store_reopen_interval) return;
    // Reopen: drop the handle first (RocksDB holds a lock on the directory), then reload every
    // piece of state from what the store has durably.
    store_.reset();
    absl::StatusOr<std::unique_ptr<KvStore>> reopened = open_store_();
    absl::Status s = reopened.status();
    if (s.ok()) {
      store_ = *std::move(reopened);
      s = LoadState();
    }
    if (!s.ok()) {
      spdlog::error("coordinator: store reopen failed: {}", s.ToString());
      store_failed_at_ = now;
      return;
    }
    spdlog::info("coordinator: store reopened");
    SetServing(true);
    return;
  }
  for (const Action& a : scheduler_.Tick(now)) {
    if (a.kind == Action::Kind::kExpireLease) {
      WriteBatch batch;
      batch.Delete(Column::kWorkers, a.worker_id);
      if (!Commit(batch).ok()) return;
      device_memory_.erase(a.worker_id);
      peer_addresses_.erase(a.worker_id);
      exchange_.erase(a.worker_id);
      metrics_->AddLeaseExpiry();
      spdlog::warn("coordinator: lease {}@{} expired", a.worker_id, a.epoch);
      continue;
    }
    if (absl::Status s = Apply(a); !s.ok()) {
      spdlog::error("coordinator: {}", s.ToString());
      return;
    }
  }
  UpdateGauges();
}

void Coordinator::Shutdown() {
  absl::MutexLock lock(&mu_);
  shutdown_ = true;
  work_cv_.SignalAll();
  events_cv_.SignalAll();
}

}  // namespace qcal::coordinator
