// Input-path confinement and submit-time file checks (DESIGN section 7, "Paths" and "Limits and
// errors"), and the JobSpec normalization and fault-injection parsing the service relies on.
#include "services/common/input_paths.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>

#include "common/files.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
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

// A mixture-of-experts model is a model like any other to the input checks (the service runs MoE
// jobs: docs/MOE.md); its config's expert keys are parsed and still checked.
TEST_F(InputPathsTest, MixtureOfExpertsConfigIsCheckedAndAccepted) {
  const v1::JobSpec good = testing::TinySpec("out");
  ASSERT_TRUE(Validate(good).ok());
  const std::string config = tree_.input + "/tiny/config.json";
  auto text = ReadFileToString(config);
  ASSERT_TRUE(text.ok());
  nlohmann::json j = nlohmann::json::parse(*text);
  j["model_type"] = "qwen3_moe";
  j["num_experts"] = 4;
  j["num_experts_per_tok"] = 2;
  ASSERT_TRUE(WriteStringToFile(config, j.dump()).ok());
  absl::StatusOr<v1::JobSpec> normalized = NormalizeJobSpec(good);
  ASSERT_TRUE(normalized.ok()) << normalized.status();
  absl::StatusOr<ModelFacts> facts = ValidateJobInputs(*root_, *normalized);
  ASSERT_TRUE(facts.ok()) << facts.status();
  EXPECT_TRUE(facts->config.moe());
  EXPECT_EQ(facts->config.num_experts, 4);
  j["num_experts_per_tok"] = 5;
  ASSERT_TRUE(WriteStringToFile(config, j.dump()).ok());
  const absl::Status s = Validate(good);
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("num_experts_per_tok"));
}

TEST_F(InputPathsTest, EitherTokenizerFileIsAccepted) {
  const v1::JobSpec good = testing::TinySpec("out");
  const std::string model = tree_.input + "/tiny/tokenizer.model";
  const std::string json = tree_.input + "/tiny/tokenizer.json";
  ASSERT_TRUE(fs::exists(model));
  ASSERT_TRUE(WriteStringToFile(json, "{}").ok());
  EXPECT_TRUE(Validate(good).ok());
  fs::remove(model);
  EXPECT_TRUE(Validate(good).ok());  // tokenizer.json alone (Llama 3, Qwen)
  fs::remove(json);
  const absl::Status s = Validate(good);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr("has no tokenizer: neither tokenizer.json (model file \"tiny/tokenizer.json\" "
                "does not exist"));
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
  EXPECT_EQ(TempOutputName("out", "job-1", 7), ".out.job-1.7.qcal-tmp");
  EXPECT_EQ(JobOfTempOutputName(".out.job-1.7.qcal-tmp"), "job-1");
  EXPECT_EQ(JobOfTempOutputName(".my.out.job-1.7.qcal-tmp"), "job-1");
  for (const char* other : {"out", ".out.job-1.qcal-tmp", ".out.job-1.x.qcal-tmp", ".7.qcal-tmp",
                            "out.job-1.7.qcal-tmp", ".qcal-tmp"}) {
    EXPECT_EQ(JobOfTempOutputName(other), "") << other;
  }
}

// Proto -> engine -> proto keeps the recipe's meaning (canonical JSON, hence recipe_sha256) and
// its normalized bytes, for the activations, smoothing and error_reconstruction sections too.
TEST(JobSpecTest, RecipeSectionsRoundTripThroughTheProto) {
  const char* kRecipes[] = {
      "method: rtn\nweights: {bits: 4}\n",
      "method: gptq\nweights: {bits: 3, group_size: -1}\nactivations: {bits: 8}\n"
      "smoothing: {method: smoothquant, alpha: 0.7}\n",
      "method: gptq\nweights: {bits: 4}\nactivations: {bits: 6}\n"
      "smoothing: {method: aser, alpha: 0.25, outlier_channels: 16}\n"
      "error_reconstruction: {rank: 64, energy: 0.5, max_extra_params: 0.05, whitening: none}\n",
      "method: rtn\nweights: {bits: 2}\nsmoothing: {method: aser, outlier_channels: 128}\n"
      "error_reconstruction: {rank: auto, whitening: diagonal}\n",
  };
  std::set<std::string> hashes;
  for (const char* yaml : kRecipes) {
    auto recipe = engine::ParseRecipeYaml(yaml, "r.yaml");
    ASSERT_TRUE(recipe.ok()) << recipe.status();
    const v1::Recipe proto = RecipeToProto(*recipe);
    auto back = RecipeFromProto(proto);
    ASSERT_TRUE(back.ok()) << yaml << ": " << back.status();
    EXPECT_EQ(back->ToCanonicalJson().dump(), recipe->ToCanonicalJson().dump()) << yaml;
    EXPECT_EQ(back->Sha256(), recipe->Sha256()) << yaml;
    EXPECT_EQ(RecipeToProto(*back).SerializeAsString(), proto.SerializeAsString()) << yaml;
    EXPECT_EQ(proto.has_error_reconstruction(), recipe->error_reconstruction.enabled) << yaml;
    hashes.insert(recipe->Sha256());
  }
  EXPECT_EQ(hashes.size(), std::size(kRecipes));
  // rank: auto travels as rank_auto with no rank.
  auto recipe = engine::ParseRecipeYaml(kRecipes[3], "r.yaml");
  ASSERT_TRUE(recipe.ok());
  const v1::ErrorReconstructionRecipe e = RecipeToProto(*recipe).error_reconstruction();
  EXPECT_TRUE(e.rank_auto());
  EXPECT_FALSE(e.has_rank());
}

TEST(JobSpecTest, UnsetRecipeSectionFieldsTakeTheDocumentedDefaults) {
  v1::JobSpec spec = testing::TinySpec("out");
  v1::Recipe* p = spec.mutable_recipe();
  p->clear_activations();
  p->clear_smoothing();
  p->clear_error_reconstruction();
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->recipe().activations().bits(), 16);
  EXPECT_EQ(n->recipe().smoothing().method(), "none");
  EXPECT_DOUBLE_EQ(n->recipe().smoothing().alpha(), 0.5);
  EXPECT_EQ(n->recipe().smoothing().outlier_channels(), 32);
  EXPECT_FALSE(n->recipe().has_error_reconstruction());  // absent: off
  // Empty section messages mean the same as absent ones.
  p->mutable_activations();
  p->mutable_smoothing();
  EXPECT_EQ(SpecSha256(*n), SpecSha256(*NormalizeJobSpec(spec)));

  // A present error_reconstruction with only rank_auto set: on, every other default.
  p->mutable_smoothing()->set_method("aser");
  p->mutable_error_reconstruction()->set_rank_auto(true);
  auto recipe = RecipeFromProto(*p);
  ASSERT_TRUE(recipe.ok()) << recipe.status();
  EXPECT_TRUE(recipe->error_reconstruction.enabled);
  EXPECT_EQ(recipe->error_reconstruction.rank, engine::kRecipeAutoRank);
  EXPECT_DOUBLE_EQ(recipe->error_reconstruction.energy, 0.9);
  EXPECT_DOUBLE_EQ(recipe->error_reconstruction.max_extra_params, 0.1);
  EXPECT_EQ(recipe->error_reconstruction.whitening, engine::Whitening::kCholesky);
  EXPECT_EQ(recipe->smoothing.outlier_channels, 32);
  // Explicit defaults hash the same; a changed value does not.
  v1::JobSpec explicit_spec = spec;
  v1::ErrorReconstructionRecipe* e = explicit_spec.mutable_recipe()->mutable_error_reconstruction();
  e->set_energy(0.9);
  e->set_whitening("cholesky");
  explicit_spec.mutable_recipe()->mutable_activations()->set_bits(16);
  const std::string sha = SpecSha256(*NormalizeJobSpec(spec));
  EXPECT_EQ(sha, SpecSha256(*NormalizeJobSpec(explicit_spec)));
  e->set_energy(0.8);
  EXPECT_NE(sha, SpecSha256(*NormalizeJobSpec(explicit_spec)));
}

TEST(JobSpecTest, BadRecipeSectionValuesNameTheKey) {
  const auto error_of = [](const v1::Recipe& recipe) {
    auto r = RecipeFromProto(recipe);
    EXPECT_FALSE(r.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
    return std::string(r.status().message());
  };
  const v1::Recipe base = testing::TinySpec("out").recipe();
  v1::Recipe p = base;
  p.mutable_error_reconstruction();  // present without a rank
  EXPECT_THAT(error_of(p), HasSubstr("\"error_reconstruction.rank\" is required"));
  p.mutable_error_reconstruction()->set_rank_auto(false);
  EXPECT_THAT(error_of(p), HasSubstr("\"error_reconstruction.rank\" is required"));
  for (int rank : {0, -1, -3}) {  // -1 is the engine's auto marker: it must not leak through
    p.mutable_error_reconstruction()->set_rank(rank);
    EXPECT_THAT(error_of(p), HasSubstr("\"error_reconstruction.rank\" must be")) << rank;
  }
  p.mutable_error_reconstruction()->set_rank(8);
  p.mutable_error_reconstruction()->set_rank_auto(true);
  EXPECT_THAT(error_of(p), HasSubstr("\"error_reconstruction.rank\" is set together"));
  p.mutable_error_reconstruction()->clear_rank_auto();
  p.mutable_error_reconstruction()->set_whitening("pca");
  EXPECT_THAT(error_of(p), HasSubstr("\"error_reconstruction.whitening\""));

  p = base;
  p.mutable_activations()->set_bits(3);
  EXPECT_THAT(error_of(p), HasSubstr("\"activations.bits\""));
  p = base;
  p.mutable_smoothing()->set_method("aser");
  EXPECT_THAT(error_of(p), HasSubstr("\"smoothing.method\""));
  p.mutable_error_reconstruction()->set_rank(16);  // default outlier_channels 32 > 16
  EXPECT_THAT(error_of(p), HasSubstr("\"smoothing.outlier_channels\""));
  p.mutable_smoothing()->set_alpha(1.5);
  EXPECT_THAT(error_of(p), HasSubstr("\"smoothing.alpha\""));
  // Through NormalizeJobSpec too.
  v1::JobSpec spec = testing::TinySpec("out");
  spec.mutable_recipe()->mutable_error_reconstruction()->set_energy(0.5);
  EXPECT_THAT(std::string(NormalizeJobSpec(spec).status().message()),
              HasSubstr("error_reconstruction.rank"));
}

TEST(FaultInjectionTest, ParsesPointsForItsProcessAndFiresOnce) {
  auto f = FaultInjector::Parse("worker:block=2:stage=solve:error,coordinator:stage=commit:kill",
                                "worker");
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_TRUE((*f)->Hit("solve", 1).ok());
  EXPECT_TRUE((*f)->Hit("commit", 2).ok());  // the coordinator's fault is not ours
  EXPECT_TRUE(absl::IsInternal((*f)->Hit("solve", 2)));
  EXPECT_TRUE((*f)->Hit("solve", 2).ok());  // fired once
  for (const char* bad :
       {"worker:stage=solve", "gpu:stage=x:kill", "worker:block=x:stage=a:kill",
        "worker:block=1:kill", "worker:stage=a:explode", "worker:stage=a:stop:kill"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(FaultInjector::Parse(bad, "worker").status())) << bad;
  }
}

// waitpid(pid, WUNTRACED) polled for at most 20 s: the status of the child's next stop or exit,
// or nullopt when neither came.
std::optional<int> WaitStoppedOrExited(pid_t pid) {
  for (int i = 0; i < 2000; ++i) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG | WUNTRACED) == pid) return status;
    usleep(10'000);
  }
  return std::nullopt;
}

TEST(FaultInjectionTest, StopFreezesTheProcessAtThePointUntilContinued) {
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // Child: exit code 0 when every Hit is OK; only Hit("commit", 1) may stop.
    auto f = FaultInjector::Parse("worker:block=1:stage=commit:stop", "worker");
    if (!f.ok()) _exit(2);
    if (!(*f)->Hit("commit", 0).ok() || !(*f)->Hit("solve", 1).ok()) _exit(3);
    if (!(*f)->Hit("commit", 1).ok()) _exit(4);  // stops here; OK once continued
    if (!(*f)->Hit("commit", 1).ok()) _exit(5);  // fired once: no second stop
    _exit(0);
  }
  // Reaps the child whatever happens below.
  struct Reaper {
    pid_t pid;
    bool exited = false;
    ~Reaper() {
      if (exited) return;
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  } reaper{pid};
  std::optional<int> status = WaitStoppedOrExited(pid);
  ASSERT_TRUE(status.has_value()) << "the child neither stopped nor exited";
  ASSERT_TRUE(WIFSTOPPED(*status)) << "the child did not stop: status " << *status;
  EXPECT_EQ(WSTOPSIG(*status), SIGSTOP);
  ASSERT_EQ(kill(pid, SIGCONT), 0);
  status = WaitStoppedOrExited(pid);
  ASSERT_TRUE(status.has_value()) << "the child did not exit after SIGCONT";
  ASSERT_TRUE(WIFEXITED(*status)) << "the child stopped again: status " << *status;
  reaper.exited = true;
  EXPECT_EQ(WEXITSTATUS(*status), 0);
}

}  // namespace
}  // namespace qcal::service
