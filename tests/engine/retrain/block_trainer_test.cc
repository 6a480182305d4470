// The block trainer's oracles (services/engine/retrain/block_trainer.h; issue 13, acceptance 1):
// - its quantized block forward is Model::BlockForward's, bit for bit (activation quantization
//   included);
// - its gradients equal central differences, in float64, of the loss computed by an independent
//   float64 block (kernels/cpu/ref_grad.h's double forwards), exactly for the LoRA factors and
//   through the frozen STE surrogate for the clipping logits;
// - AdamW steps of the trainer equal hand-computed float64 AdamW steps on those gradients;
// - λ = 0 reproduces plain ApiQ bit for bit (Fisher given or not, mixed or output stage);
// - the result does not depend on the thread count;
// - the loss decreases over epochs on a random block and on the first block of stories260k and
//   sotu-llama-16m (skipped without ../shared).
#include "services/engine/retrain/block_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gtest/gtest.h"
#include "kernels/cpu/quant_ref.h"
#include "kernels/cpu/ref_grad.h"
#include "kernels/hash_random.h"
#include "tests/engine/retrain/frozen_surrogate.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

using kernels::Backend;

int Idx(LinearKind k) { return static_cast<int>(k); }

Tensor RandomTensor(const Shape& shape, float lo, float hi, std::mt19937& rng) {
  Tensor t = Tensor::Zeros(DType::kF32, shape);
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = u(rng);
  return t;
}

std::vector<double> ToDouble(const Tensor& t) {
  return std::vector<double>(t.data<float>(), t.data<float>() + t.numel());
}

struct TinyBlockOptions {
  int hidden = 16, heads = 4, kv_heads = 2, head_dim = 4, intermediate = 24;
  bool qk_norm = false;
  bool bias = false;
  int act_bits = 16;
  int bits = 2, group_size = 8;
  int samples = 3, seq_len = 6;
  int start_rank = 3;  // > 0: given starting factors of this rank; 0: the random start
  float base_noise = 0.02f;
};

// A random block: W (fp), W̃ = W + noise, F > 0, starting factors, inputs, and targets from the
// full-precision block (Model::BlockForward).
struct TinyBlock {
  ModelConfig config;
  kernels::QuantSpec spec;
  BlockWeights fp, q;  // host; q: the quantized block as installed (norms, biases, act_bits)
  std::array<Tensor, kNumLinears> base, reference, fisher, lora_a, lora_b;
  std::vector<Tensor> inputs, targets;

  RetrainBlockInput Input(bool with_fisher) const {
    RetrainBlockInput in;
    in.block = &q;
    for (int l = 0; l < kNumLinears; ++l) {
      in.linears[l].base = base[l];
      in.linears[l].reference = reference[l];
      if (with_fisher) in.linears[l].fisher = fisher[l];
      in.linears[l].lora_a = lora_a[l];
      in.linears[l].lora_b = lora_b[l];
    }
    in.inputs = inputs;
    in.targets = targets;
    return in;
  }
};

std::pair<int64_t, int64_t> ShapeOf(const ModelConfig& c, LinearKind k) {
  switch (k) {
    case LinearKind::kQ:
      return {c.q_dim(), c.hidden_size};
    case LinearKind::kK:
    case LinearKind::kV:
      return {c.kv_dim(), c.hidden_size};
    case LinearKind::kO:
      return {c.hidden_size, c.q_dim()};
    case LinearKind::kGate:
    case LinearKind::kUp:
      return {c.intermediate_size, c.hidden_size};
    case LinearKind::kDown:
      return {c.hidden_size, c.intermediate_size};
  }
  return {0, 0};
}

TinyBlock MakeTinyBlock(Backend& be, const TinyBlockOptions& o, uint32_t seed) {
  std::mt19937 rng(seed);
  TinyBlock s;
  ModelConfig& c = s.config;
  c.hidden_size = o.hidden;
  c.intermediate_size = o.intermediate;
  c.num_layers = 1;
  c.num_heads = o.heads;
  c.num_kv_heads = o.kv_heads;
  c.head_dim = o.head_dim;
  c.vocab_size = 8;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.qk_norm = o.qk_norm;
  c.attention_bias = o.bias;
  s.spec.bits = o.bits;
  s.spec.group_size = o.group_size;
  s.fp.input_norm = RandomTensor({c.hidden_size}, 0.8f, 1.2f, rng);
  s.fp.post_attention_norm = RandomTensor({c.hidden_size}, 0.8f, 1.2f, rng);
  if (o.qk_norm) {
    s.fp.q_norm = RandomTensor({c.head_dim}, 0.8f, 1.2f, rng);
    s.fp.k_norm = RandomTensor({c.head_dim}, 0.8f, 1.2f, rng);
  }
  for (LinearKind k : kAllLinears) {
    const auto [d_out, d_in] = ShapeOf(c, k);
    Linear& l = s.fp.at(k);
    const float bound = 1.5f / std::sqrt(static_cast<float>(d_in));
    l.weight = RandomTensor({d_out, d_in}, -bound, bound, rng);
    if (o.bias) l.bias = RandomTensor({d_out}, -0.1f, 0.1f, rng);
    const int i = Idx(k);
    s.reference[i] = l.weight;
    s.base[i] = l.weight.Clone();
    Tensor noise = RandomTensor({d_out, d_in}, -o.base_noise, o.base_noise, rng);
    for (int64_t e = 0; e < noise.numel(); ++e)
      s.base[i].data<float>()[e] += noise.data<float>()[e];
    s.fisher[i] = RandomTensor({d_out, d_in}, 0.0f, 2.0f, rng);
    if (o.start_rank > 0) {
      s.lora_a[i] = RandomTensor({d_out, o.start_rank}, -0.05f, 0.05f, rng);
      s.lora_b[i] = RandomTensor({o.start_rank, d_in}, -0.3f, 0.3f, rng);
    }
  }
  s.q = s.fp;
  for (LinearKind k : kAllLinears) {
    s.q.at(k).weight = Tensor();
    s.q.at(k).act_bits = o.act_bits;
  }
  auto model = Model::FromWeights(c, &be, Tensor(), Tensor(), Tensor(), {s.fp});
  for (int n = 0; n < o.samples; ++n) {
    Tensor x = RandomTensor({o.seq_len, c.hidden_size}, -1.0f, 1.0f, rng);
    Tensor y = x.Clone();
    const absl::Status st = model->BlockForward(0, y, SeqShape{1, o.seq_len, 0});
    EXPECT_TRUE(st.ok()) << st;
    s.inputs.push_back(x);
    s.targets.push_back(y);
  }
  return s;
}

std::unique_ptr<Backend> CpuBackend() {
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto be = kernels::CreateBackend(bo);
  EXPECT_TRUE(be.ok()) << be.status();
  return std::move(be).value();
}

// The trainable parameters in float64, per linear: L_A, L_B, γ, β.
struct ParamsD {
  std::array<std::array<std::vector<double>, 4>, kNumLinears> p;
};

ParamsD ParamsOf(const BlockTrainer& t) {
  ParamsD d;
  for (LinearKind k : kAllLinears) {
    const RetrainParams& p = t.params(k);
    d.p[Idx(k)] = {ToDouble(p.lora_a), ToDouble(p.lora_b), ToDouble(p.gamma), ToDouble(p.beta)};
  }
  return d;
}
ParamsD GradsOf(const BlockTrainer& t) {
  ParamsD d;
  for (LinearKind k : kAllLinears) {
    const RetrainParams& p = t.grads(k);
    d.p[Idx(k)] = {ToDouble(p.lora_a), ToDouble(p.lora_b), ToDouble(p.gamma), ToDouble(p.beta)};
  }
  return d;
}

// The loss of DESIGN section 3 computed independently in float64: the surrogate fake quant frozen
// at `frozen_at` (so that the clipping logits are differentiable), plus L_A·L_B, through a
// float64 block (ref_grad.h's double forwards), against the sample's target.
class ReferenceLoss {
 public:
  ReferenceLoss(const TinyBlock& s, const ParamsD& frozen_at, double lambda, bool with_fisher)
      : s_(s), lambda_(lambda), with_fisher_(with_fisher) {
    for (LinearKind k : kAllLinears) {
      const int i = Idx(k);
      layouts_[i].d_out = s.base[i].dim(0);
      layouts_[i].d_in = s.base[i].dim(1);
      layouts_[i].spec = s.spec;
      surrogates_.emplace_back(ToDouble(s.base[i]), layouts_[i], frozen_at.p[i][2],
                               frozen_at.p[i][3]);
    }
  }

  double operator()(const ParamsD& params, int sample, LossCoefficients c) const {
    std::array<std::vector<double>, kNumLinears> eff;
    double reg = 0;
    for (LinearKind k : kAllLinears) {
      const int i = Idx(k);
      const int64_t d_out = layouts_[i].d_out, d_in = layouts_[i].d_in;
      eff[i] = surrogates_[i](ToDouble(s_.base[i]), params.p[i][2], params.p[i][3]);
      const std::vector<double>& a = params.p[i][0];
      const std::vector<double>& b = params.p[i][1];
      const int64_t r = static_cast<int64_t>(a.size()) / d_out;
      for (int64_t o = 0; o < d_out; ++o) {
        for (int64_t j = 0; j < d_in; ++j) {
          double sum = 0;
          for (int64_t t = 0; t < r; ++t) sum += a[o * r + t] * b[t * d_in + j];
          eff[i][o * d_in + j] += sum;
          const double d = eff[i][o * d_in + j] - s_.reference[i].data<float>()[o * d_in + j];
          const double f = with_fisher_ ? s_.fisher[i].data<float>()[o * d_in + j] : 1.0;
          reg += f * d * d;
        }
      }
    }
    double mse = 0;
    if (c.c_out != 0) {
      const std::vector<double> out = Forward(eff, ToDouble(s_.inputs[sample]));
      const float* t = s_.targets[sample].data<float>();
      for (size_t e = 0; e < out.size(); ++e) mse += (out[e] - t[e]) * (out[e] - t[e]);
      mse /= static_cast<double>(out.size());
    }
    return c.c_out * mse + c.c_reg * lambda_ * reg;
  }

 private:
  std::vector<double> Project(LinearKind k, const std::vector<double>& w,
                              const std::vector<double>& x, int64_t rows) const {
    const int i = Idx(k);
    const int64_t d_out = layouts_[i].d_out, d_in = layouts_[i].d_in;
    std::vector<double> y(rows * d_out);
    kernels::ref::LinearT<double>(x.data(), w.data(), y.data(), rows, d_out, d_in);
    const Tensor& bias = s_.q.at(k).bias;
    if (bias.defined()) {
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t o = 0; o < d_out; ++o) y[r * d_out + o] += bias.data<float>()[o];
      }
    }
    return y;
  }

  std::vector<double> Forward(const std::array<std::vector<double>, kNumLinears>& w,
                              const std::vector<double>& x) const {
    const ModelConfig& c = s_.config;
    const int64_t h = c.hidden_size, rows = static_cast<int64_t>(x.size()) / h;
    const BlockWeights& b = s_.q;
    std::vector<double> a(x.size());
    kernels::ref::RmsNormT<double>(x.data(), ToDouble(b.input_norm).data(), c.rms_norm_eps,
                                   a.data(), rows, h);
    std::vector<double> q = Project(LinearKind::kQ, w[0], a, rows);
    std::vector<double> k = Project(LinearKind::kK, w[1], a, rows);
    std::vector<double> v = Project(LinearKind::kV, w[2], a, rows);
    if (b.q_norm.defined()) {
      std::vector<double> qn(q.size()), kn(k.size());
      kernels::ref::RmsNormT<double>(q.data(), ToDouble(b.q_norm).data(), c.rms_norm_eps, qn.data(),
                                     q.size() / c.head_dim, c.head_dim);
      kernels::ref::RmsNormT<double>(k.data(), ToDouble(b.k_norm).data(), c.rms_norm_eps, kn.data(),
                                     k.size() / c.head_dim, c.head_dim);
      q = qn;
      k = kn;
    }
    const kernels::RopeShape rope(static_cast<int>(rows), 0, c.head_dim, c.rope_theta,
                                  c.rope_scaling);
    kernels::ref::RopeT<double>(q.data(), rows, c.q_dim(), rope);
    kernels::ref::RopeT<double>(k.data(), rows, c.kv_dim(), rope);
    std::vector<double> attn(rows * c.q_dim());
    const kernels::AttentionShape as(1, static_cast<int>(rows), static_cast<int>(rows), c.num_heads,
                                     c.num_kv_heads, c.head_dim, 0);
    kernels::ref::AttentionT<double>(q.data(), k.data(), v.data(), as, attn.data());
    std::vector<double> h1 = Project(LinearKind::kO, w[3], attn, rows);
    for (size_t e = 0; e < h1.size(); ++e) h1[e] += x[e];
    std::vector<double> m(h1.size());
    kernels::ref::RmsNormT<double>(h1.data(), ToDouble(b.post_attention_norm).data(),
                                   c.rms_norm_eps, m.data(), rows, h);
    const std::vector<double> g = Project(LinearKind::kGate, w[4], m, rows);
    const std::vector<double> u = Project(LinearKind::kUp, w[5], m, rows);
    std::vector<double> p(g.size());
    kernels::ref::SiluMulT<double>(g.data(), u.data(), p.data(), g.size());
    std::vector<double> out = Project(LinearKind::kDown, w[6], p, rows);
    for (size_t e = 0; e < out.size(); ++e) out[e] += h1[e];
    return out;
  }

  const TinyBlock& s_;
  double lambda_;
  bool with_fisher_;
  std::array<ClipLayout, kNumLinears> layouts_;
  std::vector<FrozenSurrogate> surrogates_;
};

// Central differences of the reference loss for every parameter.
ParamsD NumericGradients(const ReferenceLoss& loss, ParamsD at, int sample, LossCoefficients c) {
  ParamsD g = at;
  const double h = 1e-6;
  for (int l = 0; l < kNumLinears; ++l) {
    for (int t = 0; t < 4; ++t) {
      std::vector<double>& x = at.p[l][t];
      for (size_t i = 0; i < x.size(); ++i) {
        const double keep = x[i];
        x[i] = keep + h;
        const double up = loss(at, sample, c);
        x[i] = keep - h;
        const double down = loss(at, sample, c);
        x[i] = keep;
        g.p[l][t][i] = (up - down) / (2 * h);
      }
    }
  }
  return g;
}

double RelativeError(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

constexpr const char* kTensorNames[4] = {"lora_a", "lora_b", "gamma", "beta"};

RetrainOptions Options(int weight, int mixed, int output, double lambda) {
  RetrainOptions o;
  o.epochs = {weight, mixed, output};
  o.lambda = lambda;
  o.seed = 7;
  return o;
}

// The trainer's forward is the model's: with the installed weights set to Q(W̃; σ(4) clipping)
// and the starting factors, Model::BlockForward gives the same outputs, so the same MSE, bit for
// bit — with and without activation quantization, with Qwen3's q/k norms and biases.
TEST(BlockTrainerTest, ForwardIsModelBlockForward) {
  auto be = CpuBackend();
  for (int act_bits : {16, 8}) {
    TinyBlockOptions so;
    so.act_bits = act_bits;
    so.qk_norm = act_bits == 8;
    so.bias = act_bits == 8;
    const TinyBlock s = MakeTinyBlock(*be, so, 11);
    auto trainer =
        BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), s.Input(false));
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    auto mse = (*trainer)->OutputMse();
    ASSERT_TRUE(mse.ok()) << mse.status();
    BlockWeights installed = s.q;
    for (LinearKind k : kAllLinears) {
      const int i = Idx(k);
      ClipLayout l;
      l.d_out = s.base[i].dim(0);
      l.d_in = s.base[i].dim(1);
      l.spec = s.spec;
      std::vector<float> four(l.num_logits(), 4.0f);
      Tensor w = Tensor::Zeros(DType::kF32, s.base[i].shape());
      ClippedFakeQuant<float>(s.base[i].data<float>(), l, four.data(), four.data(),
                              w.data<float>());
      installed.at(k).weight = w;
      installed.at(k).lora_a = s.lora_a[i];
      installed.at(k).lora_b = s.lora_b[i];
    }
    auto model = Model::FromWeights(s.config, be.get(), Tensor(), Tensor(), Tensor(), {installed});
    double total = 0;
    for (size_t n = 0; n < s.inputs.size(); ++n) {
      Tensor y = s.inputs[n].Clone();
      ASSERT_TRUE(model->BlockForward(0, y, SeqShape{1, static_cast<int>(y.dim(0)), 0}).ok());
      double sum = 0;
      for (int64_t e = 0; e < y.numel(); ++e) {
        const double d = static_cast<double>(y.data<float>()[e]) -
                         static_cast<double>(s.targets[n].data<float>()[e]);
        sum += d * d;
      }
      total += sum / static_cast<double>(y.numel());
    }
    EXPECT_EQ(*mse, total / static_cast<double>(s.inputs.size())) << "act_bits " << act_bits;
    EXPECT_GT(*mse, 0);
  }
}

// Gradients of the mixed loss (output MSE + λ·Fisher term) against float64 central differences:
// the LoRA factors exactly (no STE on their path: W̃ is frozen), the clipping logits through the
// frozen surrogate. Llama-shaped and Qwen3-shaped (q/k norms, biases) blocks.
TEST(BlockTrainerTest, GradientsMatchFloat64CentralDifferences) {
  auto be = CpuBackend();
  for (bool qwen : {false, true}) {
    TinyBlockOptions so;
    so.qk_norm = qwen;
    so.bias = qwen;
    const TinyBlock s = MakeTinyBlock(*be, so, 21 + qwen);
    auto trainer =
        BlockTrainer::Create(*be, s.config, s.spec, Options(0, 1, 0, 0.1), s.Input(true));
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    const LossCoefficients c = CoefficientsOf(RetrainStage::kMixed);
    auto step = (*trainer)->ComputeGradients(1, c);
    ASSERT_TRUE(step.ok()) << step.status();
    const ParamsD at = ParamsOf(**trainer);
    const ReferenceLoss loss(s, at, 0.1, true);
    EXPECT_NEAR(step->loss, loss(at, 1, c), 1e-5 * loss(at, 1, c));
    EXPECT_GT(step->output_mse, 0);
    EXPECT_GT(step->regularizer, 0);
    const ParamsD fd = NumericGradients(loss, at, 1, c);
    const ParamsD got = GradsOf(**trainer);
    double worst = 0;
    for (LinearKind k : kAllLinears) {
      for (int t = 0; t < 4; ++t) {
        const double err = RelativeError(got.p[Idx(k)][t], fd.p[Idx(k)][t]);
        EXPECT_LT(err, 2e-5) << LinearName(k) << " " << kTensorNames[t] << (qwen ? " qwen" : "");
        worst = std::max(worst, err);
      }
    }
    std::printf("%s block: worst relative gradient error %.3g\n", qwen ? "qwen3" : "llama", worst);
  }
}

// The output stage alone (no regularizer) on a block whose codes sit away from rounding
// boundaries: LoRA gradients are those of the true loss (no STE anywhere on their path).
TEST(BlockTrainerTest, OutputStageGradientsOfTheLoraFactors) {
  auto be = CpuBackend();
  const TinyBlock s = MakeTinyBlock(*be, TinyBlockOptions{}, 31);
  auto trainer = BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), s.Input(false));
  ASSERT_TRUE(trainer.ok());
  const LossCoefficients c = CoefficientsOf(RetrainStage::kOutput);
  auto step = (*trainer)->ComputeGradients(0, c);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->regularizer, 0);
  const ParamsD at = ParamsOf(**trainer);
  const ReferenceLoss loss(s, at, 0.1, false);
  const ParamsD fd = NumericGradients(loss, at, 0, c);
  const ParamsD got = GradsOf(**trainer);
  for (LinearKind k : kAllLinears) {
    for (int t = 0; t < 2; ++t) {
      EXPECT_LT(RelativeError(got.p[Idx(k)][t], fd.p[Idx(k)][t]), 2e-5)
          << LinearName(k) << " " << kTensorNames[t];
    }
  }
}

// Trains `options` (every stage one epoch over two samples at most) and compares the result with
// AdamW steps computed by hand in float64 from the float64 reference gradients, each at the
// hand-computed point; every stage that trains starts from zero moments and step 1.
void ExpectHandComputedAdamW(const RetrainOptions& options, int64_t want_steps) {
  auto be = CpuBackend();
  TinyBlockOptions so;
  so.samples = 2;
  const TinyBlock s = MakeTinyBlock(*be, so, 41);
  auto trainer = BlockTrainer::Create(*be, s.config, s.spec, options, s.Input(true));
  ASSERT_TRUE(trainer.ok());
  ParamsD hand = ParamsOf(**trainer);
  ParamsD m, v;
  int global_epoch = 0;
  for (RetrainStage stage : kRetrainStages) {
    const int epochs = stage == RetrainStage::kWeight  ? options.epochs.weight
                       : stage == RetrainStage::kMixed ? options.epochs.mixed
                                                       : options.epochs.output;
    if (epochs == 0) continue;
    ASSERT_EQ(epochs, 1);
    for (int l = 0; l < kNumLinears; ++l) {
      for (int t = 0; t < 4; ++t) {
        m.p[l][t].assign(hand.p[l][t].size(), 0.0);
        v.p[l][t].assign(hand.p[l][t].size(), 0.0);
      }
    }
    const LossCoefficients c = CoefficientsOf(stage);
    const std::vector<int> order = RetrainSampleOrder(options.seed, global_epoch++, 2);
    for (int step = 1; step <= 2; ++step) {
      const ReferenceLoss loss(s, hand, options.lambda, true);
      const ParamsD g = NumericGradients(loss, hand, order[step - 1], c);
      for (int l = 0; l < kNumLinears; ++l) {
        for (int t = 0; t < 4; ++t) {
          const double lr = t < 2 ? options.lr_lora : options.lr_clip;
          for (size_t i = 0; i < hand.p[l][t].size(); ++i) {
            double& p = hand.p[l][t][i];
            double& mi = m.p[l][t][i];
            double& vi = v.p[l][t][i];
            const double gi = g.p[l][t][i];
            p -= lr * options.weight_decay * p;
            mi = 0.9 * mi + 0.1 * gi;
            vi = 0.999 * vi + 0.001 * gi * gi;
            const double m_hat = mi / (1 - std::pow(0.9, step));
            const double v_hat = vi / (1 - std::pow(0.999, step));
            p -= lr * m_hat / (std::sqrt(v_hat) + 1e-8);
          }
        }
      }
    }
  }
  auto history = (*trainer)->Train();
  ASSERT_TRUE(history.ok()) << history.status();
  EXPECT_EQ((*trainer)->steps(), want_steps);
  EXPECT_EQ((*trainer)->optimizer_steps(), 2);
  const ParamsD got = ParamsOf(**trainer);
  double overall = 0;
  for (int l = 0; l < kNumLinears; ++l) {
    for (int t = 0; t < 4; ++t) {
      const double lr = t < 2 ? options.lr_lora : options.lr_clip;
      double worst = 0;
      for (size_t i = 0; i < got.p[l][t].size(); ++i) {
        const double err = std::abs(got.p[l][t][i] - hand.p[l][t][i]);
        worst = std::max(worst, err / (1e-3 * lr + 1e-6 * std::abs(hand.p[l][t][i])));
      }
      EXPECT_LE(worst, 1.0) << LinearName(static_cast<LinearKind>(l)) << " " << kTensorNames[t];
      overall = std::max(overall, worst);
    }
  }
  std::printf("%lld AdamW steps: worst |trainer - hand| / (1e-3 lr + 1e-6 |p|) = %.3g\n",
              static_cast<long long>(want_steps), overall);
}

// Two training steps (one mixed epoch over two samples) equal two AdamW steps computed by hand.
TEST(BlockTrainerTest, TrainingStepsEqualHandComputedAdamW) {
  ExpectHandComputedAdamW(Options(0, 1, 0, 0.1), 2);
}

// A weight-preservation epoch, then an output epoch: the output stage starts a fresh AdamW (zero
// moments, bias correction from step 1), as computed by hand; carrying the weight stage's
// moments over gives other parameters (the comparison can fail).
TEST(BlockTrainerTest, EachStageStartsAFreshOptimizer) {
  ExpectHandComputedAdamW(Options(1, 0, 1, 0.1), 4);
}

void ExpectSameBytes(const Tensor& a, const Tensor& b, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  EXPECT_EQ(0, std::memcmp(a.raw(), b.raw(), a.nbytes())) << what;
}

// λ = 0 is plain ApiQ bit for bit: saliency with a Fisher and λ = 0, in the output stage or in the
// mixed stage, trains exactly the parameters that ApiQ (F = 1, output stage) trains. With λ > 0
// the mixed stage differs (the comparison can fail).
TEST(BlockTrainerTest, LambdaZeroIsApiqBitForBit) {
  auto be = CpuBackend();
  const TinyBlock s = MakeTinyBlock(*be, TinyBlockOptions{}, 51);
  auto run = [&](RetrainOptions o, bool fisher) {
    auto r = RetrainBlock(*be, s.config, s.spec, o, s.Input(fisher));
    EXPECT_TRUE(r.ok()) << r.status();
    return std::move(r).value();
  };
  const RetrainResult apiq = run(Options(0, 0, 3, 0.1), false);
  const RetrainResult output = run(Options(0, 0, 3, 0.0), true);
  const RetrainResult mixed = run(Options(0, 3, 0, 0.0), true);
  const RetrainResult salient = run(Options(0, 3, 0, 0.1), true);
  for (const RetrainResult* r : {&output, &mixed}) {
    for (LinearKind k : kAllLinears) {
      const RetrainedLinear& a = apiq.linears[Idx(k)];
      const RetrainedLinear& b = r->linears[Idx(k)];
      ExpectSameBytes(a.lora_a, b.lora_a, LinearName(k));
      ExpectSameBytes(a.lora_b, b.lora_b, LinearName(k));
      EXPECT_EQ(a.quantized.codes, b.quantized.codes) << LinearName(k);
      EXPECT_EQ(a.quantized.scales, b.quantized.scales) << LinearName(k);
      EXPECT_EQ(a.quantized.zeros, b.quantized.zeros) << LinearName(k);
    }
    ASSERT_EQ(apiq.epochs.size(), r->epochs.size());
    for (size_t e = 0; e < apiq.epochs.size(); ++e) {
      EXPECT_EQ(apiq.epochs[e].mean.loss, r->epochs[e].mean.loss);
    }
    EXPECT_EQ(apiq.output_mse_after, r->output_mse_after);
  }
  EXPECT_NE(0, std::memcmp(apiq.linears[0].lora_a.raw(), salient.linears[0].lora_a.raw(),
                           apiq.linears[0].lora_a.nbytes()));
}

// The random start: L_A = 0, L_B uniform in [−1/√d_in, 1/√d_in) from the seed (deterministic, a
// different seed differs); L_B's first gradient is 0 (L_A = 0), L_A's is not.
TEST(BlockTrainerTest, RandomStartIsSeededKaimingUniformAndZero) {
  auto be = CpuBackend();
  TinyBlockOptions so;
  so.start_rank = 0;
  const TinyBlock s = MakeTinyBlock(*be, so, 61);
  RetrainOptions o = Options(0, 0, 1, 0.1);
  o.rank = 5;
  auto a = BlockTrainer::Create(*be, s.config, s.spec, o, s.Input(false));
  auto b = BlockTrainer::Create(*be, s.config, s.spec, o, s.Input(false));
  o.seed = 8;
  auto c = BlockTrainer::Create(*be, s.config, s.spec, o, s.Input(false));
  ASSERT_TRUE(a.ok() && b.ok() && c.ok());
  for (LinearKind k : kAllLinears) {
    const RetrainParams& p = (*a)->params(k);
    const int64_t d_in = p.lora_b.dim(1);
    EXPECT_EQ(p.lora_b.dim(0), 5);
    const double bound = 1 / std::sqrt(static_cast<double>(d_in));
    double lo = 1, hi = -1;
    for (int64_t e = 0; e < p.lora_b.numel(); ++e) {
      lo = std::min<double>(lo, p.lora_b.data<float>()[e]);
      hi = std::max<double>(hi, p.lora_b.data<float>()[e]);
    }
    EXPECT_GE(lo, -bound);
    EXPECT_LT(hi, bound);
    EXPECT_GT(hi - lo, bound);  // spread over the interval, not a constant
    for (int64_t e = 0; e < p.lora_a.numel(); ++e) ASSERT_EQ(p.lora_a.data<float>()[e], 0.0f);
    ExpectSameBytes(p.lora_b, (*b)->params(k).lora_b, LinearName(k));
    EXPECT_NE(0, std::memcmp(p.lora_b.raw(), (*c)->params(k).lora_b.raw(), p.lora_b.nbytes()));
    EXPECT_EQ(p.gamma.data<float>()[0], 4.0f);
    EXPECT_EQ(p.beta.data<float>()[0], 4.0f);
  }
  ASSERT_TRUE((*a)->ComputeGradients(0, CoefficientsOf(RetrainStage::kOutput)).ok());
  for (LinearKind k : kAllLinears) {
    const RetrainParams& g = (*a)->grads(k);
    double b_norm = 0, a_norm = 0;
    for (int64_t e = 0; e < g.lora_b.numel(); ++e) b_norm += std::abs(g.lora_b.data<float>()[e]);
    for (int64_t e = 0; e < g.lora_a.numel(); ++e) a_norm += std::abs(g.lora_a.data<float>()[e]);
    EXPECT_EQ(b_norm, 0) << LinearName(k);
    EXPECT_GT(a_norm, 0) << LinearName(k);
  }
}

TEST(BlockTrainerTest, StagesAreWeightMixedOutput) {
  const char* names[] = {"weight", "mixed", "output"};
  const double c_out[] = {0, 1, 1}, c_reg[] = {1, 1, 0};
  for (int i = 0; i < 3; ++i) {
    EXPECT_STREQ(RetrainStageName(kRetrainStages[i]), names[i]);
    EXPECT_EQ(CoefficientsOf(kRetrainStages[i]).c_out, c_out[i]);
    EXPECT_EQ(CoefficientsOf(kRetrainStages[i]).c_reg, c_reg[i]);
  }
}

TEST(BlockTrainerTest, SampleOrderIsASeededPermutationPerEpoch) {
  const std::vector<int> a = RetrainSampleOrder(3, 0, 10);
  EXPECT_EQ(a, RetrainSampleOrder(3, 0, 10));
  EXPECT_NE(a, RetrainSampleOrder(3, 1, 10));
  EXPECT_NE(a, RetrainSampleOrder(4, 0, 10));
  std::vector<int> sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 10; ++i) EXPECT_EQ(sorted[i], i);
  EXPECT_EQ(RetrainSampleOrder(3, 0, 1), std::vector<int>{0});
}

TEST(BlockTrainerTest, InvalidInputsAreErrors) {
  auto be = CpuBackend();
  const TinyBlock s = MakeTinyBlock(*be, TinyBlockOptions{}, 71);
  RetrainBlockInput in = s.Input(false);
  in.linears[2].lora_b = Tensor();
  auto t = BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), in);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(std::string(t.status().message()).find("v_proj"), std::string::npos) << t.status();
  in = s.Input(false);
  in.linears[4].fisher = Tensor::Zeros(DType::kF32, {3, 3});
  EXPECT_FALSE(BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), in).ok());
  in = s.Input(false);
  Tensor bad_base = s.base[6].Clone();
  bad_base.data<float>()[5] = NAN;
  in.linears[6].base = bad_base;
  t = BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), in);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(std::string(t.status().message()).find("down_proj base [0, 5]"), std::string::npos)
      << t.status();
  in = s.Input(false);
  in.targets.pop_back();
  EXPECT_FALSE(BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 1, 0.1), in).ok());
  auto bad = BlockTrainer::Create(*be, s.config, s.spec, Options(0, 0, 0, 0.1), s.Input(false));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("retrain.epochs"), std::string::npos);
}

// Asserts that the per-epoch loss decreases and the output error after training is below the
// error before it; prints the numbers.
void ExpectTrainingHelps(const RetrainResult& r, const std::string& what) {
  ASSERT_GE(r.epochs.size(), 2u);
  std::printf("%s: output MSE %.6g -> %.6g; epoch losses", what.c_str(), r.output_mse_before,
              r.output_mse_after);
  for (const EpochLoss& e : r.epochs) std::printf(" %.6g", e.mean.loss);
  std::printf("\n");
  for (size_t e = 1; e < r.epochs.size(); ++e) {
    EXPECT_LT(r.epochs[e].mean.loss, r.epochs[e - 1].mean.loss) << what << " epoch " << e;
  }
  EXPECT_LT(r.output_mse_after, r.output_mse_before) << what;
}

// W2 g16 on a random block (RTN base: W̃ = W, random LoRA start): ApiQ's output stage, and
// saliency's weight then output stages.
TEST(BlockTrainerTest, LossDecreasesOverEpochsOnARandomBlock) {
  auto be = CpuBackend();
  TinyBlockOptions so;
  so.hidden = 32;
  so.heads = 4;
  so.kv_heads = 2;
  so.head_dim = 8;
  so.intermediate = 64;
  so.group_size = 16;
  so.samples = 8;
  so.seq_len = 16;
  so.start_rank = 0;
  so.base_noise = 0;
  const TinyBlock s = MakeTinyBlock(*be, so, 81);
  RetrainOptions apiq = Options(0, 0, 6, 0.1);
  apiq.rank = 8;
  auto r = RetrainBlock(*be, s.config, s.spec, apiq, s.Input(false));
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectTrainingHelps(*r, "random block, apiq");
  // The re-rounded export is the trained forward.
  for (LinearKind k : kAllLinears) {
    const RetrainedLinear& l = r->linears[Idx(k)];
    EXPECT_EQ(l.quantized.d_out, s.base[Idx(k)].dim(0));
    EXPECT_EQ(l.lora_a.dim(1), 8);
  }
}

// Host loops split rows over threads (ParallelFor): 1 and 3 threads train the same bits.
TEST(BlockTrainerTest, ThreadCountDoesNotChangeTheResult) {
  auto be = CpuBackend();
  TinyBlockOptions so;
  so.hidden = 128;
  so.heads = 4;
  so.kv_heads = 2;
  so.head_dim = 32;
  so.intermediate = 512;  // gate/up/down: 65536 weights, enough for ParallelFor to split
  so.group_size = 32;
  so.samples = 2;
  so.seq_len = 8;
  const TinyBlock s = MakeTinyBlock(*be, so, 91);
  auto run = [&](int threads) {
    SetParallelThreads(threads);
    auto r = RetrainBlock(*be, s.config, s.spec, Options(0, 1, 1, 0.1), s.Input(true));
    EXPECT_TRUE(r.ok()) << r.status();
    return std::move(r).value();
  };
  const RetrainResult one = run(1);
  const RetrainResult three = run(3);
  SetParallelThreads(0);
  for (LinearKind k : kAllLinears) {
    ExpectSameBytes(one.linears[Idx(k)].lora_a, three.linears[Idx(k)].lora_a, LinearName(k));
    ExpectSameBytes(one.linears[Idx(k)].lora_b, three.linears[Idx(k)].lora_b, LinearName(k));
    EXPECT_EQ(one.linears[Idx(k)].quantized.codes, three.linears[Idx(k)].quantized.codes);
    EXPECT_EQ(one.linears[Idx(k)].quantized.scales, three.linears[Idx(k)].quantized.scales);
  }
  EXPECT_EQ(one.epochs[0].mean.loss, three.epochs[0].mean.loss);
  EXPECT_EQ(one.output_mse_after, three.output_mse_after);
}

// A checkpoint's first block (DESIGN: the block sees the quantized path's inputs; for block 0 the
// embeddings, the same on both paths) on RTN's grid, ApiQ's output stage (rank 16): the training
// loss decreases every epoch. Prints the time per training step.
void TrainFirstBlock(const std::string& model_name, const std::string& calib, int bits,
                     int group_size, int n, int len, int epochs) {
  auto be = CpuBackend();
  const std::string dir = testing::SharedDir() + "/models/" + model_name;
  auto model = Model::Load(dir, be.get());
  ASSERT_TRUE(model.ok()) << model.status();
  auto tok = Tokenizer::Load(dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(testing::SharedDir() + "/data/" + calib);
  ASSERT_TRUE(text.ok()) << text.status();
  auto tokens = (*tok)->Encode(*text);
  ASSERT_TRUE(tokens.ok());
  auto samples = SampleCalibration(*tokens, n, len, 0, (*model)->config().bos_token_id, "calib");
  ASSERT_TRUE(samples.ok()) << samples.status();
  RetrainBlockInput in;
  BlockWeights q = (*model)->block(0);
  in.block = &q;
  for (const std::vector<int>& ids : *samples) {
    auto x = (*model)->Embed(ids);
    ASSERT_TRUE(x.ok());
    Tensor y = x->Clone();
    ASSERT_TRUE((*model)->BlockForward(0, y, SeqShape{1, len, 0}).ok());
    in.inputs.push_back(*x);
    in.targets.push_back(y);
  }
  kernels::QuantSpec spec;
  spec.bits = bits;
  spec.group_size = group_size;
  // RTN's solve: W̃ = W, and the clipping scales the span of RTN's grid.
  for (LinearKind k : kAllLinears) {
    const Tensor& w = (*model)->block(0).at(k).weight;
    RetrainLinearInput& l = in.linears[Idx(k)];
    l.base = w;
    l.reference = w;
    auto rtn = kernels::ref::QuantizeRtn<float>(w.data<float>(), w.dim(0), w.dim(1), spec);
    ASSERT_TRUE(rtn.ok()) << rtn.status();
    l.grid_scales = rtn->scales;
    l.grid_zeros = rtn->zeros;
  }
  RetrainOptions o = Options(0, 0, epochs, 0.1);
  o.rank = 16;
  const auto start = std::chrono::steady_clock::now();
  auto r = RetrainBlock(*be, (*model)->config(), spec, o, std::move(in));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(r.ok()) << r.status();
  ExpectTrainingHelps(*r, model_name + " block 0, W" + std::to_string(bits) + " g" +
                              std::to_string(group_size) + ", apiq rank 16");
  std::printf("  %d steps of %d tokens and 2 evaluations in %.2f s: %.1f ms per sample pass\n",
              n * epochs, len, seconds, 1e3 * seconds / (n * epochs + 2 * n));
}

TEST(BlockTrainerTest, LossDecreasesOnStories260kFirstBlock) {
  QCAL_REQUIRE_SHARED();
  TrainFirstBlock("stories260k", "tinystories-calib.txt", 2, 32, 16, 64, 5);
}

TEST(BlockTrainerTest, LossDecreasesOnSotuLlamaFirstBlock) {
  QCAL_REQUIRE_SHARED();
  TrainFirstBlock("sotu-llama-16m", "sotu-calib.txt", 2, 64, 8, 128, 3);
}

}  // namespace
}  // namespace qcal::engine
