// Mixture-of-experts jobs through the service (issue 17; docs/MOE.md, "The service"), with real
// processes on loopback and the synthetic tiny checkpoints of `qcal synth --arch mixtral` (four
// experts named w1/w3/w2 in both blocks), `--arch qwen2_moe` (eight routed experts and a shared
// expert in both blocks) and `--arch qwen3_moe` (block 0 dense, block 1 an MoE block):
//   - `qcal quantize --workers 1` and `--workers 2` give byte-identical outputs (qcal_run.json
//     aside), equal to the engine run in this process (engine::RunQuantizeJob, the engine-only
//     build's `qcal quantize`), and `qcal eval` of the export gives the job's perplexity;
//   - a two-worker job whose plan gives both ranks expert units, one worker SIGKILLed as it sends
//     an expert unit's partials mid-block (QCAL_FAULT stage=expert), succeeds on the other with the
//     bytes of an unfaulted run;
//   - an MoE recipe with a stage the phase does not do on experts is refused at submission, naming
//     the key.
#include <signal.h>

#include <cmath>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "services/common/job_spec.h"
#include "services/engine/pipeline.h"
#include "services/engine/recipe.h"
#include "tests/service/service_harness.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

using ::testing::HasSubstr;

constexpr absl::Duration kJobTimeout = absl::Seconds(180);
constexpr char kGptq[] = "method: gptq\nweights: {bits: 4, group_size: 32}\n";
// Three chunks of 8 samples (the last short): two workers hold one and two.
constexpr int kSamples = 20;

// The job of LocalGangRun, run by the engine in this process.
engine::JobOptions EngineJob(const Cluster& c, const std::string& out) {
  engine::JobOptions j;
  const std::string in = c.input_root() + "/";
  j.model_dir = in + c.model().model;
  j.calib_path = in + c.model().calib;
  j.eval_text = in + c.model().eval;
  j.eval_max_windows = 4;
  absl::StatusOr<engine::Recipe> recipe = engine::ParseRecipeYaml(kGptq, "recipe");
  EXPECT_TRUE(recipe.ok()) << recipe.status();
  if (recipe.ok()) j.recipe = *recipe;
  j.samples = kSamples;
  j.seq_len = 32;
  j.seed = 7;
  j.threads = 1;
  j.out_dir = out;
  return j;
}

nlohmann::json ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  EXPECT_TRUE(text.ok()) << text.status();
  return text.ok() ? nlohmann::json::parse(*text) : nlohmann::json();
}

class MoeQuantizeCliTest : public ::testing::TestWithParam<const char*> {};

TEST_P(MoeQuantizeCliTest, OneAndTwoWorkersMatchTheEngineAndTheExportReloads) {
  Cluster c(absl::StrCat("moe-cli-", GetParam()), GetParam());
  const std::string one = LocalGangRun(c, kGptq, kSamples, 1);
  const std::string two = LocalGangRun(c, kGptq, kSamples, 2);
  EXPECT_EQ(CompareOutputs(one, two), "") << "qcal quantize --workers 1 and 2";
  const std::string direct = MakeTempDir("qcal-moe-direct") + "/out";
  absl::StatusOr<engine::JobResult> engine = engine::RunQuantizeJob(EngineJob(c, direct));
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_EQ(CompareOutputs(one, direct), "") << "the engine in process";

  // Every expert linear was quantized and reported; the report says which experts fell back.
  const nlohmann::json report = ReadJson(one + "/qcal_report.json");
  int expert_linears = 0;
  for (const nlohmann::json& l : report["layers"]) expert_linears += l.contains("expert") ? 1 : 0;
  const std::string arch = GetParam();
  // mixtral: two MoE blocks of 4 experts; qwen2_moe: two of 8 routed experts and a shared one;
  // qwen3_moe: one of 8.
  EXPECT_EQ(expert_linears, arch == "mixtral"     ? 2 * 4 * 3
                            : arch == "qwen2_moe" ? 2 * 9 * 3
                                                  : 8 * 3);
  EXPECT_TRUE(report["moe"].contains("fallback_experts"));

  // The export reloads: `qcal eval` of it gives the perplexity the job measured.
  const nlohmann::json evaluation = report["evaluation"];
  const RunResult eval =
      RunQcal({"eval", "--model", one, "--text", c.input_root() + "/" + c.model().eval, "--seq-len",
               "32", "--max-windows", "4", "--threads", "1", "--json"});
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const double reloaded = nlohmann::json::parse(eval.out)["perplexity"].get<double>();
  const double measured = evaluation["perplexity"].get<double>();
  EXPECT_TRUE(std::isfinite(reloaded));
  EXPECT_LT(std::abs(reloaded - measured), 1e-9 * measured) << reloaded << " vs " << measured;
  EXPECT_EQ(engine->perplexity, measured);
}

INSTANTIATE_TEST_SUITE_P(Families, MoeQuantizeCliTest,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe"));

TEST(ServiceMoeTest, WorkerKilledSendingExpertPartialsLeavesTheOutputUnchanged) {
  Cluster c("moe-kill", "qwen2_moe");
  c.StartCoordinator();
  c.StartWorker();
  Process* victim = c.StartWorker({}, {{"QCAL_FAULT", "worker:block=1:stage=expert:kill"}});
  WaitForWorkers(c, 2);
  const std::string id = c.SubmitSpec(c.GangSpec("out", kGptq, kSamples, 1, 2));
  ASSERT_FALSE(id.empty());
  // The first plan splits the expert units between the two ranks.
  for (int i = 0; i < 200; ++i) {
    absl::StatusOr<v1::Job> job = c.Client()->Get(id);
    ASSERT_TRUE(job.ok()) << job.status();
    if (job->gang_size() == 2) {
      EXPECT_GT(job->gang(0).owned_expert_units_size(), 0);
      EXPECT_GT(job->gang(1).owned_expert_units_size(), 0);
      EXPECT_EQ(job->gang(0).owned_expert_units_size() + job->gang(1).owned_expert_units_size(), 9);
      break;
    }
    ASSERT_LT(i, 199) << "no two-worker plan\n" << c.Logs();
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_TRUE(victim->Wait(kJobTimeout)) << c.Logs();
  EXPECT_EQ(victim->term_signal(), SIGKILL);
  absl::StatusOr<v1::Job> job = c.WaitFinal(id, kJobTimeout);
  ASSERT_TRUE(job.ok()) << job.status() << "\n" << c.Logs();
  ASSERT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED) << job->error() << "\n" << c.Logs();
  EXPECT_GE(job->attempts(), 2);
  EXPECT_EQ(CompareOutputs(LocalGangRun(c, kGptq, kSamples, 1), c.output_root() + "/out"), "");
}

TEST(ServiceMoeTest, RecipeStagesTheExpertsDoNotTakeAreRefusedAtSubmit) {
  Cluster c("moe-refused", "qwen3_moe");
  c.StartCoordinator();
  v1::JobSpec spec = c.GangSpec(
      "out", "method: gptq\nweights: {bits: 4}\nerror_reconstruction: {rank: 8}\n", 8, 1, 1);
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  absl::StatusOr<v1::SubmitJobResponse> r = c.Client()->Submit(request);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("\"error_reconstruction\""));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("qwen3_moe"));
}

}  // namespace
}  // namespace qcal::testing
