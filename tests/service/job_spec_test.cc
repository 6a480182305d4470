// NormalizeJobSpec's gang size (JobSpec.workers): defaults, the range 1 <= min <= max <= 64, and
// errors that name the key; the recipe's `hessian` (proto3 optional string) and `retrain` section
// both ways, and their errors at submit.
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

TEST(JobSpecRetrainTest, AbsentIsOffAndDefaultsAreFilledIn) {
  v1::JobSpec spec = testing::TinySpec("a");
  auto n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_FALSE(n->recipe().has_retrain());
  ASSERT_FALSE(RecipeFromProto(n->recipe())->retrain.enabled);

  spec.mutable_recipe()->mutable_retrain();  // an empty section: on, every default
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  const v1::RetrainRecipe& t = n->recipe().retrain();
  EXPECT_EQ(t.method(), "apiq");
  EXPECT_EQ(t.rank(), 64);
  EXPECT_EQ(t.epochs().weight(), 0);
  EXPECT_EQ(t.epochs().mixed(), 0);
  EXPECT_EQ(t.epochs().output(), 20);
  EXPECT_EQ(t.lambda(), 0.1);
  EXPECT_EQ(t.lr_lora(), 5.0e-4);
  EXPECT_EQ(t.lr_clip(), 5.0e-3);
  EXPECT_EQ(t.weight_decay(), 0.1);
  // Explicit defaults are the same spec; the engine's recipe reads back the same canonical JSON.
  v1::JobSpec explicit_spec = testing::TinySpec("a");
  *explicit_spec.mutable_recipe()->mutable_retrain() = t;
  EXPECT_EQ(SpecSha256(*NormalizeJobSpec(explicit_spec)), SpecSha256(*n));

  // The saliency paper's recipe survives the round trip, and needs the Fisher.
  v1::RetrainRecipe* s = spec.mutable_recipe()->mutable_retrain();
  s->set_method("saliency");
  s->set_rank(16);
  s->mutable_epochs()->set_weight(15);
  s->mutable_epochs()->set_output(5);
  s->set_lambda(0.25);
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  absl::StatusOr<engine::Recipe> recipe = RecipeFromProto(n->recipe());
  ASSERT_TRUE(recipe.ok()) << recipe.status();
  EXPECT_TRUE(recipe->retrain.enabled);
  EXPECT_EQ(recipe->retrain.method, engine::RetrainMethod::kSaliency);
  EXPECT_EQ(recipe->retrain.RankOrDefault(), 16);
  EXPECT_EQ(recipe->retrain.epochs.weight, 15);
  EXPECT_EQ(recipe->retrain.epochs.mixed, 0);
  EXPECT_EQ(recipe->retrain.epochs.output, 5);
  EXPECT_EQ(recipe->retrain.lambda, 0.25);
  EXPECT_TRUE(recipe->NeedsFisher());
  absl::StatusOr<engine::Recipe> again = RecipeFromProto(RecipeToProto(*recipe));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->ToCanonicalJson(), recipe->ToCanonicalJson());
}

TEST(JobSpecRetrainTest, BadValuesAreInvalidArgumentNamingTheKey) {
  struct Case {
    const char* key;
    void (*set)(v1::RetrainRecipe*);
  };
  const Case cases[] = {
      {"retrain.method", [](v1::RetrainRecipe* t) { t->set_method("lora"); }},
      {"retrain.rank", [](v1::RetrainRecipe* t) { t->set_rank(0); }},
      {"retrain.epochs", [](v1::RetrainRecipe* t) { t->mutable_epochs()->set_output(0); }},
      {"retrain.lambda", [](v1::RetrainRecipe* t) { t->set_lambda(-1); }},
      {"retrain.lr_lora", [](v1::RetrainRecipe* t) { t->set_lr_lora(0); }},
      {"retrain.lr_clip", [](v1::RetrainRecipe* t) { t->set_lr_clip(-5e-3); }},
      {"retrain.weight_decay", [](v1::RetrainRecipe* t) { t->set_weight_decay(-0.1); }},
  };
  for (const Case& c : cases) {
    v1::JobSpec spec = testing::TinySpec("a");
    c.set(spec.mutable_recipe()->mutable_retrain());
    auto n = NormalizeJobSpec(spec);
    EXPECT_TRUE(absl::IsInvalidArgument(n.status())) << c.key << ": " << n.status();
    EXPECT_NE(n.status().message().find(c.key), std::string::npos) << n.status();
  }
  // With error reconstruction its factors start the LoRA: a rank is an error.
  v1::JobSpec spec = testing::TinySpec("a");
  spec.mutable_recipe()->mutable_error_reconstruction()->set_rank(8);
  spec.mutable_recipe()->mutable_retrain()->set_rank(8);
  auto n = NormalizeJobSpec(spec);
  EXPECT_TRUE(absl::IsInvalidArgument(n.status()));
  EXPECT_NE(n.status().message().find("retrain.rank"), std::string::npos) << n.status();
  spec.mutable_recipe()->mutable_retrain()->clear_rank();
  n = NormalizeJobSpec(spec);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_FALSE(n->recipe().retrain().has_rank());
}

}  // namespace
}  // namespace qcal::service
