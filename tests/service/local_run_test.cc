// `qcal quantize`'s two paths: the engine called directly (engine::RunQuantizeJob, what the
// engine-only build runs) and the in-process coordinator with N workers (local::RunLocalJob, what
// the service build runs). Same job, byte-identical outputs (qcal_run.json aside).
#include "services/local/local_run.h"

#include <gtest/gtest.h>

#include <string>

#include "services/engine/pipeline.h"
#include "services/engine/recipe.h"
#include "tests/service/service_harness.h"
#include "tests/support/test_paths.h"

namespace qcal::testing {
namespace {

engine::JobOptions JobOf(const Cluster& c, const std::string& recipe_yaml, const std::string& out) {
  engine::JobOptions j;
  const std::string in = c.input_root() + "/";
  j.model_dir = in + c.model().model;
  j.calib_path = in + c.model().calib;
  j.eval_text = in + c.model().eval;
  j.eval_max_windows = 2;
  absl::StatusOr<engine::Recipe> recipe = engine::ParseRecipeYaml(recipe_yaml, "recipe");
  EXPECT_TRUE(recipe.ok()) << recipe.status();
  j.recipe = *recipe;
  j.samples = 20;  // three chunks of 8, the last short
  j.seq_len = 32;
  j.seed = 3;
  j.threads = 1;
  j.out_dir = out;
  return j;
}

constexpr char kGptq[] = "method: gptq\nweights: {bits: 4, group_size: 32}\n";

TEST(LocalRunTest, InProcessCoordinatorMatchesTheEngineDirectly) {
  Cluster cluster("local_run");
  const std::string dir = MakeTempDir("qcal-local-run");
  absl::StatusOr<engine::JobResult> direct =
      engine::RunQuantizeJob(JobOf(cluster, kGptq, dir + "/direct"));
  ASSERT_TRUE(direct.ok()) << direct.status();
  local::LocalRunOptions lo;
  lo.job = JobOf(cluster, kGptq, dir + "/local");
  absl::StatusOr<engine::JobResult> local = local::RunLocalJob(lo);
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_EQ(CompareOutputs(dir + "/direct", dir + "/local"), "");
  EXPECT_EQ(local->perplexity, direct->perplexity);
  EXPECT_EQ(local->report["summary"], direct->report["summary"]);
}

TEST(LocalRunTest, BadRequestIsRefusedWithTheReason) {
  Cluster cluster("local_run_bad");
  const std::string dir = MakeTempDir("qcal-local-run-bad");
  local::LocalRunOptions lo;
  lo.job = JobOf(cluster, kGptq, dir + "/out");
  lo.job.calib_path = dir + "/missing.txt";
  absl::StatusOr<engine::JobResult> r = local::RunLocalJob(lo);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  EXPECT_NE(r.status().message().find("missing.txt"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace qcal::testing
