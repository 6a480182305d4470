// End-to-end tests of ASER in the quantization path (issue 6 acceptance 2): the exported GPTQ
// checkpoint plus its PEFT adapter, loaded back from disk, reproduces the in-memory model (with and
// without 8-bit activations, with smoothing folded into fp32 and bf16 checkpoints); a job resumed
// from committed layer artifacts is byte-identical to one run straight through; bad adapters are
// refused with the file and tensor named.
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "common/files.h"
#include "common/safetensors.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/model.h"
#include "services/engine/pipeline.h"
#include "services/engine/quantize.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// The exported checkpoint must reproduce the in-memory perplexity this closely (issue 6).
constexpr double kRoundTripTolerance = 1e-4;

std::string Shared(const std::string& rel) { return testing::SharedDir() + "/" + rel; }

Recipe MakeRecipe(const std::string& method, int bits, int group) {
  Recipe r;
  r.method = *ParseQuantMethod(method);
  r.weights.bits = bits;
  r.weights.group_size = group;
  return r;
}

Recipe WithEr(Recipe r, int rank, const std::string& whitening) {
  r.error_reconstruction.enabled = true;
  r.error_reconstruction.rank = rank;
  r.error_reconstruction.whitening = *ParseWhitening(whitening);
  return r;
}

Recipe WithSmoothing(Recipe r, const std::string& method, int outliers) {
  r.smoothing.method = *ParseSmoothingMethod(method);
  r.smoothing.outlier_channels = outliers;
  return r;
}

Recipe WithActBits(Recipe r, int bits) {
  r.activations.bits = bits;
  return r;
}

bool SameBytes(kernels::Backend& be, const Tensor& a, const Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  auto ha = be.ToHost(a), hb = be.ToHost(b);
  if (!ha.ok() || !hb.ok() || ha->shape() != hb->shape()) return false;
  return std::memcmp(ha->raw(), hb->raw(), ha->nbytes()) == 0;
}

// Every tensor the forward reads in the blocks of `a` and `b` is bit-identical, and the activation
// bits agree.
void ExpectSameBlocks(Model& a, Model& b) {
  kernels::Backend& be = a.backend();
  for (int blk = 0; blk < a.num_blocks(); ++blk) {
    EXPECT_TRUE(SameBytes(be, a.block(blk).input_norm, b.block(blk).input_norm)) << blk;
    EXPECT_TRUE(SameBytes(be, a.block(blk).post_attention_norm, b.block(blk).post_attention_norm))
        << blk;
    for (LinearKind k : kAllLinears) {
      const Linear& la = a.block(blk).at(k);
      const Linear& lb = b.block(blk).at(k);
      const std::string name = LinearPrefix(blk, k);
      EXPECT_TRUE(SameBytes(be, la.weight, lb.weight)) << name;
      EXPECT_TRUE(SameBytes(be, la.bias, lb.bias)) << name;
      EXPECT_TRUE(SameBytes(be, la.lora_a, lb.lora_a)) << name << " lora_a";
      EXPECT_TRUE(SameBytes(be, la.lora_b, lb.lora_b)) << name << " lora_b";
      EXPECT_EQ(la.act_bits, lb.act_bits) << name;
    }
  }
}

class AserModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    QCAL_REQUIRE_SHARED();
    kernels::BackendOptions bo;
    bo.threads = 2;
    auto be = kernels::CreateBackend(bo);
    ASSERT_TRUE(be.ok()) << be.status();
    backend_ = std::move(be).value();
  }

  // N calibration samples of `len` tokens and up to `windows` evaluation windows of `eval_len`.
  void LoadData(const std::string& model_dir, const std::string& calib, const std::string& eval,
                int n, int len, int eval_len, int windows) {
    auto tok = Tokenizer::Load(model_dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    auto text = LoadCorpusText(calib);
    ASSERT_TRUE(text.ok()) << text.status();
    auto tokens = (*tok)->Encode(*text);
    ASSERT_TRUE(tokens.ok());
    auto s = SampleCalibration(*tokens, n, len, 0, 1, "calib");
    ASSERT_TRUE(s.ok()) << s.status();
    samples_ = *s;
    auto etext = LoadCorpusText(eval);
    ASSERT_TRUE(etext.ok());
    auto etokens = (*tok)->Encode(*etext);
    ASSERT_TRUE(etokens.ok());
    auto w = MakeEvalWindows(*etokens, eval_len, windows, 1, "eval");
    ASSERT_TRUE(w.ok()) << w.status();
    windows_ = *w;
  }

  double Perplexity(Model& m) {
    auto r = EvaluatePerplexity(m, windows_);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->perplexity : 0;
  }

  // Quantizes model_dir with `recipe`, exports into a fresh directory (returned) and checks that
  // the checkpoint loaded back equals the in-memory model, tensor for tensor and in perplexity.
  std::string RoundTrip(const std::string& model_dir, const Recipe& recipe, double* in_memory_ppl) {
    auto model = Model::Load(model_dir, backend_.get());
    EXPECT_TRUE(model.ok()) << model.status();
    if (!model.ok()) return "";
    auto outcome = QuantizeModel(**model, samples_, recipe);
    EXPECT_TRUE(outcome.ok()) << outcome.status();
    if (!outcome.ok()) return "";
    const double in_memory = Perplexity(**model);
    if (in_memory_ppl) *in_memory_ppl = in_memory;
    const std::string dir = testing::MakeTempDir("aser-roundtrip");
    const absl::Status written =
        WriteQuantizedCheckpoint(model_dir, dir, recipe, outcome->quantized, outcome->extras);
    EXPECT_TRUE(written.ok()) << written;
    auto loaded = LoadCheckpoint(dir, backend_.get());
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    if (!loaded.ok()) return dir;
    ExpectSameBlocks(**model, **loaded);
    const double from_disk = Perplexity(**loaded);
    EXPECT_LT(std::abs(from_disk - in_memory) / in_memory, kRoundTripTolerance)
        << "in memory " << in_memory << ", exported " << from_disk;
    EXPECT_EQ(fs::exists(fs::path(dir) / "adapter" / "adapter_model.safetensors"),
              recipe.error_reconstruction.enabled);
    return dir;
  }

  std::unique_ptr<kernels::Backend> backend_;
  std::vector<std::vector<int>> samples_;
  TokenWindows windows_;
};

struct RoundTripCase {
  std::string name;
  Recipe recipe;
};

class AserRoundTripTest : public AserModelTest,
                          public ::testing::WithParamInterface<RoundTripCase> {};

TEST_P(AserRoundTripTest, CheckpointPlusAdapterReproducesInMemoryModel) {
  const std::string model_dir = Shared("models/stories260k");
  LoadData(model_dir, Shared("data/tinystories-calib.txt"), Shared("data/tinystories-eval.txt"), 16,
           128, 256, 8);
  const Recipe& recipe = GetParam().recipe;
  const std::string dir = RoundTrip(model_dir, recipe, nullptr);
  auto q = ReadCheckpointQuantization(dir);
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->quant_method, "gptq");
  EXPECT_EQ(q->activation_bits, recipe.activations.bits);
  if (recipe.error_reconstruction.enabled) {
    auto cfg = ReadFileToString(dir + "/adapter/adapter_config.json");
    ASSERT_TRUE(cfg.ok());
    const nlohmann::json j = nlohmann::json::parse(*cfg);
    EXPECT_EQ(j["peft_type"], "LORA");
    EXPECT_EQ(j["task_type"], "CAUSAL_LM");
    EXPECT_EQ(j["lora_alpha"], j["r"]);
    EXPECT_EQ(j["base_model_name_or_path"], "..");
    auto file = SafetensorsFile::Open(dir + "/adapter/adapter_model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    // 5 blocks x 7 linears x (lora_A, lora_B), fp32, PEFT names.
    EXPECT_EQ((*file)->tensors().size(), 70u);
    auto a = (*file)->Get("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight");
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(a->dtype(), DType::kF32);
    EXPECT_EQ(a->dim(1), 172);  // lora_A = L_B [r, d_in]
  }
  fs::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(
    Recipes, AserRoundTripTest,
    ::testing::Values(
        RoundTripCase{"gptq_w3_er16_cholesky", WithEr(MakeRecipe("gptq", 3, 32), 16, "cholesky")},
        RoundTripCase{"gptq_w3_er_auto_diagonal",
                      WithEr(MakeRecipe("gptq", 3, 32), kRecipeAutoRank, "diagonal")},
        RoundTripCase{"rtn_w4_er8_none", WithEr(MakeRecipe("rtn", 4, -1), 8, "none")},
        RoundTripCase{"gptq_w4_act8", WithActBits(MakeRecipe("gptq", 4, -1), 8)},
        RoundTripCase{"gptq_w4_er16_act8",
                      WithActBits(WithEr(MakeRecipe("gptq", 4, -1), 16, "cholesky"), 8)},
        RoundTripCase{
            "gptq_w4_aser8_act8",
            WithActBits(WithSmoothing(WithEr(MakeRecipe("gptq", 4, -1), 16, "cholesky"), "aser", 8),
                        8)},
        RoundTripCase{"gptq_w4_smoothquant_act8",
                      WithActBits(WithSmoothing(MakeRecipe("gptq", 4, -1), "smoothquant", 32), 8)}),
    [](const ::testing::TestParamInfo<RoundTripCase>& info) { return info.param.name; });

// sotu-llama-16m is stored in bf16: the folded norm weights are exported in bf16 and the in-memory
// model uses exactly those values.
TEST_F(AserModelTest, SmoothingFoldsIntoABf16CheckpointExactly) {
  const std::string model_dir = Shared("models/sotu-llama-16m");
  LoadData(model_dir, Shared("data/sotu-calib.txt"), Shared("data/sotu-eval.txt"), 4, 64, 128, 2);
  const Recipe recipe =
      WithActBits(WithSmoothing(WithEr(MakeRecipe("gptq", 4, 128), 8, "cholesky"), "aser", 8), 8);
  const std::string dir = RoundTrip(model_dir, recipe, nullptr);
  auto src = CheckpointReader::Open(model_dir);
  auto out = CheckpointReader::Open(dir);
  ASSERT_TRUE(src.ok() && out.ok());
  const std::string norm = "model.layers.2.input_layernorm.weight";
  auto a = (*src)->Get(norm);
  auto b = (*out)->Get(norm);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(b->dtype(), DType::kBF16);
  EXPECT_EQ(a->shape(), b->shape());
  // The fold changed it (ASER scales the outlier channels).
  EXPECT_NE(0, std::memcmp(a->raw(), b->raw(), a->nbytes()));
  // Untouched tensors keep their bytes.
  auto e1 = (*src)->Get("model.embed_tokens.weight");
  auto e2 = (*out)->Get("model.embed_tokens.weight");
  ASSERT_TRUE(e1.ok() && e2.ok());
  EXPECT_EQ(0, std::memcmp(e1->raw(), e2->raw(), e1->nbytes()));
  fs::remove_all(dir);
}

TEST_F(AserModelTest, ActBitsOverrideAppliesAtLoad) {
  const std::string model_dir = Shared("models/stories260k");
  LoadData(model_dir, Shared("data/tinystories-calib.txt"), Shared("data/tinystories-eval.txt"), 8,
           128, 256, 4);
  double in_memory = 0;
  const std::string dir =
      RoundTrip(model_dir, WithActBits(MakeRecipe("gptq", 4, -1), 4), &in_memory);
  LoadOptions off;
  off.act_bits = 16;
  auto full = LoadCheckpoint(dir, backend_.get(), off);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ((*full)->block(0).at(LinearKind::kQ).act_bits, 16);
  // 4-bit activations cost perplexity; switching them off at load wins it back.
  EXPECT_LT(Perplexity(**full), in_memory);
  LoadOptions bad;
  bad.act_bits = 3;
  auto refused = LoadCheckpoint(dir, backend_.get(), bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(refused.status().message(), HasSubstr("--act-bits"));
  fs::remove_all(dir);
}

std::map<std::string, std::string> ReadDir(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    auto bytes = ReadFileToString(e.path().string());
    files[fs::relative(e.path(), dir).string()] = bytes.ok() ? *bytes : "<unreadable>";
  }
  return files;
}

// A job that stops after two blocks and resumes in a new session from the committed artifacts
// (serialized like the worker does) and the boundary activations gives the same files.
TEST_F(AserModelTest, ResumeFromArtifactsIsByteIdentical) {
  JobOptions o;
  o.model_dir = Shared("models/stories260k");
  o.recipe =
      WithActBits(WithSmoothing(WithEr(MakeRecipe("gptq", 4, -1), 16, "cholesky"), "aser", 8), 8);
  o.calib_path = Shared("data/tinystories-calib.txt");
  o.samples = 16;
  o.seq_len = 128;
  o.eval_text = Shared("data/tinystories-eval.txt");
  o.eval_seq_len = 256;
  o.eval_max_windows = 4;
  o.threads = 2;
  const std::string root = testing::MakeTempDir("aser-resume");
  o.out_dir = root + "/straight";
  auto straight = RunQuantizeJob(o);
  ASSERT_TRUE(straight.ok()) << straight.status();

  std::vector<std::vector<std::pair<std::string, std::string>>> committed;  // artifact, report
  {
    auto first = JobSession::Open(o);
    ASSERT_TRUE(first.ok()) << first.status();
    for (int b = 0; b < 2; ++b) {
      auto block = (*first)->RunNextBlock();
      ASSERT_TRUE(block.ok()) << block.status();
      std::vector<std::pair<std::string, std::string>> layers;
      for (const LayerResult& r : **block) {
        layers.emplace_back(SerializeLayerArtifact(r), LayerReportJson(r.report).dump());
      }
      committed.push_back(std::move(layers));
    }
    ASSERT_TRUE(SaveActivations((*first)->backend(), (*first)->activations(),
                                root + "/boundary.safetensors")
                    .ok());
  }
  auto second = JobSession::Open(o);
  ASSERT_TRUE(second.ok()) << second.status();
  std::vector<BlockArtifacts> blocks;
  for (const auto& layers : committed) {
    BlockArtifacts artifacts;
    for (const auto& [bytes, report] : layers) {
      auto r = ParseLayerArtifact(bytes);
      ASSERT_TRUE(r.ok()) << r.status();
      auto rep = LayerReportFromJson(nlohmann::json::parse(report));
      ASSERT_TRUE(rep.ok()) << rep.status();
      r->report = *rep;
      artifacts.push_back(*std::move(r));
    }
    blocks.push_back(std::move(artifacts));
  }
  auto acts = LoadActivations((*second)->backend(), root + "/boundary.safetensors");
  ASSERT_TRUE(acts.ok()) << acts.status();
  ASSERT_TRUE((*second)->Restore(blocks, *std::move(acts)).ok());
  while ((*second)->next_block() < (*second)->num_blocks()) {
    ASSERT_TRUE((*second)->RunNextBlock().ok());
  }
  fs::create_directories(root + "/resumed");
  auto resumed = (*second)->Finish(root + "/resumed");
  ASSERT_TRUE(resumed.ok()) << resumed.status();
  auto fa = ReadDir(root + "/straight"), fb = ReadDir(root + "/resumed");
  ASSERT_TRUE(fa.count("adapter/adapter_model.safetensors"));
  fa.erase("qcal_run.json");
  fb.erase("qcal_run.json");
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& [name, bytes] : fa) EXPECT_TRUE(fb[name] == bytes) << name << " differs";
  fs::remove_all(root);
}

// Writes an adapter for stories260k's block 0 q_proj with the given tensors into dir/adapter.
void WriteAdapter(const std::string& dir, const std::map<std::string, Tensor>& tensors) {
  fs::create_directories(dir + "/adapter");
  ASSERT_TRUE(WriteSafetensors(dir + "/adapter/adapter_model.safetensors", tensors).ok());
  ASSERT_TRUE(WriteStringToFile(dir + "/adapter/adapter_config.json",
                                R"({"peft_type": "LORA", "r": 2, "lora_alpha": 2})")
                  .ok());
}

TEST_F(AserModelTest, BadAdaptersAreRefusedWithTheTensorNamed) {
  const std::string model_dir = Shared("models/stories260k");
  const std::string dir = testing::MakeTempDir("bad-adapter");
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.model"}) {
    fs::copy_file(fs::path(model_dir) / f, fs::path(dir) / f);
  }
  const std::string p = "base_model.model.model.layers.0.self_attn.q_proj";
  const Tensor a = Tensor::Zeros(DType::kF32, {2, 64});
  const Tensor b = Tensor::Zeros(DType::kF32, {64, 2});
  struct Case {
    std::map<std::string, Tensor> tensors;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {{{p + ".lora_A.weight", a}, {p + ".lora_B.weight", b}}, ""},
      {{{p + ".lora_A.weight", a}}, "has only lora_A"},
      {{{p + ".lora_A.weight", Tensor::Zeros(DType::kF32, {2, 63})}, {p + ".lora_B.weight", b}},
       "do not fit"},
      {{{"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight", a},
        {"base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight", b}},
       "is not a linear of the model"},
      {{{"something.else", a}}, "unexpected tensor"},
  };
  for (const Case& c : cases) {
    WriteAdapter(dir, c.tensors);
    auto m = LoadCheckpoint(dir, backend_.get());
    if (c.expected.empty()) {
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_TRUE((*m)->block(0).at(LinearKind::kQ).lora_a.defined());
    } else {
      ASSERT_FALSE(m.ok()) << c.expected;
      EXPECT_THAT(m.status().message(), HasSubstr(c.expected));
      EXPECT_THAT(m.status().message(), HasSubstr("adapter_model.safetensors"));
    }
  }
  ASSERT_TRUE(
      WriteStringToFile(dir + "/adapter/adapter_config.json", R"({"peft_type": "IA3"})").ok());
  auto m = LoadCheckpoint(dir, backend_.get());
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("peft_type"));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace qcal::engine
