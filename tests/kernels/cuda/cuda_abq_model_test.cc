// ABQ inference on the GPU (issue 14, acceptance 3; built into cuda_model_test, suite
// AbqInference*, which tools/gpu/session.sh runs in its abq step): sotu-llama-16m quantized by
// GPTQ at W4A8 g128 and W2*A8 g64 (on the GPU), then evaluated through the ABQ kernels (b1 and
// int8) and through dequantization on the CUDA backend in f32: the same perplexity and the same
// logits along the dequantized model's greedy sequence, bit for bit (both paths sum exactly in
// fp64 and round once: kernels/cpu/abq_ref.h). Also the decode benchmark on a small shape with
// bf16 dense weights. Skips without a GPU or ../shared.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "services/engine/bench.h"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/pipeline.h"
#include "services/engine/recipe.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

using kernels::AbqKernel;

std::unique_ptr<kernels::Backend> CudaBackend(kernels::ComputeDType dtype) {
  kernels::BackendOptions options;
  options.device = "cuda";
  options.compute_dtype = dtype;
  auto backend = kernels::CreateBackend(options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

class AbqInferenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kernels::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    QCAL_REQUIRE_SHARED();
    shared_ = testing::SharedDir();
    backend_ = CudaBackend(kernels::ComputeDType::kF32);
    ASSERT_NE(backend_, nullptr);
  }
  void TearDown() override {
    if (!work_.empty()) std::filesystem::remove_all(work_);
  }

  // sotu-llama-16m quantized with GPTQ (32 x 512 calibration on sotu-calib) on the GPU.
  std::string Quantize(int bits, engine::GridKind grid, int group, int act_bits) {
    if (work_.empty()) work_ = testing::MakeTempDir("abq-gpu");
    engine::JobOptions o;
    o.model_dir = shared_ + "/models/sotu-llama-16m";
    o.recipe.method = engine::QuantMethod::kGptq;
    o.recipe.weights.bits = bits;
    o.recipe.weights.grid = grid;
    o.recipe.weights.group_size = group;
    o.recipe.activations.bits = act_bits;
    o.calib_path = shared_ + "/data/sotu-calib.txt";
    o.samples = 32;
    o.seq_len = 512;
    o.device = "cuda";
    o.out_dir = absl::StrCat(work_, "/w", bits, "g", group, "a", act_bits);
    o.scratch_dir = work_;
    auto r = engine::RunQuantizeJob(o);
    EXPECT_TRUE(r.ok()) << r.status();
    return o.out_dir;
  }

  absl::StatusOr<engine::PerplexityResult> Perplexity(const std::string& dir,
                                                      std::optional<AbqKernel> abq) {
    engine::LoadOptions load;
    load.residency = engine::BlockResidency::kStreaming;
    load.abq_kernel = abq;
    QCAL_ASSIGN_OR_RETURN(auto model, engine::LoadCheckpoint(dir, backend_.get(), load));
    QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(dir));
    const std::string text_path = shared_ + "/data/sotu-eval.txt";
    QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(text_path));
    QCAL_ASSIGN_OR_RETURN(std::vector<int> tokens, tokenizer->Encode(text));
    QCAL_ASSIGN_OR_RETURN(TokenWindows windows,
                          MakeEvalWindows(tokens, 512, 32, tokenizer->bos_id(), text_path));
    return engine::EvaluatePerplexity(*model, windows);
  }

  absl::StatusOr<std::unique_ptr<engine::Model>> Load(const std::string& dir,
                                                      std::optional<AbqKernel> abq) {
    engine::LoadOptions load;
    load.abq_kernel = abq;
    return engine::LoadCheckpoint(dir, backend_.get(), load);
  }

  // The prompt followed by the dequantized model's 32 greedy tokens.
  absl::StatusOr<std::vector<int>> GreedySequence(const std::string& dir, size_t* prompt_len) {
    QCAL_ASSIGN_OR_RETURN(auto model, Load(dir, std::nullopt));
    QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(dir));
    QCAL_ASSIGN_OR_RETURN(std::vector<int> prompt,
                          tokenizer->Encode("Madam Speaker, the state of our union is"));
    engine::GenerateOptions go;
    go.max_new_tokens = 32;
    go.bos_id = tokenizer->bos_id();
    go.eos_ids = tokenizer->eos_ids();
    QCAL_ASSIGN_OR_RETURN(std::vector<int> generated, engine::GenerateGreedy(*model, prompt, go));
    std::vector<int> seq = {tokenizer->bos_id()};
    seq.insert(seq.end(), prompt.begin(), prompt.end());
    *prompt_len = seq.size();
    seq.insert(seq.end(), generated.begin(), generated.end());
    return seq;
  }

  absl::StatusOr<Tensor> Logits(const std::string& dir, std::optional<AbqKernel> abq,
                                const std::vector<int>& seq) {
    QCAL_ASSIGN_OR_RETURN(auto model, Load(dir, abq));
    return engine::SequenceLogits(*model, seq);
  }

  std::string shared_, work_;
  std::unique_ptr<kernels::Backend> backend_;
};

TEST_F(AbqInferenceTest, SotuMatchesDequantization) {
  struct Config {
    const char* name;
    int bits;
    engine::GridKind grid;
    int group;
  };
  for (const Config& c : {Config{"W4A8 g128", 4, engine::GridKind::kUniform, 128},
                          Config{"W2*A8 g64", 2, engine::GridKind::kBalanced, 64}}) {
    SCOPED_TRACE(c.name);
    const std::string dir = Quantize(c.bits, c.grid, c.group, 8);
    auto deq = Perplexity(dir, std::nullopt);
    auto b1 = Perplexity(dir, AbqKernel::kBinaryMma);
    auto int8 = Perplexity(dir, AbqKernel::kInt8Mma);
    ASSERT_TRUE(deq.ok() && b1.ok() && int8.ok())
        << deq.status() << " " << b1.status() << " " << int8.status();
    std::printf("sotu-llama-16m %s: perplexity dequant %.6f, abq b1 %.6f, abq int8 %.6f\n", c.name,
                deq->perplexity, b1->perplexity, int8->perplexity);
    EXPECT_EQ(b1->tokens, 16384);
    // Every linear gives the dequantizing path's bits (fp64 sums, one rounding), so the whole
    // forward does: the same perplexity, and the same logits along a greedy sequence.
    EXPECT_EQ(b1->nll, deq->nll);
    EXPECT_EQ(int8->nll, b1->nll);
    size_t prompt_len = 0;
    auto seq = GreedySequence(dir, &prompt_len);
    ASSERT_TRUE(seq.ok()) << seq.status();
    ASSERT_GT(seq->size(), prompt_len);
    auto deq_logits = Logits(dir, std::nullopt, *seq);
    auto b1_logits = Logits(dir, AbqKernel::kBinaryMma, *seq);
    auto int8_logits = Logits(dir, AbqKernel::kInt8Mma, *seq);
    ASSERT_TRUE(deq_logits.ok() && b1_logits.ok() && int8_logits.ok());
    const auto values = [](const Tensor& t) {
      return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
    };
    const std::vector<float> b1_v = values(*b1_logits);
    EXPECT_EQ(values(*deq_logits), b1_v);
    EXPECT_EQ(values(*int8_logits), b1_v);
  }
}

// The decode benchmark on a small shape (hidden 1024, 4 layers): bf16 dense weights on the GPU,
// every configuration runs, and b1 and int8 generate the same tokens.
TEST_F(AbqInferenceTest, DecodeBenchOnSmallShape) {
  auto backend = CudaBackend(kernels::ComputeDType::kBF16);
  ASSERT_NE(backend, nullptr);
  auto shape = engine::BenchShapeNamed("7b");
  ASSERT_TRUE(shape.ok());
  engine::DecodeBenchOptions o;
  o.config = shape->config;
  o.config.hidden_size = 1024;
  o.config.intermediate_size = 2816;
  o.config.num_layers = 4;
  o.config.num_heads = o.config.num_kv_heads = 8;
  o.config.head_dim = 128;
  o.tokens = 16;
  auto r = engine::RunDecodeBench(*backend, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->dense_dtype, "bf16");
  ASSERT_EQ(r->rows.size(), 6u);
  for (const engine::DecodeBenchRow& row : r->rows) {
    std::printf("decode %s %s: %.1f tokens/s, weights %.1f MB\n", row.config.c_str(),
                row.kernel.c_str(), row.tokens_per_second, row.weight_bytes * 1e-6);
    EXPECT_GT(row.tokens_per_second, 0);
  }
  EXPECT_EQ(r->rows[2].generated, r->rows[3].generated);
  EXPECT_EQ(r->rows[4].generated, r->rows[5].generated);
}

}  // namespace
}  // namespace qcal
