#include "services/engine/retrain/block_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "common/status.h"
#include "kernels/hash_random.h"

namespace qcal::engine {
namespace {

using kernels::Backend;

// A host tensor on the backend (no copy on a host backend).
absl::StatusOr<Tensor> OnDevice(Backend& be, const Tensor& host) {
  if (host.device() == be.device()) return host;
  return be.ToDevice(host);
}

// A host I32 tensor holding `values`.
// The index of the first element of p[0, n) that is not finite, or -1 (split over threads).
int64_t FirstNonFinite(const float* p, int64_t n) {
  constexpr int64_t kPieces = 64;
  std::vector<int64_t> first(kPieces, -1);
  const int64_t piece = (n + kPieces - 1) / kPieces;
  ParallelFor(kPieces, piece, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t e = i * piece; e < std::min(n, (i + 1) * piece); ++e) {
        if (!std::isfinite(p[e])) {
          first[static_cast<size_t>(i)] = e;
          break;
        }
      }
    }
  });
  for (int64_t e : first) {
    if (e >= 0) return e;
  }
  return -1;
}

Tensor I32Tensor(const std::vector<int32_t>& values, const Shape& shape) {
  Tensor t = Tensor::Zeros(DType::kI32, shape);
  std::copy(values.begin(), values.end(), t.data<int32_t>());
  return t;
}

absl::Status CheckHostF32(const Tensor& t, const Shape& shape, LinearKind kind, const char* what) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kF32 ||
      t.shape() != shape) {
    return absl::InvalidArgumentError(
        absl::StrCat("retrain: ", LinearName(kind), " ", what, " is ",
                     t.defined() ? t.DebugString() : std::string("undefined"),
                     ", expected a host F32 tensor ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

}  // namespace

const char* RetrainStageName(RetrainStage stage) {
  switch (stage) {
    case RetrainStage::kWeight:
      return "weight";
    case RetrainStage::kMixed:
      return "mixed";
    case RetrainStage::kOutput:
      return "output";
  }
  return "?";
}

LossCoefficients CoefficientsOf(RetrainStage stage) {
  switch (stage) {
    case RetrainStage::kWeight:
      return {0, 1};
    case RetrainStage::kMixed:
      return {1, 1};
    case RetrainStage::kOutput:
      return {1, 0};
  }
  return {};
}

absl::Status RetrainOptions::Validate() const {
  RetrainRecipe r;
  r.enabled = true;
  r.rank = rank;
  r.epochs = epochs;
  r.lambda = lambda;
  r.lr_lora = lr_lora;
  r.lr_clip = lr_clip;
  r.weight_decay = weight_decay;
  // The recipe's rules name the recipe's keys; a uniform-grid recipe without error
  // reconstruction checks exactly the retrain section.
  Recipe recipe;
  recipe.method = QuantMethod::kRtn;
  recipe.weights.bits = 4;
  recipe.retrain = r;
  QCAL_RETURN_IF_ERROR(recipe.Validate());
  if (!std::isfinite(initial_clip_logit)) {
    return absl::InvalidArgumentError(
        absl::StrCat("retrain: initial_clip_logit must be finite, got ", initial_clip_logit));
  }
  return absl::OkStatus();
}

RetrainOptions RetrainOptionsOf(const RetrainRecipe& recipe, uint64_t seed) {
  RetrainOptions o;
  o.epochs = recipe.epochs;
  o.lambda = recipe.lambda;
  o.lr_lora = recipe.lr_lora;
  o.lr_clip = recipe.lr_clip;
  o.weight_decay = recipe.weight_decay;
  o.rank = recipe.RankOrDefault();
  o.seed = seed;
  return o;
}

std::vector<int> RetrainSampleOrder(uint64_t seed, int epoch, int n) {
  std::vector<int> order(static_cast<size_t>(std::max(n, 0)));
  for (int i = 0; i < n; ++i) order[i] = i;
  const uint64_t stream = kernels::HashBits(seed, kNumLinears + static_cast<uint64_t>(epoch));
  for (int i = n - 1; i >= 1; --i) {
    const int j = static_cast<int>(kernels::HashBits(stream, i) % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

// One trainable linear. Every tensor but base_host lives on the backend.
struct TrainLinear {
  LinearKind kind = LinearKind::kQ;
  ClipLayout layout;               // host form (validated; Finish's re-rounding)
  kernels::ClipTensors clip;       // the same layout on the backend
  Tensor base_host;                // W̃ (host)
  Tensor base, reference, fisher;  // W̃, W, F (undefined: F = 1)
  Tensor bias;                     // or undefined
  int act_bits = 16;
  RetrainParams params, grads;
  RetrainParams m, v;           // AdamW moments
  Tensor lora_a_op, lora_b_op;  // this step's L_A and L_B as GEMM operands (State::Operand)
  // This step's Q(W̃; γ, β): BF16 when the backend's GEMMs round their operands to bf16 anyway
  // and it writes BF16 fake-quant output (a device backend), else F32. The regularizer forms the
  // F32 values itself then.
  Tensor q;
  // ∂loss/∂(the weight branch's W) and ∂loss/∂(L_A·L_B), [d_out, d_in]; the same tensor
  // without activation quantization (both branches then see the same input).
  Tensor g_q, g_lora;
  int64_t d_out() const { return layout.d_out; }
  int64_t d_in() const { return layout.d_in; }
};

// What one sample's forward keeps for the backward.
struct ForwardActs {
  // Per linear, as GEMM operands (State::Operand): the input of the weight branch
  // (activation-quantized when act_bits < 16) and of the low-rank branch, and the low-rank
  // branch's x·L_Bᵀ [rows, r].
  std::array<Tensor, kNumLinears> x_q, x, lora_t;
  Tensor q_pre, k_pre;  // q/k projections before Qwen3's q/k norms (undefined without them)
  Tensor q, k, v;       // attention's operands (after norms and RoPE)
  Tensor h1;            // the residual after attention
  Tensor gate, up;      // the MLP projections
  Tensor out;           // the block's output
};

struct BlockTrainer::State {
  Backend* be = nullptr;
  ModelConfig config;
  RetrainOptions options;
  RetrainBlockInput input;
  std::array<TrainLinear, kNumLinears> linears;
  int64_t steps = 0;
  int64_t optimizer_steps = 0;
  // This step's LoRA gradients come from the per-sample factors (LinearBackward: ∂L_A =
  // dyᵀ·(x·L_Bᵀ), ∂L_B = (dy·L_A)ᵀ·x) rather than from the dense weight gradient (ParamGrads:
  // G·L_Bᵀ, L_Aᵀ·G): when the step has only the output term, whose G is dyᵀ·x. The same gradients,
  // at a fraction of the cost (no pass over the d_out × d_in gradient; no dyᵀ·x of the low-rank
  // branch's own input under activation quantization). With the regularizer G has a dense part:
  // ParamGrads.
  bool factored_lora = false;
  // GEMM operands are converted to bf16 once by the trainer (Operand) and shared by every product
  // that takes them, instead of once per product by the backend: a device backend computing in
  // bf16. The same values either way (the backend's conversion is the same rounding).
  bool bf16_operands = false;

  // t as a GEMM operand: with bf16_operands a BF16 copy, else t itself (the backend rounds it per
  // its compute dtype).
  absl::StatusOr<Tensor> Operand(const Tensor& t) {
    if (!bf16_operands || t.dtype() == DType::kBF16) return t;
    QCAL_ASSIGN_OR_RETURN(Tensor out, be->AllocUninitialized(DType::kBF16, t.shape()));
    QCAL_RETURN_IF_ERROR(be->Convert(t, out));
    return out;
  }
  RetrainSeconds seconds;
  std::chrono::steady_clock::time_point mark;

  // With options.profile: runs `op` between synchronizations and adds its time to *part, without
  // moving the mark (a part of the part being timed by Lap).
  template <typename Op>
  absl::Status TimedPart(double* part, Op op) {
    if (!options.profile) return op();
    QCAL_RETURN_IF_ERROR(be->Synchronize());
    const auto t0 = std::chrono::steady_clock::now();
    QCAL_RETURN_IF_ERROR(op());
    QCAL_RETURN_IF_ERROR(be->Synchronize());
    *part += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return absl::OkStatus();
  }

  // With options.profile: adds the time since the last mark to *part (after synchronizing).
  absl::Status Lap(double* part) {
    if (!options.profile) return absl::OkStatus();
    QCAL_RETURN_IF_ERROR(be->Synchronize());
    const auto now = std::chrono::steady_clock::now();
    if (part) *part += std::chrono::duration<double>(now - mark).count();
    mark = now;
    return absl::OkStatus();
  }

  TrainLinear& L(LinearKind k) { return linears[static_cast<int>(k)]; }

  // Q(W̃; γ, β) for this step.
  // And the LoRA factors as GEMM operands.
  absl::Status PrepareWeights() {
    for (TrainLinear& l : linears) {
      QCAL_RETURN_IF_ERROR(
          be->ClippedFakeQuant(l.base, l.clip, l.params.gamma, l.params.beta, l.q));
      QCAL_ASSIGN_OR_RETURN(l.lora_a_op, Operand(l.params.lora_a));
      QCAL_ASSIGN_OR_RETURN(l.lora_b_op, Operand(l.params.lora_b));
    }
    return absl::OkStatus();
  }

  // y (+)= Q·ActQuant(x) + bias + L_A(L_B x), recording the branches' inputs; x_op is x as a GEMM
  // operand (shared by the linears that read x).
  absl::Status Apply(LinearKind kind, const Tensor& x, const Tensor& x_op, ForwardActs& acts,
                     Tensor& y, bool accumulate) {
    TrainLinear& l = L(kind);
    const int i = static_cast<int>(kind);
    acts.x[i] = x_op;
    acts.x_q[i] = x_op;
    const Tensor* bias = l.bias.defined() ? &l.bias : nullptr;
    if (l.act_bits < 16) {
      // x̂ for the backward pass; the product as Model::ApplyLinear forms it (fp64 sums).
      QCAL_ASSIGN_OR_RETURN(Tensor x_q, be->Alloc(DType::kF32, x.shape()));
      QCAL_RETURN_IF_ERROR(be->ActQuant(x, l.act_bits, x_q));
      QCAL_ASSIGN_OR_RETURN(acts.x_q[i], Operand(x_q));
      QCAL_RETURN_IF_ERROR(be->ActQuantLinear(x, l.act_bits, l.q, bias, y, accumulate));
    } else {
      QCAL_RETURN_IF_ERROR(be->Linear(acts.x_q[i], l.q, bias, y, accumulate));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor t,
                          be->AllocUninitialized(DType::kF32, {x.dim(0), l.params.lora_a.dim(1)}));
    QCAL_RETURN_IF_ERROR(be->Linear(x_op, l.lora_b_op, nullptr, t, false));
    QCAL_ASSIGN_OR_RETURN(acts.lora_t[i], Operand(t));
    return be->Linear(acts.lora_t[i], l.lora_a_op, nullptr, y, true);
  }

  absl::StatusOr<Tensor> Project(LinearKind kind, const Tensor& x, const Tensor& x_op,
                                 ForwardActs& acts) {
    QCAL_ASSIGN_OR_RETURN(Tensor y, be->Alloc(DType::kF32, {x.dim(0), L(kind).d_out()}));
    QCAL_RETURN_IF_ERROR(Apply(kind, x, x_op, acts, y, false));
    return y;
  }

  kernels::RopeShape Rope(int64_t rows) const {
    return kernels::RopeShape(static_cast<int>(rows), 0, config.head_dim, config.rope_theta,
                              config.rope_scaling);
  }
  kernels::AttentionShape Attention(int64_t rows) const {
    const int n = static_cast<int>(rows);
    return kernels::AttentionShape(1, n, n, config.num_heads, config.num_kv_heads, config.head_dim,
                                   0, static_cast<int>(config.sliding_window));
  }

  // The quantized block on x [rows, hidden] (Model::BlockForward's ops and order).
  absl::StatusOr<ForwardActs> Forward(const Tensor& x) {
    const BlockWeights& w = *input.block;
    const float eps = static_cast<float>(config.rms_norm_eps);
    const int64_t rows = x.dim(0);
    ForwardActs acts;
    QCAL_ASSIGN_OR_RETURN(Tensor a, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be->RmsNorm(x, w.input_norm, eps, a));
    QCAL_ASSIGN_OR_RETURN(const Tensor a_op, Operand(a));
    QCAL_ASSIGN_OR_RETURN(acts.q, Project(LinearKind::kQ, a, a_op, acts));
    QCAL_ASSIGN_OR_RETURN(acts.k, Project(LinearKind::kK, a, a_op, acts));
    QCAL_ASSIGN_OR_RETURN(acts.v, Project(LinearKind::kV, a, a_op, acts));
    if (w.q_norm.defined()) {
      const int64_t hd = config.head_dim;
      QCAL_ASSIGN_OR_RETURN(acts.q_pre, be->Alloc(DType::kF32, acts.q.shape()));
      QCAL_ASSIGN_OR_RETURN(acts.k_pre, be->Alloc(DType::kF32, acts.k.shape()));
      QCAL_RETURN_IF_ERROR(be->Copy(acts.q, acts.q_pre));
      QCAL_RETURN_IF_ERROR(be->Copy(acts.k, acts.k_pre));
      Tensor qh = acts.q.Reshape({acts.q.numel() / hd, hd});
      Tensor kh = acts.k.Reshape({acts.k.numel() / hd, hd});
      QCAL_RETURN_IF_ERROR(be->RmsNorm(qh, w.q_norm, eps, qh));
      QCAL_RETURN_IF_ERROR(be->RmsNorm(kh, w.k_norm, eps, kh));
    }
    QCAL_RETURN_IF_ERROR(be->Rope(acts.q, Rope(rows)));
    QCAL_RETURN_IF_ERROR(be->Rope(acts.k, Rope(rows)));
    QCAL_ASSIGN_OR_RETURN(Tensor attn, be->Alloc(DType::kF32, {rows, config.q_dim()}));
    QCAL_RETURN_IF_ERROR(TimedPart(&seconds.attention_forward, [&] {
      return be->Attention(acts.q, acts.k, acts.v, Attention(rows), attn);
    }));
    QCAL_ASSIGN_OR_RETURN(acts.h1, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be->Copy(x, acts.h1));
    QCAL_ASSIGN_OR_RETURN(const Tensor attn_op, Operand(attn));
    QCAL_RETURN_IF_ERROR(Apply(LinearKind::kO, attn, attn_op, acts, acts.h1, true));
    QCAL_ASSIGN_OR_RETURN(Tensor m, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be->RmsNorm(acts.h1, w.post_attention_norm, eps, m));
    QCAL_ASSIGN_OR_RETURN(const Tensor m_op, Operand(m));
    QCAL_ASSIGN_OR_RETURN(acts.gate, Project(LinearKind::kGate, m, m_op, acts));
    QCAL_ASSIGN_OR_RETURN(acts.up, Project(LinearKind::kUp, m, m_op, acts));
    QCAL_ASSIGN_OR_RETURN(Tensor p, be->Alloc(DType::kF32, acts.gate.shape()));
    QCAL_RETURN_IF_ERROR(be->SiluMul(acts.gate, acts.up, p));
    QCAL_ASSIGN_OR_RETURN(acts.out, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be->Copy(acts.h1, acts.out));
    QCAL_ASSIGN_OR_RETURN(const Tensor p_op, Operand(p));
    QCAL_RETURN_IF_ERROR(Apply(LinearKind::kDown, p, p_op, acts, acts.out, true));
    return acts;
  }

  // For y = linear(x) with output gradient dy: the weight gradients and, when dx is given,
  // dx = dy·Q + (dy·L_A)·L_B (ActQuant passes gradients through). Each linear's backward runs once
  // a step. With factored_lora: g_q = dyᵀ·x_q (overwritten), ∂L_A = dyᵀ·(x·L_Bᵀ) and
  // ∂L_B = (dy·L_A)ᵀ·x. Otherwise dyᵀ·x_q is added to g_q and dyᵀ·x to g_lora (without activation
  // quantization x_q = x, and g_q is g_lora: one product), for ParamGrads.
  absl::Status LinearBackward(LinearKind kind, const ForwardActs& acts, const Tensor& dy,
                              Tensor* dx) {
    TrainLinear& l = L(kind);
    const int i = static_cast<int>(kind);
    QCAL_ASSIGN_OR_RETURN(const Tensor dy_op, Operand(dy));
    QCAL_RETURN_IF_ERROR(TimedPart(&seconds.weight_grads, [&]() -> absl::Status {
      if (factored_lora) return be->Gemm(dy_op, true, acts.x_q[i], false, 1.0f, 0.0f, l.g_q);
      QCAL_RETURN_IF_ERROR(be->Gemm(dy_op, true, acts.x[i], false, 1.0f, 1.0f, l.g_lora));
      if (l.act_bits < 16) {
        QCAL_RETURN_IF_ERROR(be->Gemm(dy_op, true, acts.x_q[i], false, 1.0f, 1.0f, l.g_q));
      }
      return absl::OkStatus();
    }));
    if (!dx && !factored_lora) return absl::OkStatus();
    QCAL_ASSIGN_OR_RETURN(Tensor u,
                          be->AllocUninitialized(DType::kF32, {dy.dim(0), l.params.lora_a.dim(1)}));
    QCAL_RETURN_IF_ERROR(be->Gemm(dy_op, false, l.lora_a_op, false, 1.0f, 0.0f, u));
    QCAL_ASSIGN_OR_RETURN(const Tensor u_op, Operand(u));
    if (factored_lora) {
      QCAL_RETURN_IF_ERROR(
          be->Gemm(dy_op, true, acts.lora_t[i], false, 1.0f, 0.0f, l.grads.lora_a));
      QCAL_RETURN_IF_ERROR(be->Gemm(u_op, true, acts.x[i], false, 1.0f, 0.0f, l.grads.lora_b));
    }
    if (dx) {
      QCAL_RETURN_IF_ERROR(be->Gemm(dy_op, false, l.q, false, 1.0f, 0.0f, *dx));
      QCAL_RETURN_IF_ERROR(be->Gemm(u_op, false, l.lora_b_op, false, 1.0f, 1.0f, *dx));
    }
    return absl::OkStatus();
  }

  // Back-propagates dout = ∂loss/∂out through the block into every linear's g_q and g_lora.
  absl::Status Backward(const Tensor& x, const ForwardActs& acts, const Tensor& dout) {
    const BlockWeights& w = *input.block;
    const float eps = static_cast<float>(config.rms_norm_eps);
    const int64_t rows = x.dim(0);
    // MLP: out = h1 + down(silu(gate)·up), gate/up = linear(RmsNorm(h1)).
    QCAL_ASSIGN_OR_RETURN(Tensor dp, be->Alloc(DType::kF32, acts.gate.shape()));
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kDown, acts, dout, &dp));
    QCAL_ASSIGN_OR_RETURN(Tensor dgate, be->Alloc(DType::kF32, acts.gate.shape()));
    QCAL_ASSIGN_OR_RETURN(Tensor dup, be->Alloc(DType::kF32, acts.up.shape()));
    QCAL_RETURN_IF_ERROR(be->SiluMulBackward(acts.gate, acts.up, dp, dgate, dup));
    QCAL_ASSIGN_OR_RETURN(Tensor dm, be->Alloc(DType::kF32, x.shape()));
    QCAL_ASSIGN_OR_RETURN(Tensor dm_up, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kGate, acts, dgate, &dm));
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kUp, acts, dup, &dm_up));
    QCAL_RETURN_IF_ERROR(be->Add(dm_up, dm));
    QCAL_ASSIGN_OR_RETURN(Tensor dh1, be->Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be->RmsNormBackward(acts.h1, w.post_attention_norm, eps, dm, dh1));
    QCAL_RETURN_IF_ERROR(be->Add(dout, dh1));
    // Attention: h1 = x + o(attention(rope(q), rope(k), v)), q/k/v = linear(RmsNorm(x)).
    QCAL_ASSIGN_OR_RETURN(Tensor dattn, be->Alloc(DType::kF32, {rows, config.q_dim()}));
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kO, acts, dh1, &dattn));
    QCAL_ASSIGN_OR_RETURN(Tensor dq, be->Alloc(DType::kF32, acts.q.shape()));
    QCAL_ASSIGN_OR_RETURN(Tensor dk, be->Alloc(DType::kF32, acts.k.shape()));
    QCAL_ASSIGN_OR_RETURN(Tensor dv, be->Alloc(DType::kF32, acts.v.shape()));
    QCAL_RETURN_IF_ERROR(TimedPart(&seconds.attention_backward, [&] {
      return be->AttentionBackward(acts.q, acts.k, acts.v, dattn, Attention(rows), dq, dk, dv);
    }));
    QCAL_RETURN_IF_ERROR(be->RopeBackward(dq, Rope(rows)));
    QCAL_RETURN_IF_ERROR(be->RopeBackward(dk, Rope(rows)));
    if (w.q_norm.defined()) {
      const int64_t hd = config.head_dim;
      Tensor dqh = dq.Reshape({dq.numel() / hd, hd}), dkh = dk.Reshape({dk.numel() / hd, hd});
      QCAL_RETURN_IF_ERROR(
          be->RmsNormBackward(acts.q_pre.Reshape(dqh.shape()), w.q_norm, eps, dqh, dqh));
      QCAL_RETURN_IF_ERROR(
          be->RmsNormBackward(acts.k_pre.Reshape(dkh.shape()), w.k_norm, eps, dkh, dkh));
    }
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kQ, acts, dq, nullptr));
    QCAL_RETURN_IF_ERROR(LinearBackward(LinearKind::kK, acts, dk, nullptr));
    return LinearBackward(LinearKind::kV, acts, dv, nullptr);
  }

  // MSE(target, out) (the squares summed in double on the backend) and, when dout is given,
  // dout = scale·(out − target).
  absl::StatusOr<double> Mse(const Tensor& out, const Tensor& target, float scale, Tensor* dout) {
    if (dout) {
      QCAL_ASSIGN_OR_RETURN(*dout, be->Alloc(DType::kF32, out.shape()));
    }
    QCAL_ASSIGN_OR_RETURN(const double sum, be->SquaredError(out, target, scale, dout));
    return sum / static_cast<double>(out.numel());
  }

  // Σ F (Weff − W)² over every linear (double, on the backend), adding weight·2F(Weff − W) to
  // g_q and g_lora.
  absl::StatusOr<double> Regularizer(double weight) {
    double total = 0;
    const float scale = static_cast<float>(2.0 * weight);
    for (TrainLinear& l : linears) {
      // Weff = Q + L_A·L_B.
      QCAL_ASSIGN_OR_RETURN(Tensor eff, be->AllocUninitialized(DType::kF32, {l.d_out(), l.d_in()}));
      if (l.q.dtype() == DType::kF32) {
        QCAL_RETURN_IF_ERROR(be->Copy(l.q, eff));
      } else {
        QCAL_RETURN_IF_ERROR(
            be->ClippedFakeQuant(l.base, l.clip, l.params.gamma, l.params.beta, eff));
      }
      QCAL_RETURN_IF_ERROR(
          be->Gemm(l.params.lora_a, false, l.params.lora_b, false, 1.0f, 1.0f, eff));
      const bool shared = l.g_q.raw() == l.g_lora.raw();
      QCAL_ASSIGN_OR_RETURN(total,
                            be->WeightedSquaredError(eff, l.reference, l.fisher, scale, &l.g_q,
                                                     shared ? nullptr : &l.g_lora, total));
    }
    return total;
  }

  // The parameter gradients from g_q and g_lora: ∂L_A = G·L_Bᵀ and ∂L_B = L_Aᵀ·G (unless
  // factored_lora: LinearBackward set them), ∂γ/∂β by the STE.
  absl::Status ParamGrads() {
    for (TrainLinear& l : linears) {
      if (!factored_lora) {
        QCAL_RETURN_IF_ERROR(
            be->Gemm(l.g_lora, false, l.params.lora_b, true, 1.0f, 0.0f, l.grads.lora_a));
        QCAL_RETURN_IF_ERROR(
            be->Gemm(l.params.lora_a, true, l.g_lora, false, 1.0f, 0.0f, l.grads.lora_b));
      }
      QCAL_RETURN_IF_ERROR(TimedPart(&seconds.clip_grads, [&] {
        return be->ClippedFakeQuantBackward(l.base, l.clip, l.params.gamma, l.params.beta, l.g_q,
                                            l.grads.gamma, l.grads.beta, nullptr);
      }));
    }
    return absl::OkStatus();
  }
};

BlockTrainer::BlockTrainer(std::unique_ptr<State> state) : s_(std::move(state)) {}
BlockTrainer::~BlockTrainer() = default;

absl::StatusOr<std::unique_ptr<BlockTrainer>> BlockTrainer::Create(Backend& backend,
                                                                   const ModelConfig& config,
                                                                   const kernels::QuantSpec& spec,
                                                                   const RetrainOptions& options,
                                                                   RetrainBlockInput input) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (!backend.SupportsOp(kernels::Op::kBackward) || !backend.SupportsOp(kernels::Op::kTrain)) {
    return absl::FailedPreconditionError(
        absl::StrCat("retrain: the ", backend.name(), " backend has no backward or training ops"));
  }
  if (input.block == nullptr) return absl::InvalidArgumentError("retrain: no block given");
  if (input.inputs.empty() || input.inputs.size() != input.targets.size()) {
    return absl::InvalidArgumentError(absl::StrCat("retrain: ", input.inputs.size(), " inputs and ",
                                                   input.targets.size(),
                                                   " targets; need the same positive number"));
  }
  for (size_t n = 0; n < input.inputs.size(); ++n) {
    const Tensor& x = input.inputs[n];
    if (x.rank() != 2 || x.dim(1) != config.hidden_size || x.dim(0) < 1 ||
        input.targets[n].shape() != x.shape()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "retrain: sample ", n, " has input ", x.DebugString(), " and target ",
          input.targets[n].DebugString(), "; expected two [seq_len, ", config.hidden_size, "]"));
    }
  }
  auto s = std::make_unique<State>();
  s->be = &backend;
  s->config = config;
  s->options = options;
  s->bf16_operands =
      backend.device() != Device::kHost && backend.compute_dtype() == kernels::ComputeDType::kBF16;
  for (LinearKind kind : kAllLinears) {
    RetrainLinearInput& in = input.linears[static_cast<int>(kind)];
    const Linear& installed = input.block->at(kind);
    TrainLinear& l = s->L(kind);
    l.kind = kind;
    if (!in.base.defined() || in.base.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("retrain: ", LinearName(kind), " has no base weight [d_out, d_in]"));
    }
    const int64_t d_out = in.base.dim(0), d_in = in.base.dim(1);
    const Shape w_shape = {d_out, d_in};
    QCAL_RETURN_IF_ERROR(CheckHostF32(in.base, w_shape, kind, "base"));
    QCAL_RETURN_IF_ERROR(CheckHostF32(in.reference, w_shape, kind, "reference"));
    if (in.fisher.defined()) QCAL_RETURN_IF_ERROR(CheckHostF32(in.fisher, w_shape, kind, "fisher"));
    // The fake quantizer assumes finite weights (QuantizeClipped checks again at the end).
    const int64_t bad = FirstNonFinite(in.base.data<float>(), in.base.numel());
    if (bad >= 0) {
      return absl::InvalidArgumentError(absl::StrCat("retrain: ", LinearName(kind), " base [",
                                                     bad / d_in, ", ", bad % d_in,
                                                     "] is not finite"));
    }
    l.layout.d_out = d_out;
    l.layout.d_in = d_in;
    l.layout.spec = spec;
    l.layout.perm = in.perm;
    l.layout.grid_scales = in.grid_scales;
    l.layout.grid_zeros = in.grid_zeros;
    QCAL_RETURN_IF_ERROR(l.layout.Validate());
    l.clip.d_out = d_out;
    l.clip.d_in = d_in;
    l.clip.spec = spec;
    if (!in.perm.empty()) {
      QCAL_ASSIGN_OR_RETURN(l.clip.perm, OnDevice(backend, I32Tensor(in.perm, {d_in})));
    }
    if (l.layout.has_grid()) {
      const Shape grid = {l.layout.n_groups(), d_out};
      QCAL_ASSIGN_OR_RETURN(l.clip.grid_scales,
                            OnDevice(backend, Tensor::FromVector(in.grid_scales, grid)));
      QCAL_ASSIGN_OR_RETURN(l.clip.grid_zeros, OnDevice(backend, I32Tensor(in.grid_zeros, grid)));
    }
    l.base_host = in.base;
    QCAL_ASSIGN_OR_RETURN(l.base, OnDevice(backend, in.base));
    QCAL_ASSIGN_OR_RETURN(l.reference, OnDevice(backend, in.reference));
    if (in.fisher.defined()) {
      QCAL_ASSIGN_OR_RETURN(l.fisher, OnDevice(backend, in.fisher));
    }
    l.bias = installed.bias;
    l.act_bits = installed.act_bits;
    // The LoRA start.
    if (in.lora_a.defined() != in.lora_b.defined()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "retrain: ", LinearName(kind), " has one starting LoRA factor; give both or neither"));
    }
    if (in.lora_a.defined()) {
      const int64_t r = in.lora_a.rank() == 2 ? in.lora_a.dim(1) : 0;
      QCAL_RETURN_IF_ERROR(
          CheckHostF32(in.lora_a, {d_out, std::max<int64_t>(r, 1)}, kind, "starting lora_a (L_A)"));
      QCAL_RETURN_IF_ERROR(CheckHostF32(in.lora_b, {r, d_in}, kind, "starting lora_b (L_B)"));
      QCAL_ASSIGN_OR_RETURN(l.params.lora_a, backend.ToDevice(in.lora_a));
      QCAL_ASSIGN_OR_RETURN(l.params.lora_b, backend.ToDevice(in.lora_b));
    } else {
      const int64_t r = std::min<int64_t>(options.rank, std::min(d_out, d_in));
      Tensor b = Tensor::Zeros(DType::kF32, {r, d_in});
      const float bound = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d_in)));
      const uint64_t stream = kernels::HashBits(options.seed, static_cast<uint64_t>(kind));
      float* bp = b.data<float>();
      for (int64_t e = 0; e < r * d_in; ++e) bp[e] = kernels::HashUniform(stream, e, -bound, bound);
      QCAL_ASSIGN_OR_RETURN(l.params.lora_a, backend.Alloc(DType::kF32, {d_out, r}));
      QCAL_ASSIGN_OR_RETURN(l.params.lora_b, backend.ToDevice(b));
    }
    const Shape clip_shape = {d_out, l.layout.n_groups()};
    Tensor logits = Tensor::Zeros(DType::kF32, clip_shape);
    std::fill_n(logits.data<float>(), l.layout.num_logits(), options.initial_clip_logit);
    QCAL_ASSIGN_OR_RETURN(l.params.gamma, backend.ToDevice(logits));
    QCAL_ASSIGN_OR_RETURN(l.params.beta, backend.ToDevice(logits));
    // Gradients and moments start at zero (Alloc zero-fills).
    for (RetrainParams* t : {&l.grads, &l.m, &l.v}) {
      QCAL_ASSIGN_OR_RETURN(t->lora_a, backend.Alloc(DType::kF32, l.params.lora_a.shape()));
      QCAL_ASSIGN_OR_RETURN(t->lora_b, backend.Alloc(DType::kF32, l.params.lora_b.shape()));
      QCAL_ASSIGN_OR_RETURN(t->gamma, backend.Alloc(DType::kF32, clip_shape));
      QCAL_ASSIGN_OR_RETURN(t->beta, backend.Alloc(DType::kF32, clip_shape));
    }
    QCAL_ASSIGN_OR_RETURN(l.q,
                          backend.Alloc(s->bf16_operands ? DType::kBF16 : DType::kF32, w_shape));
  }
  s->input = std::move(input);
  return std::unique_ptr<BlockTrainer>(new BlockTrainer(std::move(s)));
}

absl::StatusOr<StepLoss> BlockTrainer::ComputeGradients(int sample, LossCoefficients c) {
  State& s = *s_;
  if (sample < 0 || sample >= num_samples()) {
    return absl::InvalidArgumentError(absl::StrCat("retrain: sample ", sample, " out of range"));
  }
  QCAL_RETURN_IF_ERROR(s.Lap(nullptr));
  QCAL_RETURN_IF_ERROR(s.PrepareWeights());
  const double reg_weight = c.c_reg * s.options.lambda;
  s.factored_lora = c.c_out != 0 && reg_weight == 0;
  for (TrainLinear& l : s.linears) {
    const Shape shape = {l.d_out(), l.d_in()};
    if (s.factored_lora) {
      // Overwritten by LinearBackward; no g_lora.
      QCAL_ASSIGN_OR_RETURN(l.g_q, s.be->AllocUninitialized(DType::kF32, shape));
      l.g_lora = Tensor();
      continue;
    }
    QCAL_ASSIGN_OR_RETURN(l.g_lora, s.be->Alloc(DType::kF32, shape));
    // Without activation quantization both branches see the same input, so the two gradients are
    // one tensor (LinearBackward and Regularizer then add into it once).
    l.g_q = l.g_lora;
    if (l.act_bits < 16) {
      QCAL_ASSIGN_OR_RETURN(l.g_q, s.be->Alloc(DType::kF32, shape));
    }
  }
  QCAL_RETURN_IF_ERROR(s.Lap(&s.seconds.weights));
  StepLoss loss;
  if (c.c_out != 0) {
    const Tensor& x = s.input.inputs[sample];
    QCAL_ASSIGN_OR_RETURN(ForwardActs acts, s.Forward(x));
    Tensor dout;
    const float scale = static_cast<float>(2.0 * c.c_out / static_cast<double>(x.numel()));
    QCAL_ASSIGN_OR_RETURN(loss.output_mse, s.Mse(acts.out, s.input.targets[sample], scale, &dout));
    QCAL_RETURN_IF_ERROR(s.Lap(&s.seconds.forward));
    QCAL_RETURN_IF_ERROR(s.Backward(x, acts, dout));
    QCAL_RETURN_IF_ERROR(s.Lap(&s.seconds.backward));
    loss.loss += c.c_out * loss.output_mse;
  }
  if (reg_weight != 0) {
    QCAL_ASSIGN_OR_RETURN(loss.regularizer, s.Regularizer(reg_weight));
    QCAL_RETURN_IF_ERROR(s.Lap(&s.seconds.regularizer));
    loss.loss += reg_weight * loss.regularizer;
  }
  QCAL_RETURN_IF_ERROR(s.ParamGrads());
  QCAL_RETURN_IF_ERROR(s.Lap(&s.seconds.params));
  return loss;
}

absl::Status BlockTrainer::RestartOptimizer() {
  State& s = *s_;
  s.optimizer_steps = 0;
  for (TrainLinear& l : s.linears) {
    for (RetrainParams* t : {&l.m, &l.v}) {
      for (Tensor* x : {&t->lora_a, &t->lora_b, &t->gamma, &t->beta}) {
        QCAL_ASSIGN_OR_RETURN(*x, s.be->Alloc(DType::kF32, x->shape()));  // zero-filled
      }
    }
  }
  return absl::OkStatus();
}

absl::Status BlockTrainer::Step() {
  State& s = *s_;
  ++s.steps;
  ++s.optimizer_steps;
  AdamWOptions lora{s.options.lr_lora, 0.9, 0.999, 1e-8, s.options.weight_decay};
  AdamWOptions clip{s.options.lr_clip, 0.9, 0.999, 1e-8, s.options.weight_decay};
  for (TrainLinear& l : s.linears) {
    RetrainParams& p = l.params;
    RetrainParams& g = l.grads;
    QCAL_RETURN_IF_ERROR(
        s.be->AdamWStep(p.lora_a, g.lora_a, l.m.lora_a, l.v.lora_a, s.optimizer_steps, lora));
    QCAL_RETURN_IF_ERROR(
        s.be->AdamWStep(p.lora_b, g.lora_b, l.m.lora_b, l.v.lora_b, s.optimizer_steps, lora));
    QCAL_RETURN_IF_ERROR(
        s.be->AdamWStep(p.gamma, g.gamma, l.m.gamma, l.v.gamma, s.optimizer_steps, clip));
    QCAL_RETURN_IF_ERROR(
        s.be->AdamWStep(p.beta, g.beta, l.m.beta, l.v.beta, s.optimizer_steps, clip));
  }
  return s.Lap(&s.seconds.optimizer);
}

absl::StatusOr<std::vector<EpochLoss>> BlockTrainer::Train() {
  State& s = *s_;
  std::vector<EpochLoss> history;
  const int n = num_samples();
  int global_epoch = 0;
  for (RetrainStage stage : kRetrainStages) {
    const int epochs = stage == RetrainStage::kWeight  ? s.options.epochs.weight
                       : stage == RetrainStage::kMixed ? s.options.epochs.mixed
                                                       : s.options.epochs.output;
    const LossCoefficients c = CoefficientsOf(stage);
    if (epochs > 0 && s.optimizer_steps > 0) QCAL_RETURN_IF_ERROR(RestartOptimizer());
    for (int e = 0; e < epochs; ++e, ++global_epoch) {
      EpochLoss record;
      record.stage = stage;
      record.epoch = e;
      for (int sample : RetrainSampleOrder(s.options.seed, global_epoch, n)) {
        const bool marked = s.steps == s.options.profiler_step;
        if (marked) s.be->ProfilerRange(true);
        QCAL_ASSIGN_OR_RETURN(StepLoss l, ComputeGradients(sample, c));
        QCAL_RETURN_IF_ERROR(Step());
        if (marked) s.be->ProfilerRange(false);
        record.mean.output_mse += l.output_mse / n;
        record.mean.regularizer += l.regularizer / n;
        record.mean.loss += l.loss / n;
      }
      history.push_back(record);
    }
  }
  return history;
}

absl::StatusOr<double> BlockTrainer::OutputMse() {
  State& s = *s_;
  QCAL_RETURN_IF_ERROR(s.PrepareWeights());
  double total = 0;
  for (int n = 0; n < num_samples(); ++n) {
    QCAL_ASSIGN_OR_RETURN(ForwardActs acts, s.Forward(s.input.inputs[n]));
    QCAL_ASSIGN_OR_RETURN(double mse, s.Mse(acts.out, s.input.targets[n], 0, nullptr));
    total += mse;
  }
  return total / num_samples();
}

absl::StatusOr<RetrainedLinear> BlockTrainer::Finish(LinearKind kind) const {
  const TrainLinear& l = s_->linears[static_cast<int>(kind)];
  Backend& be = *s_->be;
  QCAL_ASSIGN_OR_RETURN(const Tensor gamma, be.ToHost(l.params.gamma));
  QCAL_ASSIGN_OR_RETURN(const Tensor beta, be.ToHost(l.params.beta));
  RetrainedLinear out;
  QCAL_ASSIGN_OR_RETURN(out.lora_a, be.ToHost(l.params.lora_a));
  QCAL_ASSIGN_OR_RETURN(out.lora_b, be.ToHost(l.params.lora_b));
  QCAL_RETURN_IF_ERROR(be.Synchronize());
  QCAL_ASSIGN_OR_RETURN(out.quantized, QuantizeClipped(l.base_host.data<float>(), l.layout,
                                                       gamma.data<float>(), beta.data<float>()));
  return out;
}

const RetrainParams& BlockTrainer::params(LinearKind kind) const {
  return s_->linears[static_cast<int>(kind)].params;
}
const RetrainParams& BlockTrainer::grads(LinearKind kind) const {
  return s_->linears[static_cast<int>(kind)].grads;
}
int BlockTrainer::num_samples() const { return static_cast<int>(s_->input.inputs.size()); }
int64_t BlockTrainer::steps() const { return s_->steps; }
int64_t BlockTrainer::optimizer_steps() const { return s_->optimizer_steps; }
const RetrainSeconds& BlockTrainer::seconds() const { return s_->seconds; }

absl::StatusOr<RetrainResult> RetrainBlock(Backend& backend, const ModelConfig& config,
                                           const kernels::QuantSpec& spec,
                                           const RetrainOptions& options, RetrainBlockInput input) {
  using Clock = std::chrono::steady_clock;
  auto lap = [&backend](Clock::time_point& t0, double& slot) -> absl::Status {
    QCAL_RETURN_IF_ERROR(backend.Synchronize());
    const auto now = Clock::now();
    slot += std::chrono::duration<double>(now - t0).count();
    t0 = now;
    return absl::OkStatus();
  };
  auto t0 = Clock::now();
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<BlockTrainer> trainer,
                        BlockTrainer::Create(backend, config, spec, options, std::move(input)));
  RetrainSeconds outside;
  QCAL_RETURN_IF_ERROR(lap(t0, outside.setup));
  RetrainResult result;
  QCAL_ASSIGN_OR_RETURN(result.output_mse_before, trainer->OutputMse());
  QCAL_RETURN_IF_ERROR(lap(t0, outside.mse));
  QCAL_ASSIGN_OR_RETURN(result.epochs, trainer->Train());
  t0 = Clock::now();
  QCAL_ASSIGN_OR_RETURN(result.output_mse_after, trainer->OutputMse());
  QCAL_RETURN_IF_ERROR(lap(t0, outside.mse));
  for (LinearKind kind : kAllLinears) {
    QCAL_ASSIGN_OR_RETURN(result.linears[static_cast<int>(kind)], trainer->Finish(kind));
  }
  QCAL_RETURN_IF_ERROR(lap(t0, outside.finish));
  result.seconds = trainer->seconds();
  result.seconds.setup = outside.setup;
  result.seconds.mse = outside.mse;
  result.seconds.finish = outside.finish;
  return result;
}

}  // namespace qcal::engine
