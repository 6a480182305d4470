#include "services/worker/worker.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/common/input_paths.h"
#include "services/common/job_spec.h"
#include "services/engine/bench.h"
#include "services/engine/pipeline.h"

namespace qcal::worker {
namespace fs = std::filesystem;

namespace {

bool Transient(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsDeadlineExceeded(s);
}

// --- Per-chunk checkpoint files (interim, single-worker: the gang task loop replaces these).
// Chunk c's activations as a one-chunk CalibActivations file.
absl::Status SaveChunk(kernels::Backend& backend, const engine::CalibActivations& acts, int c,
                       const std::string& path) {
  engine::CalibActivations one;
  one.seq_len = acts.seq_len;
  one.next_block = acts.next_block;
  one.chunks = {acts.chunks[static_cast<size_t>(c)]};
  one.chunk_batch = {acts.chunk_batch[static_cast<size_t>(c)]};
  return engine::SaveActivations(backend, one, path);
}

// The chunk files FetchResume wrote, in chunk order, as one CalibActivations.
absl::StatusOr<engine::CalibActivations> LoadChunks(kernels::Backend& backend,
                                                    const std::vector<std::string>& paths) {
  engine::CalibActivations all;
  for (const std::string& path : paths) {
    QCAL_ASSIGN_OR_RETURN(engine::CalibActivations one, engine::LoadActivations(backend, path));
    all.seq_len = one.seq_len;
    all.next_block = one.next_block;
    for (size_t i = 0; i < one.chunks.size(); ++i) {
      all.chunks.push_back(std::move(one.chunks[i]));
      all.chunk_batch.push_back(one.chunk_batch[i]);
    }
  }
  return all;
}

}  // namespace

absl::Status WorkerOptions::Validate() const {
  QCAL_RETURN_IF_ERROR(coordinator.Validate());
  if (input_root.empty()) return absl::InvalidArgumentError("--input-root is required");
  if (output_root.empty()) return absl::InvalidArgumentError("--output-root is required");
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  if (acquire_wait <= absl::ZeroDuration())
    return absl::InvalidArgumentError("acquire_wait must be > 0");
  return absl::OkStatus();
}

Worker::~Worker() = default;

absl::StatusOr<std::unique_ptr<Worker>> Worker::Create(const WorkerOptions& options,
                                                       service::FaultInjector* faults) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  auto w = std::unique_ptr<Worker>(new Worker());
  w->options_ = options;
  w->faults_ = faults;
  if (w->options_.scratch_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    w->options_.scratch_dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  }
  QCAL_RETURN_IF_ERROR(service::InputRoot::Open(options.input_root).status());
  std::error_code ec;
  if (!fs::is_directory(options.output_root, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("output root \"", options.output_root, "\" is not a directory"));
  }
  kernels::BackendOptions bo;
  bo.device = options.device;
  bo.threads = options.threads;
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<kernels::Backend> backend, kernels::CreateBackend(bo));
  w->device_kind_ = backend->DeviceKind();
  w->threads_ = backend->threads();
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  w->hostname_ = host;
  QCAL_ASSIGN_OR_RETURN(w->client_, CoordinatorClient::Create(options.coordinator));
  return w;
}

void Worker::Stop() {
  stop_.store(true);
  client_->CancelWait();
  absl::MutexLock lock(&mu_);
  heartbeat_cv_.SignalAll();
}

bool Worker::LeaseLost() const {
  absl::MutexLock lock(&mu_);
  return lease_lost_ || absl::Now() - last_contact_ > lease_duration_;
}

void Worker::SetProgress(const std::string& job_id, v1::JobStage stage, int block) {
  absl::MutexLock lock(&mu_);
  job_id_ = job_id;
  stage_ = stage;
  block_ = block;
  // Report a stage change at once rather than at the next heartbeat tick.
  heartbeat_cv_.SignalAll();
}

absl::Status Worker::Retry(const std::string& what, const std::function<absl::Status()>& call) {
  absl::Duration backoff = absl::Milliseconds(100);
  for (;;) {
    const absl::Status s = call();
    if (s.ok() || !Transient(s) || stop_.load() || LeaseLost()) return s;
    spdlog::warn("worker: {} failed ({}); retrying", what, s.ToString());
    absl::SleepFor(backoff);
    backoff = std::min(backoff * 2, absl::Seconds(2));
  }
}

absl::Status Worker::Run() {
  spdlog::info("qcal-worker: {} threads, {}; coordinator {}", threads_, device_kind_,
               options_.coordinator.address);
  absl::Duration backoff = absl::Milliseconds(100);
  while (!stop_.load()) {
    v1::RegisterWorkerRequest request;
    request.set_device_kind(device_kind_);
    request.set_threads(threads_);
    request.set_hostname(hostname_);
    absl::StatusOr<v1::RegisterWorkerResponse> registration = client_->RegisterWorker(request);
    if (!registration.ok()) {
      if (!Transient(registration.status())) return registration.status();
      absl::SleepFor(backoff);
      backoff = std::min(backoff * 2, absl::Seconds(2));
      continue;
    }
    backoff = absl::Milliseconds(100);
    QCAL_RETURN_IF_ERROR(RunLease(*registration));
  }
  return absl::OkStatus();
}

absl::Status Worker::RunLease(const v1::RegisterWorkerResponse& registration) {
  {
    absl::MutexLock lock(&mu_);
    lease_ = registration.lease();
    lease_duration_ = absl::Milliseconds(registration.lease_ms());
    heartbeat_interval_ = absl::Milliseconds(registration.heartbeat_interval_ms());
    last_contact_ = absl::Now();
    lease_lost_ = false;
    heartbeat_stop_ = false;
  }
  spdlog::info("worker: lease {}@{}", registration.lease().worker_id(),
               registration.lease().epoch());
  std::thread heartbeats([this] { HeartbeatLoop(); });
  while (!stop_.load() && !LeaseLost()) {
    absl::StatusOr<std::optional<v1::Task>> task =
        client_->AcquireTask(registration.lease(), options_.acquire_wait);
    if (!task.ok()) {
      if (absl::IsFailedPrecondition(task.status())) {
        absl::MutexLock lock(&mu_);
        lease_lost_ = true;
      } else {
        absl::SleepFor(absl::Milliseconds(200));
      }
      continue;
    }
    if (!task->has_value()) continue;
    const v1::Task& t = **task;
    spdlog::info("worker: job {} attempt {} (blocks done {}, checkpoint {})", t.job_id(),
                 t.attempt(), t.blocks_done(), t.checkpoint_block());
    const TaskEnd end = RunTask(t);
    SetProgress("", v1::JOB_STAGE_UNSPECIFIED, -1);
    static const char* const kEnds[] = {"completed", "cancelled", "failed", "dropped"};
    spdlog::info("worker: job {} {}", t.job_id(), kEnds[static_cast<int>(end)]);
  }
  {
    absl::MutexLock lock(&mu_);
    heartbeat_stop_ = true;
    heartbeat_cv_.SignalAll();
  }
  heartbeats.join();
  return absl::OkStatus();
}

void Worker::HeartbeatLoop() {
  absl::MutexLock lock(&mu_);
  while (!heartbeat_stop_ && !stop_.load() && !lease_lost_) {
    heartbeat_cv_.WaitWithTimeout(&mu_, heartbeat_interval_);
    if (heartbeat_stop_ || stop_.load()) break;
    v1::HeartbeatRequest request;
    *request.mutable_lease() = lease_;
    request.set_job_id(job_id_);
    request.set_stage(stage_);
    request.set_block(block_);
    if (backend_ != nullptr) {
      request.set_device_memory_bytes(std::max<int64_t>(0, backend_->MemoryInUse()));
    }
    mu_.Unlock();
    // drop_task is not acted on here: a dropped task's next commit is refused anyway.
    const absl::Status s = client_->Heartbeat(request).status();
    mu_.Lock();
    if (s.ok()) {
      last_contact_ = absl::Now();
    } else if (absl::IsFailedPrecondition(s)) {
      spdlog::warn("worker: lease lost: {}", s.ToString());
      lease_lost_ = true;
    }
  }
}

Worker::TaskEnd Worker::FailJob(const v1::Task& task, const absl::Status& error) {
  spdlog::error("worker: job {} failed: {}", task.job_id(), error.ToString());
  v1::FailTaskRequest request;
  {
    absl::MutexLock lock(&mu_);
    *request.mutable_lease() = lease_;
  }
  request.set_job_id(task.job_id());
  std::string message(error.message());
  std::replace(message.begin(), message.end(), '\n', ' ');
  request.set_error(message);
  const absl::Status s = Retry("FailTask", [&] { return client_->FailTask(request); });
  if (!s.ok()) spdlog::warn("worker: FailTask for {}: {}", task.job_id(), s.ToString());
  return TaskEnd::kFailed;
}

Worker::TaskEnd Worker::RunTask(const v1::Task& task) {
  const std::string& job_id = task.job_id();
  v1::Lease lease;
  {
    absl::MutexLock lock(&mu_);
    lease = lease_;
  }
  auto drop = [&](const std::string& what, const absl::Status& s) {
    spdlog::warn("worker: dropping job {}: {}: {}", job_id, what, s.ToString());
    return TaskEnd::kDropped;
  };
  SetProgress(job_id, v1::JOB_STAGE_LOADING, -1);

  absl::StatusOr<engine::JobOptions> job_options =
      service::JobOptionsFromSpec(task.spec(), options_.input_root, options_.output_root,
                                  task.threads(), options_.device, job_id);
  if (!job_options.ok()) return FailJob(task, job_options.status());
  job_options->scratch_dir = options_.scratch_dir;
  // The same confinement and file checks as at submit: inputs may have changed since.
  absl::StatusOr<service::InputRoot> root = service::InputRoot::Open(options_.input_root);
  if (!root.ok()) return drop("input root", root.status());
  if (absl::Status s = service::ValidateJobInputs(*root, task.spec()).status(); !s.ok()) {
    return FailJob(task, s);
  }
  absl::StatusOr<std::unique_ptr<engine::JobSession>> opened = engine::JobSession::Open(
      *job_options, [&](const std::string& line) { spdlog::info("job {}: {}", job_id, line); });
  if (!opened.ok()) return FailJob(task, opened.status());
  engine::JobSession& session = **opened;
  {
    absl::MutexLock lock(&mu_);
    backend_ = &session.backend();
  }
  // Cleared before the session (and its backend) goes away.
  struct BackendGuard {
    Worker* worker;
    ~BackendGuard() {
      absl::MutexLock lock(&worker->mu_);
      worker->backend_ = nullptr;
    }
  } backend_guard{this};
  const int num_blocks = session.num_blocks();
  if (num_blocks != task.num_blocks()) {
    return FailJob(
        task, absl::FailedPreconditionError(absl::StrCat(
                  "the model has ", num_blocks, " blocks, the job expects ", task.num_blocks())));
  }
  // The gang plan: this worker's chunks and linears (a single worker holds all of them).
  const v1::GangPlan& gang = task.gang();
  const uint64_t gang_epoch = gang.gang_epoch();
  if (gang.rank() < 0 || gang.rank() >= gang.members_size()) {
    return FailJob(task, absl::FailedPreconditionError("the task's gang plan lacks this worker"));
  }
  const v1::GangMember& me = gang.members(gang.rank());
  const std::string scratch =
      (fs::path(options_.scratch_dir) / absl::StrCat("qcal-", job_id, "-", getpid())).string();
  struct ScratchGuard {
    std::string path;
    ~ScratchGuard() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  } scratch_guard{scratch};
  {
    std::error_code ec;
    fs::create_directories(scratch, ec);
    if (ec) return drop("scratch", absl::InternalError(absl::StrCat(scratch, ": ", ec.message())));
  }

  if (task.checkpoint_block() > 0) {
    ResumeData data;
    const absl::Status fetched = Retry("FetchResume", [&] {
      absl::StatusOr<ResumeData> r = client_->FetchResume(
          lease, job_id, me.chunk_begin(), me.chunk_end(), /*artifacts=*/true, scratch);
      if (r.ok()) data = *std::move(r);
      return r.status();
    });
    if (absl::IsDataLoss(fetched)) return FailJob(task, fetched);
    if (!fetched.ok()) return drop("FetchResume", fetched);
    std::vector<engine::BlockArtifacts> committed;
    for (const std::vector<LayerArtifact>& block : data.blocks) {
      engine::BlockArtifacts artifacts;
      for (const LayerArtifact& a : block) {
        engine::LayerResult r;
        absl::StatusOr<engine::LayerResult> q = engine::ParseLayerArtifact(a.quantized);
        if (!q.ok()) return FailJob(task, Annotate(q.status(), a.name));
        const nlohmann::json report_json =
            nlohmann::json::parse(a.report_json, nullptr, /*allow_exceptions=*/false);
        absl::StatusOr<engine::LayerReport> report = report_json.is_object()
                                                         ? engine::LayerReportFromJson(report_json)
                                                         : absl::DataLossError("not a JSON object");
        if (!report.ok()) return FailJob(task, Annotate(report.status(), a.name));
        r = *std::move(q);
        r.report = *std::move(report);
        artifacts.push_back(std::move(r));
      }
      committed.push_back(std::move(artifacts));
    }
    absl::StatusOr<engine::CalibActivations> acts = LoadChunks(session.backend(), data.chunk_paths);
    if (!acts.ok()) return FailJob(task, acts.status());
    if (absl::Status s = session.Restore(committed, *std::move(acts)); !s.ok())
      return FailJob(task, s);
    spdlog::info("worker: job {} restored at block {}/{}", job_id, data.checkpoint_block,
                 num_blocks);
  }
  if (absl::Status f = faults_->Hit("open", session.next_block()); !f.ok()) return FailJob(task, f);

  const int every = task.checkpoint_every();
  double since_checkpoint = 0, checkpoint_cost = 0;
  while (session.next_block() < num_blocks) {
    if (stop_.load()) return drop("stopping", absl::CancelledError("worker stopping"));
    if (LeaseLost()) return drop("lease", absl::FailedPreconditionError("lease lost"));
    const int b = session.next_block();
    SetProgress(job_id, v1::JOB_STAGE_QUANTIZING, b);
    const absl::Time t0 = absl::Now();
    const double hessian_before = session.times().hessian;
    absl::StatusOr<engine::BlockArtifactsPtr> block = session.RunNextBlock();
    if (!block.ok()) return FailJob(task, Annotate(block.status(), absl::StrCat("block ", b)));
    const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    if (absl::Status f = faults_->Hit("solve", b); !f.ok()) return FailJob(task, f);
    std::vector<OwnedLayer> layers;
    for (int l : me.owned_linears()) {
      const engine::LayerResult& r = (**block)[static_cast<size_t>(l)];
      layers.push_back({l,
                        {r.report.name, engine::SerializeLayerArtifact(r),
                         engine::LayerReportJson(r.report).dump(), r.report.solve_seconds}});
    }
    v1::BlockStats stats;
    stats.set_seconds(seconds);
    stats.set_tokens(static_cast<int64_t>(task.spec().samples()) * task.spec().seq_len());
    stats.set_hessian_seconds(session.times().hessian - hessian_before);
    stats.set_hessian_flops(
        engine::CountFlops(session.config(), task.spec().samples(), task.spec().seq_len()).hessian /
        std::max(session.config().num_layers, 1));
    v1::CommitBlockResponse committed;
    const absl::Status s = Retry("CommitBlock", [&] {
      absl::StatusOr<v1::CommitBlockResponse> r =
          client_->CommitBlock(lease, job_id, b, gang_epoch, layers, stats);
      if (r.ok()) committed = *r;
      return r.status();
    });
    if (!s.ok()) return drop(absl::StrCat("CommitBlock ", b), s);
    if (committed.cancel_job()) return TaskEnd::kCancelled;
    if (absl::Status f = faults_->Hit("commit", b); !f.ok()) return FailJob(task, f);

    since_checkpoint += seconds;
    const bool last = b + 1 == num_blocks;
    const bool due = every > 0 ? (b + 1) % every == 0 : since_checkpoint >= 19 * checkpoint_cost;
    if (due || last) {
      SetProgress(job_id, v1::JOB_STAGE_CHECKPOINTING, b);
      const absl::Time t1 = absl::Now();
      for (int c = me.chunk_begin(); c < me.chunk_end(); ++c) {
        const std::string file = (fs::path(scratch) / absl::StrCat("up-", c)).string();
        if (absl::Status saved = SaveChunk(session.backend(), session.activations(), c, file);
            !saved.ok()) {
          return FailJob(task, saved);
        }
        v1::UploadActivationsResponse uploaded;
        const absl::Status u = Retry("UploadActivations", [&] {
          absl::StatusOr<v1::UploadActivationsResponse> r =
              client_->UploadActivations(lease, job_id, b + 1, c, gang_epoch, file);
          if (r.ok()) uploaded = *r;
          return r.status();
        });
        std::error_code ec;
        fs::remove(file, ec);
        if (!u.ok()) return drop("UploadActivations", u);
        if (uploaded.cancel_job()) return TaskEnd::kCancelled;
      }
      checkpoint_cost = absl::ToDoubleSeconds(absl::Now() - t1);
      since_checkpoint = 0;
      if (absl::Status f = faults_->Hit("checkpoint", b + 1); !f.ok()) return FailJob(task, f);
    }
  }

  SetProgress(job_id, v1::JOB_STAGE_EXPORTING, -1);
  const fs::path tmp = fs::path(options_.output_root) / task.temp_output_name();
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) {
    return FailJob(task, absl::PermissionDeniedError(
                             absl::StrCat(tmp.string(), ": cannot create: ", ec.message())));
  }
  const absl::Time t0 = absl::Now();
  absl::StatusOr<engine::JobResult> result = session.Finish(tmp.string());
  if (!result.ok()) {
    fs::remove_all(tmp, ec);
    return FailJob(task, result.status());
  }
  if (absl::Status f = faults_->Hit("finish", num_blocks); !f.ok()) return FailJob(task, f);
  v1::CompleteTaskRequest request;
  *request.mutable_lease() = lease;
  request.set_job_id(job_id);
  request.set_gang_epoch(gang_epoch);
  request.set_finish_seconds(absl::ToDoubleSeconds(absl::Now() - t0));
  request.set_peak_rss_bytes(result->peak_rss_bytes);
  request.set_peak_device_bytes(std::max<int64_t>(0, result->peak_device_bytes));
  if (result->has_perplexity) {
    request.mutable_result()->set_perplexity(result->perplexity);
    request.mutable_result()->set_perplexity_fp(result->perplexity_fp);
  }
  v1::CompleteTaskResponse completed;
  const absl::Status c = Retry("CompleteTask", [&] {
    absl::StatusOr<v1::CompleteTaskResponse> r = client_->CompleteTask(request);
    if (r.ok()) completed = *r;
    return r.status();
  });
  if (!c.ok()) return drop("CompleteTask", c);
  return completed.state() == v1::JOB_STATE_CANCELLED ? TaskEnd::kCancelled : TaskEnd::kCompleted;
}

}  // namespace qcal::worker
