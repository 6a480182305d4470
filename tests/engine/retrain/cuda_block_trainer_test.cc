// The block trainer on the CUDA backend against the CPU backend (label gpu; skips without a GPU):
// the same random block (Qwen3-style q/k norms, biases, 8-bit activations, an act-order linear and
// one on a solver grid) and the same start. Every training op is bit-identical across the
// backends given equal inputs (tests/kernels/cuda/cuda_train_test); the block's GEMMs, attention
// and norms are not (cuBLAS and the device kernels sum in other orders, fp32), so results agree
// within bounds: the output MSE and one step's loss within kLossBound relative, each gradient
// tensor within kGradBound (relative Frobenius norm; kBf16Bound in bf16 operands), the
// parameters after one AdamW step within kParamBound (kBf16Bound), and after a short training the
// loss decreases on both and the final output MSE agrees within kTrainedMseBound.
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "services/engine/retrain/block_trainer.h"

namespace qcal::engine {
namespace {

constexpr double kLossBound = 1e-4;
constexpr double kGradBound = 1e-3;
// In bf16 operands both backends round the same operands at the same points, but an activation
// that differs in its last fp32 bits (another summation order) can round to the neighbouring bf16
// value, 2^-8 away: gradients, and so the parameters after one step (AdamW's update of a small
// gradient follows its value), then differ by a few times bf16's unit roundoff (2^-9 ≈ 2e-3);
// measured up to 3.7e-3 on the H200. The bound of both in bf16 operands.
constexpr double kBf16Bound = 1e-2;
constexpr double kParamBound = 1e-3;
constexpr double kTrainedMseBound = 0.05;

Tensor RandomTensor(const Shape& shape, float lo, float hi, std::mt19937& rng) {
  Tensor t = Tensor::Zeros(DType::kF32, shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

// A host tensor on `be` (the CPU backend keeps the host tensor).
Tensor On(kernels::Backend& be, const Tensor& host) {
  if (!host.defined() || be.device() == Device::kHost) return host;
  auto t = be.ToDevice(host);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? *t : Tensor();
}

Tensor Host(kernels::Backend& be, const Tensor& t) {
  if (t.device() == Device::kHost) return t;
  auto h = be.ToHost(t);
  EXPECT_TRUE(h.ok()) << h.status();
  return h.ok() ? *h : Tensor();
}

// ‖a − b‖ / max(‖b‖, 1e-12) over host F32 tensors.
double RelativeDifference(const Tensor& a, const Tensor& b) {
  double d2 = 0, n2 = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = a.data<float>()[i], y = b.data<float>()[i];
    d2 += (x - y) * (x - y);
    n2 += y * y;
  }
  return std::sqrt(d2) / std::max(std::sqrt(n2), 1e-12);
}

// A random block's host tensors; Install places them on a backend.
struct HostBlock {
  ModelConfig config;
  kernels::QuantSpec spec;
  BlockWeights block;
  std::array<RetrainLinearInput, kNumLinears> linears;
  std::vector<Tensor> inputs, targets;

  HostBlock() {
    std::mt19937 rng(17);
    ModelConfig& c = config;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_layers = 1;
    c.num_heads = 4;
    c.num_kv_heads = 2;
    c.head_dim = 8;
    c.vocab_size = 8;
    c.max_position_embeddings = 64;
    c.rms_norm_eps = 1e-5;
    c.qk_norm = true;
    c.attention_bias = true;
    spec.bits = 3;
    spec.group_size = 16;
    block.input_norm = RandomTensor({c.hidden_size}, 0.8f, 1.2f, rng);
    block.post_attention_norm = RandomTensor({c.hidden_size}, 0.8f, 1.2f, rng);
    block.q_norm = RandomTensor({c.head_dim}, 0.8f, 1.2f, rng);
    block.k_norm = RandomTensor({c.head_dim}, 0.8f, 1.2f, rng);
    for (LinearKind k : kAllLinears) {
      const int i = static_cast<int>(k);
      const bool attn = k == LinearKind::kQ || k == LinearKind::kK || k == LinearKind::kV;
      const int64_t d_out = k == LinearKind::kQ                              ? c.q_dim()
                            : k == LinearKind::kK || k == LinearKind::kV     ? c.kv_dim()
                            : k == LinearKind::kGate || k == LinearKind::kUp ? c.intermediate_size
                                                                             : c.hidden_size;
      const int64_t d_in = k == LinearKind::kO      ? c.q_dim()
                           : k == LinearKind::kDown ? c.intermediate_size
                                                    : c.hidden_size;
      const float bound = 1.5f / std::sqrt(static_cast<float>(d_in));
      RetrainLinearInput& in = linears[i];
      in.reference = RandomTensor({d_out, d_in}, -bound, bound, rng);
      in.base = in.reference.Clone();
      for (int64_t e = 0; e < in.base.numel(); ++e) {
        in.base.data<float>()[e] += std::uniform_real_distribution<float>(-0.02f, 0.02f)(rng);
      }
      in.fisher = RandomTensor({d_out, d_in}, 0.0f, 2.0f, rng);
      in.lora_a = RandomTensor({d_out, 3}, -0.05f, 0.05f, rng);
      in.lora_b = RandomTensor({3, d_in}, -0.3f, 0.3f, rng);
      if (k == LinearKind::kQ) {
        in.perm.resize(d_in);
        for (int64_t j = 0; j < d_in; ++j) in.perm[j] = static_cast<int32_t>((j * 7) % d_in);
      }
      if (k == LinearKind::kO) {
        const int64_t n = kernels::NumGroups(spec, d_in) * d_out;
        for (int64_t g = 0; g < n; ++g) {
          in.grid_scales.push_back(kernels::RoundScaleToHalf(0.02f + 0.01f * (g % 5)));
          in.grid_zeros.push_back(static_cast<int32_t>(1 + g % 7));
        }
      }
      Linear& l = block.at(k);
      if (attn) l.bias = RandomTensor({d_out}, -0.1f, 0.1f, rng);
      l.act_bits = 8;
    }
    for (int n = 0; n < 3; ++n) {
      Tensor x = RandomTensor({6, c.hidden_size}, -1.0f, 1.0f, rng);
      Tensor y = x.Clone();
      for (int64_t e = 0; e < y.numel(); ++e) y.data<float>()[e] += 0.3f * std::sin(0.7f * e);
      inputs.push_back(x);
      targets.push_back(y);
    }
  }
};

// The block's tensors on one backend, and a trainer over them.
struct BackendTrainer {
  std::unique_ptr<kernels::Backend> be;
  BlockWeights block;
  std::unique_ptr<BlockTrainer> trainer;
};

BackendTrainer MakeTrainer(const HostBlock& h, const char* device, const RetrainOptions& options,
                           kernels::ComputeDType dtype = kernels::ComputeDType::kF32) {
  BackendTrainer s;
  kernels::BackendOptions bo;
  bo.device = device;
  bo.threads = 1;
  bo.compute_dtype = dtype;
  auto be = kernels::CreateBackend(bo);
  EXPECT_TRUE(be.ok()) << be.status();
  if (!be.ok()) return s;
  s.be = std::move(*be);
  s.block.input_norm = On(*s.be, h.block.input_norm);
  s.block.post_attention_norm = On(*s.be, h.block.post_attention_norm);
  s.block.q_norm = On(*s.be, h.block.q_norm);
  s.block.k_norm = On(*s.be, h.block.k_norm);
  for (LinearKind k : kAllLinears) {
    s.block.at(k).bias = On(*s.be, h.block.at(k).bias);
    s.block.at(k).act_bits = h.block.at(k).act_bits;
  }
  RetrainBlockInput in;
  in.block = &s.block;
  in.linears = h.linears;
  for (size_t n = 0; n < h.inputs.size(); ++n) {
    in.inputs.push_back(On(*s.be, h.inputs[n]));
    in.targets.push_back(On(*s.be, h.targets[n]));
  }
  auto t = BlockTrainer::Create(*s.be, h.config, h.spec, options, std::move(in));
  EXPECT_TRUE(t.ok()) << t.status();
  if (t.ok()) s.trainer = std::move(*t);
  return s;
}

class CudaBlockTrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (kernels::CudaDeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

RetrainOptions Options() {
  RetrainOptions o;
  o.epochs = {0, 1, 3};
  o.lambda = 0.1;
  o.seed = 7;
  return o;
}

// One step of the mixed stage (the LoRA gradients from the dense weight gradient) and of the
// output stage (from the per-sample factors), in fp32 and in bf16 operands (where the device's
// fake quantizer writes bf16 directly and the CPU's GEMMs round its fp32 output: the same
// operands).
TEST_F(CudaBlockTrainerTest, OneStepMatchesTheCpu) {
  const HostBlock h;
  for (kernels::ComputeDType dtype : {kernels::ComputeDType::kF32, kernels::ComputeDType::kBF16}) {
    for (RetrainStage stage : {RetrainStage::kMixed, RetrainStage::kOutput}) {
      SCOPED_TRACE(std::string(dtype == kernels::ComputeDType::kBF16 ? "bf16 " : "f32 ") +
                   RetrainStageName(stage));
      BackendTrainer cpu = MakeTrainer(h, "cpu", Options(), dtype);
      BackendTrainer gpu = MakeTrainer(h, "cuda", Options(), dtype);
      ASSERT_TRUE(cpu.trainer && gpu.trainer);
      auto mse_cpu = cpu.trainer->OutputMse();
      auto mse_gpu = gpu.trainer->OutputMse();
      ASSERT_TRUE(mse_cpu.ok() && mse_gpu.ok());
      EXPECT_LE(std::abs(*mse_gpu - *mse_cpu), kLossBound * *mse_cpu);
      const LossCoefficients c = CoefficientsOf(stage);
      auto loss_cpu = cpu.trainer->ComputeGradients(1, c);
      auto loss_gpu = gpu.trainer->ComputeGradients(1, c);
      ASSERT_TRUE(loss_cpu.ok()) << loss_cpu.status();
      ASSERT_TRUE(loss_gpu.ok()) << loss_gpu.status();
      EXPECT_LE(std::abs(loss_gpu->output_mse - loss_cpu->output_mse),
                kLossBound * loss_cpu->output_mse);
      EXPECT_LE(std::abs(loss_gpu->regularizer - loss_cpu->regularizer),
                kLossBound * loss_cpu->regularizer);
      const bool bf16 = dtype == kernels::ComputeDType::kBF16;
      const double grad_bound = bf16 ? kBf16Bound : kGradBound;
      const double param_bound = bf16 ? kBf16Bound : kParamBound;
      for (LinearKind k : kAllLinears) {
        SCOPED_TRACE(LinearName(k));
        const RetrainParams& gc = cpu.trainer->grads(k);
        const RetrainParams& gg = gpu.trainer->grads(k);
        EXPECT_EQ(gg.lora_a.device(), Device::kCuda);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, gg.lora_a), gc.lora_a), grad_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, gg.lora_b), gc.lora_b), grad_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, gg.gamma), gc.gamma), grad_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, gg.beta), gc.beta), grad_bound);
      }
      ASSERT_TRUE(cpu.trainer->Step().ok());
      ASSERT_TRUE(gpu.trainer->Step().ok());
      for (LinearKind k : kAllLinears) {
        SCOPED_TRACE(LinearName(k));
        const RetrainParams& pc = cpu.trainer->params(k);
        const RetrainParams& pg = gpu.trainer->params(k);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, pg.lora_a), pc.lora_a), param_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, pg.lora_b), pc.lora_b), param_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, pg.gamma), pc.gamma), param_bound);
        EXPECT_LE(RelativeDifference(Host(*gpu.be, pg.beta), pc.beta), param_bound);
      }
    }
  }
}

TEST_F(CudaBlockTrainerTest, TrainingHelpsLikeOnTheCpu) {
  const HostBlock h;
  double after[2];
  int i = 0;
  for (const char* device : {"cpu", "cuda"}) {
    SCOPED_TRACE(device);
    BackendTrainer s = MakeTrainer(h, device, Options());
    ASSERT_TRUE(s.trainer);
    auto before = s.trainer->OutputMse();
    ASSERT_TRUE(before.ok());
    auto epochs = s.trainer->Train();
    ASSERT_TRUE(epochs.ok()) << epochs.status();
    auto mse = s.trainer->OutputMse();
    ASSERT_TRUE(mse.ok());
    EXPECT_LT(*mse, *before);
    after[i++] = *mse;
    for (LinearKind k : kAllLinears) {
      auto f = s.trainer->Finish(k);
      ASSERT_TRUE(f.ok()) << f.status();
      EXPECT_EQ(f->lora_a.device(), Device::kHost);
    }
  }
  EXPECT_LE(std::abs(after[1] - after[0]), kTrainedMseBound * after[0])
      << "cpu " << after[0] << " cuda " << after[1];
}

}  // namespace
}  // namespace qcal::engine
