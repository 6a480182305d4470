// End-to-end tests of the service with real processes on loopback (DESIGN section 7, issue 5
// acceptance 1-4): submit -> SUCCEEDED with the output byte-identical to `qcal quantize`; SIGKILL
// of the worker at a fault point and at a random time; SIGKILL of the coordinator mid-job and a
// restart on the same data dir; both killed together and again during recovery; a store write
// error (health NOT_SERVING until the store is reopened). Every case ends with the same output
// as the uninterrupted local run (qcal_run.json aside).
#include <signal.h>

#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "common/files.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"

namespace qcal::testing {
namespace {

constexpr absl::Duration kJobTimeout = absl::Seconds(90);

// The job id printed by the CLI, or the failure.
std::string SubmitOrDie(Cluster& c, const std::string& output_name,
                        const std::string& client = "test") {
  v1::SubmitJobRequest request;
  *request.mutable_spec() = c.Spec(output_name);
  absl::StatusOr<v1::SubmitJobResponse> r = c.Client(client)->Submit(request);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->job().job_id() : "";
}

void ExpectSucceededWithBaseline(Cluster& c, const std::string& job_id, const std::string& output) {
  absl::StatusOr<v1::Job> job = c.WaitFinal(job_id, kJobTimeout);
  ASSERT_TRUE(job.ok()) << job.status() << "\n" << c.Logs();
  ASSERT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << "\n" << c.Logs();
  const std::string dir = c.output_root() + "/" + output;
  EXPECT_EQ(CompareOutputs(LocalBaseline(c), dir), "");
  absl::StatusOr<std::string> run = ReadFileToString(dir + "/qcal_run.json");
  ASSERT_TRUE(run.ok());
  EXPECT_EQ(nlohmann::json::parse(*run)["job_id"], job_id);
}

TEST(ServiceE2eTest, SubmitSucceedsWithTheLocalOutput) {
  Cluster c("e2e-happy");
  c.StartCoordinator();
  Process* worker = c.StartWorker();
  const std::string in = c.input_root() + "/";
  const RunResult submit = RunQcal({"submit",
                                    "--coordinator",
                                    c.address(),
                                    "--model",
                                    c.model().model,
                                    "--recipe",
                                    c.RecipePath(),
                                    "--calib",
                                    c.model().calib,
                                    "--samples",
                                    "16",
                                    "--seq-len",
                                    "64",
                                    "--seed",
                                    "7",
                                    "--threads",
                                    "1",
                                    "--eval-text",
                                    c.model().eval,
                                    "--eval-max-windows",
                                    "4",
                                    "--output-name",
                                    "happy",
                                    "--client-id",
                                    "cli",
                                    "--wait"});
  ASSERT_TRUE(submit.exited && submit.exit_code == 0) << submit.err << c.Logs();
  const std::string job_id = submit.out.substr(0, submit.out.find('\n'));
  EXPECT_EQ(submit.out, job_id + "\n");                        // stdout carries only the job id
  EXPECT_NE(submit.err.find("SUCCEEDED"), std::string::npos);  // progress on stderr
  ExpectSucceededWithBaseline(c, job_id, "happy");

  const RunResult status = RunQcal({"status", "--coordinator", c.address(), job_id, "--json"});
  ASSERT_EQ(status.exit_code, 0) << status.err;
  const nlohmann::json j = nlohmann::json::parse(status.out);
  EXPECT_EQ(j["state"], "SUCCEEDED");
  EXPECT_EQ(j["client"], "cli");
  EXPECT_EQ(j["blocks_done"], c.model().num_blocks);
  EXPECT_EQ(j["attempts"], 1);

  // The exported checkpoint evaluates to the perplexity the job reported.
  const RunResult eval =
      RunQcal({"eval", "--model", c.output_root() + "/happy", "--text", in + c.model().eval,
               "--seq-len", "64", "--max-windows", "4", "--threads", "1", "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  EXPECT_DOUBLE_EQ(nlohmann::json::parse(eval.out)["perplexity"].get<double>(),
                   j["perplexity"].get<double>());

  const RunResult watch = RunQcal({"watch", "--coordinator", c.address(), job_id});
  EXPECT_EQ(watch.exit_code, 0) << watch.err;
  EXPECT_EQ(watch.out, "SUCCEEDED\n");
  const RunResult list = RunQcal({"list", "--coordinator", c.address(), "--json"});
  ASSERT_EQ(list.exit_code, 0) << list.err;
  EXPECT_EQ(nlohmann::json::parse(list.out)["jobs"].size(), 1u);
  EXPECT_EQ(Metric(c, "qcal_blocks_committed_total"), c.model().num_blocks);
  EXPECT_GT(Metric(c, "qcal_hessian_flops_per_second"), 0);
  // The job's peaks reach the metrics as the job recorded them.
  {
    absl::StatusOr<std::string> run = ReadFileToString(c.output_root() + "/happy/qcal_run.json");
    ASSERT_TRUE(run.ok());
    const nlohmann::json r = nlohmann::json::parse(*run);
    EXPECT_GT(r["peak_rss_bytes"].get<int64_t>(), 0);
    EXPECT_GT(r["peak_device_bytes"].get<int64_t>(), 0);  // the CPU backend's tensors
    EXPECT_EQ(Metric(c, "qcal_job_peak_rss_bytes"), r["peak_rss_bytes"].get<double>());
    EXPECT_EQ(Metric(c, "qcal_job_peak_device_memory_bytes"), r["peak_device_bytes"].get<double>());
  }
  // Between jobs no backend holds memory.
  EXPECT_EQ(Metric(c, "qcal_device_memory_bytes"), 0);
  // Every linear's errors: RTN, the recipe's quantizer, and after error reconstruction (the
  // harness recipe has it).
  for (const char* kind : {"rtn", "recipe", "reconstructed"}) {
    EXPECT_EQ(Metric(c, absl::StrCat("qcal_layer_rel_error_count{kind=\"", kind, "\"}")),
              7 * c.model().num_blocks)
        << kind;
  }

  // SIGTERM shuts both down gracefully.
  worker->Signal(SIGTERM);
  ASSERT_TRUE(worker->Wait(absl::Seconds(15)));
  EXPECT_TRUE(worker->exited());
  EXPECT_EQ(worker->exit_code(), 0);
  c.coordinator()->Signal(SIGTERM);
  ASSERT_TRUE(c.coordinator()->Wait(absl::Seconds(15)));
  EXPECT_TRUE(c.coordinator()->exited());
  EXPECT_EQ(c.coordinator()->exit_code(), 0);
}

TEST(ServiceE2eTest, CancelAQueuedJob) {
  Cluster c("e2e-cancel");
  c.StartCoordinator();  // no worker: the job stays queued
  const std::string id = SubmitOrDie(c, "cancelled");
  const RunResult cancel = RunQcal({"cancel", "--coordinator", c.address(), id, "--json"});
  ASSERT_EQ(cancel.exit_code, 0) << cancel.err;
  EXPECT_EQ(nlohmann::json::parse(cancel.out)["state"], "CANCELLED");
  const RunResult watch = RunQcal({"watch", "--coordinator", c.address(), id});
  EXPECT_EQ(watch.exit_code, 1);
  EXPECT_EQ(watch.out, "CANCELLED\n");
  EXPECT_NE(watch.err.find("qcal: error: job " + id + " CANCELLED"), std::string::npos)
      << watch.err;
}

TEST(ServiceE2eTest, WorkerKilledAtAFaultPointAnotherWorkerFinishes) {
  Cluster c("e2e-worker-fault");
  const int nb = c.model().num_blocks;
  const int kill_block = std::min(2, nb - 1);  // block 2 of 5 with stories260k
  c.StartCoordinator({"--checkpoint-every", "2"});
  Process* first = c.StartWorker(
      {}, {{"QCAL_FAULT", absl::StrCat("worker:block=", kill_block, ":stage=solve:kill")}});
  const std::string id = SubmitOrDie(c, "out");
  ASSERT_TRUE(first->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(first->term_signal(), SIGKILL);
  absl::StatusOr<v1::Job> mid = c.Client()->Get(id);
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ(mid->state(), v1::JOB_STATE_RUNNING);
  EXPECT_EQ(mid->blocks_done(), kill_block);
  EXPECT_EQ(mid->checkpoint_block(), kill_block / 2 * 2);
  c.StartWorker();
  ExpectSucceededWithBaseline(c, id, "out");
  EXPECT_EQ(c.Client()->Get(id)->attempts(), 2);
  EXPECT_EQ(Metric(c, "qcal_lease_expiries_total"), 1);
  EXPECT_EQ(Metric(c, "qcal_task_retries_total"), 1);
}

TEST(ServiceE2eTest, RecomputedBlocksAfterAResumeMatchTheCommittedOnes) {
  Cluster c("e2e-recompute");
  const int nb = c.model().num_blocks;
  const int kill_block = nb - 2;  // committed past the last checkpoint (every 2 blocks)
  c.StartCoordinator({"--checkpoint-every", "2"});
  Process* first = c.StartWorker(
      {}, {{"QCAL_FAULT", absl::StrCat("worker:block=", kill_block, ":stage=commit:kill")}});
  const std::string id = SubmitOrDie(c, "out");
  ASSERT_TRUE(first->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(first->term_signal(), SIGKILL);
  EXPECT_EQ(c.Client()->Get(id)->blocks_done(), kill_block + 1);
  c.StartWorker();
  ExpectSucceededWithBaseline(c, id, "out");
  EXPECT_NE(c.coordinator()->LogTail(100000).find("recomputed: matches the committed artifacts"),
            std::string::npos);
}

TEST(ServiceE2eTest, WorkerKilledAtARandomTimeAnotherWorkerFinishes) {
  Cluster c("e2e-worker-random");
  c.StartCoordinator();
  Process* first = c.StartWorker();
  const std::string id = SubmitOrDie(c, "out");
  ASSERT_TRUE(c.WaitState(id, v1::JOB_STATE_RUNNING, kJobTimeout)) << c.Logs();
  std::random_device rd;
  const int delay_ms = static_cast<int>(rd() % 400);
  RecordProperty("kill_delay_ms", delay_ms);
  std::fprintf(stderr, "killing the worker %d ms into the job\n", delay_ms);
  absl::SleepFor(absl::Milliseconds(delay_ms));
  first->Signal(SIGKILL);
  ASSERT_TRUE(first->Wait(absl::Seconds(10)));
  c.StartWorker();
  ExpectSucceededWithBaseline(c, id, "out");
}

TEST(ServiceE2eTest, CoordinatorKilledMidJobRestartsOnItsDataDir) {
  Cluster c("e2e-coordinator");
  const int nb = c.model().num_blocks;
  c.StartCoordinator(
      {}, {{"QCAL_FAULT", absl::StrCat("coordinator:block=", nb / 2, ":stage=commit:kill")}});
  c.StartWorker();
  const std::string first = SubmitOrDie(c, "first");
  const std::string queued = SubmitOrDie(c, "queued");  // one worker: this one waits
  ASSERT_TRUE(c.coordinator()->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(c.coordinator()->term_signal(), SIGKILL);
  c.StartCoordinator();
  absl::StatusOr<v1::Job> q = c.Client()->Get(queued);
  ASSERT_TRUE(q.ok()) << q.status();  // queued before the kill, still there
  EXPECT_EQ(q->state(), v1::JOB_STATE_QUEUED);
  // The live worker goes on at once with the restored coordinator.
  EXPECT_GE(c.Client()->Get(first)->blocks_done(), nb / 2 + 1);
  ExpectSucceededWithBaseline(c, first, "first");
  ExpectSucceededWithBaseline(c, queued, "queued");
}

TEST(ServiceE2eTest, WorkerAndCoordinatorKilledTogetherAndAgainDuringRecovery) {
  Cluster c("e2e-both");
  const int nb = c.model().num_blocks;
  c.StartCoordinator(
      {},
      {{"QCAL_FAULT", absl::StrCat("coordinator:block=", nb >= 3 ? 1 : 0, ":stage=commit:kill")}});
  Process* first = c.StartWorker();
  const std::string id = SubmitOrDie(c, "out");
  ASSERT_TRUE(c.coordinator()->Wait(kJobTimeout)) << c.Logs();
  first->Signal(SIGKILL);  // the worker dies with it
  ASSERT_TRUE(first->Wait(absl::Seconds(10)));
  // Recovery: a new worker resumes the job; the coordinator dies again at the last block.
  c.StartCoordinator(
      {}, {{"QCAL_FAULT", absl::StrCat("coordinator:block=", nb - 1, ":stage=precommit:kill")}});
  c.StartWorker();
  ASSERT_TRUE(c.coordinator()->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(c.coordinator()->term_signal(), SIGKILL);
  c.StartCoordinator();
  ExpectSucceededWithBaseline(c, id, "out");
  EXPECT_GE(c.Client()->Get(id)->attempts(), 2);
}

TEST(ServiceE2eTest, StoreWriteErrorReportsNotServingUntilReopened) {
  Cluster c("e2e-store-error");
  c.StartCoordinator({"--store-reopen-seconds", "3"},
                     {{"QCAL_FAULT", "coordinator:block=1:stage=store:error"}});
  grpc::ChannelArguments args;
  auto channel = grpc::CreateCustomChannel(c.address(), grpc::InsecureChannelCredentials(), args);
  auto health = grpc::health::v1::Health::NewStub(channel);
  auto check = [&]() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    grpc::health::v1::HealthCheckRequest request;
    request.set_service("qcal.v1.QuantService");
    grpc::health::v1::HealthCheckResponse response;
    const grpc::Status s = health->Check(&ctx, request, &response);
    return s.ok() ? response.status() : grpc::health::v1::HealthCheckResponse::UNKNOWN;
  };
  EXPECT_EQ(check(), grpc::health::v1::HealthCheckResponse::SERVING);
  c.StartWorker();
  const std::string id = SubmitOrDie(c, "out");
  bool saw_not_serving = false;
  for (absl::Time end = absl::Now() + kJobTimeout; absl::Now() < end && !saw_not_serving;) {
    saw_not_serving = check() == grpc::health::v1::HealthCheckResponse::NOT_SERVING;
    absl::SleepFor(absl::Milliseconds(20));
  }
  ASSERT_TRUE(saw_not_serving) << c.Logs();
  // Writes are refused meanwhile.
  v1::SubmitJobRequest request;
  *request.mutable_spec() = c.Spec("refused");
  EXPECT_TRUE(absl::IsUnavailable(c.Client()->Submit(request).status()));
  ExpectSucceededWithBaseline(c, id, "out");
  EXPECT_EQ(check(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_EQ(Metric(c, "qcal_store_write_errors_total"), 1);
}

}  // namespace
}  // namespace qcal::testing
