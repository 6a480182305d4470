// The coordinator's frame: options, construction and state loading, the store and serving state,
// events and gauges, time-driven work, and the helpers the other files share
// (coordinator_internal.h). The rest of the class lives in the files named in coordinator.h.
#include "services/coordinator/coordinator.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/logging.h"
#include "common/status.h"
#include "services/common/job_spec.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::ActivationRecord;
using store::v1::WorkerRecord;

constexpr size_t kMaxEventsPerJob = 1000;

}  // namespace

// Declared in coordinator_internal.h.
namespace internal {

std::string StateLabel(v1::JobState state) {
  std::string s = service::JobStateName(state);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

void SyncDir(const fs::path& dir) {
  const int fd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
}

bool RunsGradientPass(const engine::Recipe& recipe) {
  return recipe.NeedsGradientPass() || recipe.NeedsFisher();
}
bool RunsGradientPass(const v1::JobSpec& spec) {
  absl::StatusOr<engine::Recipe> recipe = service::RecipeFromProto(spec.recipe());
  return recipe.ok() && RunsGradientPass(*recipe);
}

bool IsNonEmptyDir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && !fs::is_empty(p, ec);
}

GangSize GangSizeOf(const v1::JobSpec& spec) {
  const int min = std::max(1, spec.workers().min());
  return {min, std::max(min, spec.workers().max())};
}

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

}  // namespace internal

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
                                                internal::GangSizeOf(job.spec()), export_only,
                                                members));
    } else if (job.state() == v1::JOB_STATE_QUEUED) {
      scheduler_.JobQueued(id, rec.seq(), req, job.attempts(), internal::GangSizeOf(job.spec()),
                           export_only);
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
  internal::RemoveEmptyDirs(act_root);
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
    by_state[internal::StateLabel(rec.job().state())]++;
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
