// Block retraining as job state (issue 13, acceptance 2), with real processes on loopback: an ApiQ
// job (GPTQ W2 g32 plus a rank-4 LoRA and learnable clipping, two output-preservation epochs)
// succeeds on 1 and 2 workers and from `qcal quantize` with byte-identical output that evaluates
// and carries the adapter (and differs from plain GPTQ's, so the section reached the engine); a
// worker SIGKILLed while block 1 trains (fault point `retrain`) leaves the job to a second worker,
// which resumes at that block from the boundary checkpoint and ends with the same bytes
// (qcal_run.json aside) as the undisturbed `qcal quantize`.
#include <signal.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

constexpr absl::Duration kJobTimeout = absl::Seconds(180);

constexpr char kApiq[] =
    "method: gptq\nweights: {bits: 2, group_size: 32}\n"
    "retrain: {method: apiq, rank: 4, epochs: {output: 2}}\n";
constexpr char kGptq[] = "method: gptq\nweights: {bits: 2, group_size: 32}\n";
constexpr int kSamples = 16;  // two chunks of 8: one per worker of a gang of two

v1::Job Succeeded(Cluster& c, const std::string& id) {
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, kJobTimeout);
  EXPECT_TRUE(job.ok()) << job.status() << "\n" << c.Logs();
  if (!job.ok()) return v1::Job();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << "\n" << c.Logs();
  return *job;
}

// The undisturbed output of the ApiQ job (`qcal quantize`, one worker), computed once.
const std::string& Baseline(const Cluster& c) {
  static const std::string* out = new std::string(LocalGangRun(c, kApiq, kSamples, 1));
  return *out;
}

TEST(ServiceRetrainTest, SameOutputOnOneAndTwoWorkersAndLocally) {
  Cluster c("retrain-workers");
  c.StartCoordinator();
  c.StartWorker();
  c.StartWorker();
  WaitForWorkers(c, 2);
  std::vector<std::string> outputs;
  for (int w = 1; w <= 2; ++w) {
    const std::string name = absl::StrCat("w", w);
    const v1::Job job = Succeeded(c, c.SubmitSpec(c.GangSpec(name, kApiq, kSamples, w, w)));
    EXPECT_EQ(job.attempts(), 1);
    outputs.push_back(c.output_root() + "/" + name);
    if (w == 1) {
      // The checkpoint plus its adapter, loaded from disk, evaluates to the job's perplexity.
      ASSERT_TRUE(job.has_result());
      EXPECT_TRUE(std::isfinite(job.result().perplexity()));
      EXPECT_TRUE(std::filesystem::exists(outputs[0] + "/adapter/adapter_model.safetensors"));
      const RunResult eval =
          RunQcal({"eval", "--model", outputs[0], "--text", c.input_root() + "/" + c.model().eval,
                   "--seq-len", "32", "--max-windows", "4", "--threads", "1", "--json"});
      ASSERT_EQ(eval.exit_code, 0) << eval.err;
      EXPECT_DOUBLE_EQ(nlohmann::json::parse(eval.out)["perplexity"].get<double>(),
                       job.result().perplexity());
      absl::StatusOr<std::string> report = ReadFileToString(outputs[0] + "/qcal_report.json");
      ASSERT_TRUE(report.ok());
      EXPECT_EQ(nlohmann::json::parse(*report)["recipe"]["retrain"]["method"], "apiq");
    }
  }
  EXPECT_EQ(CompareOutputs(outputs[0], outputs[1]), "") << "2 workers";
  EXPECT_EQ(CompareOutputs(outputs[0], Baseline(c)), "") << "qcal quantize --workers 1";
  // Retraining changed the output: the section reached the engine.
  EXPECT_NE(CompareOutputs(outputs[0], LocalGangRun(c, kGptq, kSamples, 1)), "");
}

TEST(ServiceRetrainTest, WorkerKilledWhileABlockTrainsResumesWithTheSameBytes) {
  Cluster c("retrain-kill");
  c.StartCoordinator();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=retrain:kill"}});
  const std::string id = c.SubmitSpec(c.GangSpec("out", kApiq, kSamples, 1, 1));
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  c.StartWorker();
  const v1::Job job = Succeeded(c, id);
  EXPECT_EQ(job.attempts(), 2);
  EXPECT_EQ(CompareOutputs(Baseline(c), c.output_root() + "/out"), "");
}

}  // namespace
}  // namespace qcal::testing
