// Output-adaptive calibration as job state (issue 12 "Persistence" and acceptance 2), with real
// processes on loopback: a `hessian: output_adaptive` job succeeds on 1, 2 and 3 workers and from
// `qcal quantize` with byte-identical output that evaluates (and differs from the layer-Hessian
// output, so the key reached the engine), as does an `output_adaptive_token` job on 2 workers; a
// gang member SIGKILLed in the middle of the gradient pass (re-plan, the pass redone) and one
// killed in block 1 (re-plan, the pass restored by the new owners) or while committing its files
// (re-plan, the pass redone on two and the files already in compared); a worker SIGKILLed while
// committing the pass's files (the pass redone, the files already in compared) and right after
// committing them (the pass restored, not redone); the coordinator SIGKILLed right after the store
// write that completed the pass and restarted (the pass restored, not redone). Every case ends with
// the same bytes (qcal_run.json aside) as the undisturbed `qcal quantize`.
#include <signal.h>

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/engine/recipe.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

constexpr absl::Duration kJobTimeout = absl::Seconds(120);

constexpr char kOac[] =
    "method: gptq\nweights: {bits: 3, group_size: 32}\nhessian: output_adaptive\n";
constexpr char kOacToken[] =
    "method: gptq\nweights: {bits: 3, group_size: 32}\nhessian: output_adaptive_token\n";
constexpr char kLayer[] = "method: gptq\nweights: {bits: 3, group_size: 32}\n";
// The gradient-pass durations the coordinator observed (one per rank that committed its files).
constexpr char kGradientCount[] = "qcal_stage_duration_seconds_count{stage=\"gradient\"}";

// 24 samples of 32 tokens: three chunks of 8, so that each of three workers holds one.
v1::JobSpec OacSpec(const Cluster& c, const std::string& output, int min_workers, int max_workers,
                    const char* recipe_yaml = kOac) {
  return c.GangSpec(output, recipe_yaml, 24, min_workers, max_workers);
}

std::string Submit(Cluster& c, const v1::JobSpec& spec) { return c.SubmitSpec(spec); }

// Waits for SUCCEEDED; the final job.
v1::Job Succeeded(Cluster& c, const std::string& id) {
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, kJobTimeout);
  EXPECT_TRUE(job.ok()) << job.status() << "\n" << c.Logs();
  if (!job.ok()) return v1::Job();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << "\n" << c.Logs();
  EXPECT_TRUE(job->gradient_pass_done());
  return *job;
}

// `qcal quantize --workers N` of the same job into a fresh directory.
std::string LocalRun(const Cluster& c, const char* recipe_yaml, int workers) {
  return LocalGangRun(c, recipe_yaml, 24, workers);
}

// The undisturbed output of the OAC job (`qcal quantize`, one worker), computed once.
const std::string& Baseline(const Cluster& c) {
  static const std::string* out = new std::string(LocalRun(c, kOac, 1));
  return *out;
}

TEST(ServiceOacTest, SameOutputOnOneToThreeWorkersAndLocally) {
  Cluster c("oac-workers");
  c.StartCoordinator();
  for (int i = 0; i < 3; ++i) c.StartWorker();
  WaitForWorkers(c, 3);
  std::vector<std::string> outputs;
  for (int w = 1; w <= 3; ++w) {
    const std::string name = absl::StrCat("w", w);
    const v1::Job job = Succeeded(c, Submit(c, OacSpec(c, name, w, w)));
    EXPECT_EQ(job.attempts(), 1);
    outputs.push_back(c.output_root() + "/" + name);
    if (w == 1) {
      // The exported checkpoint evaluates to the perplexity the job reported.
      ASSERT_TRUE(job.has_result());
      EXPECT_TRUE(std::isfinite(job.result().perplexity()));
      const RunResult eval =
          RunQcal({"eval", "--model", outputs[0], "--text", c.input_root() + "/" + c.model().eval,
                   "--seq-len", "32", "--max-windows", "4", "--threads", "1", "--json"});
      ASSERT_EQ(eval.exit_code, 0) << eval.err;
      EXPECT_DOUBLE_EQ(nlohmann::json::parse(eval.out)["perplexity"].get<double>(),
                       job.result().perplexity());
      absl::StatusOr<std::string> report = ReadFileToString(outputs[0] + "/qcal_report.json");
      ASSERT_TRUE(report.ok());
      EXPECT_EQ(nlohmann::json::parse(*report)["recipe"]["hessian"], "output_adaptive");
    }
  }
  EXPECT_EQ(CompareOutputs(outputs[0], outputs[1]), "") << "2 workers";
  EXPECT_EQ(CompareOutputs(outputs[0], outputs[2]), "") << "3 workers";
  EXPECT_EQ(CompareOutputs(outputs[0], Baseline(c)), "") << "qcal quantize --workers 1";
  // Every rank of every job ran the pass once and committed its files: 1 + 2 + 3.
  EXPECT_EQ(Metric(c, kGradientCount), 6);
  // The output-adaptive Hessians changed the codes: the key reached the solve.
  EXPECT_NE(CompareOutputs(outputs[0], LocalRun(c, kLayer, 1)), "");
  // The per-token form too, on two workers against `qcal quantize --workers 1`.
  Succeeded(c, Submit(c, OacSpec(c, "token", 2, 2, kOacToken)));
  const std::string token = c.output_root() + "/token";
  EXPECT_EQ(CompareOutputs(token, LocalRun(c, kOacToken, 1)), "") << "output_adaptive_token";
  EXPECT_NE(CompareOutputs(token, outputs[0]), "");
}

TEST(ServiceOacTest, GangMemberKilledInTheMiddleOfThePass) {
  Cluster c("oac-kill-gradient");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  // The pass runs from the last block down: block 1 (of 2 or 5) is in its middle.
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=gradient:kill"}});
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, OacSpec(c, "out", 2, 3));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  const v1::Job job = Succeeded(c, id);
  EXPECT_GE(job.attempts(), 2);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
}

TEST(ServiceOacTest, GangMemberKilledWhileCommittingThePassIsReproducedOnTwo) {
  Cluster c("oac-kill-gang-upload");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  // The victim's block-0 files are in when it dies; the pass is redone on two workers, whose
  // owners (another plan) must reproduce them bit for bit.
  Process* victim =
      c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=gradient_upload:kill"}});
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, OacSpec(c, "out", 2, 3));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  const v1::Job job = Succeeded(c, id);
  EXPECT_GE(job.attempts(), 2);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
}

TEST(ServiceOacTest, GangMemberKilledAfterThePassRestoresItUnderTheNewPlan) {
  Cluster c("oac-kill-exchange");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=exchange:kill"}});
  WaitForWorkers(c, 3);
  const std::string id = Submit(c, OacSpec(c, "out", 2, 3));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  const v1::Job job = Succeeded(c, id);
  EXPECT_GE(job.attempts(), 2);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
  // The three members of the first plan committed the pass; the two of the second (owning other
  // linears) fetched their files instead of running it again.
  EXPECT_EQ(Metric(c, kGradientCount), 3);
}

// One worker runs the job and dies at `fault`; a second one, started after, finishes it.
// Returns the coordinator's count of gradient passes committed.
double KillTheOnlyWorker(const std::string& name, const std::string& fault) {
  Cluster c(name);
  c.StartCoordinator();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", fault}});
  const std::string id = Submit(c, OacSpec(c, "out", 1, 1));
  EXPECT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  c.StartWorker();
  const v1::Job job = Succeeded(c, id);
  EXPECT_EQ(job.attempts(), 2);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
  return Metric(c, kGradientCount);
}

TEST(ServiceOacTest, WorkerKilledInTheMiddleOfThePassRedoesIt) {
  // Killed as the backward reaches block 0's statistics (the last block's are done, nothing is
  // committed): the second attempt runs the whole pass.
  EXPECT_EQ(KillTheOnlyWorker("oac-kill-mid", "worker:block=0:stage=gradient:kill"), 1);
}

TEST(ServiceOacTest, WorkerKilledWhileCommittingThePassRedoesIt) {
  // Block 0's files are in, the rest not: the second attempt runs the pass again and reproduces
  // the committed files.
  EXPECT_EQ(KillTheOnlyWorker("oac-kill-upload", "worker:block=1:stage=gradient_upload:kill"), 1);
}

TEST(ServiceOacTest, WorkerKilledRightAfterThePassDoesNotRedoIt) {
  // Only the first attempt committed a pass; the second restored it.
  EXPECT_EQ(KillTheOnlyWorker("oac-kill-done", "worker:stage=gradient_done:kill"), 1);
}

TEST(ServiceOacTest, CoordinatorRestartAfterThePassDoesNotRedoIt) {
  Cluster c("oac-kill-coordinator");
  c.StartCoordinator({}, {{"QCAL_FAULT", "coordinator:stage=gradient_done:kill"}});
  c.StartWorker();
  const std::string id = Submit(c, OacSpec(c, "out", 1, 1));
  ASSERT_TRUE(c.coordinator()->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(c.coordinator()->term_signal(), SIGKILL);
  c.StartCoordinator();
  Succeeded(c, id);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
  // The restarted coordinator saw no pass committed: the worker restored the stored one.
  EXPECT_EQ(Metric(c, kGradientCount), 0);
}

}  // namespace
}  // namespace qcal::testing
