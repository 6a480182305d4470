// Input-path confinement and submit-time file checks (DESIGN section 7, "Paths" and "Limits and
// errors"), and the JobSpec normalization and fault-injection parsing the service relies on.
#include "services/common/input_paths.h"

#include <fcntl.h>

#include <filesystem>
#include <fstream>

#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/common/fault_injection.h"
#include "services/common/job_spec.h"
#include "tests/service/service_test_util.h"

namespace qcal::service {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class InputPathsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tree_ = testing::MakeServiceTree("input_paths_test");
    auto root = InputRoot::Open(tree_.input);
    ASSERT_TRUE(root.ok()) << root.status();
    root_ = std::make_unique<InputRoot>(*std::move(root));
  }
  void TearDown() override { fs::remove_all(tree_.root); }

  std::string Why(const std::string& rel, int flags = O_RDONLY) {
    absl::StatusOr<ScopedFd> fd = root_->OpenBeneath(rel, flags, "spec.model");
    EXPECT_FALSE(fd.ok()) << rel;
    EXPECT_TRUE(absl::IsInvalidArgument(fd.status())) << fd.status();
    return std::string(fd.status().message());
  }
  absl::Status Validate(const v1::JobSpec& spec) {
    absl::StatusOr<v1::JobSpec> normalized = NormalizeJobSpec(spec);
    if (!normalized.ok()) return normalized.status();
    return ValidateJobInputs(*root_, *normalized).status();
  }

  testing::ServiceTree tree_;
  std::unique_ptr<InputRoot> root_;
};

TEST_F(InputPathsTest, EscapesAreRefusedAndInsideLinksFollowed) {
  EXPECT_THAT(Why("/etc/passwd"), HasSubstr("is absolute"));
  EXPECT_THAT(Why("tiny/../../input/tiny/config.json"), HasSubstr("contains \"..\""));
  EXPECT_THAT(Why(""), HasSubstr("is empty"));
  EXPECT_THAT(Why("tiny/nothing"), HasSubstr("does not exist"));
  fs::create_symlink("/etc/passwd", tree_.input + "/passwd");
  EXPECT_THAT(Why("passwd"), HasSubstr("resolves outside the input root"));
  fs::create_directory_symlink("..", tree_.input + "/up");
  EXPECT_THAT(Why("up/input/tiny/config.json"), HasSubstr("resolves outside the input root"));
  fs::create_symlink("tiny/config.json", tree_.input + "/config-link");
  EXPECT_TRUE(root_->OpenFile("config-link", "x").ok());
  EXPECT_THAT(Why("tiny/config.json", O_RDONLY | O_DIRECTORY), HasSubstr("not a directory"));
}

TEST_F(InputPathsTest, ModelFilesAreCheckedAtSubmit) {
  const v1::JobSpec good = testing::TinySpec("out");
  auto facts = ValidateJobInputs(*root_, *NormalizeJobSpec(good));
  ASSERT_TRUE(facts.ok()) << facts.status();
  EXPECT_EQ(facts->num_blocks, 2);
  EXPECT_EQ(facts->shards, std::vector<std::string>{"model.safetensors"});

  const std::string shard = tree_.input + "/tiny/model.safetensors";
  fs::resize_file(shard, fs::file_size(shard) - 1);  // offsets past the end of the file
  absl::Status s = Validate(good);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(std::string(s.message()), HasSubstr("tiny/model.safetensors"));
  {
    std::ofstream f(shard, std::ios::binary | std::ios::trunc);
    f << "\x05\x00\x00\x00\x00\x00\x00\x00{bad}";  // a malformed header
  }
  s = Validate(good);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(std::string(s.message()), HasSubstr("tiny/model.safetensors"));
  fs::remove(shard);
  EXPECT_THAT(std::string(Validate(good).message()), HasSubstr("has no *.safetensors"));

  ASSERT_TRUE(
      WriteStringToFile(tree_.input + "/tiny/config.json", "{\"model_type\": \"gpt2\"}").ok());
  s = Validate(good);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(std::string(s.message()), HasSubstr("tiny/config.json"));
}

TEST_F(InputPathsTest, IndexMustNameExistingShards) {
  ASSERT_TRUE(
      WriteStringToFile(tree_.input + "/tiny/model.safetensors.index.json",
                        "{\"weight_map\": {\"lm_head.weight\": \"model-00002.safetensors\"}}")
          .ok());
  const absl::Status s = Validate(testing::TinySpec("out"));
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(std::string(s.message()), HasSubstr("missing shard \"model-00002.safetensors\""));
}

TEST(JobSpecTest, UnsetFieldsTakeTheDocumentedDefaults) {
  v1::JobSpec spec;
  spec.set_model("m");
  spec.set_calib("c.txt");
  spec.set_output_name("out");
  spec.mutable_recipe()->set_method("rtn");
  spec.mutable_recipe()->mutable_weights()->set_bits(3);
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->samples(), 128);
  EXPECT_EQ(n->seq_len(), 2048);
  EXPECT_EQ(n->seed(), 0u);
  EXPECT_FALSE(n->has_threads());
  EXPECT_FALSE(n->has_eval_text());
  EXPECT_EQ(n->recipe().weights().group_size(), 128);
  EXPECT_EQ(n->recipe().weights().grid(), "uniform");
  EXPECT_DOUBLE_EQ(n->recipe().gptq().damp(), 0.01);
  EXPECT_TRUE(n->recipe().gptq().true_sequential());
  // Explicit defaults hash the same; a changed value does not.
  v1::JobSpec explicit_spec = spec;
  explicit_spec.set_samples(128);
  explicit_spec.mutable_recipe()->mutable_gptq()->set_block_size(128);
  EXPECT_EQ(SpecSha256(*n), SpecSha256(*NormalizeJobSpec(explicit_spec)));
  explicit_spec.mutable_recipe()->mutable_gptq()->set_damp(0.02);
  EXPECT_NE(SpecSha256(*n), SpecSha256(*NormalizeJobSpec(explicit_spec)));
  // The recipe round-trips to the engine's.
  auto recipe = RecipeFromProto(n->recipe());
  ASSERT_TRUE(recipe.ok());
  EXPECT_EQ(RecipeToProto(*recipe).SerializeAsString(), n->recipe().SerializeAsString());
}

TEST(JobSpecTest, BadValuesNameTheField) {
  v1::JobSpec spec = testing::TinySpec("out");
  spec.set_samples(0);
  EXPECT_THAT(std::string(NormalizeJobSpec(spec).status().message()), HasSubstr("spec.samples"));
  spec = testing::TinySpec(".hidden");
  EXPECT_THAT(std::string(NormalizeJobSpec(spec).status().message()),
              HasSubstr("must not start with '.'"));
  spec = testing::TinySpec("out");
  spec.set_eval_text("e.txt");
  spec.set_eval_max_windows(0);
  EXPECT_THAT(std::string(NormalizeJobSpec(spec).status().message()),
              HasSubstr("spec.eval_max_windows"));
  spec = testing::TinySpec("out");
  spec.mutable_recipe()->mutable_weights()->set_group_size(0);
  EXPECT_THAT(std::string(NormalizeJobSpec(spec).status().message()),
              HasSubstr("weights.group_size"));
  EXPECT_EQ(TempOutputName("out", "job-1"), ".out.job-1.qcal-tmp");
}

TEST(FaultInjectionTest, ParsesPointsForItsProcessAndFiresOnce) {
  auto f = FaultInjector::Parse("worker:block=2:stage=solve:error,coordinator:stage=commit:kill",
                                "worker");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->Hit("solve", 1).ok());
  EXPECT_TRUE((*f)->Hit("commit", 2).ok());  // the coordinator's fault is not ours
  EXPECT_TRUE(absl::IsInternal((*f)->Hit("solve", 2)));
  EXPECT_TRUE((*f)->Hit("solve", 2).ok());  // fired once
  for (const char* bad : {"worker:stage=solve", "gpu:stage=x:kill", "worker:block=x:stage=a:kill",
                          "worker:block=1:kill", "worker:stage=a:explode"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(FaultInjector::Parse(bad, "worker").status())) << bad;
  }
}

}  // namespace
}  // namespace qcal::service
