#include "services/local/local_run.h"

#include <stdlib.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/server_builder.h"
#include "nlohmann/json.hpp"
#include "services/common/fault_injection.h"
#include "services/common/job_spec.h"
#include "services/common/rpc.h"
#include "services/coordinator/auth.h"
#include "services/coordinator/clock.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/grpc_services.h"
#include "services/coordinator/prometheus_metrics.h"
#include "services/coordinator/rocks_store.h"
#include "services/worker/worker.h"

namespace qcal::local {
namespace fs = std::filesystem;

namespace {

// A private directory, removed with everything in it when this goes away.
class TempDir {
 public:
  static absl::StatusOr<TempDir> Make(const std::string& parent) {
    std::string pattern = (fs::path(parent) / "qcal-local-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      return absl::UnavailableError(
          absl::StrCat(parent, ": cannot create a temporary directory: ", std::strerror(errno)));
    }
    return TempDir(pattern);
  }
  TempDir(TempDir&& o) noexcept : path_(std::move(o.path_)) { o.path_.clear(); }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// An absolute path relative to "/" (the local input root).
std::string UnderRoot(const std::string& path) {
  return fs::absolute(path).lexically_normal().relative_path().string();
}

absl::StatusOr<v1::JobSpec> SpecOf(const engine::JobOptions& j, int workers) {
  v1::JobSpec spec;
  spec.set_model(UnderRoot(j.model_dir));
  spec.set_calib(UnderRoot(j.calib_path));
  spec.set_samples(j.samples);
  spec.set_seq_len(j.seq_len);
  spec.set_seed(j.seed);
  *spec.mutable_recipe() = service::RecipeToProto(j.recipe);
  spec.set_output_name(fs::absolute(j.out_dir).lexically_normal().filename().string());
  if (!j.eval_text.empty()) {
    spec.set_eval_text(UnderRoot(j.eval_text));
    if (j.eval_seq_len > 0) spec.set_eval_seq_len(j.eval_seq_len);
    spec.set_eval_max_windows(j.eval_max_windows);
  }
  spec.set_overwrite(j.overwrite);
  spec.mutable_workers()->set_min(workers);
  spec.mutable_workers()->set_max(workers);
  spec.set_shard_size(j.shard_size);
  spec.set_compute_dtype(j.compute_dtype);
  return spec;
}

}  // namespace

absl::Status LocalRunOptions::Validate() const {
  QCAL_RETURN_IF_ERROR(job.Validate());
  if (workers < 1 || workers > 64) {
    return absl::InvalidArgumentError(absl::StrCat("--workers must be in 1..64, got ", workers));
  }
  return absl::OkStatus();
}

absl::StatusOr<engine::JobResult> RunLocalJob(const LocalRunOptions& options,
                                              const engine::JobLogFn& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  const engine::JobOptions& job = options.job;
  const fs::path out = fs::absolute(job.out_dir).lexically_normal();
  if (out.filename().empty() || out.filename().string().front() == '.') {
    return absl::InvalidArgumentError(
        absl::StrCat("--out \"", job.out_dir, "\": name the output directory itself"));
  }
  const std::string output_root = out.parent_path().string();
  std::error_code ec;
  if (!fs::is_directory(output_root, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out: the parent directory \"", output_root, "\" does not exist"));
  }
  // The same refusals as the engine's local run (pipeline.cc), before anything starts; an empty
  // directory in the way is removed (the coordinator only creates its output).
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) {
    return absl::AlreadyExistsError(
        absl::StrCat(out.string(), ": output path exists and is not a directory"));
  }
  if (fs::is_directory(out, ec) && !fs::is_empty(out, ec)) {
    if (!job.overwrite) {
      return absl::AlreadyExistsError(absl::StrCat(
          out.string(), ": output directory is not empty (use --overwrite to replace it)"));
    }
  } else if (fs::is_directory(out, ec)) {
    fs::remove(out, ec);
  }
  std::string scratch = job.scratch_dir;
  if (scratch.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    scratch = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  }
  QCAL_ASSIGN_OR_RETURN(TempDir temp, TempDir::Make(scratch));
  QCAL_ASSIGN_OR_RETURN(v1::JobSpec spec, SpecOf(job, options.workers));

  coordinator::CoordinatorOptions co;
  co.data_dir = temp.path();
  co.input_root = "/";
  co.output_root = output_root;
  QCAL_ASSIGN_OR_RETURN(auto metrics, coordinator::PrometheusMetrics::Create({}));
  coordinator::RealClock clock;
  service::FaultInjector no_faults;
  const std::string store_dir = (fs::path(temp.path()) / "store").string();
  coordinator::StoreOpener opener =
      [store_dir]() -> absl::StatusOr<std::unique_ptr<coordinator::KvStore>> {
    QCAL_ASSIGN_OR_RETURN(std::unique_ptr<coordinator::RocksStore> s,
                          coordinator::RocksStore::Open({store_dir}));
    return std::unique_ptr<coordinator::KvStore>(std::move(s));
  };
  QCAL_ASSIGN_OR_RETURN(
      auto coord, coordinator::Coordinator::Create(co, opener, &clock, metrics.get(), &no_faults));
  coordinator::Authenticator auth;
  coordinator::WorkerGrpcService worker_service(coord.get(), &auth, metrics.get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(rpc::kMaxMessageBytes);
  builder.SetMaxSendMessageSize(rpc::kMaxMessageBytes);
  builder.RegisterService(&worker_service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) return absl::UnavailableError("cannot listen on 127.0.0.1");

  std::atomic<bool> stop{false};
  std::thread ticker([&] {
    while (!stop.load()) {
      coord->Tick();
      absl::SleepFor(absl::Milliseconds(50));
    }
  });
  std::vector<std::unique_ptr<worker::Worker>> workers;
  std::vector<std::thread> threads;
  std::vector<absl::Status> worker_status(static_cast<size_t>(options.workers));
  // Stops everything started so far, in reverse order.
  auto shut_down = [&] {
    for (auto& w : workers) w->Stop();
    for (std::thread& t : threads) t.join();
    coord->Shutdown();
    server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    stop.store(true);
    ticker.join();
  };
  absl::Status started;
  for (int i = 0; i < options.workers && started.ok(); ++i) {
    worker::WorkerOptions wo;
    wo.coordinator.address = absl::StrCat("127.0.0.1:", port);
    wo.input_root = "/";
    wo.output_root = output_root;
    wo.device = job.device;
    wo.threads = job.threads;
    wo.scratch_dir = scratch;
    absl::StatusOr<std::unique_ptr<worker::Worker>> w = worker::Worker::Create(wo, &no_faults);
    if (!w.ok()) {
      started = w.status();
      break;
    }
    workers.push_back(*std::move(w));
    worker::Worker* wp = workers.back().get();
    absl::Status* slot = &worker_status[static_cast<size_t>(i)];
    threads.emplace_back([wp, slot] { *slot = wp->Run(); });
  }
  if (!started.ok()) {
    shut_down();
    return started;
  }

  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  absl::StatusOr<v1::SubmitJobResponse> submitted = coord->SubmitJob("local", request);
  if (!submitted.ok()) {
    shut_down();
    return submitted.status();
  }
  const std::string job_id = submitted->job().job_id();
  int64_t cursor = 0;
  bool done = false;
  absl::Status watched;
  while (!done && watched.ok()) {
    std::vector<v1::ProgressEvent> events;
    watched = coord->WaitForEvents(job_id, &cursor, absl::Now() + absl::Seconds(1), &events, &done);
    for (const v1::ProgressEvent& e : events) {
      if (log && !e.message().empty()) log(e.message());
    }
  }
  absl::StatusOr<v1::Job> final_job = coord->GetJob(job_id);
  shut_down();
  QCAL_RETURN_IF_ERROR(watched);
  QCAL_RETURN_IF_ERROR(final_job.status());
  if (final_job->state() != v1::JOB_STATE_SUCCEEDED) {
    return absl::AbortedError(
        absl::StrCat("job ", service::JobStateName(final_job->state()), ": ", final_job->error()));
  }

  engine::JobResult result;
  result.out_dir = out.string();
  std::ifstream report_in(out / "qcal_report.json");
  result.report = nlohmann::ordered_json::parse(report_in, nullptr, /*allow_exceptions=*/false);
  if (!result.report.is_object()) {
    return absl::DataLossError(absl::StrCat((out / "qcal_report.json").string(), ": not JSON"));
  }
  if (final_job->has_result()) {
    result.has_perplexity = true;
    result.perplexity = final_job->result().perplexity();
    result.perplexity_fp = final_job->result().perplexity_fp();
  }
  std::ifstream run_in(out / "qcal_run.json");
  const nlohmann::json run = nlohmann::json::parse(run_in, nullptr, /*allow_exceptions=*/false);
  if (run.is_object()) {
    result.peak_rss_bytes = run.value("peak_rss_bytes", int64_t{0});
    result.peak_device_bytes = run.value("peak_device_bytes", int64_t{-1});
  }
  return result;
}

}  // namespace qcal::local
