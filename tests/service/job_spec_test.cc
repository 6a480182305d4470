// NormalizeJobSpec's gang size (JobSpec.workers): defaults, the range 1 <= min <= max <= 64, and
// errors that name the key; the recipe's `hessian` (proto3 optional string) both ways, and its
// errors at submit; the balanced grid both ways.
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

// weights.grid "balanced" (ABQ bit balance) crosses the proto both ways and needs bits 2.
TEST(JobSpecGridTest, BalancedRoundTripsAndNeedsTwoBits) {
  v1::JobSpec spec = testing::TinySpec("a");
  spec.mutable_recipe()->mutable_weights()->set_bits(2);
  spec.mutable_recipe()->mutable_weights()->set_grid("balanced");
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  absl::StatusOr<engine::Recipe> recipe = RecipeFromProto(n->recipe());
  ASSERT_TRUE(recipe.ok()) << recipe.status();
  EXPECT_EQ(recipe->weights.grid, kernels::GridKind::kBalanced);
  EXPECT_EQ(RecipeToProto(*recipe).weights().grid(), "balanced");
  spec.mutable_recipe()->mutable_weights()->set_bits(3);
  n = NormalizeJobSpec(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(n.status()));
  EXPECT_NE(n.status().message().find("\"weights.grid\""), std::string::npos) << n.status();
  EXPECT_NE(n.status().message().find("weights.bits"), std::string::npos) << n.status();
}

}  // namespace
}  // namespace qcal::service
