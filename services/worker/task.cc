// One attempt of a job as one rank of its gang (see worker.h).
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/common/input_paths.h"
#include "services/common/job_spec.h"
#include "services/engine/bench.h"
#include "services/engine/pipeline.h"
#include "services/worker/gang.h"
#include "services/worker/peer/grpc_transport.h"
#include "services/worker/worker.h"

namespace qcal::worker {
namespace fs = std::filesystem;

namespace {

// The committed artifacts FetchResume returned, as the session's BlockArtifacts.
absl::StatusOr<std::vector<engine::BlockArtifacts>> ParseCommitted(const ResumeData& data) {
  std::vector<engine::BlockArtifacts> committed;
  for (const std::vector<LayerArtifact>& block : data.blocks) {
    engine::BlockArtifacts artifacts;
    for (const LayerArtifact& a : block) {
      absl::StatusOr<engine::LayerResult> q = engine::ParseLayerArtifact(a.quantized);
      if (!q.ok()) return Annotate(q.status(), a.name);
      const nlohmann::json report_json =
          nlohmann::json::parse(a.report_json, nullptr, /*allow_exceptions=*/false);
      absl::StatusOr<engine::LayerReport> report = report_json.is_object()
                                                       ? engine::LayerReportFromJson(report_json)
                                                       : absl::DataLossError("not a JSON object");
      if (!report.ok()) return Annotate(report.status(), a.name);
      engine::LayerResult r = *std::move(q);
      r.report = *std::move(report);
      artifacts.push_back(std::move(r));
    }
    committed.push_back(std::move(artifacts));
  }
  return committed;
}

}  // namespace

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
  const v1::GangPlan& gang = task.gang();
  const uint64_t gang_epoch = gang.gang_epoch();
  SetTask(job_id, gang_epoch);
  // The heartbeats name no task once this one ends, and the peer server takes no more for it.
  struct TaskGuard {
    Worker* worker;
    ~TaskGuard() {
      worker->peer_server_->ClearTask();
      worker->SetTask("", 0);
    }
  } task_guard{this};
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
  absl::StatusOr<engine::GangPlan> plan = PlanFromProto(gang, task.spec().samples());
  if (!plan.ok()) return FailJob(task, Annotate(plan.status(), "the task's gang plan"));
  const int rank = plan->rank;
  const engine::ChunkRange mine = plan->local();

  // The exchange with the other ranks (none for a gang of one).
  std::unique_ptr<GrpcTransport> grpc;
  std::unique_ptr<FaultingTransport> transport;
  if (plan->world > 1) {
    if (absl::Status s = peer_server_->SetTask(job_id, *plan); !s.ok()) return drop("peers", s);
    GrpcTransportOptions to;
    to.timeout = options_.peer_timeout;
    absl::StatusOr<std::unique_ptr<GrpcTransport>> t =
        GrpcTransport::Create(job_id, *plan, PeerAddresses(gang), peer_server_.get(), to);
    if (!t.ok()) return drop("peers", t.status());
    grpc = *std::move(t);
    transport = std::make_unique<FaultingTransport>(grpc.get(), faults_);
    spdlog::info("worker: job {} epoch {}: rank {} of {}, chunks [{}, {})", job_id, gang_epoch,
                 rank, plan->world, mine.begin, mine.end);
  }
  // A block that failed: the attempt is given up when the exchange failed or the coordinator
  // dropped the task; otherwise the job itself failed.
  auto block_failed = [&](const absl::Status& s, int b) {
    if (TaskDropped()) return drop(absl::StrCat("block ", b), s);
    if (transport != nullptr && !transport->first_error().ok()) {
      return AbandonJob(task, Annotate(transport->first_error(), absl::StrCat("block ", b)));
    }
    return FailJob(task, Annotate(s, absl::StrCat("block ", b)));
  };

  absl::StatusOr<std::unique_ptr<engine::JobSession>> opened = engine::JobSession::Open(
      *job_options, [&](const std::string& line) { spdlog::info("job {}: {}", job_id, line); },
      *plan);
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
      absl::StatusOr<ResumeData> r = client_->FetchResume(lease, job_id, mine.begin, mine.end,
                                                          /*artifacts=*/rank == 0, scratch);
      if (r.ok()) data = *std::move(r);
      return r.status();
    });
    if (absl::IsDataLoss(fetched)) return FailJob(task, fetched);
    if (!fetched.ok()) return drop("FetchResume", fetched);
    absl::StatusOr<std::vector<engine::BlockArtifacts>> committed = ParseCommitted(data);
    if (!committed.ok()) return FailJob(task, committed.status());
    absl::StatusOr<engine::CalibActivations> acts;
    if (data.chunk_paths.empty()) {
      // A rank without chunks (more ranks than chunks) holds an empty share of the boundary.
      engine::CalibActivations none = session.activations();
      none.next_block = data.checkpoint_block;
      acts = std::move(none);
    } else {
      acts = engine::AssembleActivations(session.backend(), data.chunk_paths);
    }
    if (!acts.ok()) return FailJob(task, acts.status());
    if (absl::Status s = session.Restore(*committed, *std::move(acts)); !s.ok()) {
      return FailJob(task, s);
    }
    spdlog::info("worker: job {} restored at block {}/{}", job_id, data.checkpoint_block,
                 num_blocks);
  }
  if (absl::Status f = faults_->Hit("open", session.next_block()); !f.ok()) return FailJob(task, f);

  // The gradient pass (output-adaptive recipes), before block 0: restored when an earlier attempt
  // committed it, else run here (every rank over its chunks) and committed by each linear's owner.
  if (session.NeedsGradientPass() && session.next_block() < num_blocks) {
    const std::optional<TaskEnd> end =
        task.gradient_pass_done() ? RestoreGradientPass(task, lease, *plan, scratch, session)
                                  : RunGradientPass(task, lease, *plan, transport.get(), session);
    if (end.has_value()) return *end;
  }

  const int every = task.checkpoint_every();
  double since_checkpoint = 0, checkpoint_cost = 0;
  while (session.next_block() < num_blocks) {
    if (stop_.load()) return drop("stopping", absl::CancelledError("worker stopping"));
    if (LeaseLost()) return drop("lease", absl::FailedPreconditionError("lease lost"));
    if (TaskDropped()) return drop("re-planned", absl::AbortedError("dropped by the coordinator"));
    const int b = session.next_block();
    SetProgress(job_id, v1::JOB_STAGE_QUANTIZING, b);
    const absl::Time t0 = absl::Now();
    const double hessian_before = session.times().hessian;
    const int64_t bytes_before = transport ? transport->bytes_sent() : 0;
    const double wait_before = transport ? transport->receive_wait_seconds() : 0;
    engine::GangBlockOptions block_options;
    block_options.retrain_block = [&](int block) { return faults_->Hit("retrain", block); };
    absl::StatusOr<engine::BlockArtifactsPtr> block =
        session.RunNextBlock(transport.get(), block_options);
    if (!block.ok()) return block_failed(block.status(), b);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    if (plan->world == 1) {
      if (absl::Status f = faults_->Hit("solve", b); !f.ok()) return FailJob(task, f);
    }
    v1::BlockStats stats;
    stats.set_seconds(seconds);
    stats.set_tokens(
        int64_t{task.spec().seq_len()} *
        std::min(task.spec().samples() - mine.begin * kCalibChunk, mine.size() * kCalibChunk));
    stats.set_hessian_seconds(session.times().hessian - hessian_before);
    stats.set_hessian_flops(
        engine::CountFlops(session.config(), task.spec().samples(), task.spec().seq_len()).hessian /
        std::max(session.config().num_layers, 1));
    if (transport != nullptr) {
      const int64_t bytes = transport->bytes_sent() - bytes_before;
      const double wait = transport->receive_wait_seconds() - wait_before;
      stats.set_exchange_bytes(bytes);
      stats.set_reduction_wait_seconds(wait);
      absl::MutexLock lock(&mu_);
      exchange_bytes_total_ += bytes;
      reduction_wait_total_ += wait;
    }
    // This rank's linears of the block, in the block's order (an MoE block: its experts' too).
    std::vector<OwnedLayer> layers;
    for (const engine::LayerResult& r : **block) {
      if (plan->LinearOwner(session.config(), r.id()) != rank) continue;
      layers.push_back({static_cast<int>(r.report.kind),
                        r.report.expert,
                        {r.report.name, engine::SerializeLayerArtifact(r),
                         engine::LayerReportJson(r.report).dump(), r.report.solve_seconds}});
    }
    if (!layers.empty()) {
      v1::CommitBlockResponse committed;
      const absl::Status s = Retry("CommitBlock", [&] {
        absl::StatusOr<v1::CommitBlockResponse> r =
            client_->CommitBlock(lease, job_id, b, gang_epoch, layers, stats);
        if (r.ok()) committed = *r;
        return r.status();
      });
      if (!s.ok()) return drop(absl::StrCat("CommitBlock ", b), s);
      if (committed.cancel_job()) return TaskEnd::kCancelled;
    }
    if (absl::Status f = faults_->Hit("commit", b); !f.ok()) return FailJob(task, f);

    since_checkpoint += seconds;
    const bool last = b + 1 == num_blocks;
    bool due = every > 0 ? (b + 1) % every == 0 : since_checkpoint >= 19 * checkpoint_cost;
    if (every == 0 && transport != nullptr && !last) {
      // Every rank must checkpoint the same boundaries: rank 0's timing decides.
      const engine::MessageKey key{b, engine::kStepBoundary, engine::MessageKind::kControl, 0, 0};
      if (rank == 0) {
        for (int to = 1; to < plan->world; ++to) {
          engine::MessageKey k = key;
          if (absl::Status s = transport->Send(to, k, due ? "1" : "0"); !s.ok()) {
            return block_failed(s, b);
          }
        }
      } else {
        absl::StatusOr<std::string> decision =
            transport->Receive(key, engine::GangBlockOptions().receive_timeout);
        if (!decision.ok()) return block_failed(decision.status(), b);
        due = *decision == "1";
      }
    }
    if (due || last) {
      SetProgress(job_id, v1::JOB_STAGE_CHECKPOINTING, b);
      const absl::Time t1 = absl::Now();
      for (int c = mine.begin; c < mine.end; ++c) {
        const std::string file = (fs::path(scratch) / absl::StrCat("up-", c)).string();
        if (absl::Status saved =
                engine::SaveActivationChunk(session.backend(), session.activations(), c, file);
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

  if (rank != 0) {
    // This rank's part is done: rank 0 exports. Leave the gang.
    v1::CompleteTaskRequest request;
    *request.mutable_lease() = lease;
    request.set_job_id(job_id);
    request.set_gang_epoch(gang_epoch);
    request.set_member_done(true);
    request.set_peak_rss_bytes(session.PeakRssBytes());
    request.set_peak_device_bytes(std::max<int64_t>(0, session.PeakDeviceBytes()));
    const absl::Status c =
        Retry("CompleteTask", [&] { return client_->CompleteTask(request).status(); });
    if (!c.ok()) return drop("CompleteTask", c);
    return TaskEnd::kCompleted;
  }
  // An attempt that lost its lease (stopped past it, then continued) does not export: another
  // attempt has the job.
  if (LeaseLost()) return drop("export", absl::FailedPreconditionError("lease lost"));
  if (TaskDropped()) return drop("export", absl::AbortedError("dropped by the coordinator"));
  SetProgress(job_id, v1::JOB_STAGE_EXPORTING, -1);
  // This attempt's own directory (the name carries the gang epoch); removed unless the
  // coordinator takes it.
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
  if (!c.ok()) {
    // Refused (the lease or the plan is gone) or unreachable: the job is another attempt's now,
    // and this directory no one's. (A directory the coordinator renamed is no longer here.)
    fs::remove_all(tmp, ec);
    return drop("CompleteTask", c);
  }
  return completed.state() == v1::JOB_STATE_CANCELLED ? TaskEnd::kCancelled : TaskEnd::kCompleted;
}

std::optional<Worker::TaskEnd> Worker::RunGradientPass(const v1::Task& task, const v1::Lease& lease,
                                                       const engine::GangPlan& plan,
                                                       FaultingTransport* transport,
                                                       engine::JobSession& session) {
  const std::string& job_id = task.job_id();
  const uint64_t gang_epoch = task.gang().gang_epoch();
  SetProgress(job_id, v1::JOB_STAGE_GRADIENT, -1);
  const absl::Time t0 = absl::Now();
  const int64_t bytes_before = transport ? transport->bytes_sent() : 0;
  const double wait_before = transport ? transport->receive_wait_seconds() : 0;
  engine::GangBlockOptions pass_options;
  pass_options.gradient_block = [&](int b) -> absl::Status {
    SetProgress(job_id, v1::JOB_STAGE_GRADIENT, b);
    // With peers the fault point is hit where the block's partials are sent (FaultingTransport).
    return transport == nullptr ? faults_->Hit("gradient", b) : absl::OkStatus();
  };
  absl::StatusOr<std::vector<engine::OacFile>> files =
      session.RunGradientPass(transport, pass_options);
  if (transport != nullptr) {
    absl::MutexLock lock(&mu_);
    exchange_bytes_total_ += transport->bytes_sent() - bytes_before;
    reduction_wait_total_ += transport->receive_wait_seconds() - wait_before;
  }
  if (!files.ok()) {
    if (TaskDropped()) {
      spdlog::warn("worker: dropping job {}: gradient pass: {}", job_id, files.status().ToString());
      return TaskEnd::kDropped;
    }
    // A failed exchange gives the attempt up (the gang is re-planned); anything else is the job's.
    if (transport != nullptr && !transport->first_error().ok()) {
      return AbandonJob(task, Annotate(transport->first_error(), "gradient pass"));
    }
    return FailJob(task, Annotate(files.status(), "gradient pass"));
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  // Block, then linear order, whatever order the pass wrote them in.
  std::sort(files->begin(), files->end(), [](const engine::OacFile& a, const engine::OacFile& b) {
    return std::make_pair(a.block, a.kind) < std::make_pair(b.block, b.kind);
  });
  int block = -1;
  for (size_t i = 0; i < files->size(); ++i) {
    const engine::OacFile& f = (*files)[i];
    if (f.block != block) {
      block = f.block;
      if (absl::Status s = faults_->Hit("gradient_upload", block); !s.ok()) {
        return FailJob(task, s);
      }
    }
    if (stop_.load()) {
      spdlog::warn("worker: dropping job {}: stopping", job_id);
      return TaskEnd::kDropped;
    }
    const GradientFile file{f.block, static_cast<int>(f.kind), f.path, f.sha256, f.bytes};
    const bool last = i + 1 == files->size();
    v1::UploadGradientFileResponse uploaded;
    const absl::Status u = Retry("UploadGradientFile", [&] {
      absl::StatusOr<v1::UploadGradientFileResponse> r =
          client_->UploadGradientFile(lease, job_id, gang_epoch, file, last, seconds);
      if (r.ok()) uploaded = *r;
      return r.status();
    });
    if (!u.ok()) {
      spdlog::warn("worker: dropping job {}: UploadGradientFile: {}", job_id, u.ToString());
      return TaskEnd::kDropped;
    }
    if (uploaded.cancel_job()) return TaskEnd::kCancelled;
  }
  spdlog::info("worker: job {}: gradient pass committed ({} files of rank {}, {:.2f} s)", job_id,
               files->size(), plan.rank, seconds);
  if (absl::Status s = faults_->Hit("gradient_done", 0); !s.ok()) return FailJob(task, s);
  return std::nullopt;
}

std::optional<Worker::TaskEnd> Worker::RestoreGradientPass(const v1::Task& task,
                                                           const v1::Lease& lease,
                                                           const engine::GangPlan& plan,
                                                           const std::string& scratch,
                                                           engine::JobSession& session) {
  const std::string& job_id = task.job_id();
  SetProgress(job_id, v1::JOB_STAGE_LOADING, -1);
  // The linears this rank solves, from the block it resumes at.
  std::vector<int> linears;
  for (engine::LinearKind k : engine::kAllLinears) {
    if (plan.Owns(k)) linears.push_back(static_cast<int>(k));
  }
  std::vector<GradientFile> fetched;
  if (!linears.empty()) {
    const absl::Status s = Retry("FetchGradientPass", [&] {
      absl::StatusOr<std::vector<GradientFile>> r =
          client_->FetchGradientPass(lease, job_id, session.next_block(), linears, scratch);
      if (r.ok()) fetched = *std::move(r);
      return r.status();
    });
    if (absl::IsDataLoss(s)) return FailJob(task, s);
    if (!s.ok()) {
      spdlog::warn("worker: dropping job {}: FetchGradientPass: {}", job_id, s.ToString());
      return TaskEnd::kDropped;
    }
  }
  std::vector<engine::OacFile> files;
  for (const GradientFile& g : fetched) {
    engine::OacFile f;
    f.block = g.block;
    f.kind = engine::kAllLinears[static_cast<size_t>(g.linear)];
    f.path = g.path;
    f.sha256 = g.sha256;
    f.bytes = g.size;
    files.push_back(std::move(f));
  }
  const size_t n = files.size();
  if (absl::Status s = session.RestoreGradientPass(std::move(files)); !s.ok()) {
    return FailJob(task, Annotate(s, "restoring the gradient pass"));
  }
  spdlog::info("worker: job {}: gradient pass restored ({} files from block {})", job_id, n,
               session.next_block());
  return std::nullopt;
}

}  // namespace qcal::worker
