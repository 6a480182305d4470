// Tests of config.json parsing (common/hf_config.h): the two shared checkpoints, the variants of
// the Hugging Face format a loader must accept, and errors that name the file and key at fault.
#include "common/hf_config.h"

#include <filesystem>
#include <string>

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

  nested["rope_parameters"]["rope_type"] = "yarn";
  ExpectError(nested, "rope_type");
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
  ExpectError(j, "unsupported architecture: model_type \"gpt2\"");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectError(j, "hidden_act");
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

TEST(HfConfigTest, RopeScalingIsRejected) {
  Json j = BaseConfig();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectError(j, "rope_scaling");
  j["rope_scaling"] = nullptr;  // HF writes null when there is no scaling
  EXPECT_TRUE(Parse(j).ok());
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
  ExpectError(j, "key \"sliding_window\" must be a non-negative integer or null");
  j["sliding_window"] = "4096";
  ExpectError(j, "sliding_window");

  // Qwen2 uses the window only with use_sliding_window true (transformers' default is false).
  j["model_type"] = "qwen2";
  j["sliding_window"] = 32768;
  j["max_window_layers"] = 28;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
  j["use_sliding_window"] = false;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
  j["use_sliding_window"] = true;
  EXPECT_EQ(Parse(j)->sliding_window, 32768);
  j["use_sliding_window"] = "yes";
  ExpectError(j, "use_sliding_window");

  // transformers' Llama has no sliding-window attention: the key is ignored.
  j = BaseConfig();
  j["sliding_window"] = 4096;
  EXPECT_EQ(Parse(j)->sliding_window, 0);
}

TEST(HfConfigTest, CheckSequenceLength) {
  ModelConfig c;
  EXPECT_TRUE(CheckSequenceLength(c, 1 << 20).ok());  // no window
  c.sliding_window = 4096;
  EXPECT_TRUE(CheckSequenceLength(c, 1).ok());
  EXPECT_TRUE(CheckSequenceLength(c, 4096).ok());  // the window covers every position
  const absl::Status s = CheckSequenceLength(c, 8192);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(),
            "config.json: sliding_window 4096 is shorter than the sequence length 8192 "
            "(sliding-window attention is not implemented)");
  EXPECT_FALSE(CheckSequenceLength(c, 4097).ok());
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
