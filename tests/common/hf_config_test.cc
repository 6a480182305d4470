// Tests of config.json parsing (common/hf_config.h): the two shared checkpoints, the variants of
// the Hugging Face format a loader must accept, and errors that name the file and key at fault.
#include "common/hf_config.h"

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

using ::testing::HasSubstr;
using Json = nlohmann::json;

constexpr char kPath[] = "models/test/config.json";

// A minimal valid Llama config (hidden 64, 8 heads, no head_dim, no KV-head count).
Json BaseConfig() {
  return Json{{"model_type", "llama"},  {"hidden_size", 64},        {"intermediate_size", 172},
              {"num_hidden_layers", 2}, {"num_attention_heads", 8}, {"vocab_size", 512}};
}

absl::StatusOr<ModelConfig> Parse(const Json& j) { return ParseModelConfig(j.dump(), kPath); }

// Parsing `j` fails with InvalidArgument and a message naming the file and `what`.
void ExpectError(const Json& j, const std::string& what) {
  auto c = Parse(j);
  ASSERT_FALSE(c.ok()) << j.dump();
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(kPath));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(what));
}

TEST(HfConfigTest, Stories260k) {
  QCAL_REQUIRE_SHARED();
  auto c = LoadModelConfig(testing::SharedDir() + "/models/stories260k");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 172);
  EXPECT_EQ(c->num_layers, 5);
  EXPECT_EQ(c->num_heads, 8);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 8);
  EXPECT_EQ(c->n_rep(), 2);
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->max_position_embeddings, 512);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
  EXPECT_EQ(c->dtype, "float32");  // from torch_dtype
}

TEST(HfConfigTest, SotuLlama16m) {
  QCAL_REQUIRE_SHARED();
  auto c = LoadModelConfig(testing::SharedDir() + "/models/sotu-llama-16m");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 384);
  EXPECT_EQ(c->intermediate_size, 1024);
  EXPECT_EQ(c->num_layers, 8);
  EXPECT_EQ(c->num_heads, 6);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->n_rep(), 3);
  EXPECT_EQ(c->q_dim(), 384);
  EXPECT_EQ(c->kv_dim(), 128);
  EXPECT_EQ(c->vocab_size, 4096);
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);  // from rope_parameters.rope_theta
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->dtype, "bfloat16");  // from dtype
}

TEST(HfConfigTest, Defaults) {
  auto c = Parse(BaseConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 8);  // hidden_size / num_attention_heads
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->n_rep(), 1);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c->rms_norm_eps, 1e-6);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->dtype, "float32");
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
}

TEST(HfConfigTest, RopeThetaTopLevelOrUnderRopeParameters) {
  Json top = BaseConfig();
  top["rope_theta"] = 500000.0;
  auto c = Parse(top);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);

  Json nested = BaseConfig();
  nested["rope_parameters"] = {{"rope_theta", 1000000.0}, {"rope_type", "default"}};
  c = Parse(nested);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 1000000.0);

  nested["rope_parameters"]["rope_type"] = "dynamic";
  ExpectError(nested, "key \"rope_parameters.rope_type\" is \"dynamic\"");
  Json zero = BaseConfig();
  zero["rope_theta"] = 0;
  ExpectError(zero, "rope_theta");
}

TEST(HfConfigTest, DTypeOrTorchDType) {
  Json j = BaseConfig();
  j["torch_dtype"] = "float16";
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->dtype, "float16");

  j = BaseConfig();
  j["dtype"] = "bfloat16";
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->dtype, "bfloat16");

  j["dtype"] = "int8";
  ExpectError(j, "unsupported dtype \"int8\"");
}

TEST(HfConfigTest, ExplicitHeadDimAndGqa) {
  Json j = BaseConfig();
  j["head_dim"] = 16;
  j["num_key_value_heads"] = 2;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->n_rep(), 4);
  EXPECT_EQ(c->q_dim(), 128);
  EXPECT_EQ(c->kv_dim(), 32);

  j["head_dim"] = 7;
  ExpectError(j, "head_dim");
}

TEST(HfConfigTest, TiedEmbeddingsAndEosList) {
  Json j = BaseConfig();
  j["tie_word_embeddings"] = true;
  j["eos_token_id"] = {7, 2};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->eos_token_id, 7);

  j["tie_word_embeddings"] = "yes";
  ExpectError(j, "tie_word_embeddings");
}

TEST(HfConfigTest, BiasFlags) {
  Json qwen = BaseConfig();
  qwen["model_type"] = "qwen2";
  auto c = Parse(qwen);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);  // Qwen2 always has q/k/v bias
  EXPECT_FALSE(c->o_bias);

  Json llama = BaseConfig();
  llama["attention_bias"] = true;
  llama["mlp_bias"] = true;
  c = Parse(llama);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->o_bias);  // Llama's attention_bias covers o_proj too
  EXPECT_TRUE(c->mlp_bias);

  Json mistral = BaseConfig();
  mistral["model_type"] = "mistral";
  c = Parse(mistral);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->attention_bias);
}

TEST(HfConfigTest, MissingKeyIsNamed) {
  for (const char* key : {"hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "vocab_size", "model_type"}) {
    Json j = BaseConfig();
    j.erase(key);
    ExpectError(j, std::string("missing key \"") + key + "\"");
  }
  Json null_value = BaseConfig();
  null_value["hidden_size"] = nullptr;
  ExpectError(null_value, "missing key \"hidden_size\"");
}

TEST(HfConfigTest, BadValuesAreNamed) {
  Json j = BaseConfig();
  j["hidden_size"] = -64;
  ExpectError(j, "key \"hidden_size\" must be a positive integer");
  j = BaseConfig();
  j["vocab_size"] = "512";
  ExpectError(j, "key \"vocab_size\" must be a positive integer");
  j = BaseConfig();
  j["rms_norm_eps"] = "small";
  ExpectError(j, "key \"rms_norm_eps\" must be a number");
  j = BaseConfig();
  j["hidden_size"] = 68;  // not divisible by 8 heads, and no head_dim given
  ExpectError(j, "hidden_size is not divisible by num_attention_heads");
}

TEST(HfConfigTest, UnsupportedArchitecture) {
  Json j = BaseConfig();
  j["model_type"] = "gpt2";
  ExpectError(j, "unsupported architecture: key \"model_type\" is \"gpt2\"");
  j["model_type"] = "gemma2";
  ExpectError(j, "key \"model_type\" is \"gemma2\"");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectError(j, "hidden_act");
}

// Mixture-of-experts configs (docs/MOE.md): each family's keys, transformers 5's defaults, which
// blocks are MoE blocks, and errors naming the key.
Json MoeConfig(const std::string& model_type) {
  Json j = BaseConfig();
  j["model_type"] = model_type;
  j["num_hidden_layers"] = 4;
  return j;
}

TEST(HfConfigTest, MixtralKeysAndDefaults) {
  Json j = MoeConfig("mixtral");
  j["router_jitter_noise"] = 0.1;  // a training option: ignored
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->moe());
  EXPECT_EQ(c->num_experts, 8);  // MixtralConfig's defaults
  EXPECT_EQ(c->num_experts_per_tok, 2);
  EXPECT_EQ(c->moe_intermediate_size, 172);  // the experts are intermediate_size wide
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_TRUE(c->norm_topk_prob);  // Mixtral always renormalises
  EXPECT_FALSE(c->attention_bias);
  for (int b = 0; b < 4; ++b) EXPECT_TRUE(c->IsMoeBlock(b)) << b;
  j["num_local_experts"] = 4;
  j["num_experts_per_tok"] = 3;
  j["sliding_window"] = 32;
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_experts, 4);
  EXPECT_EQ(c->num_experts_per_tok, 3);
  EXPECT_EQ(c->sliding_window, 32);  // as mistral
}

TEST(HfConfigTest, Qwen2MoeKeysAndDefaults) {
  Json j = MoeConfig("qwen2_moe");
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_experts, 60);  // Qwen2MoeConfig's defaults
  EXPECT_EQ(c->num_experts_per_tok, 4);
  EXPECT_EQ(c->moe_intermediate_size, 1408);
  EXPECT_EQ(c->shared_expert_intermediate_size, 5632);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_TRUE(c->attention_bias);  // qkv_bias defaults to true
  EXPECT_FALSE(c->o_bias);
  j["num_experts"] = 16;
  j["num_experts_per_tok"] = 2;
  j["moe_intermediate_size"] = 32;
  j["shared_expert_intermediate_size"] = 64;
  j["norm_topk_prob"] = true;
  j["qkv_bias"] = false;
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_experts, 16);
  EXPECT_EQ(c->moe_intermediate_size, 32);
  EXPECT_EQ(c->shared_expert_intermediate_size, 64);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FALSE(c->attention_bias);
  // transformers: MoE unless in mlp_only_layers, and (b + 1) % decoder_sparse_step == 0.
  EXPECT_FALSE(c->IsMoeBlock(0));
  EXPECT_TRUE(c->IsMoeBlock(1));
  EXPECT_FALSE(c->IsMoeBlock(2));
  EXPECT_FALSE(c->IsMoeBlock(3));
}

TEST(HfConfigTest, Qwen3MoeKeysAndDefaults) {
  Json j = MoeConfig("qwen3_moe");
  j["head_dim"] = 16;
  j["attention_bias"] = true;
  j["mlp_only_layers"] = {2, 0, 2};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_experts, 128);  // Qwen3MoeConfig's defaults
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->moe_intermediate_size, 768);
  EXPECT_EQ(c->shared_expert_intermediate_size, 0);
  EXPECT_FALSE(c->norm_topk_prob);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->o_bias);  // as qwen3: q/k/v/o
  EXPECT_EQ(c->mlp_only_layers, (std::vector<int>{0, 2}));
  EXPECT_FALSE(c->IsMoeBlock(0));
  EXPECT_TRUE(c->IsMoeBlock(1));
  EXPECT_FALSE(c->IsMoeBlock(2));
  EXPECT_TRUE(c->IsMoeBlock(3));
  // A dense family is no MoE model.
  c = Parse(BaseConfig());
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->moe());
  EXPECT_FALSE(c->IsMoeBlock(0));
}

TEST(HfConfigTest, MoeErrorsNameTheKey) {
  for (const char* type : {"mixtral", "qwen2_moe", "qwen3_moe"}) {
    SCOPED_TRACE(type);
    const std::string experts =
        std::string(type) == "mixtral" ? "num_local_experts" : "num_experts";
    Json j = MoeConfig(type);
    j[experts] = 4;
    j["num_experts_per_tok"] = 5;
    ExpectError(j, "key \"num_experts_per_tok\" is 5 (must be in [1, " + experts + " = 4])");
    j["num_experts_per_tok"] = 0;
    ExpectError(j, "key \"num_experts_per_tok\" is 0");
    j["num_experts_per_tok"] = -1;
    ExpectError(j, "key \"num_experts_per_tok\" is -1");
    j["num_experts_per_tok"] = 2;
    j[experts] = 0;
    ExpectError(j, "key \"" + experts + "\" is 0 (must be >= 1)");
    j[experts] = "8";
    ExpectError(j, "key \"" + experts + "\" must be an integer");
  }
  Json j = MoeConfig("qwen2_moe");
  j["decoder_sparse_step"] = 0;
  ExpectError(j, "key \"decoder_sparse_step\" is 0");
  j = MoeConfig("qwen3_moe");
  j["mlp_only_layers"] = {1, 4};
  ExpectError(j,
              "key \"mlp_only_layers\" holds 4 (must be block indices in [0, "
              "num_hidden_layers = 4))");
  j["mlp_only_layers"] = 1;
  ExpectError(j, "key \"mlp_only_layers\" must be a list of integers");
  j = MoeConfig("qwen2_moe");
  j["moe_intermediate_size"] = 0;
  ExpectError(j, "key \"moe_intermediate_size\" is 0");
  j = MoeConfig("qwen3_moe");
  j["norm_topk_prob"] = "yes";
  ExpectError(j, "key \"norm_topk_prob\" must be true or false");
  j["norm_topk_prob"] = true;
  j["use_sliding_window"] = true;
  ExpectError(j, "use_sliding_window");
}

TEST(HfConfigTest, KvHeadsMustDivideHeads) {
  Json j = BaseConfig();
  j["num_key_value_heads"] = 3;
  ExpectError(j, "key \"num_key_value_heads\" must divide num_attention_heads");
  j["num_key_value_heads"] = 0;
  ExpectError(j, "num_key_value_heads");
}

TEST(HfConfigTest, MalformedJson) {
  auto c = ParseModelConfig("{\"model_type\": \"llama\",", kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(kPath));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("malformed JSON"));
  ExpectError(Json::array({1, 2}), "not a JSON object");
}

TEST(HfConfigTest, RopeScalingTypes) {
  Json j = BaseConfig();
  j["rope_scaling"] = nullptr;  // HF writes null when there is no scaling
  EXPECT_EQ(Parse(j)->rope_scaling.type, RopeScaling::Type::kDefault);

  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 2.0);

  // Llama 3.1's config.json.
  j["rope_scaling"] = {{"rope_type", "llama3"},
                       {"factor", 8.0},
                       {"low_freq_factor", 1.0},
                       {"high_freq_factor", 4.0},
                       {"original_max_position_embeddings", 8192}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.high_freq_factor, 4.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  j["rope_scaling"].erase("original_max_position_embeddings");
  ExpectError(j, "missing key \"rope_scaling.original_max_position_embeddings\"");

  // YaRN as Qwen documents it; the attention factor defaults to 0.1 ln(factor) + 1.
  j = BaseConfig();
  j["model_type"] = "qwen2";
  j["max_position_embeddings"] = 32768;
  j["rope_scaling"] = {
      {"type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 32768}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 4.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 32768);
  EXPECT_DOUBLE_EQ(c->rope_scaling.beta_fast, 32.0);
  EXPECT_DOUBLE_EQ(c->rope_scaling.beta_slow, 1.0);
  EXPECT_TRUE(c->rope_scaling.truncate);
  EXPECT_DOUBLE_EQ(c->rope_scaling.attention_factor, 0.1 * std::log(4.0) + 1.0);
  j["rope_scaling"]["attention_factor"] = 1.5;
  j["rope_scaling"].erase("original_max_position_embeddings");
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_scaling.attention_factor, 1.5);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 32768);  // max_position_embeddings

  // transformers 5: everything under rope_parameters.
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_type", "yarn"},
                          {"rope_theta", 1e6},
                          {"factor", 2.0},
                          {"beta_fast", 16.0},
                          {"original_max_position_embeddings", 64}};
  c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 1e6);
  EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kYarn);
  EXPECT_DOUBLE_EQ(c->rope_scaling.beta_fast, 16.0);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 64);
}

TEST(HfConfigTest, UnknownRopeTypeIsNamed) {
  Json j = BaseConfig();
  j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 2.0}};
  ExpectError(j, "unsupported rope type: key \"rope_scaling.type\" is \"dynamic\"");
  j["rope_scaling"] = {{"rope_type", "longrope"}, {"factor", 2.0}};
  ExpectError(j, "key \"rope_scaling.rope_type\" is \"longrope\"");
  j["rope_scaling"] = {{"rope_type", "linear"}};
  ExpectError(j, "missing key \"rope_scaling.factor\"");
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 0.5}};
  ExpectError(j, "key \"rope_scaling.factor\" is 0.5");
  j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"partial_rotary_factor", 0.5}};
  ExpectError(j, "partial_rotary_factor");
  j["rope_scaling"] = "linear";
  ExpectError(j, "key \"rope_scaling\" must be an object");
}

TEST(HfConfigTest, OutOfRangeValuesAreNamed) {
  for (double eps : {-1e-9, 0.0, 1.0, 1e308}) {
    Json j = BaseConfig();
    j["rms_norm_eps"] = eps;
    ExpectError(j, "key \"rms_norm_eps\" is");
  }
  Json ok = BaseConfig();
  ok["rms_norm_eps"] = 1e-5;
  EXPECT_TRUE(Parse(ok).ok());
  for (int n : {0, -1}) {
    Json j = BaseConfig();
    j["max_position_embeddings"] = n;
    ExpectError(j, "key \"max_position_embeddings\" is " + std::to_string(n));
  }
  for (double theta : {1e308, -1.0, 0.0, 1e13}) {
    Json j = BaseConfig();
    j["rope_theta"] = theta;
    ExpectError(j, "key \"rope_theta\" is");
  }
  Json nested = BaseConfig();
  nested["rope_parameters"] = {{"rope_theta", 1e308}, {"rope_type", "default"}};
  ExpectError(nested, "key \"rope_theta\" is");
  Json heads = BaseConfig();
  heads["num_attention_heads"] = 0;
  ExpectError(heads, "key \"num_attention_heads\" must be a positive integer");
  heads = BaseConfig();
  heads["num_key_value_heads"] = -2;
  ExpectError(heads, "key \"num_key_value_heads\" is -2");
  Json layers = BaseConfig();
  layers["num_hidden_layers"] = 0;
  ExpectError(layers, "key \"num_hidden_layers\" must be a positive integer");
  Json head_dim = BaseConfig();
  head_dim["head_dim"] = -8;
  ExpectError(head_dim, "key \"head_dim\" is -8");
}

TEST(HfConfigTest, Qwen3) {
  // Qwen3-0.6B's shape: head_dim 128 with hidden 1024 and 16 heads (not hidden / heads).
  Json j = {{"model_type", "qwen3"},     {"hidden_size", 1024},
            {"intermediate_size", 3072}, {"num_hidden_layers", 28},
            {"num_attention_heads", 16}, {"num_key_value_heads", 8},
            {"head_dim", 128},           {"vocab_size", 151936},
            {"attention_bias", false},   {"tie_word_embeddings", true},
            {"sliding_window", nullptr}, {"use_sliding_window", false},
            {"max_window_layers", 28},   {"rope_theta", 1000000},
            {"rms_norm_eps", 1e-6}};
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_dim(), 2048);
  EXPECT_TRUE(c->qk_norm);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->sliding_window, 0);
  j["attention_bias"] = true;
  c = Parse(j);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->o_bias);
  EXPECT_FALSE(Parse(BaseConfig())->qk_norm);
}

TEST(HfConfigTest, SlidingWindow) {
  Json j = BaseConfig();
  EXPECT_EQ(Parse(j)->sliding_window, 0);  // absent

  j["model_type"] = "mistral";
  j["sliding_window"] = 4096;
  EXPECT_EQ(Parse(j)->sliding_window, 4096);
  j["sliding_window"] = nullptr;  // Mistral v0.2 and later
  EXPECT_EQ(Parse(j)->sliding_window, 0);
  j["sliding_window"] = -1;
  ExpectError(j, "key \"sliding_window\" is -1");
  j["sliding_window"] = 0;
  ExpectError(j, "key \"sliding_window\" is 0");
  j["sliding_window"] = "4096";
  ExpectError(j, "sliding_window");

  // Qwen2 uses the window only with use_sliding_window true (transformers' default is false),
  // which is refused.
  j["model_type"] = "qwen2";
  j["sliding_window"] = 32768;
  j["max_window_layers"] = 28;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
  j["use_sliding_window"] = false;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
  j["use_sliding_window"] = true;
  ExpectError(j, "unsupported key \"use_sliding_window\" true for model_type \"qwen2\"");
  j["model_type"] = "qwen3";
  ExpectError(j, "use_sliding_window");
  j["use_sliding_window"] = "yes";
  ExpectError(j, "use_sliding_window");

  // transformers' Llama has no sliding-window attention: the key is ignored.
  j = BaseConfig();
  j["sliding_window"] = 4096;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
}

TEST(HfConfigTest, CheckSequenceLength) {
  ModelConfig c;
  c.max_position_embeddings = 2048;
  EXPECT_TRUE(CheckSequenceLength(c, 1).ok());
  EXPECT_TRUE(CheckSequenceLength(c, 2048).ok());
  EXPECT_EQ(SequenceLengthWarning(c, 2048), "");
  // Longer sequences run, with a warning naming both numbers.
  EXPECT_TRUE(CheckSequenceLength(c, 4096).ok());
  EXPECT_THAT(SequenceLengthWarning(c, 4096), HasSubstr("4096"));
  EXPECT_THAT(SequenceLengthWarning(c, 4096), HasSubstr("max_position_embeddings 2048"));
  // A sliding window shorter than the sequence is computed, no error.
  c.sliding_window = 16;
  EXPECT_TRUE(CheckSequenceLength(c, 64).ok());
  EXPECT_FALSE(CheckSequenceLength(c, 0).ok());
}

TEST(HfConfigTest, LoadFromMissingDirectoryNamesThePath) {
  const std::string dir = testing::MakeTempDir("hf_config_test");
  ASSERT_FALSE(dir.empty());
  auto c = LoadModelConfig(dir);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(dir + "/config.json"));
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace qcal
