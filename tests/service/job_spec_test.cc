// NormalizeJobSpec's gang size (JobSpec.workers): defaults, the range 1 <= min <= max <= 64, and
// errors that name the key; the recipe's `hessian` (proto3 optional string) both ways, and its
// errors at submit; the recipe's `retrain` section both ways (absent: off; a rank only when given).
#include "services/common/job_spec.h"

#include <string>

#include "gtest/gtest.h"
#include "tests/service/service_test_util.h"

namespace qcal::service {
namespace {

TEST(JobSpecWorkersTest, DefaultsAreOneAndMaxFollowsMin) {
  v1::JobSpec spec = testing::TinySpec("a");
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->workers().min(), 1);
  EXPECT_EQ(n->workers().max(), 1);
  spec.mutable_workers()->set_min(3);
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->workers().min(), 3);
  EXPECT_EQ(n->workers().max(), 3);
  spec.mutable_workers()->set_max(kMaxGangWorkers);
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->workers().max(), 64);
  // Explicit defaults are the same spec.
  v1::JobSpec explicit_spec = testing::TinySpec("a");
  explicit_spec.mutable_workers()->set_min(1);
  explicit_spec.mutable_workers()->set_max(1);
  EXPECT_EQ(SpecSha256(*NormalizeJobSpec(explicit_spec)),
            SpecSha256(*NormalizeJobSpec(testing::TinySpec("a"))));
}

TEST(JobSpecWorkersTest, OutOfRangeCountsAreInvalidArgumentNamingTheKey) {
  struct Case {
    int min, max;  // 0: unset
    const char* key;
  };
  for (const Case& c :
       {Case{0, 0, nullptr}, Case{-1, 0, "spec.workers.min"}, Case{65, 0, "spec.workers.min"},
        Case{4, 2, "spec.workers.max"}, Case{1, 65, "spec.workers.max"}, Case{0, 0, nullptr}}) {
    v1::JobSpec spec = testing::TinySpec("a");
    if (c.min != 0) spec.mutable_workers()->set_min(c.min);
    if (c.max != 0) spec.mutable_workers()->set_max(c.max);
    auto n = NormalizeJobSpec(spec);
    if (c.key == nullptr) {
      EXPECT_TRUE(n.ok()) << n.status();
      continue;
    }
    EXPECT_TRUE(absl::IsInvalidArgument(n.status())) << c.min << ":" << c.max;
    EXPECT_NE(n.status().message().find(c.key), std::string::npos) << n.status();
  }
  // min 0 given explicitly is out of range too.
  v1::JobSpec spec = testing::TinySpec("a");
  spec.mutable_workers()->set_min(0);
  EXPECT_TRUE(absl::IsInvalidArgument(NormalizeJobSpec(spec).status()));
}

TEST(JobSpecHessianTest, UnsetIsLayerAndEveryKindRoundTrips) {
  v1::JobSpec spec = testing::TinySpec("a");
  spec.mutable_recipe()->clear_hessian();
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->recipe().hessian(), "layer");
  // An explicit default is the same spec.
  spec.mutable_recipe()->set_hessian("layer");
  EXPECT_EQ(SpecSha256(*NormalizeJobSpec(spec)), SpecSha256(*n));
  for (const char* kind : {"layer", "output_adaptive", "output_adaptive_token"}) {
    spec.mutable_recipe()->set_hessian(kind);
    n = NormalizeJobSpec(spec);
    ASSERT_TRUE(n.ok()) << kind << ": " << n.status();
    EXPECT_EQ(n->recipe().hessian(), kind);
    absl::StatusOr<engine::Recipe> recipe = RecipeFromProto(n->recipe());
    ASSERT_TRUE(recipe.ok()) << recipe.status();
    EXPECT_EQ(engine::RecipeName(recipe->hessian), std::string(kind));
    EXPECT_EQ(recipe->NeedsGradientPass(), std::string(kind) != "layer");
    EXPECT_EQ(RecipeToProto(*recipe).hessian(), kind);
  }
}

TEST(JobSpecHessianTest, BadValuesAreInvalidArgumentNamingTheKey) {
  v1::JobSpec spec = testing::TinySpec("a");
  spec.mutable_recipe()->set_hessian("fisher");
  auto n = NormalizeJobSpec(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(n.status()));
  EXPECT_NE(n.status().message().find("\"hessian\""), std::string::npos) << n.status();
  EXPECT_NE(n.status().message().find("fisher"), std::string::npos) << n.status();
  // The output-adaptive kinds need GPTQ.
  spec.mutable_recipe()->set_hessian("output_adaptive");
  spec.mutable_recipe()->set_method("rtn");
  n = NormalizeJobSpec(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(n.status()));
  EXPECT_NE(n.status().message().find("\"hessian\""), std::string::npos) << n.status();
}

TEST(JobSpecRetrainTest, AbsentIsOffAndTheSectionRoundTrips) {
  v1::JobSpec spec = testing::TinySpec("a");
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_FALSE(n->recipe().has_retrain());
  auto off = RecipeFromProto(n->recipe());
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_FALSE(off->retrain.enabled);

  spec.mutable_recipe()->mutable_weights()->set_grid("uniform");
  v1::RetrainRecipe* t = spec.mutable_recipe()->mutable_retrain();
  t->set_method("saliency");
  t->mutable_epochs()->set_weight(15);
  t->mutable_epochs()->set_output(5);
  t->set_lambda(0.25);
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  auto recipe = RecipeFromProto(n->recipe());
  ASSERT_TRUE(recipe.ok()) << recipe.status();
  EXPECT_TRUE(recipe->retrain.enabled);
  EXPECT_EQ(recipe->retrain.method, engine::RetrainMethod::kSaliency);
  EXPECT_FALSE(recipe->retrain.rank.has_value());
  EXPECT_EQ(recipe->retrain.epochs.weight, 15);
  EXPECT_EQ(recipe->retrain.epochs.mixed, 0);
  EXPECT_EQ(recipe->retrain.epochs.output, 5);
  EXPECT_DOUBLE_EQ(recipe->retrain.lambda, 0.25);
  EXPECT_TRUE(recipe->RunsGradientPass());
  // Back to the proto and again: the same recipe, hash included.
  auto again = RecipeFromProto(RecipeToProto(*recipe));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->Sha256(), recipe->Sha256());
  EXPECT_FALSE(RecipeToProto(*recipe).retrain().has_rank());
  t->set_rank(0);
  n = NormalizeJobSpec(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(n.status()));
  EXPECT_NE(n.status().message().find("retrain.rank"), std::string::npos) << n.status();
}

}  // namespace
}  // namespace qcal::service
