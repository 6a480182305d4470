// Every crash the fuzz harnesses (tests/fuzz/*_fuzz.cc) found, each with the input that showed it
// (tests/fuzz/regressions/<harness>/<name>), run through the same entry point as the harness: now
// a clear error naming the key, tensor or file, or (for valid input) a correct result.
#include <filesystem>
#include <string>
#include <vector>

#include "common/bpe_tokenizer.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/engine/driver/artifacts.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/recipe.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

// The crashing input `name` of `harness`, cut into `parts` files as the harness cuts it.
std::vector<std::string> Input(const std::string& harness, const std::string& name, size_t parts) {
  const std::string path =
      (fs::path(testing::SourceDir()) / "tests/fuzz/regressions" / harness / name).string();
  absl::StatusOr<std::string> bytes = ReadFileToString(path);
  EXPECT_TRUE(bytes.ok()) << bytes.status();
  return fuzz::SplitFiles(reinterpret_cast<const uint8_t*>(bytes->data()), bytes->size(), parts);
}

// UBSan: memcpy to the null buffer of an empty tensor (0 bytes) in SafetensorsFile::ReadInto.
TEST(FuzzRegressionTest, SafetensorsEmptyTensorReadsIntoNullBuffer) {
  const std::vector<std::string> files = Input("safetensors", "empty_tensor", 1);
  auto file = SafetensorsFile::FromBytes(files[0], "empty_tensor");
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_TRUE((*file)->Has("e.empty"));
  EXPECT_TRUE((*file)->ReadInto("e.empty", nullptr, 0).ok());
  auto t = (*file)->Get("e.empty");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->numel(), 0);
}

// An uncaught YAML::TypedBadConversion: a complex mapping key ("? rank: 16" under retrain).
TEST(FuzzRegressionTest, RecipeComplexKeyIsAnError) {
  const std::vector<std::string> files = Input("recipe", "complex_key.yaml", 1);
  auto recipe = engine::ParseRecipeYaml(files[0], "complex_key.yaml");
  ASSERT_FALSE(recipe.ok());
  EXPECT_EQ(recipe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(recipe.status().message()),
              HasSubstr("complex_key.yaml: recipe keys must be plain names"));
}

// UBSan: signed overflow summing retrain.epochs (2147483647 + 1) in Recipe::Validate. Large counts
// are valid; the sum is taken in 64 bits.
TEST(FuzzRegressionTest, RecipeEpochSumOverflow) {
  const std::vector<std::string> files = Input("recipe", "epochs_overflow.yaml", 1);
  auto recipe = engine::ParseRecipeYaml(files[0], "epochs_overflow.yaml");
  ASSERT_TRUE(recipe.ok()) << recipe.status();
  EXPECT_EQ(recipe->retrain.epochs.weight, 2147483647);
  EXPECT_EQ(recipe->retrain.epochs.mixed, 1);
}

// UBSan: signed overflow in ModelConfig::q_dim() (num_attention_heads 2^30 x head_dim 4096), which
// Model::Load and the harness compute from a config that parsed.
TEST(FuzzRegressionTest, ModelConfigQDimOverflow) {
  const std::vector<std::string> files = Input("model_config", "q_dim_overflow", 3);
  auto config = ParseModelConfig(files[0], "config.json");
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr("config.json: num_attention_heads 1073741824 x head_dim 4096 is larger "
                        "than 2^30"));
}

// ASan out-of-memory: one vocabulary id of 2^30 made the dense id table 2^30 strings (32 GiB).
TEST(FuzzRegressionTest, TokenizerHugeTokenId) {
  const std::vector<std::string> files = Input("tokenizer", "huge_token_id", 2);
  auto tok = ParseByteLevelBpe(files[0], "tokenizer.json");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("tokenizer.json: key \"model.vocab[\"zz\"]\": must be an integer id in "
                        "[0, 16777216)"));
}

// An uncaught nlohmann::json type_error (abort): a pre-tokenizer whose "type" is a number, read
// as a string before the parser's own checks (found by 60 s of fuzzing, 2026-12-06).
TEST(FuzzRegressionTest, TokenizerPreTokenizerTypeNotAString) {
  const std::vector<std::string> files = Input("tokenizer", "pre_tokenizer_type_number", 2);
  auto tok = ParseByteLevelBpe(files[0], "tokenizer.json");
  ASSERT_FALSE(tok.ok());
  EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(tok.status().message()),
              HasSubstr("tokenizer.json: key \"pre_tokenizer.type\": must be a string"));
}

// ASan allocation-size-too-big (std::bad_alloc in a plain build): config.json's
// num_hidden_layers 2^30 sized Model's per-block state (1.9 TB) before any block was read.
TEST(FuzzRegressionTest, CheckpointNumLayersBeyondItsTensors) {
  const std::vector<std::string> files = Input("gptq_checkpoint", "num_layers_2_30", 3);
  const std::string dir = testing::MakeTempDir("fuzz_regression_layers");
  fuzz::WriteFiles(dir, {{"config.json", files[0]}, {"model.safetensors", files[2]}});
  auto model = engine::LoadCheckpoint(dir, &fuzz::CpuBackend());
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("config.json: num_hidden_layers is 1073741824 but the checkpoint has no "
                        "tensor \"model.layers.1073741823.input_layernorm.weight\""));
  fs::remove_all(dir);
}

// An uncaught nlohmann::json type_error: adapter_config.json's peft_type an object.
TEST(FuzzRegressionTest, AdapterPeftTypeNotAString) {
  const std::vector<std::string> files = Input("adapter", "peft_type_object", 2);
  const std::string dir = testing::MakeTempDir("fuzz_regression_adapter");
  fuzz::WriteFiles(dir, fuzz::TinyModelFiles());
  fuzz::WriteFiles(dir, {{"adapter/adapter_config.json", files[0]},
                         {"adapter/adapter_model.safetensors", files[1]}});
  auto model = engine::LoadCheckpoint(dir, &fuzz::CpuBackend());
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("adapter/adapter_config.json: key \"peft_type\" must be a string"));
  fs::remove_all(dir);
}

// The same uncaught type_error, by review, in quantize_config.json's quant_method and
// checkpoint_format (nlohmann's value() with a string default throws on another type).
TEST(FuzzRegressionTest, QuantizeConfigKeysNotStrings) {
  const std::string dir = testing::MakeTempDir("fuzz_regression_quantize_config");
  for (const char* qc :
       {R"({"quant_method": 4, "bits": 4})", R"({"checkpoint_format": [], "bits": 4})"}) {
    fuzz::WriteFiles(dir,
                     {{"config.json", fuzz::TinyModelConfigJson()}, {"quantize_config.json", qc}});
    auto q = engine::ReadCheckpointQuantization(dir);
    ASSERT_FALSE(q.ok()) << qc;
    EXPECT_THAT(std::string(q.status().message()),
                ::testing::MatchesRegex(".*quantize_config.json: key \"(quant_method|"
                                        "checkpoint_format)\" must be a string"));
  }
  fs::remove_all(dir);
}

// The harness's check that every chunk has chunk_batch · seq_len rows: chunk_batch "0" was
// accepted with a chunk of 3 rows (the block runner would read 0 samples of it, or, with a larger
// chunk_batch, past its end).
TEST(FuzzRegressionTest, ActivationChunkBatchZero) {
  const std::vector<std::string> files = Input("activations", "chunk_batch_zero", 1);
  const std::string dir = testing::MakeTempDir("fuzz_regression_acts");
  fuzz::WriteFiles(dir, {{"chunk.safetensors", files[0]}});
  auto acts = engine::LoadActivations(fuzz::CpuBackend(), dir + "/chunk.safetensors");
  ASSERT_FALSE(acts.ok());
  EXPECT_EQ(acts.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(acts.status().message()),
              HasSubstr("chunk.safetensors: bad chunk_batch"));
  fs::remove_all(dir);
}

// The same reader, by review: a tensor named neither chunk.* nor fp_chunk.* sorts after the
// fp_chunk.* tensors, so the full-precision chunks were matched against quantized-path chunks not
// yet read (an index past the end of acts.chunks).
TEST(FuzzRegressionTest, ActivationUnexpectedTensorName) {
  std::map<std::string, Tensor> tensors;
  tensors["fp_chunk.100000"] = Tensor::Zeros(DType::kF32, {3, 4});
  tensors["zzz"] = Tensor::Zeros(DType::kF32, {3, 4});
  const std::string dir = testing::MakeTempDir("fuzz_regression_acts_names");
  ASSERT_TRUE(WriteSafetensors(dir + "/chunk.safetensors", tensors,
                               {{"seq_len", "3"}, {"next_block", "1"}, {"chunk_batch", "1"}})
                  .ok());
  auto acts = engine::LoadActivations(fuzz::CpuBackend(), dir + "/chunk.safetensors");
  ASSERT_FALSE(acts.ok());
  EXPECT_THAT(std::string(acts.status().message()),
              HasSubstr("chunk.safetensors: unexpected tensor \"zzz\""));
  fs::remove_all(dir);
}

// ASan SEGV in QuantizedLinear::Dequantized (what InstallWeight runs): a solved layer whose g_idx
// names a group past n_groups.
TEST(FuzzRegressionTest, LayerArtifactGroupIndexOutOfRange) {
  const std::vector<std::string> files = Input("layer_artifact", "g_idx_out_of_range", 1);
  auto layer = engine::ParseSolvedLayer(files[0]);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(layer.status().message()), HasSubstr("quantized linear artifact: g_idx"));
}

// UBSan: signed overflow in Dequantize (code 3 − zero point −2147483647) for a solved layer whose
// zero points are off the grid's range.
TEST(FuzzRegressionTest, LayerArtifactZeroPointOutOfRange) {
  const std::vector<std::string> files = Input("layer_artifact", "zero_point_overflow", 1);
  auto layer = engine::ParseSolvedLayer(files[0]);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(layer.status().message()),
              HasSubstr("quantized linear artifact: zero point -2147483647 is outside 0.."));
}

// CHECK failure in Tensor::FromVector (re-serializing a solved layer): its report JSON says rank
// 2 while its artifact has rank 0 and no low-rank factors.
TEST(FuzzRegressionTest, LayerArtifactReportRankMismatch) {
  const std::vector<std::string> files = Input("layer_artifact", "report_rank_mismatch", 1);
  auto layer = engine::ParseSolvedLayer(files[0]);
  ASSERT_FALSE(layer.ok());
  EXPECT_EQ(layer.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(layer.status().message()),
              HasSubstr("solved layer: the report's rank 2 is not the artifact's rank 0"));
}

}  // namespace
}  // namespace qcal
