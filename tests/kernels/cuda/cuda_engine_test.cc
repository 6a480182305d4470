// The quantization driver on the CUDA backend against the CPU reference, end to end on a shared
// model: per-layer errors agree within 1e-3 relative (the brief's bound), GPU runs are
// bit-identical run to run, and spilling activations to pinned host memory (a tiny device memory
// limit) changes nothing. Also, on the CPU and the GPU: the staged true-sequential driver leaves
// exactly the activations that BlockForward computes through the quantized block, and the bench
// runs a tiny shape. GPU parts skip without a GPU; shared-model parts without ../shared.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "kernels/hash_random.h"
#include "services/engine/bench.h"
#include "services/engine/model.h"
#include "services/engine/quantize.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

// Per-layer relative output errors, GPU against CPU (fp32 compute both): different summation
// orders and factorizations (DESIGN section 3 tolerances, end to end).
constexpr double kLayerErrorParity = 1e-3;

std::unique_ptr<kernels::Backend> MakeBackend(const std::string& device, int64_t memory_limit = 0) {
  kernels::BackendOptions options;
  options.device = device;
  options.memory_limit_bytes = memory_limit;
  auto backend = kernels::CreateBackend(options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? std::move(*backend) : nullptr;
}

engine::Recipe Gptq(bool true_sequential, bool act_order) {
  engine::Recipe r;
  r.method = engine::QuantMethod::kGptq;
  r.weights.bits = 4;
  r.weights.group_size = 32;
  r.gptq.true_sequential = true_sequential;
  r.gptq.act_order = act_order;
  return r;
}

// 16 calibration samples of 64 tokens (two chunks) from the stories260k calibration text.
std::vector<std::vector<int>> Samples(const std::string& shared) {
  const std::string model = shared + "/models/stories260k";
  auto tokenizer = Tokenizer::Load(model);
  EXPECT_TRUE(tokenizer.ok()) << tokenizer.status();
  auto text = LoadCorpusText(shared + "/data/tinystories-calib.txt");
  EXPECT_TRUE(text.ok()) << text.status();
  auto tokens = (*tokenizer)->Encode(*text);
  EXPECT_TRUE(tokens.ok());
  auto samples = SampleCalibration(*tokens, 16, 64, 0, 1, "calib");
  EXPECT_TRUE(samples.ok()) << samples.status();
  return samples.ok() ? *samples : std::vector<std::vector<int>>();
}

struct QuantizeRun {
  std::vector<engine::LayerReport> layers;
  std::vector<std::string> artifacts;           // SerializeQuantizedLinear, forward order
  std::vector<std::vector<float>> activations;  // the last block's outputs, per chunk
  std::vector<std::vector<float>> lora;         // L_A then L_B of every linear, forward order
};

// `oac` and `times` as QuantizeBlock's (output-adaptive recipes; the stage times summed over the
// blocks).
QuantizeRun Quantize(kernels::Backend& be, const std::string& shared, const engine::Recipe& recipe,
                     const engine::OacSource& oac = nullptr, engine::StageTimes* times = nullptr) {
  QuantizeRun run;
  auto model = engine::Model::Load(shared + "/models/stories260k", &be);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return run;
  auto acts = engine::EmbedCalibration(**model, Samples(shared));
  EXPECT_TRUE(acts.ok()) << acts.status();
  if (!acts.ok()) return run;
  for (int b = 0; b < (*model)->num_blocks(); ++b) {
    auto block = engine::QuantizeBlock(**model, *acts, recipe, times, oac);
    EXPECT_TRUE(block.ok()) << block.status();
    if (!block.ok()) return run;
    for (const auto& r : *block) {
      run.layers.push_back(r.report);
      run.artifacts.push_back(engine::SerializeQuantizedLinear(r.quantized));
      run.lora.push_back(r.lora_a);
      run.lora.push_back(r.lora_b);
    }
  }
  for (const Tensor& chunk : acts->chunks) {
    auto host = be.ToHost(chunk);
    EXPECT_TRUE(host.ok());
    run.activations.emplace_back(host->data<float>(), host->data<float>() + host->numel());
  }
  return run;
}

class CudaEngineTest : public ::testing::Test {};

// Skips the calling test without a GPU or without ../shared.
#define REQUIRE_GPU_AND_SHARED()                                           \
  do {                                                                     \
    if (kernels::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device"; \
    QCAL_REQUIRE_SHARED();                                                 \
  } while (0)

// `recipe` quantized on the CPU and twice on the GPU; the two GPU runs must be bit-identical
// (codes, low-rank factors and the last block's activations) and match the CPU run layer for layer.
struct CpuGpuRuns {
  QuantizeRun cpu, gpu;
};
CpuGpuRuns QuantizeOnBoth(const std::string& shared, const engine::Recipe& recipe) {
  auto cpu = MakeBackend("cpu");
  auto gpu = MakeBackend("cuda");
  if (!cpu || !gpu) return {};
  CpuGpuRuns runs{Quantize(*cpu, shared, recipe), Quantize(*gpu, shared, recipe)};
  const QuantizeRun again = Quantize(*gpu, shared, recipe);
  EXPECT_EQ(runs.gpu.artifacts, again.artifacts);
  EXPECT_EQ(runs.gpu.lora, again.lora);
  EXPECT_EQ(runs.gpu.activations, again.activations);
  EXPECT_FALSE(runs.cpu.layers.empty());
  EXPECT_EQ(runs.cpu.layers.size(), runs.gpu.layers.size());
  for (size_t i = 0; i < runs.cpu.layers.size() && i < runs.gpu.layers.size(); ++i) {
    EXPECT_EQ(runs.gpu.layers[i].name, runs.cpu.layers[i].name);
  }
  return runs;
}

bool InFirstBlock(const engine::LayerReport& l) { return l.name.rfind("model.layers.0.", 0) == 0; }

// Σ over a run's layers of one metric.
double Sum(const QuantizeRun& run, double engine::LayerReport::*metric) {
  double sum = 0;
  for (const engine::LayerReport& l : run.layers) sum += l.*metric;
  return sum;
}

TEST_F(CudaEngineTest, GpuLayerErrorsMatchCpu) {
  REQUIRE_GPU_AND_SHARED();
  const std::string shared = testing::SharedDir();
  auto cpu = MakeBackend("cpu");
  auto gpu = MakeBackend("cuda");
  ASSERT_TRUE(cpu && gpu);
  for (bool true_sequential : {true, false}) {
    for (bool act_order : {false, true}) {
      SCOPED_TRACE(::testing::Message()
                   << "true_sequential " << true_sequential << " act_order " << act_order);
      const engine::Recipe recipe = Gptq(true_sequential, act_order);
      const QuantizeRun c = Quantize(*cpu, shared, recipe);
      const QuantizeRun g = Quantize(*gpu, shared, recipe);
      ASSERT_EQ(c.layers.size(), g.layers.size());
      ASSERT_FALSE(c.layers.empty());
      double gptq_sum = 0, rtn_sum = 0;
      for (size_t i = 0; i < c.layers.size(); ++i) {
        SCOPED_TRACE(c.layers[i].name);
        EXPECT_EQ(c.layers[i].name, g.layers[i].name);
        EXPECT_NEAR(g.layers[i].rel_error, c.layers[i].rel_error,
                    kLayerErrorParity * c.layers[i].rel_error);
        EXPECT_NEAR(g.layers[i].rel_error_rtn, c.layers[i].rel_error_rtn,
                    kLayerErrorParity * c.layers[i].rel_error_rtn);
        EXPECT_EQ(g.layers[i].dead_columns, c.layers[i].dead_columns);
        EXPECT_EQ(g.layers[i].damp_used, c.layers[i].damp_used);
        gptq_sum += g.layers[i].rel_error;
        rtn_sum += g.layers[i].rel_error_rtn;
      }
      EXPECT_LT(gptq_sum, rtn_sum);  // DESIGN section 3: summed over a model, GPTQ < RTN
    }
  }
}

TEST_F(CudaEngineTest, GpuRunsAreBitIdenticalAndSpillingChangesNothing) {
  REQUIRE_GPU_AND_SHARED();
  const std::string shared = testing::SharedDir();
  auto gpu = MakeBackend("cuda");
  // A 1-byte plan: every chunk parked in pinned host memory, every intermediate recomputed.
  auto tight = MakeBackend("cuda", 1);
  ASSERT_TRUE(gpu && tight);
  const engine::Recipe recipe = Gptq(true, false);
  const QuantizeRun a = Quantize(*gpu, shared, recipe);
  const QuantizeRun b = Quantize(*gpu, shared, recipe);
  const QuantizeRun spilled = Quantize(*tight, shared, recipe);
  ASSERT_FALSE(a.artifacts.empty());
  EXPECT_EQ(a.artifacts, b.artifacts);
  EXPECT_EQ(a.activations, b.activations);
  EXPECT_EQ(a.artifacts, spilled.artifacts);
  EXPECT_EQ(a.activations, spilled.activations);
  for (size_t i = 0; i < a.layers.size(); ++i) {
    EXPECT_EQ(a.layers[i].rel_error, spilled.layers[i].rel_error);
  }
}

// ASER (smoothing, outlier extraction, 8-bit activations) with error reconstruction on the
// device (randomized SVD) against the CPU (LAPACK's full SVD), for each whitening: the same
// ranks and extracted columns; block 0's errors after reconstruction (same inputs on both) within
// 1% (the randomized SVD's whitened error is within 1% of the full SVD's); over the whole model
// the mean within 2% (from block 1 on, each backend's factors change the next block's inputs, and
// 3-bit rounding amplifies that: single layers were measured up to 4% apart, in both
// directions); every layer improved by the correction; GPU runs bit-identical, factors included.
TEST_F(CudaEngineTest, GpuErrorReconstructionMatchesCpu) {
  REQUIRE_GPU_AND_SHARED();
  // Cholesky with ASER's outlier columns whitens by CholeskyWhitening's factor; without them by
  // GPTQ's factor of the same damped Gram matrix, in its visiting order (reversed), with the
  // randomized SVD's thin products.
  struct Case {
    const char* whitening;
    bool aser;
  };
  for (const Case& w : {Case{"cholesky", true}, Case{"cholesky", false}, Case{"diagonal", false},
                        Case{"none", false}}) {
    SCOPED_TRACE(::testing::Message() << w.whitening << (w.aser ? " with ASER" : ""));
    engine::Recipe recipe = Gptq(true, false);
    recipe.weights.bits = 3;
    recipe.activations.bits = 8;
    recipe.error_reconstruction.enabled = true;
    recipe.error_reconstruction.rank = 8;
    recipe.error_reconstruction.whitening = *engine::ParseWhitening(w.whitening);
    if (w.aser) {
      recipe.smoothing.method = engine::SmoothingMethod::kAser;
      recipe.smoothing.outlier_channels = 4;
    }
    const auto [c, g] = QuantizeOnBoth(testing::SharedDir(), recipe);
    ASSERT_EQ(c.layers.size(), g.layers.size());
    for (size_t i = 0; i < c.layers.size(); ++i) {
      SCOPED_TRACE(c.layers[i].name);
      const engine::LayerReport& l = g.layers[i];
      EXPECT_EQ(l.rank, 8);
      EXPECT_EQ(l.rank, c.layers[i].rank);
      EXPECT_EQ(l.outlier_columns, c.layers[i].outlier_columns);
      EXPECT_EQ(l.extra_params, c.layers[i].extra_params);
      if (InFirstBlock(l)) {
        EXPECT_NEAR(l.rel_error_er, c.layers[i].rel_error_er, 1e-2 * c.layers[i].rel_error_er);
      }
      EXPECT_LT(l.rel_error_er, l.rel_error);
      EXPECT_LT(l.whitened_error_after, l.whitened_error_before);
    }
    const double sum_c = Sum(c, &engine::LayerReport::rel_error_er);
    EXPECT_NEAR(Sum(g, &engine::LayerReport::rel_error_er), sum_c, 2e-2 * sum_c);
  }
}

// rank: auto on the device (randomized SVD of the largest rank the rule allows, the rule applied
// to its leading singular values and the total) against the CPU (the full spectrum): block 0's
// ranks equal (same inputs, a decaying spectrum resolved by the sketch), every rank within one of
// the CPU's, within the budget and at least the extracted columns; the model's mean error after
// reconstruction within 2%; GPU runs bit-identical.
TEST_F(CudaEngineTest, GpuAutoRankMatchesCpu) {
  REQUIRE_GPU_AND_SHARED();
  engine::Recipe recipe = Gptq(true, false);
  recipe.weights.bits = 3;
  recipe.error_reconstruction.enabled = true;
  recipe.error_reconstruction.rank = engine::kRecipeAutoRank;
  recipe.error_reconstruction.energy = 0.5;
  recipe.error_reconstruction.max_extra_params = 0.4;
  recipe.smoothing.method = engine::SmoothingMethod::kAser;
  recipe.smoothing.outlier_channels = 2;
  const auto [c, g] = QuantizeOnBoth(testing::SharedDir(), recipe);
  ASSERT_EQ(c.layers.size(), g.layers.size());
  int differing = 0;
  for (size_t i = 0; i < c.layers.size(); ++i) {
    SCOPED_TRACE(c.layers[i].name);
    const engine::LayerReport& l = g.layers[i];
    if (InFirstBlock(l)) {
      EXPECT_EQ(l.rank, c.layers[i].rank);
    }
    EXPECT_LE(std::abs(l.rank - c.layers[i].rank), 1);
    differing += l.rank != c.layers[i].rank;
    EXPECT_GE(l.rank, l.outlier_columns);
    EXPECT_LE(l.extra_params, 0.4 + 1e-12);
    EXPECT_LT(l.rel_error_er, l.rel_error);
  }
  RecordProperty("ranks_differing", differing);
  const double sum_c = Sum(c, &engine::LayerReport::rel_error_er);
  EXPECT_NEAR(Sum(g, &engine::LayerReport::rel_error_er), sum_c, 2e-2 * sum_c);
}

// SmoothQuant (statistics, column maxima and the fold on the device) against the CPU. Without
// activation quantization every layer is within the GPTQ parity bound. With 8-bit activations
// (W4A8) the per-token rounding of the quantized path turns the backends' last-bit differences
// into whole quantization steps on some activations, which compound block after block (measured:
// blocks 0-1 within 1e-3, later layers up to 1.7% apart, in both directions): there block 0 is held
// to the parity bound and the model's mean error to 1%. GPU runs are bit-identical either way.
TEST_F(CudaEngineTest, GpuSmoothingMatchesCpu) {
  REQUIRE_GPU_AND_SHARED();
  for (int act_bits : {16, 8}) {
    SCOPED_TRACE(::testing::Message() << "activation bits " << act_bits);
    engine::Recipe recipe = Gptq(true, false);
    recipe.activations.bits = act_bits;
    recipe.smoothing.method = engine::SmoothingMethod::kSmoothQuant;
    const auto [c, g] = QuantizeOnBoth(testing::SharedDir(), recipe);
    ASSERT_EQ(c.layers.size(), g.layers.size());
    for (size_t i = 0; i < c.layers.size(); ++i) {
      SCOPED_TRACE(c.layers[i].name);
      if (act_bits == 16 || InFirstBlock(c.layers[i])) {
        EXPECT_NEAR(g.layers[i].rel_error, c.layers[i].rel_error,
                    kLayerErrorParity * c.layers[i].rel_error);
      }
    }
    const double sum_c = Sum(c, &engine::LayerReport::rel_error);
    EXPECT_NEAR(Sum(g, &engine::LayerReport::rel_error), sum_c, 1e-2 * sum_c);
  }
}

// The staged driver's block output equals BlockForward through the quantized block, bit for bit,
// on every backend present.
TEST_F(CudaEngineTest, StagedDriverMatchesBlockForward) {
  QCAL_REQUIRE_SHARED();
  const std::string shared = testing::SharedDir();
  std::vector<std::string> devices = {"cpu"};
  if (kernels::CudaDeviceCount() > 0) devices.push_back("cuda");
  for (const std::string& device : devices) {
    SCOPED_TRACE(device);
    auto be = MakeBackend(device);
    ASSERT_TRUE(be);
    auto model = engine::Model::Load(shared + "/models/stories260k", be.get());
    ASSERT_TRUE(model.ok()) << model.status();
    auto acts = engine::EmbedCalibration(**model, Samples(shared));
    ASSERT_TRUE(acts.ok()) << acts.status();
    std::vector<Tensor> inputs;
    for (const Tensor& chunk : acts->chunks) {
      auto copy = be->Alloc(DType::kF32, chunk.shape());
      ASSERT_TRUE(copy.ok());
      ASSERT_TRUE(be->Copy(chunk, *copy).ok());
      inputs.push_back(*copy);
    }
    ASSERT_TRUE(engine::QuantizeBlock(**model, *acts, Gptq(true, false)).ok());
    for (size_t c = 0; c < inputs.size(); ++c) {
      ASSERT_TRUE(
          (*model)
              ->BlockForward(0, inputs[c], engine::SeqShape{acts->chunk_batch[c], acts->seq_len, 0})
              .ok());
      auto want = be->ToHost(inputs[c]);
      auto got = be->ToHost(acts->chunks[c]);
      ASSERT_TRUE(want.ok() && got.ok());
      EXPECT_TRUE(
          std::equal(got->data<float>(), got->data<float>() + got->numel(), want->data<float>()));
    }
  }
}

TEST_F(CudaEngineTest, BenchRunsATinyShape) {
  std::vector<std::string> devices = {"cpu"};
  if (kernels::CudaDeviceCount() > 0) devices.push_back("cuda");
  std::vector<double> errors;
  for (const std::string& device : devices) {
    SCOPED_TRACE(device);
    auto be = MakeBackend(device);
    ASSERT_TRUE(be);
    engine::BenchOptions options;
    options.config = engine::BenchShapeNamed("7b")->config;
    options.config.hidden_size = 64;
    options.config.intermediate_size = 160;
    options.config.num_heads = 4;
    options.config.num_kv_heads = 2;
    options.config.head_dim = 16;
    options.config.num_layers = 3;
    options.config.vocab_size = 100;
    options.samples = 12;
    options.seq_len = 32;
    options.blocks = 2;
    auto r = engine::RunBench(*be, options);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->blocks_run, 2);
    EXPECT_EQ(r->blocks_total, 3);
    EXPECT_TRUE(r->extrapolated);
    EXPECT_EQ(r->block_seconds.size(), 2u);
    EXPECT_GT(r->model_seconds, r->embed_seconds);
    EXPECT_GT(r->flops.total(), 0);
    EXPECT_GT(r->mean_rel_error, 0);
    EXPECT_LT(r->mean_rel_error, r->mean_rel_error_rtn);
    errors.push_back(r->mean_rel_error);
  }
  if (errors.size() == 2) {
    EXPECT_NEAR(errors[1], errors[0], kLayerErrorParity * errors[0]);
  }
  EXPECT_FALSE(engine::BenchShapeNamed("30b").ok());
}

// Output-adaptive factors computed ahead on the backend's side queue (oac/factor_prefetch.h)
// are the factors the solve computes itself: a run with them and a run without (a 1-byte memory
// plan, which leaves no room for them) give the same codes, bit for bit. The Hessians are fixed
// positive definite matrices (XᵀX of uniform X with twice as many rows as columns) per linear.
TEST_F(CudaEngineTest, PrefetchedOutputAdaptiveFactorsChangeNothing) {
  REQUIRE_GPU_AND_SHARED();
  const std::string shared = testing::SharedDir();
  auto gpu = MakeBackend("cuda");
  auto tight = MakeBackend("cuda", 1);
  ASSERT_TRUE(gpu && tight);
  engine::Recipe recipe = Gptq(true, true);
  recipe.weights.bits = 2;
  recipe.hessian = engine::HessianKind::kOutputAdaptive;
  const engine::OacSource source = [](int block,
                                      engine::LinearKind k) -> absl::StatusOr<engine::LinearOac> {
    const int64_t n = k == engine::LinearKind::kDown ? 172 : 64;  // stories260k's widths
    const int64_t rows = 2 * n;
    std::vector<float> x(static_cast<size_t>(rows * n));
    const uint64_t seed = uint64_t(block) * 16 + static_cast<uint64_t>(k);
    for (size_t i = 0; i < x.size(); ++i) x[i] = kernels::HashUniform(seed, i, -1.0f, 1.0f);
    engine::LinearOac oac;
    oac.hessian = Tensor::Zeros(DType::kF32, {n, n});
    float* h = oac.hessian.data<float>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double sum = 0;
        for (int64_t r = 0; r < rows; ++r) sum += double(x[r * n + i]) * x[r * n + j];
        h[i * n + j] = static_cast<float>(sum);
      }
    }
    return oac;
  };
  engine::StageTimes ahead, inline_factors;
  const QuantizeRun a = Quantize(*gpu, shared, recipe, source, &ahead);
  const QuantizeRun b = Quantize(*tight, shared, recipe, source, &inline_factors);
  ASSERT_FALSE(a.artifacts.empty());
  EXPECT_EQ(ahead.prefetched_factors, static_cast<int>(a.artifacts.size()))
      << "every factor of every block ran ahead";
  EXPECT_EQ(inline_factors.prefetched_factors, 0);
  EXPECT_EQ(a.artifacts, b.artifacts);
  EXPECT_EQ(a.activations, b.activations);
}

}  // namespace
}  // namespace qcal
