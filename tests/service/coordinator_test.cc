// The coordinator core in-process, on a real RocksDB store and a simulated clock: idempotency and
// quotas per client, leases (expiry requeues, stale epochs refused), block commit points and the
// artifact-hash determinism check, restarts, and store write errors (NOT_SERVING until reopened).
#include "services/coordinator/coordinator.h"

#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/files.h"
#include "gtest/gtest.h"
#include "services/common/job_spec.h"
#include "services/coordinator/prometheus_metrics.h"
#include "services/coordinator/rocks_store.h"
#include "services/engine/model.h"
#include "services/engine/pipeline.h"
#include "tests/service/service_test_util.h"

namespace qcal::coordinator {
namespace {

namespace fs = std::filesystem;

// Forwards to a real store; Write fails while `fail` is set (a full disk, a failed fsync).
class FlakyStore final : public KvStore {
 public:
  FlakyStore(std::unique_ptr<KvStore> inner, std::atomic<bool>* fail)
      : inner_(std::move(inner)), fail_(fail) {}
  absl::Status Write(const WriteBatch& batch) override {
    if (fail_->load()) return absl::ResourceExhaustedError("injected: no space left on device");
    return inner_->Write(batch);
  }
  absl::StatusOr<std::optional<std::string>> Get(Column c, const std::string& key) override {
    return inner_->Get(c, key);
  }
  absl::Status Scan(
      Column c, const std::string& prefix,
      const std::function<bool(const std::string&, const std::string&)>& fn) override {
    return inner_->Scan(c, prefix, fn);
  }

 private:
  std::unique_ptr<KvStore> inner_;
  std::atomic<bool>* fail_;
};

class CoordinatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tree_ = testing::MakeServiceTree("coordinator_test");
    auto metrics = PrometheusMetrics::Create("");
    ASSERT_TRUE(metrics.ok());
    metrics_ = *std::move(metrics);
    options_.data_dir = tree_.data;
    options_.input_root = tree_.input;
    options_.output_root = tree_.output;
    options_.scheduler.lease = absl::Seconds(10);
    options_.scheduler.max_attempts = 3;
    options_.max_active_jobs_per_client = 3;
    Open();
  }
  void TearDown() override {
    coordinator_.reset();
    fs::remove_all(tree_.root);
  }

  void Open() {
    coordinator_.reset();
    const std::string dir = tree_.data + "/store";
    std::atomic<bool>* fail = &fail_writes_;
    StoreOpener opener = [dir, fail]() -> absl::StatusOr<std::unique_ptr<KvStore>> {
      auto s = RocksStore::Open({dir});
      if (!s.ok()) return s.status();
      return std::unique_ptr<KvStore>(std::make_unique<FlakyStore>(*std::move(s), fail));
    };
    auto c = Coordinator::Create(options_, opener, &clock_, metrics_.get(), &faults_);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = *std::move(c);
  }

  absl::StatusOr<v1::SubmitJobResponse> Submit(const std::string& client, const v1::JobSpec& spec,
                                               const std::string& key = "") {
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    request.set_idempotency_key(key);
    return coordinator_->SubmitJob(client, request);
  }

  v1::Lease Register(int threads = 1) {
    v1::RegisterWorkerRequest request;
    request.set_device_kind("cpu/test");
    request.set_threads(threads);
    auto r = coordinator_->RegisterWorker(request);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->lease() : v1::Lease();
  }

  std::optional<v1::Task> Acquire(const v1::Lease& lease) {
    v1::AcquireTaskRequest request;
    *request.mutable_lease() = lease;
    request.set_wait_ms(0);
    auto r = coordinator_->AcquireTask(request, absl::Now());
    EXPECT_TRUE(r.ok()) << r.status();
    if (!r.ok() || !r->has_task()) return std::nullopt;
    return r->task();
  }

  // A block's commit with made-up quantized bytes (the coordinator only hashes them) and
  // well-formed report entries; `salt` changes the bytes.
  absl::StatusOr<v1::CommitBlockResponse> Commit(const v1::Lease& lease, const std::string& job_id,
                                                 int block, const std::string& salt = "") {
    v1::CommitBlockHeader header;
    *header.mutable_lease() = lease;
    header.set_job_id(job_id);
    header.set_block(block);
    std::vector<std::string> artifacts;
    for (engine::LinearKind kind : engine::kAllLinears) {
      engine::LayerReport r;
      r.block = block;
      r.kind = kind;
      r.name = engine::LinearPrefix(block, kind);
      r.rel_error = 0.01;
      artifacts.push_back(absl::StrCat("quantized ", r.name, salt));
      v1::LayerManifest& m = *header.add_layers();
      m.set_name(r.name);
      m.set_sha256(Sha256Hex(artifacts.back()));
      m.set_size(static_cast<int64_t>(artifacts.back().size()));
      m.set_report_json(engine::LayerReportJson(r).dump());
    }
    return coordinator_->CommitBlock(header, artifacts);
  }

  testing::ServiceTree tree_;
  CoordinatorOptions options_;
  testing::FakeClock clock_;
  std::unique_ptr<PrometheusMetrics> metrics_;
  service::FaultInjector faults_;
  std::atomic<bool> fail_writes_{false};
  std::unique_ptr<Coordinator> coordinator_;
};

TEST_F(CoordinatorTest, IdempotencyIsPerClientAndComparesTheSpec) {
  auto first = Submit("alice", testing::TinySpec("a"), "key-1");
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->existing());
  EXPECT_EQ(first->job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(first->job().num_blocks(), 2);

  // The same spec spelled with explicit defaults is the same spec.
  v1::JobSpec explicit_defaults = testing::TinySpec("a");
  explicit_defaults.set_overwrite(false);
  auto again = Submit("alice", explicit_defaults, "key-1");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->existing());
  EXPECT_EQ(again->job().job_id(), first->job().job_id());

  v1::JobSpec other = testing::TinySpec("a");
  other.set_seed(2);
  auto conflict = Submit("alice", other, "key-1");
  EXPECT_TRUE(absl::IsAlreadyExists(conflict.status())) << conflict.status();
  EXPECT_NE(conflict.status().message().find(first->job().job_id()), std::string::npos);

  // Another client's key space is its own (but the output name is taken).
  auto bob = Submit("bob", testing::TinySpec("b"), "key-1");
  ASSERT_TRUE(bob.ok()) << bob.status();
  EXPECT_NE(bob->job().job_id(), first->job().job_id());
  EXPECT_TRUE(absl::IsAlreadyExists(Submit("bob", testing::TinySpec("a")).status()));

  auto jobs = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(jobs.ok());
  EXPECT_EQ(jobs->jobs_size(), 2);
}

TEST_F(CoordinatorTest, QuotaCountsActiveJobsPerClient) {
  for (int i = 0; i < 3; ++i)
    ASSERT_TRUE(Submit("alice", testing::TinySpec(absl::StrCat("q", i))).ok());
  auto over = Submit("alice", testing::TinySpec("q3"));
  EXPECT_TRUE(absl::IsResourceExhausted(over.status())) << over.status();
  EXPECT_TRUE(Submit("bob", testing::TinySpec("q4")).ok());
  // A cancelled job no longer counts.
  auto jobs = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(coordinator_->CancelJob(jobs->jobs(0).job_id()).ok());
  EXPECT_TRUE(Submit("alice", testing::TinySpec("q5")).ok());
}

TEST_F(CoordinatorTest, BadSpecsAreInvalidArgument) {
  v1::JobSpec spec = testing::TinySpec("x");
  spec.mutable_recipe()->mutable_weights()->set_bits(9);
  auto r = Submit("alice", spec);
  EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find("weights.bits"), std::string::npos) << r.status();
  spec = testing::TinySpec("x");
  spec.set_model("../input/tiny");
  r = Submit("alice", spec);
  EXPECT_TRUE(absl::IsInvalidArgument(r.status()));
  EXPECT_NE(r.status().message().find(".."), std::string::npos) << r.status();
  spec = testing::TinySpec("sub/dir");
  EXPECT_TRUE(absl::IsInvalidArgument(Submit("alice", spec).status()));
}

TEST_F(CoordinatorTest, ExpiredLeaseRequeuesAndStaleLeaseIsRefused) {
  auto job = Submit("alice", testing::TinySpec("a"));
  ASSERT_TRUE(job.ok());
  const std::string id = job->job().job_id();
  const v1::Lease w1 = Register();
  std::optional<v1::Task> task = Acquire(w1);
  ASSERT_TRUE(task.has_value());
  EXPECT_EQ(task->job_id(), id);
  EXPECT_EQ(task->attempt(), 1);
  EXPECT_EQ(task->threads(), 1);
  ASSERT_TRUE(Commit(w1, id, 0).ok());
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 1);

  clock_.Advance(absl::Seconds(11));
  coordinator_->Tick();
  EXPECT_EQ(coordinator_->GetJob(id)->state(), v1::JOB_STATE_QUEUED);
  v1::HeartbeatRequest hb;
  *hb.mutable_lease() = w1;
  EXPECT_TRUE(absl::IsFailedPrecondition(coordinator_->Heartbeat(hb).status()));
  EXPECT_TRUE(absl::IsFailedPrecondition(Commit(w1, id, 1).status()));

  // A worker with another thread count does not match the pinned job; one with 1 thread does.
  const v1::Lease w2 = Register(2);
  EXPECT_FALSE(Acquire(w2).has_value());
  const v1::Lease w3 = Register(1);
  EXPECT_GT(w3.epoch(), w1.epoch());
  task = Acquire(w3);
  ASSERT_TRUE(task.has_value());
  EXPECT_EQ(task->attempt(), 2);
  EXPECT_EQ(task->blocks_done(), 1);
}

TEST_F(CoordinatorTest, RecomputedBlocksMustMatchTheCommittedOnes) {
  auto job = Submit("alice", testing::TinySpec("a"));
  ASSERT_TRUE(job.ok());
  const std::string id = job->job().job_id();
  const v1::Lease w = Register();
  ASSERT_TRUE(Acquire(w).has_value());
  EXPECT_TRUE(absl::IsFailedPrecondition(Commit(w, id, 1).status()));  // out of order
  auto first = Commit(w, id, 0);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_FALSE(first->already_committed());
  auto same = Commit(w, id, 0);
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_TRUE(same->already_committed());
  auto different = Commit(w, id, 0, "-changed");
  EXPECT_TRUE(absl::IsAborted(different.status())) << different.status();
  const v1::Job failed = *coordinator_->GetJob(id);
  EXPECT_EQ(failed.state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(failed.error().find("determinism error"), std::string::npos) << failed.error();
}

TEST_F(CoordinatorTest, CancelStopsARunningJobAtTheNextBlockBoundary) {
  auto job = Submit("alice", testing::TinySpec("a"));
  const std::string id = job->job().job_id();
  const v1::Lease w = Register();
  ASSERT_TRUE(Acquire(w).has_value());
  auto cancelled = coordinator_->CancelJob(id);
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(cancelled->cancel_requested());
  auto commit = Commit(w, id, 0);
  ASSERT_TRUE(commit.ok()) << commit.status();
  EXPECT_TRUE(commit->cancel_job());
  EXPECT_EQ(coordinator_->GetJob(id)->state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(CoordinatorTest, RestartKeepsJobsAndLeases) {
  auto a = Submit("alice", testing::TinySpec("a"));
  auto b = Submit("alice", testing::TinySpec("b"));
  ASSERT_TRUE(a.ok() && b.ok());
  const v1::Lease w = Register();
  ASSERT_EQ(Acquire(w)->job_id(), a->job().job_id());
  ASSERT_TRUE(Commit(w, a->job().job_id(), 0).ok());
  Open();  // a restart on the same data dir
  auto jobs = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->jobs_size(), 2);
  EXPECT_EQ(jobs->jobs(0).state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(jobs->jobs(0).blocks_done(), 1);
  EXPECT_EQ(jobs->jobs(1).state(), v1::JOB_STATE_QUEUED);
  // The restored lease still holds its job and may go on committing.
  EXPECT_TRUE(Commit(w, a->job().job_id(), 1).ok());
  // Epochs keep growing across the restart.
  EXPECT_GT(Register().epoch(), w.epoch());
}

TEST_F(CoordinatorTest, StoreWriteErrorRefusesWritesUntilReopened) {
  std::vector<bool> health;
  coordinator_->SetServingCallback([&](bool serving) { health.push_back(serving); });
  ASSERT_TRUE(Submit("alice", testing::TinySpec("a")).ok());
  fail_writes_ = true;
  auto failed = Submit("alice", testing::TinySpec("b"));
  EXPECT_TRUE(absl::IsUnavailable(failed.status())) << failed.status();
  EXPECT_FALSE(coordinator_->serving());
  fail_writes_ = false;
  // Refused without touching the store until it is reopened.
  EXPECT_TRUE(absl::IsUnavailable(Submit("alice", testing::TinySpec("c")).status()));
  coordinator_->Tick();
  EXPECT_FALSE(coordinator_->serving());  // the reopen interval has not passed
  clock_.Advance(absl::Seconds(3));
  coordinator_->Tick();
  EXPECT_TRUE(coordinator_->serving());
  EXPECT_EQ(health, (std::vector<bool>{true, false, true}));
  auto jobs = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->jobs_size(), 1);  // the failed submit left nothing behind
  EXPECT_EQ(jobs->jobs(0).spec().output_name(), "a");
  EXPECT_TRUE(Submit("alice", testing::TinySpec("d")).ok());
  EXPECT_NE(metrics_->Text().find("qcal_store_write_errors_total 1"), std::string::npos);
}

TEST_F(CoordinatorTest, EventsFollowTheJob) {
  auto job = Submit("alice", testing::TinySpec("a"));
  const std::string id = job->job().job_id();
  int64_t cursor = 0;
  auto snapshot = coordinator_->Snapshot(id, &cursor);
  ASSERT_TRUE(snapshot.ok());
  EXPECT_EQ(snapshot->state(), v1::JOB_STATE_QUEUED);
  const v1::Lease w = Register();
  ASSERT_TRUE(Acquire(w).has_value());
  ASSERT_TRUE(Commit(w, id, 0).ok());
  std::vector<v1::ProgressEvent> events;
  bool done = false;
  ASSERT_TRUE(coordinator_->WaitForEvents(id, &cursor, absl::Now(), &events, &done).ok());
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(events[1].blocks_done(), 1);
  EXPECT_FALSE(done);
  ASSERT_TRUE(coordinator_->CancelJob(id).ok());
  ASSERT_TRUE(Commit(w, id, 1).ok());
  events.clear();
  ASSERT_TRUE(coordinator_->WaitForEvents(id, &cursor, absl::Now(), &events, &done).ok());
  EXPECT_TRUE(done);
  EXPECT_EQ(events.back().state(), v1::JOB_STATE_CANCELLED);
}

}  // namespace
}  // namespace qcal::coordinator
