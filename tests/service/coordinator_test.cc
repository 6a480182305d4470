// The coordinator core in-process, on a real RocksDB store and a simulated clock: idempotency and
// quotas per client, leases (expiry requeues, stale epochs refused), block commit points and the
// artifact-hash determinism check, gradient-pass files (per owner, the pass's done mark, the same
// check, resume), restarts, and store write errors (NOT_SERVING until reopened).
#include "services/coordinator/coordinator.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/coordinator/prometheus_metrics.h"
#include "services/coordinator/rocks_store.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"
#include "services/engine/pipeline.h"
#include "tests/service/service_test_util.h"
#include "tests/support/test_paths.h"

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
    auto metrics = PrometheusMetrics::Create({});
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

  // Layers of a block with made-up quantized bytes (the coordinator only hashes them) and
  // well-formed report entries; `salt` changes the bytes. `layers`: indices in forward order (all
  // seven by default); `gang_epoch` 0: the job's current one.
  absl::StatusOr<v1::CommitBlockResponse> Commit(const v1::Lease& lease, const std::string& job_id,
                                                 int block, const std::string& salt = "",
                                                 std::vector<int> layers = {0, 1, 2, 3, 4, 5, 6},
                                                 uint64_t gang_epoch = 0) {
    std::vector<std::pair<engine::LinearId, std::string>> named;
    for (int l : layers) {
      const engine::LinearKind kind = engine::kAllLinears[static_cast<size_t>(l)];
      named.emplace_back(kind, engine::LinearPrefix(block, kind));
    }
    return CommitNamed(lease, job_id, block, named, salt, gang_epoch);
  }
  // The same for linears given by id and name (an MoE block's experts: CommitBlockHeader's
  // layer_expert is sent when one of them is an expert's, as the worker does).
  absl::StatusOr<v1::CommitBlockResponse> CommitNamed(
      const v1::Lease& lease, const std::string& job_id, int block,
      const std::vector<std::pair<engine::LinearId, std::string>>& layers,
      const std::string& salt = "", uint64_t gang_epoch = 0) {
    v1::CommitBlockHeader header;
    *header.mutable_lease() = lease;
    header.set_job_id(job_id);
    header.set_block(block);
    if (gang_epoch == 0) {
      auto job = coordinator_->GetJob(job_id);
      if (job.ok()) gang_epoch = job->gang_epoch();
    }
    header.set_gang_epoch(gang_epoch);
    const bool experts = std::any_of(layers.begin(), layers.end(), [](const auto& l) {
      return l.first.expert != engine::kNoExpert;
    });
    std::vector<std::string> artifacts;
    for (const auto& [lid, name] : layers) {
      engine::LayerReport r;
      r.block = block;
      r.kind = lid.kind;
      r.expert = lid.expert;
      r.name = name;
      r.rel_error = 0.01;
      artifacts.push_back(absl::StrCat("quantized ", r.name, salt));
      header.add_layer_index(static_cast<int>(lid.kind));
      if (experts) header.add_layer_expert(lid.expert);
      v1::LayerManifest& m = *header.add_layers();
      m.set_name(r.name);
      m.set_sha256(Sha256Hex(artifacts.back()));
      m.set_size(static_cast<int64_t>(artifacts.back().size()));
      m.set_report_json(engine::LayerReportJson(r).dump());
    }
    return coordinator_->CommitBlock(header, artifacts);
  }

  // One gradient-pass file with `bytes` as its content (the coordinator only hashes it), under the
  // job's current gang epoch; `sha256` "" means the content's.
  absl::StatusOr<v1::UploadGradientFileResponse> UploadGradient(const v1::Lease& lease,
                                                                const std::string& job_id,
                                                                int block, int linear,
                                                                const std::string& bytes,
                                                                const std::string& sha256 = "") {
    v1::GradientFileHeader header;
    *header.mutable_lease() = lease;
    header.set_job_id(job_id);
    auto job = coordinator_->GetJob(job_id);
    if (job.ok()) header.set_gang_epoch(job->gang_epoch());
    v1::GradientFileManifest& f = *header.mutable_file();
    f.set_block(block);
    f.set_linear(linear);
    f.set_sha256(sha256.empty() ? Sha256Hex(bytes) : sha256);
    f.set_size(static_cast<int64_t>(bytes.size()));
    QCAL_ASSIGN_OR_RETURN(std::unique_ptr<GradientUpload> upload,
                          coordinator_->BeginGradientFile(header));
    QCAL_RETURN_IF_ERROR(upload->Append(bytes));
    return coordinator_->CommitGradientFile(*upload);
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

TEST_F(CoordinatorTest, GradientFilesAreCommittedPerOwnerHashedAndResumed) {
  v1::JobSpec spec = testing::TinySpec("oac");
  spec.mutable_recipe()->set_hessian("output_adaptive");
  auto job = Submit("alice", spec);
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  auto layer_job = Submit("alice", testing::TinySpec("layer"));
  ASSERT_TRUE(layer_job.ok());
  const v1::Lease w = Register();
  std::optional<v1::Task> task = Acquire(w);
  ASSERT_TRUE(task.has_value());
  ASSERT_EQ(task->job_id(), id);
  EXPECT_FALSE(task->gradient_pass_done());
  auto content = [](int b, int l) {
    return absl::StrCat("statistics of block ", b, " linear ", l);
  };

  // The tiny model has 2 blocks: 14 files; the last one marks the pass done.
  for (int b = 0; b < 2; ++b) {
    for (int l = 0; l < engine::kNumLinears; ++l) {
      if (b == 1 && l == 6) continue;
      auto r = UploadGradient(w, id, b, l, content(b, l));
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_FALSE(r->already_committed());
      EXPECT_FALSE(r->pass_complete());
    }
  }
  EXPECT_FALSE(coordinator_->GetJob(id)->gradient_pass_done());
  v1::FetchGradientPassRequest fetch;
  *fetch.mutable_lease() = w;
  fetch.set_job_id(id);
  fetch.set_from_block(1);
  fetch.add_linears(0);
  fetch.add_linears(6);
  EXPECT_TRUE(absl::IsFailedPrecondition(coordinator_->PrepareGradientFetch(fetch).status()));
  // Bad uploads: a hash that does not match, a block out of range.
  auto bad = UploadGradient(w, id, 1, 6, content(1, 6), std::string(64, '0'));
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status())) << bad.status();
  EXPECT_TRUE(absl::IsFailedPrecondition(UploadGradient(w, id, 2, 0, "x").status()));
  // A recomputed file that matches is compared, not stored again.
  auto same = UploadGradient(w, id, 0, 3, content(0, 3));
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_TRUE(same->already_committed());
  auto last = UploadGradient(w, id, 1, 6, content(1, 6));
  ASSERT_TRUE(last.ok()) << last.status();
  EXPECT_TRUE(last->pass_complete());
  EXPECT_TRUE(coordinator_->GetJob(id)->gradient_pass_done());

  // A restart keeps the pass; the new plan's task says so, and the files come back by hash.
  Open();
  task = Acquire(w);
  ASSERT_TRUE(task.has_value());
  ASSERT_EQ(task->job_id(), id);
  EXPECT_TRUE(task->gradient_pass_done());
  auto plan = coordinator_->PrepareGradientFetch(fetch);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->header.files_size(), 2);
  ASSERT_EQ(plan->paths.size(), 2u);
  EXPECT_EQ(plan->header.files(1).block(), 1);
  EXPECT_EQ(plan->header.files(1).linear(), 6);
  EXPECT_EQ(plan->header.files(1).sha256(), Sha256Hex(content(1, 6)));
  EXPECT_EQ(*ReadFileToString(plan->paths[1]), content(1, 6));

  // A recomputed file that differs fails the job as a determinism error.
  auto different = UploadGradient(w, id, 0, 0, "other statistics");
  EXPECT_TRUE(absl::IsAborted(different.status())) << different.status();
  auto failed = coordinator_->GetJob(id);
  EXPECT_EQ(failed->state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(failed->error().find("determinism error: gradient-pass statistics of "
                                 "model.layers.0.self_attn.q_proj"),
            std::string::npos)
      << failed->error();
  EXPECT_FALSE(fs::exists(tree_.data + "/artifacts/" + id));

  // A job whose recipe has no pass takes no files.
  task = Acquire(w);
  ASSERT_TRUE(task.has_value());
  ASSERT_EQ(task->job_id(), layer_job->job().job_id());
  auto refused = UploadGradient(w, task->job_id(), 0, 0, "x");
  EXPECT_TRUE(absl::IsFailedPrecondition(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("hessian"), std::string::npos);
}

TEST_F(CoordinatorTest, InAGangEachOwnerCommitsTheStatisticsOfItsLinears) {
  v1::JobSpec spec = testing::TinySpec("g");
  spec.mutable_recipe()->set_hessian("output_adaptive_token");
  spec.mutable_workers()->set_min(2);
  auto job = Submit("alice", spec);
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  const v1::Lease w[2] = {Register(), Register()};
  std::optional<v1::Task> t[2] = {Acquire(w[0]), Acquire(w[1])};
  ASSERT_TRUE(t[0].has_value() && t[1].has_value());
  // By rank: the forward-order positions it owns.
  std::vector<int> owned[2];
  for (int r = 0; r < 2; ++r) {
    const v1::GangMember& m = t[0]->gang().members(r);
    owned[r].assign(m.owned_linears().begin(), m.owned_linears().end());
    ASSERT_FALSE(owned[r].empty());
  }
  const int rank_of_w0 = t[0]->gang().rank();
  auto foreign = UploadGradient(w[0], id, 0, owned[1 - rank_of_w0][0], "x");
  EXPECT_TRUE(absl::IsFailedPrecondition(foreign.status())) << foreign.status();
  EXPECT_NE(foreign.status().message().find("does not own"), std::string::npos);
  // Rank by rank: the pass is done with the other rank's last file, not before.
  for (int r = 0; r < 2; ++r) {
    const v1::Lease& lease = w[r == rank_of_w0 ? 0 : 1];
    for (int b = 0; b < 2; ++b) {
      for (int l : owned[r]) {
        auto up = UploadGradient(lease, id, b, l, absl::StrCat("statistics ", b, " ", l));
        ASSERT_TRUE(up.ok()) << up.status();
        const bool last = r == 1 && b == 1 && l == owned[1].back();
        EXPECT_EQ(up->pass_complete(), last) << r << " " << b << " " << l;
      }
    }
  }
  EXPECT_TRUE(coordinator_->GetJob(id)->gradient_pass_done());
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

TEST_F(CoordinatorTest, RestartKeepsJobsAndLeasesAndReplansUnderANewGangEpoch) {
  auto a = Submit("alice", testing::TinySpec("a"));
  auto b = Submit("alice", testing::TinySpec("b"));
  ASSERT_TRUE(a.ok() && b.ok());
  const std::string id = a->job().job_id();
  const v1::Lease w = Register();
  std::optional<v1::Task> task = Acquire(w);
  ASSERT_EQ(task->job_id(), id);
  const uint64_t old_epoch = task->gang().gang_epoch();
  ASSERT_TRUE(Commit(w, id, 0).ok());
  Open();  // a restart on the same data dir
  auto jobs = coordinator_->ListJobs(v1::ListJobsRequest());
  ASSERT_TRUE(jobs.ok());
  ASSERT_EQ(jobs->jobs_size(), 2);
  EXPECT_EQ(jobs->jobs(0).state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(jobs->jobs(0).blocks_done(), 1);
  EXPECT_GT(jobs->jobs(0).gang_epoch(), old_epoch);
  EXPECT_EQ(jobs->jobs(0).attempts(), 1) << "a restart counts no attempt";
  EXPECT_EQ(jobs->jobs(1).state(), v1::JOB_STATE_QUEUED);
  // The old plan is stale: refused, and the heartbeat says drop.
  EXPECT_TRUE(
      absl::IsFailedPrecondition(Commit(w, id, 1, "", {0, 1, 2, 3, 4, 5, 6}, old_epoch).status()));
  v1::HeartbeatRequest hb;
  *hb.mutable_lease() = w;
  hb.set_job_id(id);
  hb.set_gang_epoch(old_epoch);
  auto beat = coordinator_->Heartbeat(hb);
  ASSERT_TRUE(beat.ok()) << beat.status();
  EXPECT_TRUE(beat->drop_task());
  // The restored lease asks again and goes on under the new plan.
  task = Acquire(w);
  ASSERT_TRUE(task.has_value());
  EXPECT_EQ(task->job_id(), id);
  EXPECT_EQ(task->gang().gang_epoch(), jobs->jobs(0).gang_epoch());
  EXPECT_EQ(task->blocks_done(), 1);
  hb.set_gang_epoch(task->gang().gang_epoch());
  EXPECT_FALSE(coordinator_->Heartbeat(hb)->drop_task());
  EXPECT_TRUE(Commit(w, id, 1).ok());
  // Epochs keep growing across the restart.
  EXPECT_GT(Register().epoch(), w.epoch());
}

TEST_F(CoordinatorTest, AGangGetsOnePlanAndOwnersCommitTheirLayers) {
  v1::JobSpec spec = testing::TinySpec("g");
  spec.mutable_workers()->set_min(2);
  auto job = Submit("alice", spec);
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  EXPECT_EQ(job->job().spec().workers().max(), 2);
  v1::RegisterWorkerRequest request;
  request.set_device_kind("cpu/test");
  request.set_threads(1);
  request.set_peer_address("127.0.0.1:7001");
  const v1::Lease w1 = coordinator_->RegisterWorker(request)->lease();
  EXPECT_FALSE(Acquire(w1).has_value()) << "min 2";
  request.set_peer_address("127.0.0.1:7002");
  const v1::Lease w2 = coordinator_->RegisterWorker(request)->lease();
  std::optional<v1::Task> t2 = Acquire(w2);
  std::optional<v1::Task> t1 = Acquire(w1);
  ASSERT_TRUE(t1.has_value() && t2.has_value());
  const v1::GangPlan& plan = t1->gang();
  EXPECT_EQ(plan.gang_epoch(), t2->gang().gang_epoch());
  EXPECT_EQ(plan.world(), 2);
  EXPECT_EQ(plan.rank(), 0);
  EXPECT_EQ(t2->gang().rank(), 1);
  EXPECT_EQ(plan.total_chunks(), 2);  // 16 samples
  ASSERT_EQ(plan.members_size(), 2);
  EXPECT_EQ(plan.members(0).worker_id(), w1.worker_id());
  EXPECT_EQ(plan.members(1).peer_address(), "127.0.0.1:7002");
  EXPECT_EQ(plan.members(0).chunk_begin(), 0);
  EXPECT_EQ(plan.members(0).chunk_end(), 1);
  EXPECT_EQ(plan.members(1).chunk_end(), 2);
  std::vector<int> owned[2];
  for (int r = 0; r < 2; ++r) {
    owned[r].assign(plan.members(r).owned_linears().begin(), plan.members(r).owned_linears().end());
    EXPECT_FALSE(owned[r].empty()) << r;
  }
  EXPECT_EQ(owned[0].size() + owned[1].size(), 7u);
  const v1::Job running = *coordinator_->GetJob(id);
  EXPECT_EQ(running.gang_size(), 2);
  EXPECT_EQ(running.gang_epoch(), plan.gang_epoch());

  // A layer the sender does not own, and a stale epoch, are refused.
  auto foreign = Commit(w1, id, 0, "", {owned[1][0]});
  EXPECT_TRUE(absl::IsFailedPrecondition(foreign.status())) << foreign.status();
  EXPECT_NE(foreign.status().message().find("does not own"), std::string::npos);
  EXPECT_TRUE(absl::IsFailedPrecondition(
      Commit(w1, id, 0, "", owned[0], plan.gang_epoch() + 100).status()));
  // Rank 1's layers, then rank 0's: the block completes with the last of the seven.
  auto part = Commit(w2, id, 0, "", owned[1]);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_FALSE(part->block_complete());
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 0);
  // Block 1 may arrive before block 0 completes (one block ahead), block 2 may not.
  ASSERT_TRUE(Commit(w2, id, 1, "", owned[1]).ok());
  auto rest = Commit(w1, id, 0, "", owned[0]);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(rest->block_complete());
  EXPECT_FALSE(rest->already_committed());
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 1);
  // A re-sent layer is compared, not stored again.
  auto again = Commit(w2, id, 0, "", owned[1]);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_committed());
  EXPECT_TRUE(again->block_complete());

  // Rank 1 finishes its part and leaves; rank 0 cannot complete before every block is in.
  ASSERT_TRUE(Commit(w1, id, 1, "", owned[0]).ok());
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 2);
  v1::CompleteTaskRequest done;
  *done.mutable_lease() = w2;
  done.set_job_id(id);
  done.set_gang_epoch(plan.gang_epoch());
  done.set_member_done(true);
  auto left = coordinator_->CompleteTask(done);
  ASSERT_TRUE(left.ok()) << left.status();
  EXPECT_EQ(left->state(), v1::JOB_STATE_RUNNING);
  EXPECT_TRUE(absl::IsFailedPrecondition(Commit(w2, id, 1, "", owned[1]).status()));
}

// A mixture-of-experts model (docs/MOE.md, "The service"): the plan gives each member expert units
// as well as linears; a block commits expert linears named by kind and expert, each from its
// unit's owner, and is done when q, k, v, o and every unit's three linears are in (a dense block of
// the same model: its seven).
TEST_F(CoordinatorTest, AnMoeBlockCommitsEveryExpertLinearFromItsUnitsOwner) {
  // The tiny model's config as a Qwen3-MoE with three experts and block 0 dense: the coordinator
  // reads only the config and the safetensors headers.
  const std::string config_path = tree_.input + "/tiny/config.json";
  nlohmann::json j = nlohmann::json::parse(*ReadFileToString(config_path));
  j["model_type"] = "qwen3_moe";
  j["num_experts"] = 3;
  j["num_experts_per_tok"] = 2;
  j["moe_intermediate_size"] = 64;
  j["mlp_only_layers"] = {0};
  ASSERT_TRUE(WriteStringToFile(config_path, j.dump()).ok());
  absl::StatusOr<ModelConfig> config = ParseModelConfig(j.dump(), "config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  ASSERT_EQ(config->num_layers, 2);

  v1::JobSpec spec = testing::TinySpec("moe");
  spec.mutable_workers()->set_min(2);
  auto job = Submit("alice", spec);
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  const v1::Lease w1 = Register(), w2 = Register();
  std::optional<v1::Task> t2 = Acquire(w2);
  std::optional<v1::Task> t1 = Acquire(w1);
  ASSERT_TRUE(t1.has_value() && t2.has_value());
  const v1::GangPlan& plan = t1->gang();
  // The engine's plan, member by member.
  const engine::GangPlan expected = engine::MakeGangPlan(*config, 16, 2, 0, plan.gang_epoch());
  std::vector<int> units;
  for (int r = 0; r < 2; ++r) {
    for (int u : plan.members(r).owned_expert_units()) {
      EXPECT_EQ(expected.ExpertOwner(u), r) << u;
      units.push_back(u);
    }
  }
  std::sort(units.begin(), units.end());
  EXPECT_EQ(units, (std::vector<int>{0, 1, 2}));
  const v1::Lease lease[2] = {w1, w2};

  // Each rank's linears of block b, from the engine's plan.
  auto owned = [&](int b, int rank) {
    std::vector<engine::LinearId> ids;
    for (const engine::LinearId& lid : engine::BlockLinears(*config, b)) {
      if (expected.LinearOwner(*config, lid) == rank) ids.push_back(lid);
    }
    return ids;
  };
  auto commit = [&](int rank, int b, const std::vector<engine::LinearId>& ids,
                    const std::string& name_suffix = "") {
    std::vector<std::pair<engine::LinearId, std::string>> named;
    for (const engine::LinearId& lid : ids) {
      named.emplace_back(lid, engine::LinearPrefix(*config, b, lid) + name_suffix);
    }
    return CommitNamed(lease[rank], id, b, named);
  };

  // Block 0 is dense: its seven linears, as for a dense model.
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(commit(r, 0, owned(0, r)).ok()) << r;
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 1);

  // Block 1: an expert linear of a unit the sender does not own; a dense MLP linear the MoE
  // block does not have; an expert that does not exist; a name that is not the linear's.
  const int stranger = expected.ExpertOwner(0) == 0 ? 1 : 0;
  auto foreign = commit(stranger, 1, {engine::LinearId(engine::LinearKind::kDown, 0)});
  EXPECT_TRUE(absl::IsFailedPrecondition(foreign.status())) << foreign.status();
  EXPECT_NE(foreign.status().message().find("does not own model.layers.1.mlp.experts.0.down_proj"),
            std::string::npos)
      << foreign.status();
  const int gate_owner = expected.OwnerOf(engine::LinearKind::kGate);
  EXPECT_TRUE(absl::IsInvalidArgument(commit(gate_owner, 1, {engine::LinearKind::kGate}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      commit(0, 1, {engine::LinearId(engine::LinearKind::kUp, 3)}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      commit(expected.ExpertOwner(0), 1, {engine::LinearId(engine::LinearKind::kUp, 0)}, "x")
          .status()));
  // Rank 1's, then rank 0's: the block is done with the last of its 4 + 3·3 linears.
  const std::vector<engine::LinearId> mine[2] = {owned(1, 0), owned(1, 1)};
  EXPECT_EQ(mine[0].size() + mine[1].size(), 13u);
  auto part = commit(1, 1, mine[1]);
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_FALSE(part->block_complete());
  auto rest = commit(0, 1, mine[0]);
  ASSERT_TRUE(rest.ok()) << rest.status();
  EXPECT_TRUE(rest->block_complete());
  EXPECT_EQ(coordinator_->GetJob(id)->blocks_done(), 2);
  // Resent, the expert linears are compared, not stored again.
  auto again = commit(1, 1, mine[1]);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->already_committed());
}

TEST_F(CoordinatorTest, ALostMemberReplansTheGangAndAbandonReplansAgain) {
  v1::JobSpec spec = testing::TinySpec("g");
  spec.mutable_workers()->set_min(1);
  spec.mutable_workers()->set_max(3);
  const std::string id = Submit("alice", spec)->job().job_id();
  const v1::Lease w1 = Register();
  const v1::Lease w2 = Register();
  const v1::Lease w3 = Register();
  std::optional<v1::Task> t = Acquire(w1);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->gang().world(), 3);
  ASSERT_TRUE(Acquire(w2).has_value());
  ASSERT_TRUE(Acquire(w3).has_value());
  int64_t cursor = 0;
  ASSERT_TRUE(coordinator_->Snapshot(id, &cursor).ok());
  // w2 stops heartbeating.
  clock_.Advance(absl::Seconds(6));
  for (const v1::Lease& w : {w1, w3}) {
    v1::HeartbeatRequest hb;
    *hb.mutable_lease() = w;
    ASSERT_TRUE(coordinator_->Heartbeat(hb).ok());
  }
  clock_.Advance(absl::Seconds(5));
  coordinator_->Tick();
  v1::Job job = *coordinator_->GetJob(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(job.gang_size(), 2);
  EXPECT_GT(job.gang_epoch(), t->gang().gang_epoch());
  EXPECT_EQ(job.attempts(), 2);
  EXPECT_EQ(job.gang(1).worker_id(), w3.worker_id());
  std::vector<v1::ProgressEvent> events;
  bool done = false;
  ASSERT_TRUE(coordinator_->WaitForEvents(id, &cursor, absl::Now(), &events, &done).ok());
  ASSERT_FALSE(events.empty());
  EXPECT_NE(events.back().message().find(
                absl::StrCat("re-planned on 2 workers: the lease of ", w2.worker_id(), " expired")),
            std::string::npos)
      << events.back().message();
  // Members get the new plan when they ask.
  std::optional<v1::Task> t3 = Acquire(w3);
  ASSERT_TRUE(t3.has_value());
  EXPECT_EQ(t3->gang().rank(), 1);
  EXPECT_EQ(t3->gang().gang_epoch(), job.gang_epoch());
  // AbandonTask under a stale epoch is refused; under the current one it re-plans.
  v1::AbandonTaskRequest abandon;
  *abandon.mutable_lease() = w3;
  abandon.set_job_id(id);
  abandon.set_gang_epoch(t->gang().gang_epoch());
  abandon.set_reason("peer unreachable");
  EXPECT_TRUE(absl::IsFailedPrecondition(coordinator_->AbandonTask(abandon)));
  abandon.set_gang_epoch(job.gang_epoch());
  ASSERT_TRUE(coordinator_->AbandonTask(abandon).ok());
  job = *coordinator_->GetJob(id);
  EXPECT_EQ(job.attempts(), 3);
  EXPECT_EQ(job.gang_size(), 2);
  // max_attempts 3: the next abandon fails the job.
  abandon.set_gang_epoch(job.gang_epoch());
  ASSERT_TRUE(coordinator_->AbandonTask(abandon).ok());
  EXPECT_EQ(coordinator_->GetJob(id)->state(), v1::JOB_STATE_FAILED);
}

TEST_F(CoordinatorTest, BoundariesArePerChunkAndUsableOnlyWhenComplete) {
  v1::JobSpec spec = testing::TinySpec("g");
  spec.mutable_workers()->set_min(2);
  const std::string id = Submit("alice", spec)->job().job_id();
  const v1::Lease w1 = Register();
  const v1::Lease w2 = Register();
  std::optional<v1::Task> t1 = Acquire(w1);
  ASSERT_TRUE(t1.has_value());
  ASSERT_TRUE(Acquire(w2).has_value());
  const uint64_t epoch = t1->gang().gang_epoch();
  std::vector<int> owned[2];
  for (int r = 0; r < 2; ++r) {
    const auto& m = t1->gang().members(r);
    owned[r].assign(m.owned_linears().begin(), m.owned_linears().end());
  }
  auto upload = [&](const v1::Lease& lease, int block, int chunk,
                    const std::string& bytes) -> absl::Status {
    v1::ActivationsHeader h;
    *h.mutable_lease() = lease;
    h.set_job_id(id);
    h.set_block(block);
    h.set_chunk(chunk);
    h.set_gang_epoch(epoch);
    h.set_sha256(Sha256Hex(bytes));
    h.set_size(static_cast<int64_t>(bytes.size()));
    auto u = coordinator_->BeginActivations(h);
    if (!u.ok()) return u.status();
    if (absl::Status s = (*u)->Append(bytes); !s.ok()) return s;
    return coordinator_->CommitActivations(**u).status();
  };
  for (int b = 0; b < 2; ++b) {
    ASSERT_TRUE(Commit(w1, id, b, "", owned[0]).ok());
    ASSERT_TRUE(Commit(w2, id, b, "", owned[1]).ok());
  }
  // Chunk 1 is rank 1's: rank 0 may not upload it.
  EXPECT_TRUE(absl::IsFailedPrecondition(upload(w1, 1, 1, "x")));
  ASSERT_TRUE(upload(w1, 1, 0, "boundary 1 chunk 0").ok());
  EXPECT_EQ(coordinator_->GetJob(id)->checkpoint_block(), 0) << "one of two chunks";
  ASSERT_TRUE(upload(w2, 1, 1, "boundary 1 chunk 1").ok());
  EXPECT_EQ(coordinator_->GetJob(id)->checkpoint_block(), 1);
  const fs::path b1 = fs::path(tree_.data) / "activations" / id / "block-000001";
  EXPECT_TRUE(fs::exists(b1 / "chunk-000001.safetensors"));
  // The same chunk again must carry the same bytes.
  ASSERT_TRUE(upload(w2, 1, 1, "boundary 1 chunk 1").ok());

  // FetchResume of one chunk range: only that chunk's file, and no manifests unless asked.
  v1::FetchResumeRequest fetch;
  *fetch.mutable_lease() = w2;
  fetch.set_job_id(id);
  fetch.set_chunk_begin(1);
  fetch.set_chunk_end(2);
  auto plan = coordinator_->PrepareResume(fetch);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->header.checkpoint_block(), 1);
  ASSERT_EQ(plan->header.chunks_size(), 1);
  EXPECT_EQ(plan->header.chunks(0).chunk(), 1);
  EXPECT_EQ(plan->header.chunks(0).sha256(), Sha256Hex("boundary 1 chunk 1"));
  EXPECT_EQ(plan->header.blocks_size(), 0);
  EXPECT_EQ(*ReadFileToString(plan->chunk_paths[0]), "boundary 1 chunk 1");
  fetch.set_chunk_begin(0);
  fetch.set_artifacts(true);
  plan = coordinator_->PrepareResume(fetch);
  ASSERT_TRUE(plan.ok());
  EXPECT_EQ(plan->header.chunks_size(), 2);
  ASSERT_EQ(plan->header.blocks_size(), 1);
  EXPECT_EQ(plan->header.blocks(0).layers_size(), 7);
  fetch.set_chunk_end(3);
  EXPECT_TRUE(absl::IsInvalidArgument(coordinator_->PrepareResume(fetch).status()));

  // A newer complete boundary replaces the older one, files included.
  ASSERT_TRUE(upload(w2, 2, 1, "boundary 2 chunk 1").ok());
  EXPECT_EQ(coordinator_->GetJob(id)->checkpoint_block(), 1);
  EXPECT_TRUE(fs::exists(b1));
  ASSERT_TRUE(upload(w1, 2, 0, "boundary 2 chunk 0").ok());
  EXPECT_EQ(coordinator_->GetJob(id)->checkpoint_block(), 2);
  EXPECT_FALSE(fs::exists(b1));
  // Recomputed with other bytes: a determinism error.
  auto changed = upload(w1, 2, 0, "boundary 2 chunk 0, changed");
  EXPECT_TRUE(absl::IsAborted(changed)) << changed;
  EXPECT_EQ(coordinator_->GetJob(id)->state(), v1::JOB_STATE_FAILED);
}

TEST_F(CoordinatorTest, ReplanFaultPointIsReachedAfterTheNewPlanIsPersisted) {
  auto faults = service::FaultInjector::Parse("coordinator:stage=replan:error", "coordinator");
  ASSERT_TRUE(faults.ok()) << faults.status();
  coordinator_.reset();
  const std::string dir = tree_.data + "/store";
  auto c = Coordinator::Create(
      options_,
      [dir]() -> absl::StatusOr<std::unique_ptr<KvStore>> {
        auto s = RocksStore::Open({dir});
        if (!s.ok()) return s.status();
        return std::unique_ptr<KvStore>(*std::move(s));
      },
      &clock_, metrics_.get(), faults->get());
  ASSERT_TRUE(c.ok()) << c.status();
  coordinator_ = *std::move(c);
  const std::string id = Submit("alice", testing::TinySpec("a"))->job().job_id();
  const v1::Lease w = Register();
  std::optional<v1::Task> t = Acquire(w);
  ASSERT_TRUE(t.has_value());
  v1::AbandonTaskRequest abandon;
  *abandon.mutable_lease() = w;
  abandon.set_job_id(id);
  abandon.set_gang_epoch(t->gang().gang_epoch());
  EXPECT_TRUE(absl::IsInternal(coordinator_->AbandonTask(abandon)));
  // The fault point comes after the commit point: the new plan is in place.
  const v1::Job job = *coordinator_->GetJob(id);
  EXPECT_GT(job.gang_epoch(), t->gang().gang_epoch());
  EXPECT_EQ(job.attempts(), 2);
  coordinator_.reset();
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

// Found by the chaos soak: a store write error while a restart re-planned the running jobs made
// Create fail, and the coordinator exit.
TEST_F(CoordinatorTest, AStoreWriteErrorWhileRestoringIsRetriedNotFatal) {
  auto job = Submit("alice", testing::TinySpec("a"));
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  const v1::Lease w = Register();
  std::optional<v1::Task> task = Acquire(w);
  ASSERT_TRUE(task.has_value());
  ASSERT_TRUE(Commit(w, id, 0).ok());
  fail_writes_ = true;
  Open();  // the restart re-plans the job on w: that write fails
  ASSERT_NE(coordinator_, nullptr);
  EXPECT_FALSE(coordinator_->serving());
  EXPECT_TRUE(absl::IsUnavailable(Submit("alice", testing::TinySpec("b")).status()));
  fail_writes_ = false;
  clock_.Advance(absl::Seconds(3));
  coordinator_->Tick();
  ASSERT_TRUE(coordinator_->serving());
  const v1::Job restored = *coordinator_->GetJob(id);
  EXPECT_EQ(restored.state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(restored.blocks_done(), 1);
  EXPECT_GT(restored.gang_epoch(), task->gang().gang_epoch());
  std::optional<v1::Task> again = Acquire(w);
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->gang().gang_epoch(), restored.gang_epoch());
  EXPECT_TRUE(Commit(w, id, 1).ok());
}

// Found by the chaos soak: a worker stopped past its lease while exporting went on after another
// attempt had exported into the same temporary directory, and left it behind (or could have
// written into it while the coordinator renamed it).
TEST_F(CoordinatorTest, EachAttemptExportsIntoItsOwnDirectoryAndLeftoversAreRemoved) {
  auto job = Submit("alice", testing::TinySpec("a"));
  ASSERT_TRUE(job.ok()) << job.status();
  const std::string id = job->job().job_id();
  const v1::Lease w1 = Register();
  std::optional<v1::Task> first = Acquire(w1);
  ASSERT_TRUE(first.has_value());
  ASSERT_TRUE(Commit(w1, id, 0).ok());
  ASSERT_TRUE(Commit(w1, id, 1).ok());
  // w1 stops past its lease; the job is requeued and w2 exports it.
  clock_.Advance(absl::Seconds(11));
  coordinator_->Tick();
  const v1::Lease w2 = Register();
  std::optional<v1::Task> second = Acquire(w2);
  ASSERT_TRUE(second.has_value());
  ASSERT_NE(first->temp_output_name(), second->temp_output_name());
  EXPECT_EQ(second->temp_output_name(),
            absl::StrCat(".a.", id, ".", second->gang().gang_epoch(), ".qcal-tmp"));
  // Both attempts write their export.
  const fs::path root = tree_.output;
  const std::string run = absl::StrCat("{\"job_id\": \"", id, "\"}");
  for (const v1::Task* t : {&*first, &*second}) {
    fs::create_directories(root / t->temp_output_name());
    ASSERT_TRUE(
        WriteStringToFile((root / t->temp_output_name() / "qcal_run.json").string(), run).ok());
    ASSERT_TRUE(WriteStringToFile((root / t->temp_output_name() / "model.safetensors").string(),
                                  t->temp_output_name())
                    .ok());
  }
  v1::CompleteTaskRequest stale;
  *stale.mutable_lease() = w1;
  stale.set_job_id(id);
  stale.set_gang_epoch(first->gang().gang_epoch());
  EXPECT_TRUE(absl::IsFailedPrecondition(coordinator_->CompleteTask(stale).status()));
  v1::CompleteTaskRequest done;
  *done.mutable_lease() = w2;
  done.set_job_id(id);
  done.set_gang_epoch(second->gang().gang_epoch());
  auto completed = coordinator_->CompleteTask(done);
  ASSERT_TRUE(completed.ok()) << completed.status();
  EXPECT_EQ(completed->state(), v1::JOB_STATE_SUCCEEDED);
  // The output is the second attempt's, whole; the first attempt's directory is gone.
  EXPECT_EQ(*ReadFileToString((root / "a" / "model.safetensors").string()),
            second->temp_output_name());
  EXPECT_FALSE(fs::exists(root / first->temp_output_name()));
  EXPECT_FALSE(fs::exists(root / second->temp_output_name()));

  // What a crash left of the final job goes at the next start; another job's directory stays.
  const std::string leftover = service::TempOutputName("a", id, 12345);
  const std::string others = service::TempOutputName("b", "job-00000000000000ff", 1);
  fs::create_directories(root / leftover);
  fs::create_directories(root / others);
  fs::create_directories(fs::path(tree_.data) / "artifacts" / id);
  Open();
  EXPECT_FALSE(fs::exists(root / leftover));
  EXPECT_TRUE(fs::exists(root / others));
  EXPECT_FALSE(fs::exists(fs::path(tree_.data) / "artifacts" / id));
}

// The uploads' staging file: the declared size bounds it (the caller's wording, nothing written
// past it), a commit renames it into place and keeps it, anything else removes it.
TEST(StagingFileTest, AppendsUpToTheDeclaredSizeCommitsByRenameAndOtherwiseRemovesTheFile) {
  const fs::path dir = testing::MakeTempDir("qcal-staging-file");
  const std::string staged = (dir / ".upload-1").string();
  const fs::path final_path = dir / "file";
  {
    StagingFile file;
    ASSERT_TRUE(file.Open(staged).ok());
    ASSERT_TRUE(file.Append("abc", 5, "test upload").ok());
    const absl::Status past = file.Append("def", 5, "test upload");
    EXPECT_TRUE(absl::IsInvalidArgument(past));
    EXPECT_EQ(past.message(), "test upload exceeds its declared size 5");
    ASSERT_TRUE(file.Append("de", 5, "test upload").ok());
    EXPECT_EQ(file.written(), 5);
    ASSERT_TRUE(file.SyncAndClose().ok());
    ASSERT_TRUE(file.Commit(final_path).ok());
    EXPECT_TRUE(file.path().empty());
  }
  EXPECT_FALSE(fs::exists(staged));
  EXPECT_EQ(*ReadFileToString(final_path.string()), "abcde");

  {  // Abandoned while open, and after a failed commit.
    StagingFile open_file;
    ASSERT_TRUE(open_file.Open(staged).ok());
    ASSERT_TRUE(open_file.Append("x", 1, "test upload").ok());
    StagingFile closed_file;
    const std::string other = (dir / ".upload-2").string();
    ASSERT_TRUE(closed_file.Open(other).ok());
    ASSERT_TRUE(closed_file.SyncAndClose().ok());
    const absl::Status rename = closed_file.Commit(dir / "missing" / "file");
    EXPECT_TRUE(absl::IsUnavailable(rename)) << rename;
    EXPECT_EQ(closed_file.path(), other);
    EXPECT_TRUE(fs::exists(staged));
    EXPECT_TRUE(fs::exists(other));
  }
  EXPECT_FALSE(fs::exists(staged));
  EXPECT_FALSE(fs::exists(dir / ".upload-2"));

  StagingFile no_dir;
  const absl::Status open = no_dir.Open((dir / "missing" / ".upload-3").string());
  EXPECT_TRUE(absl::IsUnavailable(open)) << open;
  EXPECT_NE(open.message().find(": cannot create: "), std::string::npos) << open;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace qcal::coordinator
