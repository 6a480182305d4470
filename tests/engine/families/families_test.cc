// The model families of issue 20 on synthetic checkpoints (`qcal synth --arch`): Llama 3 rope
// scaling, Qwen2 (q/k/v biases, tied embeddings, YaRN), Qwen3 (q/k norms, head_dim independent of
// hidden/heads) and Mistral (sliding window). Properties of the forward pass that hold whatever the
// weights (a sliding window limits the receptive field, q/k norms make q/k_proj scale-invariant,
// cached decoding equals the full forward past the window and past
// original_max_position_embeddings), `qcal eval --logits-out`, and quantize → export → reload →
// evaluate round trips (GPTQ W4, and GPTQ W4 with ASER smoothing and error reconstruction) that
// keep the family's config keys, tensors and tokenizer files. Numerical agreement with transformers
// is checked by tools/families/compare_transformers.py on a GPU machine (not here).
#include <cmath>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/evaluate.h"
#include "services/engine/model.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/engine/families/family_checkpoints.h"
#include "tests/support/subprocess.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::vector<SynthArch> kFamilies = {SynthArch::kLlama3, SynthArch::kQwen2, SynthArch::kQwen3,
                                          SynthArch::kMistral};

// Synthetic tiny checkpoints of every family, written once for the suite.
class FamiliesTest : public FamilyCheckpointTest {
 protected:
  static void SetUpTestSuite() { WriteCheckpoints("families", kFamilies); }
};

double RelDiff(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST_F(FamiliesTest, ConfigsAndTensorsCarryEachFamilysKeys) {
  for (SynthArch a : kFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto c = LoadModelConfig(Dir(a));
    ASSERT_TRUE(c.ok()) << c.status();
    auto reader = CheckpointReader::Open(Dir(a));
    ASSERT_TRUE(reader.ok());
    const bool has_lm_head = (*reader)->Has("lm_head.weight");
    switch (a) {
      case SynthArch::kLlama3:
        EXPECT_EQ(c->model_type, "llama");
        EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kLlama3);
        EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 64);
        EXPECT_TRUE(has_lm_head);
        break;
      case SynthArch::kQwen2:
        EXPECT_EQ(c->model_type, "qwen2");
        EXPECT_EQ(c->rope_scaling.type, RopeScaling::Type::kYarn);
        EXPECT_DOUBLE_EQ(c->rope_scaling.attention_factor, 0.1 * std::log(4.0) + 1);
        EXPECT_EQ(c->sliding_window, 0);  // use_sliding_window false
        EXPECT_TRUE(c->attention_bias);
        EXPECT_TRUE(c->tie_word_embeddings);
        EXPECT_FALSE(has_lm_head);
        EXPECT_TRUE((*reader)->Has("model.layers.0.self_attn.k_proj.bias"));
        EXPECT_FALSE((*reader)->Has("model.layers.0.self_attn.o_proj.bias"));
        break;
      case SynthArch::kQwen3:
        EXPECT_EQ(c->model_type, "qwen3");
        EXPECT_TRUE(c->qk_norm);
        EXPECT_EQ(c->head_dim, 64);
        EXPECT_EQ(c->q_dim(), 2 * c->hidden_size);
        EXPECT_TRUE((*reader)->Has("model.layers.1.self_attn.q_norm.weight"));
        EXPECT_TRUE((*reader)->Has("model.layers.1.self_attn.k_norm.weight"));
        EXPECT_FALSE(has_lm_head);
        break;
      case SynthArch::kMistral:
        EXPECT_EQ(c->model_type, "mistral");
        EXPECT_EQ(c->sliding_window, 16);
        break;
      default:
        break;
    }
  }
}

// With a window W and L blocks, position p sees tokens p - L·(W - 1) .. p only: changing token 0
// leaves the logits of every later position unchanged under Mistral's window, not under full
// attention (llama3, same shapes).
TEST_F(FamiliesTest, SlidingWindowLimitsTheReceptiveField) {
  for (SynthArch a : {SynthArch::kMistral, SynthArch::kLlama3}) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    const int n = 64, vocab = model->config().vocab_size;
    std::vector<int> ids = Ids(n, vocab), changed = ids;
    changed[0] = ids[0] == 7 ? 8 : 7;
    auto l1 = SequenceLogits(*model, ids);
    auto l2 = SequenceLogits(*model, changed);
    ASSERT_TRUE(l1.ok() && l2.ok());
    const int reach = model->config().num_layers * (16 - 1);  // 30 for the tiny preset
    for (int p = 0; p < n; ++p) {
      const double d = RelDiff(l1->data<float>() + int64_t(p) * vocab,
                               l2->data<float>() + int64_t(p) * vocab, vocab);
      if (a == SynthArch::kMistral && p > reach) {
        EXPECT_EQ(d, 0.0) << "position " << p;
      } else {
        EXPECT_GT(d, 0.0) << "position " << p;
      }
    }
  }
}

// q_norm / k_norm normalize each head: scaling q_proj and k_proj rows changes nothing (up to
// rounding); without them (llama3) it changes the logits.
TEST_F(FamiliesTest, QkNormsMakeTheQkProjectionsScaleInvariant) {
  for (SynthArch a : {SynthArch::kQwen3, SynthArch::kLlama3}) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    const std::vector<int> ids = Ids(40, model->config().vocab_size);
    auto before = SequenceLogits(*model, ids);
    ASSERT_TRUE(before.ok());
    for (int b = 0; b < model->num_blocks(); ++b) {
      for (LinearKind k : {LinearKind::kQ, LinearKind::kK}) {
        Tensor& w = model->block(b).at(k).weight;
        for (int64_t i = 0; i < w.numel(); ++i) w.data<float>()[i] *= 3.0f;
      }
    }
    auto after = SequenceLogits(*model, ids);
    ASSERT_TRUE(after.ok());
    const double d = RelDiff(after->data<float>(), before->data<float>(), before->numel());
    if (a == SynthArch::kQwen3) {
      EXPECT_LT(d, 1e-5);
    } else {
      EXPECT_GT(d, 1e-3);
    }
  }
}

// Decoding token by token with the KV cache (what `qcal generate` runs) gives the full forward's
// logits, for sequences past Mistral's window and past original_max_position_embeddings (64) of the
// llama3 and yarn rope scalings.
TEST_F(FamiliesTest, CachedDecodingMatchesTheFullForward) {
  for (SynthArch a : kFamilies) {
    SCOPED_TRACE(SynthArchName(a));
    auto model = Load(a);
    ASSERT_NE(model, nullptr);
    const int n = 100, prefix = 70, vocab = model->config().vocab_size;
    const std::vector<int> ids = Ids(n, vocab, 3);
    auto full = SequenceLogits(*model, ids);
    ASSERT_TRUE(full.ok());
    auto cache = model->NewCache(n);
    ASSERT_TRUE(cache.ok());
    int offset = 0;
    for (int step = prefix; step <= n; ++step) {
      const std::vector<int> chunk(ids.begin() + offset, ids.begin() + step);
      auto hidden = model->Embed(chunk);
      ASSERT_TRUE(hidden.ok());
      const SeqShape shape{1, static_cast<int>(chunk.size()), offset};
      for (int b = 0; b < model->num_blocks(); ++b) {
        ASSERT_TRUE(model->BlockForward(b, *hidden, shape, &*cache).ok());
      }
      auto logits = model->Logits(*hidden);
      ASSERT_TRUE(logits.ok());
      const int last = step - 1;
      const float* got = logits->data<float>() + int64_t(chunk.size() - 1) * vocab;
      EXPECT_LT(RelDiff(got, full->data<float>() + int64_t(last) * vocab, vocab), 1e-4)
          << "position " << last;  // summation order differs (GEMM shapes)
      offset = step;
    }
  }
}

// `qcal eval --logits-out`: the first window's logits [seq, vocab] and its ids; with --ids, the
// given sequence's logits, equal to SequenceLogits in this process.
TEST_F(FamiliesTest, EvalWritesLogits) {
  const std::string dir = Dir(SynthArch::kQwen3);
  const std::string out = *root_ + "/logits.safetensors";
  auto r = testing::RunQcal({"eval", "--model", dir, "--text", dir + "/eval.txt", "--seq-len", "48",
                             "--max-windows", "2", "--threads", "2", "--logits-out", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto f = SafetensorsFile::Open(out);
  ASSERT_TRUE(f.ok()) << f.status();
  auto logits = (*f)->Get("logits");
  auto ids = (*f)->Get("input_ids");
  ASSERT_TRUE(logits.ok() && ids.ok());
  EXPECT_EQ(logits->shape(), (Shape{48, 512}));
  EXPECT_EQ(logits->dtype(), DType::kF32);
  EXPECT_EQ(ids->shape(), (Shape{48}));
  EXPECT_EQ(ids->data<int32_t>()[0], 1);  // each window starts with BOS

  auto model = Load(SynthArch::kQwen3);
  ASSERT_NE(model, nullptr);
  const std::vector<int> seq = Ids(90, 512, 9);
  ASSERT_TRUE(WriteStringToFile(*root_ + "/ids.json", nlohmann::json(seq).dump()).ok());
  r = testing::RunQcal({"eval", "--model", dir, "--ids", *root_ + "/ids.json", "--threads", "2",
                        "--logits-out", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  f = SafetensorsFile::Open(out);
  ASSERT_TRUE(f.ok());
  logits = (*f)->Get("logits");
  ASSERT_TRUE(logits.ok());
  auto want = SequenceLogits(*model, seq);
  ASSERT_TRUE(want.ok());
  ASSERT_EQ(logits->shape(), want->shape());
  EXPECT_LT(RelDiff(logits->data<float>(), want->data<float>(), want->numel()), 1e-6);

  r = testing::RunQcal({"eval", "--model", dir, "--ids", *root_ + "/ids.json"});
  EXPECT_NE(r.exit_code, 0);  // --ids needs --logits-out
}

// A sequence longer than max_position_embeddings runs, with a warning naming both numbers.
TEST_F(FamiliesTest, LongerThanMaxPositionEmbeddingsWarns) {
  const std::string dir = Dir(SynthArch::kQwen2);  // max_position_embeddings 256
  const std::vector<int> seq = Ids(300, 512);
  ASSERT_TRUE(WriteStringToFile(*root_ + "/long.json", nlohmann::json(seq).dump()).ok());
  auto r = testing::RunQcal({"eval", "--model", dir, "--ids", *root_ + "/long.json", "--threads",
                             "2", "--logits-out", *root_ + "/long.safetensors"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.err, HasSubstr("300"));
  EXPECT_THAT(r.err, HasSubstr("max_position_embeddings 256"));
}

// A real tokenizer's files are copied in and size the vocabulary.
TEST_F(FamiliesTest, SynthWithATokenizerDirectory) {
  const std::string tok = *root_ + "/tok";
  fs::create_directories(tok);
  nlohmann::json vocab = nlohmann::json::object();
  for (int i = 0; i < 300; ++i) vocab[absl::StrCat("t", i)] = i;
  const nlohmann::json tokenizer = {
      {"version", "1.0"},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}},
      {"added_tokens",
       {{{"id", 1000}, {"content", "<|begin|>"}, {"special", true}},
        {{"id", 1001}, {"content", "<|end|>"}, {"special", true}}}}};
  ASSERT_TRUE(WriteStringToFile(tok + "/tokenizer.json", tokenizer.dump()).ok());
  ASSERT_TRUE(WriteStringToFile(tok + "/tokenizer_config.json",
                                R"({"bos_token": "<|begin|>", "eos_token": "<|end|>"})")
                  .ok());
  SynthOptions o;
  o.out_dir = *root_ + "/with-tok";
  o.arch = SynthArch::kQwen3;
  o.tokenizer_dir = tok;
  o.sha256 = false;
  auto r = WriteSyntheticCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.vocab_size, 1024);  // ids up to 1001, rounded up to a multiple of 128
  EXPECT_EQ(r->config.bos_token_id, 1000);
  EXPECT_EQ(r->config.eos_token_id, 1001);
  EXPECT_TRUE(fs::exists(o.out_dir + "/tokenizer.json"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/tokenizer_config.json"));
  EXPECT_TRUE(fs::exists(o.out_dir + "/generation_config.json"));  // written (none to copy)
  EXPECT_FALSE(fs::exists(o.out_dir + "/tokenizer.model"));
  auto c = LoadModelConfig(o.out_dir);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->vocab_size, 1024);

  // Missing files and malformed JSON name the file.
  o.out_dir = *root_ + "/bad-tok";
  o.tokenizer_dir = *root_ + "/nowhere";
  r = WriteSyntheticCheckpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("tokenizer.json"));
  ASSERT_TRUE(WriteStringToFile(tok + "/tokenizer.json", "{\"model\": ").ok());
  o.tokenizer_dir = tok;
  r = WriteSyntheticCheckpoint(o);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(tok + "/tokenizer.json"));
}

// quantize → export → reload → evaluate, per family and recipe.
struct RoundTrip {
  SynthArch arch;
  const char* recipe;  // "gptq" or "aser"
};

class FamilyRoundTripTest : public FamiliesTest, public ::testing::WithParamInterface<RoundTrip> {};

TEST_P(FamilyRoundTripTest, ExportReloadsWithTheSamePerplexityAndKeepsTheFamily) {
  const RoundTrip rt = GetParam();
  const std::string src = Dir(rt.arch);
  // A tokenizer file nobody parses, to see the export copy it beside tokenizer.model.
  ASSERT_TRUE(WriteStringToFile(src + "/special_tokens_map.json", "{}\n").ok());
  const std::string recipe_path = *root_ + "/" + rt.recipe + ".yaml";
  const std::string recipe =
      std::string(rt.recipe) == "gptq"
          ? "method: gptq\nweights: {bits: 4, group_size: 32}\n"
          : "method: gptq\nweights: {bits: 4, group_size: 32}\n"
            "smoothing: {method: aser, outlier_channels: 8}\nerror_reconstruction: {rank: 16}\n";
  ASSERT_TRUE(WriteStringToFile(recipe_path, recipe).ok());
  const std::string out = *root_ + "/" + SynthArchName(rt.arch) + "-" + rt.recipe;
  // Calibration and evaluation windows of 96 tokens: past the window (16) and past
  // original_max_position_embeddings (64).
  auto q = testing::RunQcal({"quantize",
                             "--model",
                             src,
                             "--recipe",
                             recipe_path,
                             "--calib",
                             src + "/calib.txt",
                             "--samples",
                             "8",
                             "--seq-len",
                             "96",
                             "--out",
                             out,
                             "--eval-text",
                             src + "/eval.txt",
                             "--eval-seq-len",
                             "96",
                             "--eval-max-windows",
                             "3",
                             "--threads",
                             "2",
                             "--json",
                             "--overwrite"});
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const nlohmann::json qj = nlohmann::json::parse(q.out);
  const double in_memory = qj["perplexity"].get<double>();
  const double fp = qj["perplexity_fp"].get<double>();
  EXPECT_TRUE(std::isfinite(in_memory));
  EXPECT_LT(std::abs(in_memory - fp) / fp, 0.05) << "W4 should stay close to fp";

  auto e = testing::RunQcal({"eval", "--model", out, "--text", src + "/eval.txt", "--seq-len", "96",
                             "--max-windows", "3", "--threads", "2", "--json"});
  ASSERT_EQ(e.exit_code, 0) << e.err;
  const double reloaded = nlohmann::json::parse(e.out)["perplexity"].get<double>();
  EXPECT_NEAR(reloaded, in_memory, 1e-4 * in_memory);

  // The exported config keeps the family's keys; tensors and tokenizer files are there.
  auto src_json = ReadFileToString(src + "/config.json");
  auto out_json = ReadFileToString(out + "/config.json");
  ASSERT_TRUE(src_json.ok() && out_json.ok());
  const nlohmann::json sj = nlohmann::json::parse(*src_json), oj = nlohmann::json::parse(*out_json);
  for (const char* key : {"model_type", "rope_scaling", "head_dim", "sliding_window",
                          "use_sliding_window", "tie_word_embeddings", "rope_theta"}) {
    EXPECT_EQ(sj.contains(key), oj.contains(key)) << key;
    if (sj.contains(key)) {
      EXPECT_EQ(sj[key], oj[key]) << key;
    }
  }
  auto c = LoadModelConfig(out);
  ASSERT_TRUE(c.ok()) << c.status();
  auto reader = CheckpointReader::Open(out);
  ASSERT_TRUE(reader.ok());
  if (rt.arch == SynthArch::kQwen3) {
    EXPECT_TRUE((*reader)->Has("model.layers.0.self_attn.q_norm.weight"));
    EXPECT_TRUE((*reader)->Has("model.layers.0.self_attn.k_norm.weight"));
  }
  if (rt.arch == SynthArch::kQwen2) {
    EXPECT_TRUE((*reader)->Has("model.layers.0.self_attn.q_proj.bias"));
  }
  for (const char* f : {"tokenizer.model", "generation_config.json", "special_tokens_map.json"}) {
    EXPECT_TRUE(fs::exists(out + "/" + f)) << f;
  }
  if (std::string(rt.recipe) == "aser") {
    EXPECT_TRUE(fs::exists(out + "/adapter/adapter_model.safetensors"));
  }
}

std::string RoundTripName(const ::testing::TestParamInfo<RoundTrip>& info) {
  return std::string(SynthArchName(info.param.arch)) + "_" + info.param.recipe;
}

INSTANTIATE_TEST_SUITE_P(
    Families, FamilyRoundTripTest,
    ::testing::Values(RoundTrip{SynthArch::kLlama3, "gptq"}, RoundTrip{SynthArch::kLlama3, "aser"},
                      RoundTrip{SynthArch::kQwen2, "gptq"}, RoundTrip{SynthArch::kQwen2, "aser"},
                      RoundTrip{SynthArch::kQwen3, "gptq"}, RoundTrip{SynthArch::kQwen3, "aser"},
                      RoundTrip{SynthArch::kMistral, "gptq"},
                      RoundTrip{SynthArch::kMistral, "aser"}),
    RoundTripName);

}  // namespace
}  // namespace qcal::engine
