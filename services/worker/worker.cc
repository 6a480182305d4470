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

}  // namespace

absl::Status WorkerOptions::Validate() const {
  QCAL_RETURN_IF_ERROR(coordinator.Validate());
  if (input_root.empty()) return absl::InvalidArgumentError("--input-root is required");
  if (output_root.empty()) return absl::InvalidArgumentError("--output-root is required");
  if (threads < 0) return absl::InvalidArgumentError("--threads must be >= 0");
  if (peer_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--peer-timeout-seconds must be > 0");
  }
  if (acquire_wait <= absl::ZeroDuration())
    return absl::InvalidArgumentError("acquire_wait must be > 0");
  QCAL_RETURN_IF_ERROR(Annotate(peer_limits.Validate(), "--peer-grpc-* flags"));
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
  // Everything staged on local disk goes under this worker's own directory, which the next worker
  // to start there removes if this one dies without doing so.
  QCAL_ASSIGN_OR_RETURN(w->scratch_, ScratchSpace::Create(w->options_.scratch_dir));
  w->options_.scratch_dir = w->scratch_->path();
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
  PeerServerOptions po;
  po.listen = options.peer_listen;
  po.limits = options.peer_limits;
  QCAL_ASSIGN_OR_RETURN(w->peer_server_, PeerServer::Start(po));
  w->peer_address_ = AdvertiseAddress(options.peer_advertise, w->peer_server_->address());
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
  spdlog::info("qcal-worker: {} threads, {}; coordinator {}; peers reach it at {}", threads_,
               device_kind_, options_.coordinator.address, peer_address_);
  absl::Duration backoff = absl::Milliseconds(100);
  while (!stop_.load()) {
    v1::RegisterWorkerRequest request;
    request.set_device_kind(device_kind_);
    request.set_threads(threads_);
    request.set_hostname(hostname_);
    request.set_peer_address(peer_address_);
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
    request.set_gang_epoch(task_epoch_);
    request.set_exchange_bytes_total(exchange_bytes_total_);
    request.set_reduction_wait_seconds_total(reduction_wait_total_);
    mu_.Unlock();
    const absl::StatusOr<bool> drop = client_->Heartbeat(request);
    const absl::Status s = drop.status();
    mu_.Lock();
    if (s.ok()) {
      last_contact_ = absl::Now();
      // Only the task this heartbeat named: a newer one may have started meanwhile.
      if (*drop && task_epoch_ != 0 && task_epoch_ == request.gang_epoch() &&
          task_job_ == request.job_id() && !task_dropped_) {
        spdlog::warn("worker: the coordinator dropped job {} epoch {} from this worker", task_job_,
                     task_epoch_);
        task_dropped_ = true;
        peer_server_->ClearTask();
      }
    } else if (absl::IsFailedPrecondition(s)) {
      spdlog::warn("worker: lease lost: {}", s.ToString());
      lease_lost_ = true;
    }
  }
}

void Worker::SetTask(const std::string& job_id, uint64_t gang_epoch) {
  absl::MutexLock lock(&mu_);
  task_job_ = job_id;
  task_epoch_ = gang_epoch;
  task_dropped_ = false;
}

bool Worker::TaskDropped() const {
  absl::MutexLock lock(&mu_);
  return task_dropped_;
}

Worker::TaskEnd Worker::AbandonJob(const v1::Task& task, const absl::Status& why) {
  spdlog::warn("worker: abandoning job {} epoch {}: {}", task.job_id(), task.gang().gang_epoch(),
               why.ToString());
  v1::AbandonTaskRequest request;
  {
    absl::MutexLock lock(&mu_);
    *request.mutable_lease() = lease_;
  }
  request.set_job_id(task.job_id());
  request.set_gang_epoch(task.gang().gang_epoch());
  std::string message(why.message());
  std::replace(message.begin(), message.end(), '\n', ' ');
  request.set_reason(message);
  const absl::Status s = Retry("AbandonTask", [&] { return client_->AbandonTask(request); });
  if (!s.ok()) spdlog::warn("worker: AbandonTask for {}: {}", task.job_id(), s.ToString());
  return TaskEnd::kDropped;
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

}  // namespace qcal::worker
