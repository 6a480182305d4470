// One job across many workers, with real processes on loopback (issue 11 acceptance 1-2): the
// same output with 1, 2, 3 and 4 workers, for GPTQ and for ASER (smoothing, rank-16 error
// reconstruction, 8-bit activations), and from `qcal quantize --workers 1 / 2`; a worker of three
// SIGKILLed while partials are exchanged, and inside an owner's solve; the coordinator SIGKILLed
// during a multi-worker block and restarted; a `min: 3` job left with two workers requeued until
// a third joins; a peer that cannot be reached fails the attempt (and, out of attempts, the job
// with the reason), not a process. Every case that succeeds ends with byte-identical files
// (qcal_run.json aside).
#include <signal.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "services/common/job_spec.h"
#include "services/engine/recipe.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

constexpr absl::Duration kJobTimeout = absl::Seconds(120);

constexpr char kGptq[] = "method: gptq\nweights: {bits: 4, group_size: 32}\n";
constexpr char kAser[] =
    "method: gptq\n"
    "weights: {bits: 4, group_size: 32}\n"
    "activations: {bits: 8}\n"
    "smoothing: {method: aser, alpha: 0.5, outlier_channels: 4}\n"
    "error_reconstruction: {rank: 16, whitening: cholesky}\n";

// 40 samples of 32 tokens: five chunks of 8, so that 2, 3 and 4 workers split them unevenly.
v1::JobSpec GangSpec(const Cluster& c, const char* recipe_yaml, const std::string& output,
                     int min_workers, int max_workers) {
  return c.GangSpec(output, recipe_yaml, 40, min_workers, max_workers);
}

std::string Submit(Cluster& c, const v1::JobSpec& spec) { return c.SubmitSpec(spec); }

// Waits for SUCCEEDED; the output directory.
std::string Succeeded(Cluster& c, const std::string& id, const std::string& output) {
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, kJobTimeout);
  EXPECT_TRUE(job.ok()) << job.status() << "\n" << c.Logs();
  if (!job.ok()) return "";
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << "\n" << c.Logs();
  return c.output_root() + "/" + output;
}

// Waits until `n` workers hold leases, so that a gang can take all of them.
// `qcal quantize --workers N` of the same job into a fresh directory.
std::string LocalRun(const Cluster& c, const char* recipe_yaml, int workers) {
  return LocalGangRun(c, recipe_yaml, 40, workers);
}

class GangRecipeTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GangRecipeTest, SameOutputOnOneToFourWorkers) {
  const char* recipe = GetParam();
  Cluster c(absl::StrCat("gang-", recipe == kGptq ? "gptq" : "aser"));
  // No faults here, so leases longer than the harness's 2 s: on a loaded 2-core CI machine two of
  // the four workers' 2 s leases once expired together mid-job (a requeue, attempt 2, same bytes).
  c.StartCoordinator({"--lease-seconds", "10"});
  for (int i = 0; i < 4; ++i) c.StartWorker();
  WaitForWorkers(c, 4);
  std::vector<std::string> outputs;
  for (int w = 1; w <= 4; ++w) {
    const std::string name = absl::StrCat("w", w);
    const std::string id = Submit(c, GangSpec(c, recipe, name, w, w));
    outputs.push_back(Succeeded(c, id, name));
    absl::StatusOr<v1::Job> job = c.Client()->Get(id);
    ASSERT_TRUE(job.ok());
    EXPECT_EQ(job->attempts(), 1);
  }
  for (int w = 2; w <= 4; ++w) {
    EXPECT_EQ(CompareOutputs(outputs[0], outputs[static_cast<size_t>(w - 1)]), "")
        << w << " workers";
  }
  EXPECT_EQ(CompareOutputs(outputs[0], LocalRun(c, recipe, 1)), "") << "qcal quantize --workers 1";
  EXPECT_EQ(CompareOutputs(outputs[0], LocalRun(c, recipe, 2)), "") << "qcal quantize --workers 2";
  // Every rank of the multi-worker jobs sent partials or layers.
  EXPECT_GT(Metric(c, "qcal_exchange_bytes_total{rank=\"0\"}"), 0);
  EXPECT_GT(Metric(c, "qcal_exchange_bytes_total{rank=\"3\"}"), 0);
}

INSTANTIATE_TEST_SUITE_P(Recipes, GangRecipeTest, ::testing::Values(kGptq, kAser),
                         [](const auto& info) { return info.param == kGptq ? "Gptq" : "Aser"; });

// The uninterrupted 3-worker output of kAser, computed once.
std::string Baseline(Cluster& c) { return LocalRun(c, kAser, 1); }

void KillOneOfThree(const std::string& name, const std::string& fault) {
  Cluster c(name);
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", fault}});
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, GangSpec(c, kAser, "out", 2, 3));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  const std::string out = Succeeded(c, id, "out");
  EXPECT_EQ(CompareOutputs(Baseline(c), out), "");
  absl::StatusOr<v1::Job> job = c.Client()->Get(id);
  ASSERT_TRUE(job.ok());
  EXPECT_GE(job->attempts(), 2);
}

TEST(ServiceGangTest, WorkerKilledWhilePartialsAreExchanged) {
  KillOneOfThree("gang-kill-exchange", "worker:block=1:stage=exchange:kill");
}

TEST(ServiceGangTest, WorkerKilledInsideAnOwnersSolve) {
  KillOneOfThree("gang-kill-solve", "worker:block=1:stage=solve:kill");
}

TEST(ServiceGangTest, CoordinatorKilledDuringAMultiWorkerBlock) {
  Cluster c("gang-kill-coordinator");
  c.StartCoordinator({}, {{"QCAL_FAULT", "coordinator:block=1:stage=commit:kill"}});
  for (int i = 0; i < 3; ++i) c.StartWorker();
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, GangSpec(c, kAser, "out", 3, 3));
  ASSERT_TRUE(c.coordinator()->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(c.coordinator()->term_signal(), SIGKILL);
  c.StartCoordinator();
  const std::string out = Succeeded(c, id, "out");
  EXPECT_EQ(CompareOutputs(Baseline(c), out), "");
}

TEST(ServiceGangTest, MinThreeLeftWithTwoIsRequeuedUntilAThirdJoins) {
  Cluster c("gang-min3");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=exchange:kill"}});
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, GangSpec(c, kAser, "out", 3, 3));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  ASSERT_TRUE(c.WaitState(id, v1::JOB_STATE_QUEUED, absl::Seconds(30))) << c.Logs();
  absl::SleepFor(absl::Seconds(1));
  absl::StatusOr<v1::Job> waiting = c.Client()->Get(id);
  ASSERT_TRUE(waiting.ok());
  EXPECT_EQ(waiting->state(), v1::JOB_STATE_QUEUED);  // two workers are not enough
  c.StartWorker();
  const std::string out = Succeeded(c, id, "out");
  EXPECT_EQ(CompareOutputs(Baseline(c), out), "");
}

TEST(ServiceGangTest, UnreachablePeerFailsTheAttemptNotTheProcess) {
  Cluster c("gang-unreachable");
  c.StartCoordinator({"--max-attempts", "2"});
  Process* good = c.StartWorker({"--peer-timeout-seconds", "1"});
  // Alive and heartbeating, but it tells its peers an address where nobody listens.
  Process* bad = c.StartWorker({"--peer-timeout-seconds", "1", "--peer-advertise", "127.0.0.1:1"});
  WaitForWorkers(c, 2);
  const std::string id = Submit(c, GangSpec(c, kGptq, "out", 2, 2));
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, kJobTimeout);
  ASSERT_TRUE(job.ok()) << job.status() << c.Logs();
  EXPECT_EQ(job->state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(job->error().find("127.0.0.1:1"), std::string::npos) << job->error();
  EXPECT_EQ(job->attempts(), 2);
  // Every process is still up, and a job that needs no peer still runs.
  EXPECT_TRUE(good->running());
  EXPECT_TRUE(bad->running());
  EXPECT_TRUE(c.coordinator()->running());
  const std::string after = Submit(c, GangSpec(c, kGptq, "after", 1, 1));
  EXPECT_EQ(CompareOutputs(LocalRun(c, kGptq, 1), Succeeded(c, after, "after")), "");
}

}  // namespace
}  // namespace qcal::testing
