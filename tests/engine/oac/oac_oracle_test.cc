// The gradient pass's float64 oracles (issue 12, acceptance 1; DESIGN sections 3 and 8):
// - a whole block's backward (the float64 reference, tests/engine/oac/ref_model.h) against central
//   differences of its forward: the input gradient and every linear's weight gradient dyᵀx;
// - the engine's BlockBackward (CPU backend, fp32) against that reference: the input gradient and
//   every linear's (x, dy) handed to the tap;
// - on a tiny model, RunGradientPass's H_oac against Σ_n G_nᵀG_n and its Fisher against Σ_n G_n ⊙
// G_n,
//   with G_n = ∂ℓ_n/∂W from central differences of each sample's loss in float64, and H_tok against
//   Σ_t ‖g_t‖²·x_t x_tᵀ from the reference backward.
// Model variants: Llama with GQA and biases; Qwen3-style per-head q/k norms with a sliding window
// and llama3 RoPE scaling.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/model.h"
#include "services/engine/oac/block_backward.h"
#include "services/engine/oac/gradient_pass.h"
#include "tests/engine/oac/ref_model.h"
#include "tests/engine/quant/quant_test_data.h"

namespace qcal::testing {
namespace {

using engine::LinearKind;

struct Variant {
  std::string name;
  bool qwen3 = false;  // per-head q/k norms, sliding window, llama3 RoPE scaling; else biases
};

ModelConfig TinyConfig(const Variant& v, int hidden, int heads, int kv_heads, int head_dim,
                       int intermediate, int vocab, int layers) {
  ModelConfig c;
  c.model_type = v.qwen3 ? "qwen3" : "llama";
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  if (v.qwen3) {
    c.qk_norm = true;
    c.sliding_window = 3;
    c.rope_scaling.type = RopeScaling::Type::kLlama3;
    c.rope_scaling.factor = 8.0;
    c.rope_scaling.low_freq_factor = 1.0;
    c.rope_scaling.high_freq_factor = 4.0;
    c.rope_scaling.original_max_position_embeddings = 4;
  } else {
    c.attention_bias = true;
    c.o_bias = true;
    c.mlp_bias = true;
  }
  return c;
}

Tensor Random(TestRng& rng, Shape shape, double scale, double offset = 0) {
  std::vector<float> v(static_cast<size_t>(NumElements(shape)));
  for (float& x : v) x = static_cast<float>(offset + scale * rng.Normal());
  return Tensor::FromVector(v, std::move(shape));
}

std::unique_ptr<engine::Model> RandomModel(const ModelConfig& c, kernels::Backend* cpu,
                                           uint64_t seed) {
  TestRng rng(seed);
  const int64_t d = c.hidden_size;
  std::vector<engine::BlockWeights> blocks;
  for (int b = 0; b < c.num_layers; ++b) {
    engine::BlockWeights bw;
    bw.input_norm = Random(rng, {d}, 0.2, 1.0);
    bw.post_attention_norm = Random(rng, {d}, 0.2, 1.0);
    if (c.qk_norm) {
      bw.q_norm = Random(rng, {c.head_dim}, 0.2, 1.0);
      bw.k_norm = Random(rng, {c.head_dim}, 0.2, 1.0);
    }
    for (LinearKind k : engine::kAllLinears) {
      int64_t out = d, in = d;
      if (k == LinearKind::kQ) out = c.q_dim();
      if (k == LinearKind::kK || k == LinearKind::kV) out = c.kv_dim();
      if (k == LinearKind::kO) in = c.q_dim();
      if (k == LinearKind::kGate || k == LinearKind::kUp) out = c.intermediate_size;
      if (k == LinearKind::kDown) in = c.intermediate_size;
      // Larger than 1/sqrt(in) so that attention is far from uniform and the MLP far from linear.
      bw.at(k).weight = Random(rng, {out, in}, 1.5 / std::sqrt(double(in)));
      const bool bias = k <= LinearKind::kV   ? c.attention_bias
                        : k == LinearKind::kO ? c.o_bias
                                              : c.mlp_bias;
      if (bias) bw.at(k).bias = Random(rng, {out}, 0.2);
    }
    blocks.push_back(std::move(bw));
  }
  Tensor embed = Random(rng, {c.vocab_size, d}, 1.0);
  Tensor final_norm = Random(rng, {d}, 0.2, 1.0);
  Tensor lm_head = Random(rng, {c.vocab_size, d}, 2.0 / std::sqrt(double(d)));
  return engine::Model::FromWeights(c, cpu, embed, final_norm, lm_head, std::move(blocks));
}

std::unique_ptr<kernels::Backend> Cpu() {
  kernels::BackendOptions options;
  options.threads = 1;
  return std::move(kernels::CreateBackend(options)).value();
}

double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// ‖got − want‖ / ‖want‖, also kept as the largest seen per label (printed at the end of a test).
std::map<std::string, double>& Worst() {
  static std::map<std::string, double> worst;
  return worst;
}
double RelError(const std::vector<double>& got, const std::vector<double>& want,
                const std::string& label = "") {
  EXPECT_EQ(got.size(), want.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size() && i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  const double e = std::sqrt(num / den);
  if (!label.empty()) Worst()[label] = std::max(Worst()[label], e);
  return e;
}
void PrintWorst() {
  for (const auto& [label, e] : Worst()) std::printf("  worst %-28s %.3g\n", label.c_str(), e);
  Worst().clear();
}

std::vector<double> ToDouble(const Tensor& t) {
  const float* p = t.data<float>();
  return std::vector<double>(p, p + t.numel());
}

std::vector<double> RandomVector(TestRng& rng, size_t n) {
  std::vector<double> v(n);
  for (double& x : v) x = rng.Normal();
  return v;
}

// dW = dyᵀ·x [d_out, d_in] from a linear's rows.
std::vector<double> WeightGrad(const RefLinearGrad& g, int64_t rows, int64_t d_out, int64_t d_in) {
  std::vector<double> dw(d_out * d_in, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < d_out; ++i) {
      for (int64_t j = 0; j < d_in; ++j)
        dw[i * d_in + j] += g.dy[r * d_out + i] * g.x[r * d_in + j];
    }
  }
  return dw;
}

struct HessianKindCase {
  engine::HessianKind kind;
  const char* name;
};

constexpr double kStep = 1e-5;  // central differences in float64: O(h²) ≈ 1e-10 truncation

class OacOracleTest : public ::testing::TestWithParam<Variant> {};

// The float64 reference backward of a block against central differences of its forward, for
// φ(x, W) = <d_out, Block(x)>: ∂φ/∂x and every linear's ∂φ/∂W = Σ_t dy_t x_tᵀ. Bound 1e-7.
TEST_P(OacOracleTest, ReferenceBlockBackwardMatchesCentralDifferences) {
  auto cpu = Cpu();
  const ModelConfig c = TinyConfig(GetParam(), 12, 3, 1, 4, 10, 11, 1);
  auto model = RandomModel(c, cpu.get(), 7);
  RefModel ref(*model);
  const int batch = 2, seq = 5;
  const int64_t rows = batch * seq;
  TestRng rng(11);
  const std::vector<double> x = RandomVector(rng, rows * c.hidden_size);
  const std::vector<double> dout = RandomVector(rng, rows * c.hidden_size);
  std::array<RefLinearGrad, engine::kNumLinears> grads;
  const std::vector<double> dx = ref.BlockBackward(0, x, dout, batch, seq, &grads);
  auto phi = [&](const std::vector<double>& in) {
    return Dot(dout, ref.BlockForward(0, in, batch, seq));
  };
  std::vector<double> dx_fd(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    std::vector<double> p = x, m = x;
    p[i] += kStep;
    m[i] -= kStep;
    dx_fd[i] = (phi(p) - phi(m)) / (2 * kStep);
  }
  EXPECT_LT(RelError(dx, dx_fd, "ref dx vs fd"), 1e-7);
  for (LinearKind k : engine::kAllLinears) {
    SCOPED_TRACE(engine::LinearName(k));
    std::vector<double>& w = ref.weight(0, k);
    std::vector<double> dw_fd(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      const double w0 = w[i];
      w[i] = w0 + kStep;
      const double fp = phi(x);
      w[i] = w0 - kStep;
      const double fm = phi(x);
      w[i] = w0;
      dw_fd[i] = (fp - fm) / (2 * kStep);
    }
    const std::vector<double> dw =
        WeightGrad(grads[static_cast<int>(k)], rows, ref.d_out(k), ref.d_in(k));
    EXPECT_LT(RelError(dw, dw_fd, "ref dW vs fd"), 1e-7);
  }
  PrintWorst();
}

// The engine's fp32 BlockBackward (CPU backend) against the float64 reference: the input
// gradient and every tapped (x, dy). Bound 1e-5 (fp32 through a block with GEMMs of width ≤ 12).
TEST_P(OacOracleTest, EngineBlockBackwardMatchesReference) {
  auto cpu = Cpu();
  const ModelConfig c = TinyConfig(GetParam(), 12, 3, 1, 4, 10, 11, 1);
  auto model = RandomModel(c, cpu.get(), 17);
  RefModel ref(*model);
  const int batch = 3, seq = 7;
  const int64_t rows = batch * seq, d = c.hidden_size;
  TestRng rng(19);
  const Tensor x = Random(rng, {rows, d}, 1.0);
  const Tensor dout = Random(rng, {rows, d}, 1.0);
  std::array<RefLinearGrad, engine::kNumLinears> want;
  const std::vector<double> dx_want =
      ref.BlockBackward(0, ToDouble(x), ToDouble(dout), batch, seq, &want);
  std::array<RefLinearGrad, engine::kNumLinears> got;
  std::vector<LinearKind> order;
  auto tap = [&](LinearKind k, const Tensor& xin, const Tensor& dy, const Tensor&,
                 const Tensor&) -> absl::Status {
    order.push_back(k);
    got[static_cast<int>(k)] = {ToDouble(xin), ToDouble(dy)};
    return absl::OkStatus();
  };
  absl::StatusOr<Tensor> dx = engine::BlockBackward(*model, 0, x, {batch, seq, 0}, dout, tap);
  ASSERT_TRUE(dx.ok()) << dx.status();
  EXPECT_LT(RelError(ToDouble(*dx), dx_want, "engine dx"), 1e-5);
  const std::vector<LinearKind> backward_order = {
      LinearKind::kDown, LinearKind::kUp, LinearKind::kGate, LinearKind::kO,
      LinearKind::kV,    LinearKind::kK,  LinearKind::kQ};
  EXPECT_EQ(order, backward_order);
  for (LinearKind k : engine::kAllLinears) {
    SCOPED_TRACE(engine::LinearName(k));
    EXPECT_LT(RelError(got[static_cast<int>(k)].x, want[static_cast<int>(k)].x, "engine tap x"),
              1e-5);
    EXPECT_LT(RelError(got[static_cast<int>(k)].dy, want[static_cast<int>(k)].dy, "engine tap dy"),
              1e-5);
  }
  PrintWorst();
}

// The gradient pass on a tiny two-block model, 10 samples of 5 tokens (chunks of 8 and 2), against
// float64 oracles: H_oac = Σ_n G_nᵀG_n and F = Σ_n G_n ⊙ G_n with G_n from central differences of
// sample n's loss, and H_tok = Σ_t ‖g_t‖²·x_t x_tᵀ from the reference backward. Bound 3e-5
// (fp32 through the model and the loss head; the differences carry ≈ 1e-9).
TEST_P(OacOracleTest, GradientPassMatchesFiniteDifferenceGradients) {
  auto cpu = Cpu();
  const ModelConfig c = TinyConfig(GetParam(), 8, 2, 1, 4, 12, 13, 2);
  auto model = RandomModel(c, cpu.get(), 23);
  RefModel ref(*model);
  const int samples = 10, seq = 5;
  TestRng rng(29);
  std::vector<int32_t> ids(samples * seq);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng.Uniform() * c.vocab_size);
  engine::GradientChunks chunks;
  chunks.seq_len = seq;
  chunks.first_chunk = 0;
  chunks.total_chunks = 2;
  chunks.ids = {std::vector<int32_t>(ids.begin(), ids.begin() + 8 * seq),
                std::vector<int32_t>(ids.begin() + 8 * seq, ids.end())};
  chunks.chunk_batch = {8, 2};

  for (HessianKindCase kc : {HessianKindCase{engine::HessianKind::kOutputAdaptive, "sample-wise"},
                             HessianKindCase{engine::HessianKind::kOutputAdaptiveToken, "token"}}) {
    SCOPED_TRACE(kc.name);
    std::vector<engine::BlockOac> stats(c.num_layers);
    std::vector<int> sunk;
    engine::GradientPassOptions options;
    options.kind = kc.kind;
    options.fisher = true;
    auto sink = [&](int b, engine::BlockOacPartials partials) -> absl::Status {
      sunk.push_back(b);
      for (int k = 0; k < engine::kNumLinears; ++k) {
        if (partials[k].size() != 1) return absl::InternalError("one rank: expected the root");
        const engine::LinearOac& oac = partials[k][0].value;
        QCAL_ASSIGN_OR_RETURN(stats[b][k].hessian, cpu->ToHost(oac.hessian));
        QCAL_ASSIGN_OR_RETURN(stats[b][k].fisher, cpu->ToHost(oac.fisher));
      }
      return absl::OkStatus();
    };
    absl::StatusOr<engine::GradientPassStats> pass =
        engine::RunGradientPass(*model, chunks, options, sink);
    ASSERT_TRUE(pass.ok()) << pass.status();
    EXPECT_EQ(sunk, (std::vector<int>{1, 0}));  // last block first
    EXPECT_EQ(pass->tokens, samples * (seq - 1));
    double loss = 0;
    for (double l : ref.SampleLosses(ids, samples, seq)) loss += l;
    EXPECT_NEAR(pass->loss, loss, 1e-4 * loss);

    // The oracles, per linear.
    const std::vector<std::array<RefLinearGrad, engine::kNumLinears>> grads =
        ref.LossGrads(ids, samples, seq);
    for (int b = 0; b < c.num_layers; ++b) {
      for (LinearKind k : engine::kAllLinears) {
        SCOPED_TRACE(engine::LinearPrefix(b, k));
        const int64_t n_out = ref.d_out(k), n_in = ref.d_in(k);
        std::vector<double> h_want(n_in * n_in, 0.0), f_want(n_out * n_in, 0.0);
        if (kc.kind == engine::HessianKind::kOutputAdaptiveToken) {
          const RefLinearGrad& g = grads[b][static_cast<int>(k)];
          for (int64_t t = 0; t < samples * seq; ++t) {
            double g2 = 0;
            for (int64_t i = 0; i < n_out; ++i) g2 += g.dy[t * n_out + i] * g.dy[t * n_out + i];
            for (int64_t i = 0; i < n_in; ++i) {
              for (int64_t j = 0; j < n_in; ++j) {
                h_want[i * n_in + j] += g2 * g.x[t * n_in + i] * g.x[t * n_in + j];
              }
            }
          }
        }
        // G_n for every sample from central differences of the per-sample losses.
        std::vector<double>& w = ref.weight(b, k);
        std::vector<std::vector<double>> g_fd(samples, std::vector<double>(w.size()));
        for (size_t e = 0; e < w.size(); ++e) {
          const double w0 = w[e];
          w[e] = w0 + kStep;
          const std::vector<double> lp = ref.SampleLosses(ids, samples, seq);
          w[e] = w0 - kStep;
          const std::vector<double> lm = ref.SampleLosses(ids, samples, seq);
          w[e] = w0;
          for (int n = 0; n < samples; ++n) g_fd[n][e] = (lp[n] - lm[n]) / (2 * kStep);
        }
        for (int n = 0; n < samples; ++n) {
          const std::vector<double>& g = g_fd[n];
          for (size_t e = 0; e < g.size(); ++e) f_want[e] += g[e] * g[e];
          if (kc.kind != engine::HessianKind::kOutputAdaptive) continue;
          for (int64_t i = 0; i < n_in; ++i) {
            for (int64_t j = 0; j < n_in; ++j) {
              double s = 0;
              for (int64_t o = 0; o < n_out; ++o) s += g[o * n_in + i] * g[o * n_in + j];
              h_want[i * n_in + j] += s;
            }
          }
        }
        const engine::LinearOac& got = stats[b][static_cast<int>(k)];
        EXPECT_LT(RelError(ToDouble(got.hessian), h_want, std::string("H ") + kc.name), 3e-5);
        EXPECT_LT(RelError(ToDouble(got.fisher), f_want, std::string("F ") + kc.name), 3e-5);
      }
    }
  }
  PrintWorst();
}

INSTANTIATE_TEST_SUITE_P(Variants, OacOracleTest,
                         ::testing::Values(Variant{"llama_gqa_bias", false},
                                           Variant{"qwen3_qknorm_window_llama3", true}),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace qcal::testing
