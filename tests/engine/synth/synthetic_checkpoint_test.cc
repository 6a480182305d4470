// Synthetic checkpoints: presets, weight statistics, tokenizer training, the written directory
// (determinism, loading, evaluation, activation outliers) and the overwrite rules.
#include "services/engine/synth/synthetic_checkpoint.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "common/safetensors_writer.h"
#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/bench.h"
#include "services/engine/evaluate.h"
#include "services/engine/model.h"
#include "services/engine/synth/synthetic_text.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::vector<std::string> kFiles = {"calib.txt",         "config.json",
                                         "eval.txt",          "generation_config.json",
                                         "model.safetensors", "tokenizer.model"};

// A temporary directory removed at the end of the test.
class TempDir {
 public:
  TempDir() : path_(testing::MakeTempDir("qcal-synth")) {}
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string Sub(const std::string& name) const { return (fs::path(path_) / name).string(); }

 private:
  std::string path_;
};

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

std::string Read(const std::string& path) {
  auto s = ReadFileToString(path);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : std::string();
}

absl::StatusOr<SynthResult> Write(const std::string& dir, SynthPreset preset, uint64_t seed,
                                  bool overwrite = false) {
  SynthOptions o;
  o.out_dir = dir;
  o.preset = preset;
  o.seed = seed;
  o.overwrite = overwrite;
  return WriteSyntheticCheckpoint(o);
}

double Rms(const float* x, int64_t n, int64_t stride) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i * stride]) * x[i * stride];
  return std::sqrt(s / n);
}

TEST(SynthPresetTest, DimensionsMatchTheSpecAndAreMultiplesOf128) {
  ModelConfig t = SynthConfig(SynthPreset::kTiny);
  EXPECT_EQ(t.hidden_size, 128);
  EXPECT_EQ(t.intermediate_size, 384);
  EXPECT_EQ(t.num_layers, 2);
  EXPECT_EQ(t.num_heads, 4);
  EXPECT_EQ(t.num_kv_heads, 2);
  EXPECT_EQ(t.head_dim, 32);
  EXPECT_EQ(t.vocab_size, 512);
  EXPECT_FALSE(t.tie_word_embeddings);
  ModelConfig s = SynthConfig(SynthPreset::kSmall);
  EXPECT_EQ(s.hidden_size, 256);
  EXPECT_EQ(s.intermediate_size, 768);
  EXPECT_EQ(s.num_layers, 4);
  EXPECT_EQ(s.num_heads, 8);
  EXPECT_EQ(s.num_kv_heads, 4);
  EXPECT_EQ(s.vocab_size, 1024);
  for (const ModelConfig& c : {t, s}) {
    // Every linear's d_in, and the vocabulary, are multiples of 128; every d_out of 32.
    EXPECT_EQ(c.hidden_size % 128, 0);
    EXPECT_EQ(c.intermediate_size % 128, 0);
    EXPECT_EQ(c.q_dim() % 128, 0);
    EXPECT_EQ(c.vocab_size % 128, 0);
    EXPECT_EQ(c.kv_dim() % 32, 0);
  }
}

TEST(SynthPresetTest, Llama2PresetsHaveLlama2DimensionsAndTheBenchShapes) {
  struct Want {
    SynthPreset preset;
    int hidden, intermediate, heads, kv_heads, layers;
  };
  for (const Want& w : {Want{SynthPreset::k7b, 4096, 11008, 32, 32, 32},
                        Want{SynthPreset::k13b, 5120, 13824, 40, 40, 40},
                        Want{SynthPreset::k70b, 8192, 28672, 64, 8, 80}}) {
    SCOPED_TRACE(SynthPresetName(w.preset));
    const ModelConfig c = SynthConfig(w.preset);
    EXPECT_EQ(c.model_type, "llama");
    EXPECT_EQ(c.hidden_size, w.hidden);
    EXPECT_EQ(c.intermediate_size, w.intermediate);
    EXPECT_EQ(c.num_heads, w.heads);
    EXPECT_EQ(c.num_kv_heads, w.kv_heads);
    EXPECT_EQ(c.num_layers, w.layers);
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.vocab_size, 32000);
    EXPECT_EQ(c.max_position_embeddings, 4096);
    EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
    EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
    EXPECT_FALSE(c.tie_word_embeddings);
    EXPECT_EQ(c.dtype, "bfloat16");
    EXPECT_EQ(c.bos_token_id, 1);
    EXPECT_EQ(c.eos_token_id, 2);
    EXPECT_EQ(SynthTokenizerVocab(c), 2048);
    // `qcal bench --shape` runs the same dimensions.
    auto bench = BenchShapeNamed(SynthPresetName(w.preset));
    ASSERT_TRUE(bench.ok()) << bench.status();
    EXPECT_EQ(bench->config.hidden_size, c.hidden_size);
    EXPECT_EQ(bench->config.intermediate_size, c.intermediate_size);
    EXPECT_EQ(bench->config.num_heads, c.num_heads);
    EXPECT_EQ(bench->config.num_kv_heads, c.num_kv_heads);
    EXPECT_EQ(bench->config.head_dim, c.head_dim);
    EXPECT_EQ(bench->config.num_layers, c.num_layers);
    EXPECT_EQ(bench->config.vocab_size, c.vocab_size);
    EXPECT_GT(bench->ideal_floor_seconds, 0);
    EXPECT_GT(bench->library_floor_seconds, bench->ideal_floor_seconds);
  }
  // The 13b floors are the 7b ones scaled by the FLOP ratio.
  const BenchShape b7 = *BenchShapeNamed("7b"), b13 = *BenchShapeNamed("13b");
  EXPECT_TRUE(b13.floors_scaled);
  EXPECT_FALSE(b7.floors_scaled);
  const double ratio =
      CountFlops(b13.config, 128, 2048).total() / CountFlops(b7.config, 128, 2048).total();
  EXPECT_GT(ratio, 1.5);
  EXPECT_NEAR(b13.ideal_floor_seconds, b7.ideal_floor_seconds * ratio, 1e-9);
  EXPECT_EQ(SynthTokenizerVocab(SynthConfig(SynthPreset::kTiny)), 512);
  EXPECT_EQ(SynthTokenizerVocab(SynthConfig(SynthPreset::kSmall)), 1024);
}

TEST(SynthPresetTest, LayersReplaceTheBlockCountOfEveryPreset) {
  for (SynthPreset p : {SynthPreset::kTiny, SynthPreset::kSmall, SynthPreset::k7b,
                        SynthPreset::k13b, SynthPreset::k70b}) {
    SCOPED_TRACE(SynthPresetName(p));
    const ModelConfig base = SynthConfig(p);
    const ModelConfig one = SynthConfig(p, 1), five = SynthConfig(p, 5);
    EXPECT_EQ(one.num_layers, 1);
    EXPECT_EQ(five.num_layers, 5);
    EXPECT_EQ(five.hidden_size, base.hidden_size);
    EXPECT_EQ(SynthTensorPlan(one).size(), 3u + 9);
    EXPECT_EQ(SynthTensorPlan(five).size(), 3u + 9 * 5);
  }
}

// The Llama-2 presets' tensors, sizes and shards, planned without writing anything.
TEST(SynthPlanTest, Llama2PlansHaveTheRealParameterCountsDtypesShapesAndShards) {
  struct Want {
    SynthPreset preset;
    int64_t parameters;
    size_t shards;
  };
  TempDir dir;
  for (const Want& w :
       {Want{SynthPreset::k7b, 6'738'415'616, 3}, Want{SynthPreset::k13b, 13'015'864'320, 6},
        Want{SynthPreset::k70b, 68'976'648'192, 29}}) {
    SCOPED_TRACE(SynthPresetName(w.preset));
    const ModelConfig c = SynthConfig(w.preset);
    const std::vector<PlannedTensor> plan = SynthTensorPlan(c);
    ASSERT_EQ(plan.size(), 3u + 9 * c.num_layers);
    int64_t parameters = 0;
    std::map<std::string, Shape> shapes;
    for (const PlannedTensor& p : plan) {
      EXPECT_EQ(p.dtype, DType::kBF16) << p.name;
      parameters += NumElements(p.shape);
      shapes[p.name] = p.shape;
    }
    EXPECT_EQ(parameters, w.parameters);
    EXPECT_TRUE(std::is_sorted(
        plan.begin(), plan.end(),
        [](const PlannedTensor& a, const PlannedTensor& b) { return a.name < b.name; }));
    const int64_t d = c.hidden_size, f = c.intermediate_size, kv = c.kv_dim();
    const std::string last = absl::StrCat("model.layers.", c.num_layers - 1, ".");
    EXPECT_EQ(shapes.at("model.embed_tokens.weight"), (Shape{32000, d}));
    EXPECT_EQ(shapes.at("lm_head.weight"), (Shape{32000, d}));
    EXPECT_EQ(shapes.at("model.norm.weight"), (Shape{d}));
    EXPECT_EQ(shapes.at(last + "input_layernorm.weight"), (Shape{d}));
    EXPECT_EQ(shapes.at(last + "self_attn.q_proj.weight"), (Shape{d, d}));
    EXPECT_EQ(shapes.at(last + "self_attn.k_proj.weight"), (Shape{kv, d}));
    EXPECT_EQ(shapes.at(last + "self_attn.v_proj.weight"), (Shape{kv, d}));
    EXPECT_EQ(shapes.at(last + "self_attn.o_proj.weight"), (Shape{d, d}));
    EXPECT_EQ(shapes.at(last + "mlp.gate_proj.weight"), (Shape{f, d}));
    EXPECT_EQ(shapes.at(last + "mlp.up_proj.weight"), (Shape{f, d}));
    EXPECT_EQ(shapes.at(last + "mlp.down_proj.weight"), (Shape{d, f}));
    EXPECT_FALSE(shapes.count(absl::StrCat("model.layers.", c.num_layers, ".mlp.up_proj.weight")));

    auto writer = ShardedSafetensorsWriter::Create(dir.path(), plan, kSynthDefaultShardBytes);
    ASSERT_TRUE(writer.ok()) << writer.status();
    const std::vector<std::string>& files = (*writer)->shard_files();
    ASSERT_EQ(files.size(), w.shards);
    EXPECT_EQ(files.front(), absl::StrCat("model-00001-of-", absl::Dec(w.shards, absl::kZeroPad5),
                                          ".safetensors"));
  }
  EXPECT_TRUE(ListDir(dir.path()).empty());
}

TEST(SynthPresetTest, ParsesNames) {
  EXPECT_EQ(*ParseSynthPreset("tiny"), SynthPreset::kTiny);
  EXPECT_EQ(*ParseSynthPreset("small"), SynthPreset::kSmall);
  EXPECT_EQ(*ParseSynthPreset("7b"), SynthPreset::k7b);
  EXPECT_EQ(*ParseSynthPreset("13b"), SynthPreset::k13b);
  EXPECT_EQ(*ParseSynthPreset("70b"), SynthPreset::k70b);
  EXPECT_STREQ(SynthPresetName(SynthPreset::kSmall), "small");
  EXPECT_STREQ(SynthPresetName(SynthPreset::k13b), "13b");
  auto bad = ParseSynthPreset("huge");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("\"huge\""));
  EXPECT_THAT(bad.status().message(), HasSubstr("13b"));
}

TEST(SynthWeightsTest, NormWeightsCarryTheSameOutlierChannelsInEveryLayer) {
  for (SynthPreset preset : {SynthPreset::kTiny, SynthPreset::kSmall}) {
    const ModelConfig c = SynthConfig(preset);
    const std::vector<int> outliers = SynthOutlierChannels(preset, 11);
    ASSERT_EQ(static_cast<int>(outliers.size()), SynthOutlierCount(preset));
    EXPECT_GE(outliers.size(), 2u);
    EXPECT_LE(outliers.size(), 4u);
    EXPECT_TRUE(std::is_sorted(outliers.begin(), outliers.end()));
    EXPECT_EQ(std::set<int>(outliers.begin(), outliers.end()).size(), outliers.size());
    const auto w = SynthesizeWeights(preset, 11);
    for (int b = 0; b < c.num_layers; ++b) {
      for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
        const std::string name = absl::StrCat("model.layers.", b, ".", norm, ".weight");
        const float* x = w.at(name).data<float>();
        for (int ch = 0; ch < c.hidden_size; ++ch) {
          if (std::count(outliers.begin(), outliers.end(), ch)) {
            EXPECT_GE(x[ch], 8.0f) << name << " channel " << ch;
            EXPECT_LE(x[ch], 20.0f) << name << " channel " << ch;
          } else {
            EXPECT_GT(x[ch], 0.7f) << name << " channel " << ch;
            EXPECT_LT(x[ch], 1.1f) << name << " channel " << ch;
          }
        }
      }
    }
    const Tensor& final_norm = w.at("model.norm.weight");
    const float* f = final_norm.data<float>();
    EXPECT_LT(*std::max_element(f, f + c.hidden_size), 1.1f);
  }
  EXPECT_NE(SynthOutlierChannels(SynthPreset::kTiny, 11),
            SynthOutlierChannels(SynthPreset::kTiny, 12));
}

TEST(SynthWeightsTest, LinearsHaveScaleSpreadAndTheDocumentedMagnitude) {
  const auto w = SynthesizeWeights(SynthPreset::kSmall, 4);
  for (const char* name : {"model.layers.1.self_attn.q_proj.weight",
                           "model.layers.2.mlp.down_proj.weight", "lm_head.weight"}) {
    SCOPED_TRACE(name);
    const Tensor& t = w.at(name);
    const int64_t d_out = t.dim(0), d_in = t.dim(1);
    const float* x = t.data<float>();
    // rms of 0.6/sqrt(d_in)·r·c·n with log-normal r, c: 0.6/sqrt(d_in)·e^(0.3²)·e^(0.2²).
    const double expected = 0.6 / std::sqrt(double(d_in)) * std::exp(0.09 + 0.04);
    EXPECT_NEAR(Rms(x, d_out * d_in, 1), expected, 0.15 * expected);
    std::vector<double> rows(d_out), cols(d_in);
    for (int64_t i = 0; i < d_out; ++i) rows[i] = Rms(x + i * d_in, d_in, 1);
    for (int64_t j = 0; j < d_in; ++j) cols[j] = Rms(x + j, d_out, d_in);
    const auto [rmin, rmax] = std::minmax_element(rows.begin(), rows.end());
    const auto [cmin, cmax] = std::minmax_element(cols.begin(), cols.end());
    EXPECT_GT(*rmax / *rmin, 2.0);
    EXPECT_GT(*cmax / *cmin, 1.5);
  }
  const Tensor& e = w.at("model.embed_tokens.weight");
  EXPECT_NEAR(Rms(e.data<float>(), e.numel(), 1), 0.03, 0.005);
}

TEST(SynthWeightsTest, SameSeedSameWeightsOtherSeedOtherWeights) {
  const auto a = SynthesizeWeights(SynthPreset::kTiny, 1);
  const auto b = SynthesizeWeights(SynthPreset::kTiny, 1);
  const auto c = SynthesizeWeights(SynthPreset::kTiny, 2);
  ASSERT_EQ(a.size(), 3u + 2 * (2 + 7));
  for (const auto& [name, t] : a) {
    SCOPED_TRACE(name);
    ASSERT_EQ(t.nbytes(), b.at(name).nbytes());
    EXPECT_EQ(std::memcmp(t.raw(), b.at(name).raw(), t.nbytes()), 0);
    EXPECT_NE(std::memcmp(t.raw(), c.at(name).raw(), t.nbytes()), 0);
  }
}

// Odd sizes: pieces end inside rows, the linear's weights start at an odd position of its stream
// (d_out + d_in odd), so the halves of a Box–Muller pair fall in different pieces.
TEST(SynthWeightsTest, TensorsDoNotDependOnTheThreadCountAndBf16IsTheRoundedFp32) {
  const std::vector<int> outliers = {3, 17};
  for (const PlannedTensor& f32 :
       {PlannedTensor{"model.layers.0.mlp.down_proj.weight", DType::kF32, {37, 5000}},
        PlannedTensor{"model.embed_tokens.weight", DType::kF32, {301, 999}},
        PlannedTensor{"model.layers.2.input_layernorm.weight", DType::kF32, {129}}}) {
    SCOPED_TRACE(f32.name);
    ASSERT_TRUE(f32.shape.size() == 1 || NumElements(f32.shape) > 2 * kSynthPieceElements);
    const Tensor one = SynthesizeTensor(f32, 9, outliers, 1);
    for (int threads : {2, 3, 8}) {
      const Tensor many = SynthesizeTensor(f32, 9, outliers, threads);
      ASSERT_EQ(many.nbytes(), one.nbytes());
      EXPECT_EQ(std::memcmp(many.raw(), one.raw(), one.nbytes()), 0) << threads << " threads";
    }
    PlannedTensor bf16 = f32;
    bf16.dtype = DType::kBF16;
    const Tensor b = SynthesizeTensor(bf16, 9, outliers, 2);
    ASSERT_EQ(b.dtype(), DType::kBF16);
    ASSERT_EQ(b.shape(), f32.shape);
    const float* x = one.data<float>();
    const uint16_t* y = b.data<uint16_t>();
    int64_t mismatches = 0;
    for (int64_t i = 0; i < one.numel(); ++i) mismatches += y[i] != FloatToBf16(x[i]);
    EXPECT_EQ(mismatches, 0);
    // A different seed gives different values.
    const Tensor other = SynthesizeTensor(f32, 10, outliers, 2);
    EXPECT_NE(std::memcmp(other.raw(), one.raw(), one.nbytes()), 0);
  }
}

// The streamed, piece-parallel generator reproduces the bytes the sequential generator wrote before
// it (sha256 of `qcal synth --preset tiny|small --seed 5`'s model.safetensors). Depends on libm's
// exp/log/sin/cos results, as every synthetic checkpoint does.
TEST(SynthCheckpointTest, TinyAndSmallKeepTheirBytes) {
  TempDir dir;
  for (const auto& [preset, sha] :
       {std::pair{SynthPreset::kTiny,
                  "b8c4fa9ccd00b356260a20922e14060430bfe2a2c9594ab4923ffc980a5e7d8e"},
        std::pair{SynthPreset::kSmall,
                  "faabed5b5372667d0092f82da7c9e37bafa52a429b3edc3159e38ccc0c811ddb"}}) {
    SCOPED_TRACE(SynthPresetName(preset));
    const std::string out = dir.Sub(SynthPresetName(preset));
    auto r = Write(out, preset, 5);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(Sha256Hex(Read(out + "/model.safetensors")), sha);
  }
}

TEST(SynthTokenizerTest, TrainingTwiceGivesIdenticalBytesAndALlamaStyleTokenizer) {
  const std::string text = GenerateSyntheticText(9, 100000);
  auto a = TrainSynthTokenizer(text, 512);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = TrainSynthTokenizer(text, 512);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(*a, *b);

  TempDir dir;
  ASSERT_TRUE(WriteStringToFile(dir.Sub("tokenizer.model"), *a).ok());
  auto tok = Tokenizer::Load(dir.path());
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 512);
  EXPECT_EQ((*tok)->bos_id(), 1);
  EXPECT_EQ((*tok)->eos_id(), 2);
  // Byte fallback: characters never seen in training still round-trip; digits are split.
  for (const std::string& s : {std::string("The quiet river was golden."), std::string("in 1987"),
                               std::string("caf\xc3\xa9 \xe2\x82\xac 42")}) {
    auto ids = (*tok)->Encode(s);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_THAT(*ids, ::testing::Not(::testing::Contains(0))) << s;  // no unk
    auto back = (*tok)->Decode(*ids);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(*back, s);
  }
  auto digits = (*tok)->Encode("1987");
  ASSERT_TRUE(digits.ok());
  EXPECT_GE(digits->size(), 4u);
}

TEST(SynthTokenizerTest, VocabularyTooSmallIsAnError) {
  auto r = TrainSynthTokenizer(GenerateSyntheticText(9, 20000), 100);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("vocab 100"));
}

TEST(SynthCheckpointTest, SameSeedGivesByteIdenticalDirectories) {
  TempDir dir;
  auto a = Write(dir.Sub("a"), SynthPreset::kTiny, 7);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = Write(dir.Sub("b"), SynthPreset::kTiny, 7);
  ASSERT_TRUE(b.ok()) << b.status();
  auto c = Write(dir.Sub("c"), SynthPreset::kTiny, 8);
  ASSERT_TRUE(c.ok()) << c.status();
  // Nothing but the three outputs (no temporary directories left behind).
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("a", "b", "c"));
  ASSERT_EQ(ListDir(dir.Sub("a")), kFiles);
  ASSERT_EQ(ListDir(dir.Sub("b")), kFiles);
  for (size_t i = 0; i < kFiles.size(); ++i) {
    const std::string& f = kFiles[i];
    SCOPED_TRACE(f);
    const std::string bytes = Read(dir.Sub("a/" + f));
    EXPECT_EQ(bytes, Read(dir.Sub("b/" + f)));
    ASSERT_EQ(a->files[i].name, f);
    EXPECT_EQ(a->files[i].bytes, static_cast<int64_t>(bytes.size()));
    EXPECT_EQ(a->files[i].sha256, Sha256Hex(bytes));
  }
  for (const char* f : {"model.safetensors", "calib.txt", "eval.txt", "tokenizer.model"}) {
    EXPECT_NE(Read(dir.Sub(std::string("a/") + f)), Read(dir.Sub(std::string("c/") + f))) << f;
  }
  EXPECT_EQ(Read(dir.Sub("a/config.json")), Read(dir.Sub("c/config.json")));
  EXPECT_EQ(a->num_parameters, 524928);
}

TEST(SynthCheckpointTest, TextsHaveTheirSizesAndDiffer) {
  TempDir dir;
  ASSERT_TRUE(Write(dir.Sub("m"), SynthPreset::kTiny, 1).ok());
  auto calib = LoadCorpusText(dir.Sub("m/calib.txt"));
  auto eval = LoadCorpusText(dir.Sub("m/eval.txt"));
  ASSERT_TRUE(calib.ok()) << calib.status();
  ASSERT_TRUE(eval.ok()) << eval.status();
  EXPECT_GE(calib->size(), kSynthCalibBytes);
  EXPECT_LT(calib->size(), kSynthCalibBytes + 2000);
  EXPECT_GE(eval->size(), kSynthEvalBytes);
  EXPECT_LT(eval->size(), kSynthEvalBytes + 2000);
  // Different streams: the evaluation text is not a piece of the calibration text.
  EXPECT_EQ(calib->find(eval->substr(0, 200)), std::string::npos);
}

// Loads a written checkpoint and checks config, tokenizer, a finite perplexity and that the norm
// outliers show up as activation-outlier channels in block 0's q/k/v and gate/up inputs.
void CheckLoadsAndRuns(SynthPreset preset, uint64_t seed, int max_windows) {
  TempDir dir;
  const std::string out = dir.Sub("model");
  auto written = Write(out, preset, seed);
  ASSERT_TRUE(written.ok()) << written.status();
  const ModelConfig want = SynthConfig(preset);

  auto config = LoadModelConfig(out);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->model_type, "llama");
  EXPECT_EQ(config->hidden_size, want.hidden_size);
  EXPECT_EQ(config->intermediate_size, want.intermediate_size);
  EXPECT_EQ(config->num_layers, want.num_layers);
  EXPECT_EQ(config->num_heads, want.num_heads);
  EXPECT_EQ(config->num_kv_heads, want.num_kv_heads);
  EXPECT_EQ(config->head_dim, want.head_dim);
  EXPECT_EQ(config->vocab_size, want.vocab_size);
  EXPECT_EQ(config->bos_token_id, 1);
  EXPECT_EQ(config->eos_token_id, 2);
  EXPECT_DOUBLE_EQ(config->rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(config->rms_norm_eps, 1e-5);
  EXPECT_EQ(config->dtype, "float32");
  EXPECT_FALSE(config->tie_word_embeddings);

  kernels::BackendOptions bo;
  bo.threads = 1;
  auto backend = kernels::CreateBackend(bo);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto model = Model::Load(out, backend->get());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::Load(out);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), want.vocab_size);

  auto text = LoadCorpusText(out + "/eval.txt");
  ASSERT_TRUE(text.ok()) << text.status();
  auto ids = (*tok)->Encode(*text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto windows = MakeEvalWindows(*ids, 128, max_windows, 1, "eval.txt");
  ASSERT_TRUE(windows.ok()) << windows.status();
  ASSERT_EQ(windows->inputs.size(), static_cast<size_t>(max_windows));
  auto ppl = EvaluatePerplexity(**model, *windows);
  ASSERT_TRUE(ppl.ok()) << ppl.status();
  EXPECT_TRUE(std::isfinite(ppl->perplexity));
  // An untrained model: near the vocabulary size, far from 1 and from overflow.
  EXPECT_GT(ppl->perplexity, 0.25 * want.vocab_size);
  EXPECT_LT(ppl->perplexity, 4.0 * want.vocab_size);

  // Per-channel max |x| of block 0's linear inputs on the first window.
  std::vector<int> first_window = windows->inputs[0];
  auto hidden = (*model)->Embed(first_window);
  ASSERT_TRUE(hidden.ok()) << hidden.status();
  std::map<LinearInput, std::vector<float>> channel_max;
  auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
    QCAL_ASSIGN_OR_RETURN(Tensor h, (*backend)->ToHost(x));
    std::vector<float>& m = channel_max[in];
    m.assign(h.dim(1), 0.0f);
    const float* p = h.data<float>();
    for (int64_t r = 0; r < h.dim(0); ++r) {
      for (int64_t c = 0; c < h.dim(1); ++c) {
        m[c] = std::max(m[c], std::abs(p[r * h.dim(1) + c]));
      }
    }
    return absl::OkStatus();
  };
  SeqShape shape{1, static_cast<int>(first_window.size()), 0};
  ASSERT_TRUE((*model)->BlockForward(0, *hidden, shape, nullptr, tap).ok());
  for (LinearInput in : {LinearInput::kQkv, LinearInput::kGateUp}) {
    SCOPED_TRACE(static_cast<int>(in));
    std::vector<float> m = channel_max.at(in);
    std::vector<float> sorted = m;
    std::sort(sorted.begin(), sorted.end());
    const float median = sorted[sorted.size() / 2];
    std::vector<int> top(m.size());
    for (size_t i = 0; i < m.size(); ++i) top[i] = static_cast<int>(i);
    std::stable_sort(top.begin(), top.end(), [&](int a, int b) { return m[a] > m[b]; });
    top.resize(written->outlier_channels.size());
    std::sort(top.begin(), top.end());
    EXPECT_EQ(top, written->outlier_channels);
    for (int ch : written->outlier_channels) EXPECT_GT(m[ch], 4.0f * median) << "channel " << ch;
  }
}

TEST(SynthCheckpointTest, TinyLoadsEvaluatesAndHasActivationOutliers) {
  CheckLoadsAndRuns(SynthPreset::kTiny, 3, 16);
}

TEST(SynthCheckpointTest, SmallLoadsEvaluatesAndHasActivationOutliers) {
  CheckLoadsAndRuns(SynthPreset::kSmall, 0, 2);
}

// The Llama-2 presets' write path (bf16, shards, index) on the tiny shape with three blocks and
// 200 kB shards: the same bytes from 1 and 2 threads, and the checkpoint loads and evaluates.
TEST(SynthCheckpointTest, ShardedBf16CheckpointIsThreadIndependentAndLoads) {
  TempDir dir;
  SynthOptions o;
  o.preset = SynthPreset::kTiny;
  o.layers = 3;
  o.dtype = DType::kBF16;
  o.seed = 4;
  o.shard_bytes = 200'000;
  o.out_dir = dir.Sub("a");
  o.threads = 1;
  auto a = WriteSyntheticCheckpoint(o);
  ASSERT_TRUE(a.ok()) << a.status();
  o.out_dir = dir.Sub("b");
  o.threads = 2;
  auto b = WriteSyntheticCheckpoint(o);
  ASSERT_TRUE(b.ok()) << b.status();

  const ModelConfig c = a->config;
  EXPECT_EQ(c.num_layers, 3);
  EXPECT_EQ(c.dtype, "bfloat16");
  const std::vector<PlannedTensor> plan = SynthTensorPlan(c);
  int64_t data_bytes = 0;
  for (const PlannedTensor& p : plan) data_bytes += NumElements(p.shape) * 2;
  EXPECT_EQ(a->num_parameters, data_bytes / 2);
  const size_t shards = static_cast<size_t>(ListDir(dir.Sub("a")).size() - 6);
  ASSERT_GE(shards, 7u);  // 1.44 MB of bf16 weights in 200 kB shards
  std::vector<std::string> want = {"calib.txt", "config.json", "eval.txt",
                                   "generation_config.json"};
  for (size_t i = 1; i <= shards; ++i) {
    want.push_back(absl::StrCat("model-", absl::Dec(i, absl::kZeroPad5), "-of-",
                                absl::Dec(shards, absl::kZeroPad5), ".safetensors"));
  }
  want.push_back("model.safetensors.index.json");
  want.push_back("tokenizer.model");
  ASSERT_EQ(ListDir(dir.Sub("a")), want);
  ASSERT_EQ(a->files.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    SCOPED_TRACE(want[i]);
    const std::string bytes = Read(dir.Sub("a/" + want[i]));
    EXPECT_EQ(bytes, Read(dir.Sub("b/" + want[i])));
    EXPECT_EQ(a->files[i].name, want[i]);
    EXPECT_EQ(a->files[i].sha256, Sha256Hex(bytes));
    EXPECT_EQ(a->files[i].sha256, b->files[i].sha256);
  }

  // config.json and the index.
  const nlohmann::json config = nlohmann::json::parse(Read(dir.Sub("a/config.json")));
  EXPECT_EQ(config["torch_dtype"], "bfloat16");
  EXPECT_EQ(config["num_hidden_layers"], 3);
  EXPECT_EQ(config["hidden_size"], 128);
  EXPECT_EQ(config["tie_word_embeddings"], false);
  const nlohmann::json index =
      nlohmann::json::parse(Read(dir.Sub("a/model.safetensors.index.json")));
  EXPECT_EQ(index["metadata"]["total_size"], data_bytes);
  ASSERT_EQ(index["weight_map"].size(), plan.size());
  for (const PlannedTensor& p : plan) {
    ASSERT_TRUE(index["weight_map"].contains(p.name)) << p.name;
    const std::string shard = index["weight_map"][p.name];
    EXPECT_TRUE(std::count(want.begin(), want.end(), shard)) << shard;
  }

  // Every tensor through CheckpointReader: bf16, its planned shape, the generator's bytes.
  auto reader = CheckpointReader::Open(dir.Sub("a"));
  ASSERT_TRUE(reader.ok()) << reader.status();
  std::vector<std::string> names;
  for (const PlannedTensor& p : plan) names.push_back(p.name);
  EXPECT_EQ((*reader)->Names(), names);
  for (const PlannedTensor& p : plan) {
    SCOPED_TRACE(p.name);
    auto t = (*reader)->Get(p.name);
    ASSERT_TRUE(t.ok()) << t.status();
    EXPECT_EQ(t->dtype(), DType::kBF16);
    EXPECT_EQ(t->shape(), p.shape);
    const Tensor want_t = SynthesizeTensor(p, 4, a->outlier_channels);
    EXPECT_EQ(std::memcmp(t->raw(), want_t.raw(), want_t.nbytes()), 0);
  }

  // The model loads from the shards and gives a finite, untrained perplexity.
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto backend = kernels::CreateBackend(bo);
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto model = Model::Load(dir.Sub("a"), backend->get());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::Load(dir.Sub("a"));
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(dir.Sub("a/eval.txt"));
  ASSERT_TRUE(text.ok()) << text.status();
  auto ids = (*tok)->Encode(*text);
  ASSERT_TRUE(ids.ok()) << ids.status();
  auto windows = MakeEvalWindows(*ids, 128, 2, 1, "eval.txt");
  ASSERT_TRUE(windows.ok()) << windows.status();
  auto ppl = EvaluatePerplexity(**model, *windows);
  ASSERT_TRUE(ppl.ok()) << ppl.status();
  EXPECT_GT(ppl->perplexity, 0.25 * c.vocab_size);
  EXPECT_LT(ppl->perplexity, 4.0 * c.vocab_size);
}

TEST(SynthCheckpointTest, LayersChangeTheTinyBlockCount) {
  TempDir dir;
  SynthOptions o;
  o.out_dir = dir.Sub("m");
  o.layers = 1;
  o.sha256 = false;
  auto r = WriteSyntheticCheckpoint(o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.num_layers, 1);
  EXPECT_EQ(r->num_parameters, 524928 - 196864);  // tiny less one block
  for (const SynthFile& f : r->files) EXPECT_TRUE(f.sha256.empty()) << f.name;
  EXPECT_EQ(ListDir(o.out_dir), kFiles);  // one fp32 file, as tiny always had
  auto config = LoadModelConfig(o.out_dir);
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->num_layers, 1);
  EXPECT_EQ(config->dtype, "float32");
  auto reader = CheckpointReader::Open(o.out_dir);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE((*reader)->Has("model.layers.0.mlp.down_proj.weight"));
  EXPECT_FALSE((*reader)->Has("model.layers.1.mlp.down_proj.weight"));
  EXPECT_EQ((*reader)->Names().size(), 3u + 9);
}

TEST(SynthCheckpointTest, BadLayersThreadsAndDtypeAreErrors) {
  TempDir dir;
  for (int layers : {0, -1}) {
    SynthOptions o;
    o.out_dir = dir.Sub("m");
    o.layers = layers;
    auto r = WriteSyntheticCheckpoint(o);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(r.status().message(), HasSubstr(absl::StrCat("layers must be >= 1, got ", layers)));
  }
  SynthOptions threads;
  threads.out_dir = dir.Sub("m");
  threads.threads = -2;
  EXPECT_THAT(WriteSyntheticCheckpoint(threads).status().message(),
              HasSubstr("threads must be >= 0, got -2"));
  SynthOptions dtype;
  dtype.out_dir = dir.Sub("m");
  dtype.dtype = DType::kI32;
  EXPECT_THAT(WriteSyntheticCheckpoint(dtype).status().message(),
              HasSubstr("dtype must be F32 or BF16, got I32"));
  EXPECT_TRUE(ListDir(dir.path()).empty());  // nothing written
}

TEST(SynthCheckpointTest, RefusesANonEmptyDirectoryUnlessOverwrite) {
  TempDir dir;
  const std::string out = dir.Sub("model");
  fs::create_directories(out);
  ASSERT_TRUE(WriteStringToFile(out + "/notes.txt", "keep me").ok());
  auto refused = Write(out, SynthPreset::kTiny, 0);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(refused.status().message(), HasSubstr(out));
  EXPECT_THAT(refused.status().message(), HasSubstr("--overwrite"));
  EXPECT_THAT(ListDir(out), ElementsAre("notes.txt"));
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("model"));

  auto replaced = Write(out, SynthPreset::kTiny, 0, /*overwrite=*/true);
  ASSERT_TRUE(replaced.ok()) << replaced.status();
  EXPECT_EQ(ListDir(out), kFiles);
  EXPECT_THAT(ListDir(dir.path()), ElementsAre("model"));
}

TEST(SynthCheckpointTest, EmptyDirectoryIsReplacedAndAFileIsAnError) {
  TempDir dir;
  const std::string empty = dir.Sub("empty");
  fs::create_directories(empty);
  auto r = Write(empty, SynthPreset::kTiny, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(ListDir(empty), kFiles);

  const std::string file = dir.Sub("file");
  ASSERT_TRUE(WriteStringToFile(file, "x").ok());
  auto bad = Write(file, SynthPreset::kTiny, 0, /*overwrite=*/true);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(bad.status().message(), HasSubstr(file + ": exists and is not a directory"));
  EXPECT_EQ(Read(file), "x");

  SynthOptions none;
  EXPECT_FALSE(WriteSyntheticCheckpoint(none).ok());
}

}  // namespace
}  // namespace qcal::engine
