// `qcal bench --shape mixtral-8x7b|qwen3-30b-a3b` (issue 17; services/engine/bench.h): the two
// shapes carry the published configs, their FLOP count is the MoE one, and a shrunken variant of
// each runs one block through the MoE driver on the CPU, counting routed tokens and fallback
// experts by the recipe's moe.min_tokens.
#include <cstdint>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/bench.h"

namespace qcal::engine {
namespace {

using ::testing::HasSubstr;

TEST(MoeBenchShapeTest, ShapesHaveThePublishedConfigs) {
  auto mixtral = BenchShapeNamed("mixtral-8x7b");
  ASSERT_TRUE(mixtral.ok()) << mixtral.status();
  const ModelConfig& m = mixtral->config;
  EXPECT_EQ(m.model_type, "mixtral");
  EXPECT_EQ(m.hidden_size, 4096);
  EXPECT_EQ(m.num_layers, 32);
  EXPECT_EQ(m.num_heads, 32);
  EXPECT_EQ(m.num_kv_heads, 8);
  EXPECT_EQ(m.head_dim, 128);
  EXPECT_EQ(m.num_experts, 8);
  EXPECT_EQ(m.num_experts_per_tok, 2);
  EXPECT_EQ(m.moe_intermediate_size, 14336);
  EXPECT_EQ(m.vocab_size, 32000);
  EXPECT_EQ(m.sliding_window, 0);
  EXPECT_EQ(m.rope_theta, 1e6);
  EXPECT_EQ(mixtral->ideal_floor_seconds, 0);  // no floors for the MoE shapes

  auto qwen = BenchShapeNamed("qwen3-30b-a3b");
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  const ModelConfig& q = qwen->config;
  EXPECT_EQ(q.model_type, "qwen3_moe");
  EXPECT_EQ(q.hidden_size, 2048);
  EXPECT_EQ(q.num_layers, 48);
  EXPECT_EQ(q.num_heads, 32);
  EXPECT_EQ(q.num_kv_heads, 4);
  EXPECT_EQ(q.head_dim, 128);
  EXPECT_TRUE(q.qk_norm);
  EXPECT_EQ(q.num_experts, 128);
  EXPECT_EQ(q.num_experts_per_tok, 8);
  EXPECT_EQ(q.moe_intermediate_size, 768);
  EXPECT_TRUE(q.norm_topk_prob);
  EXPECT_EQ(q.shared_expert_intermediate_size, 0);
  EXPECT_EQ(q.vocab_size, 151936);
  for (int b = 0; b < q.num_layers; ++b) EXPECT_TRUE(q.IsMoeBlock(b)) << b;

  auto bad = BenchShapeNamed("mixtral");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("qwen3-30b-a3b"));
}

// Qwen3-30B-A3B's counts by hand: per block the q/k/v (2048 wide) and o (4096 wide) inputs over
// every token, and gate/up (2048) and down (768) over the 8 experts a token is routed to; 128
// experts' solves each.
TEST(MoeBenchShapeTest, FlopsCountEachTokensTopKExperts) {
  const ModelConfig q = BenchShapeNamed("qwen3-30b-a3b")->config;
  const double tokens = 128.0 * 2048, d = 2048, qd = 4096, kvd = 512, fe = 768;
  const BenchFlops f = CountFlops(q, 128, 2048);
  EXPECT_DOUBLE_EQ(f.hessian, 48 * (tokens * (d * d + qd * qd) + 8 * tokens * (d * d + fe * fe)));
  const double attention = 4 * qd * (2048.0 * 2049 / 2) * 128;
  const double forward =
      2 * tokens * (2 * d * qd + 2 * d * kvd + 128 * d) + 2 * 8 * tokens * 3 * d * fe + attention;
  EXPECT_DOUBLE_EQ(f.forward, 48 * forward);
  const double expert_solve = 2 * fe * d * d + d * fe * fe + 2.0 / 3.0 * (d * d * d + fe * fe * fe);
  const double attn_solve =
      qd * d * d + 2 * kvd * d * d + d * qd * qd + 2.0 / 3.0 * (d * d * d + qd * qd * qd);
  EXPECT_DOUBLE_EQ(f.solve, 48 * (attn_solve + 128 * expert_solve));
}

TEST(MoeBenchShapeTest, DecodeBenchRefusesMoeShapes) {
  DecodeBenchOptions o;
  o.config = BenchShapeNamed("mixtral-8x7b")->config;
  const absl::Status s = o.Validate();
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("mixture-of-experts"));
}

// The bench shape with hidden size, heads, experts and vocabulary scaled down (the expert count
// and top-k kept where the CPU allows: 8 experts, top 2), two blocks of which one runs.
BenchOptions Shrunken(const std::string& shape) {
  BenchOptions o;
  o.config = BenchShapeNamed(shape)->config;
  ModelConfig& c = o.config;
  c.hidden_size = 64;
  c.intermediate_size = 96;
  c.moe_intermediate_size = 32;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.num_layers = 2;
  c.vocab_size = 100;
  c.bos_token_id = 1;
  c.num_experts = 8;
  c.num_experts_per_tok = 2;
  o.samples = 16;  // two calibration chunks
  o.seq_len = 32;
  o.blocks = 1;
  o.recipe.weights.group_size = 16;
  return o;
}

class MoeBenchRunTest : public ::testing::TestWithParam<std::string> {};

TEST_P(MoeBenchRunTest, OneBlockThroughTheMoeDriverCountsFallbacks) {
  kernels::BackendOptions bo;
  bo.threads = 2;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  BenchOptions o = Shrunken(GetParam());
  const int64_t tokens = int64_t{16} * 32;

  // The defaults a job fills in (min_tokens 128): an even share is 16 * 32 * 2 / 8 = 128 tokens,
  // so some experts fall below it; with min_tokens 1 none does.
  auto defaults = RunBench(**be, o);
  ASSERT_TRUE(defaults.ok()) << defaults.status();
  EXPECT_EQ(defaults->moe_min_tokens, 128);
  EXPECT_EQ(defaults->blocks_run, 1);
  EXPECT_TRUE(defaults->extrapolated);
  ASSERT_EQ(defaults->block_seconds.size(), 1u);
  EXPECT_GT(defaults->model_seconds, defaults->embed_seconds);
  EXPECT_GT(defaults->mean_rel_error, 0);
  // Every token goes to top_k experts; the counts are the driver's own.
  EXPECT_EQ(defaults->routed_tokens, tokens * 2);
  EXPECT_GE(defaults->min_routed_tokens, 0);
  EXPECT_LE(defaults->max_routed_tokens, tokens);
  // An expert falls back exactly when it has fewer than 128; not all can (they sum to 8 * 128).
  EXPECT_EQ(defaults->fallback_experts > 0, defaults->min_routed_tokens < 128);
  EXPECT_LT(defaults->fallback_experts, 8);

  o.recipe.moe = MoeRecipe{};
  o.recipe.moe->min_tokens = 1;
  auto none = RunBench(**be, o);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_EQ(none->fallback_experts, 0);
  EXPECT_EQ(none->routed_tokens, tokens * 2);
  // The same weights and tokens route the same way whatever min_tokens says.
  EXPECT_EQ(none->min_routed_tokens, defaults->min_routed_tokens);
  EXPECT_EQ(none->max_routed_tokens, defaults->max_routed_tokens);

  o.recipe.moe->min_tokens = static_cast<int>(tokens) + 1;
  auto all = RunBench(**be, o);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->fallback_experts, 8);
}

// A Qwen2-MoE-style shared expert (no bench shape has one, but DrawBlock draws it): it takes every
// token, adds its linears to the block, and leaves the routed experts' counts as they were.
TEST(MoeBenchSharedExpertTest, SharedExpertIsDrawnAndCalibratedOnEveryToken) {
  kernels::BackendOptions bo;
  bo.threads = 2;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  BenchOptions o = Shrunken("qwen3-30b-a3b");
  auto routed_only = RunBench(**be, o);
  ASSERT_TRUE(routed_only.ok()) << routed_only.status();
  o.config.shared_expert_intermediate_size = 48;
  auto shared = RunBench(**be, o);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->routed_tokens, routed_only->routed_tokens);
  EXPECT_EQ(shared->fallback_experts, routed_only->fallback_experts);
  // 3 more linears of 48 x 64 or 64 x 48 in the block's parameter count.
  EXPECT_EQ(shared->base_params - routed_only->base_params, 3.0 * 48 * 64);
  EXPECT_GT(CountFlops(o.config, 16, 32).total(),
            CountFlops(Shrunken("qwen3-30b-a3b").config, 16, 32).total());
}

INSTANTIATE_TEST_SUITE_P(Shapes, MoeBenchRunTest,
                         ::testing::Values("mixtral-8x7b", "qwen3-30b-a3b"), [](const auto& info) {
                           return info.param == "mixtral-8x7b" ? std::string("Mixtral")
                                                               : std::string("Qwen3Moe");
                         });

}  // namespace
}  // namespace qcal::engine
