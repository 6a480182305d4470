#include "services/engine/oac/block_backward.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

// The gradient pass differentiates the full-precision model only (its forward is exactly
// Backend::Linear of the weight plus the bias): a fake-quantized or low-rank linear is a caller's
// mistake, caught before any work.
absl::Status CheckFullPrecision(const BlockWeights& w, int b) {
  for (LinearKind k : kAllLinears) {
    const Linear& l = w.at(k);
    if (l.act_bits < 16 || l.lora_a.defined()) {
      return absl::FailedPreconditionError(
          absl::StrCat("BlockBackward: ", LinearPrefix(b, k),
                       " carries activation quantization or a low-rank branch; the gradient pass "
                       "runs on the full-precision model"));
    }
  }
  return absl::OkStatus();
}

// y [rows, d_out] = x · Wᵀ + bias: Model::Project for a full-precision linear, the same op on the
// same operands, so the same bits.
absl::StatusOr<Tensor> Project(kernels::Backend& be, const Linear& l, const Tensor& x) {
  QCAL_ASSIGN_OR_RETURN(Tensor y, be.AllocUninitialized(DType::kF32, {x.dim(0), l.weight.dim(0)}));
  QCAL_RETURN_IF_ERROR(be.Linear(x, l.weight, l.bias.defined() ? &l.bias : nullptr, y, false));
  return y;
}

// dx (+)= dy · W for y = x·Wᵀ + bias (dx [rows, d_in], dy [rows, d_out] as an F32 tensor or its
// BF16 operand copy, W [d_out, d_in]).
absl::Status LinearInputGradient(kernels::Backend& be, const Linear& l, const Tensor& dy,
                                 bool accumulate, Tensor& dx) {
  Tensor dx3 = dx.Reshape({1, dx.dim(0), dx.dim(1)});
  return be.GemmBatched(dy.Reshape({1, dy.dim(0), dy.dim(1)}), false,
                        l.weight.Reshape({1, l.weight.dim(0), l.weight.dim(1)}), false, 1.0f,
                        accumulate ? 1.0f : 0.0f, dx3, /*lower=*/false);
}

// The GEMM operand copy of t (GradTap): BF16 under bf16 compute when a tap will read it, else t.
absl::StatusOr<Tensor> OperandOf(kernels::Backend& be, const GradTap& tap, const Tensor& t) {
  if (!tap || be.compute_dtype() != kernels::ComputeDType::kBF16) return t;
  QCAL_ASSIGN_OR_RETURN(Tensor out, be.AllocUninitialized(DType::kBF16, t.shape()));
  QCAL_RETURN_IF_ERROR(be.Convert(t, out));
  return out;
}

absl::Status CallTap(const GradTap& tap, LinearKind kind, const Tensor& x, const Tensor& dy,
                     const Tensor& x_op, const Tensor& dy_op) {
  return tap ? tap(kind, x, dy, x_op, dy_op) : absl::OkStatus();
}

}  // namespace

absl::StatusOr<Tensor> BlockBackward(Model& model, int b, const Tensor& input,
                                     const SeqShape& shape, const Tensor& d_output,
                                     const GradTap& tap) {
  if (!model.resident(b)) {
    return absl::FailedPreconditionError(
        absl::StrCat("BlockBackward: block ", b, " is not loaded (AcquireBlock first)"));
  }
  const ModelConfig& c = model.config();
  const int64_t rows = int64_t(shape.batch) * shape.seq_len;
  if (shape.offset != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("BlockBackward: shape.offset must be 0 (no KV cache), got ", shape.offset));
  }
  const Shape expected{rows, c.hidden_size};
  if (input.shape() != expected || d_output.shape() != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat("BlockBackward: input is ", input.DebugString(), " and d_output ",
                     d_output.DebugString(), ", expected ", ShapeString(expected), " for batch ",
                     shape.batch, " × seq_len ", shape.seq_len));
  }
  kernels::Backend& be = model.backend();
  if (!be.SupportsOp(kernels::Op::kBackward)) {
    return absl::UnimplementedError(
        absl::StrCat("BlockBackward: the ", be.name(), " backend has no backward ops"));
  }
  const BlockWeights& w = model.block(b);
  QCAL_RETURN_IF_ERROR(CheckFullPrecision(w, b));
  const float eps = static_cast<float>(c.rms_norm_eps);
  const int64_t hd = c.head_dim;

  // ---- Recompute: Model::BlockForward's ops in its order (NormedInput, Attend, AddProjection,
  // NormedInput, MlpProduct, AddProjection), keeping what the backward needs.
  QCAL_ASSIGN_OR_RETURN(Tensor x_qkv, be.AllocUninitialized(DType::kF32, input.shape()));
  QCAL_RETURN_IF_ERROR(be.RmsNorm(input, w.input_norm, eps, x_qkv));
  QCAL_ASSIGN_OR_RETURN(Tensor q, Project(be, w.at(LinearKind::kQ), x_qkv));
  QCAL_ASSIGN_OR_RETURN(Tensor k, Project(be, w.at(LinearKind::kK), x_qkv));
  QCAL_ASSIGN_OR_RETURN(Tensor v, Project(be, w.at(LinearKind::kV), x_qkv));
  // Qwen3's per-head norms read the projections; keep them (q_raw, k_raw) for their backward.
  Tensor q_raw, k_raw;
  if (w.q_norm.defined()) {
    q_raw = q;
    k_raw = k;
    QCAL_ASSIGN_OR_RETURN(q, be.AllocUninitialized(DType::kF32, q_raw.shape()));
    QCAL_ASSIGN_OR_RETURN(k, be.AllocUninitialized(DType::kF32, k_raw.shape()));
    Tensor qh = q.Reshape({q.numel() / hd, hd}), kh = k.Reshape({k.numel() / hd, hd});
    QCAL_RETURN_IF_ERROR(be.RmsNorm(q_raw.Reshape(qh.shape()), w.q_norm, eps, qh));
    QCAL_RETURN_IF_ERROR(be.RmsNorm(k_raw.Reshape(kh.shape()), w.k_norm, eps, kh));
  }
  const kernels::RopeShape rope{shape.seq_len, 0, c.head_dim, c.rope_theta, c.rope_scaling};
  QCAL_RETURN_IF_ERROR(be.Rope(q, rope));
  QCAL_RETURN_IF_ERROR(be.Rope(k, rope));
  const kernels::AttentionShape as(shape.batch, shape.seq_len, shape.seq_len, c.num_heads,
                                   c.num_kv_heads, c.head_dim, 0,
                                   static_cast<int>(c.sliding_window));
  QCAL_ASSIGN_OR_RETURN(Tensor attn, be.AllocUninitialized(DType::kF32, {rows, c.q_dim()}));
  // What the attention backward can reuse (the CUDA bf16 path: packed operands, statistics).
  kernels::AttentionSaved saved;
  QCAL_RETURN_IF_ERROR(be.AttentionForBackward(q, k, v, as, attn, saved));
  // mid = input + o_proj(attn): the residual after attention, as AddProjection accumulates it.
  QCAL_ASSIGN_OR_RETURN(Tensor mid, be.AllocUninitialized(DType::kF32, input.shape()));
  QCAL_RETURN_IF_ERROR(be.Copy(input, mid));
  {
    const Linear& o = w.at(LinearKind::kO);
    QCAL_RETURN_IF_ERROR(be.Linear(attn, o.weight, o.bias.defined() ? &o.bias : nullptr, mid,
                                   /*accumulate=*/true));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor x_mlp, be.AllocUninitialized(DType::kF32, input.shape()));
  QCAL_RETURN_IF_ERROR(be.RmsNorm(mid, w.post_attention_norm, eps, x_mlp));
  QCAL_ASSIGN_OR_RETURN(Tensor gate, Project(be, w.at(LinearKind::kGate), x_mlp));
  QCAL_ASSIGN_OR_RETURN(Tensor up, Project(be, w.at(LinearKind::kUp), x_mlp));
  QCAL_ASSIGN_OR_RETURN(Tensor x_down, be.AllocUninitialized(DType::kF32, gate.shape()));
  QCAL_RETURN_IF_ERROR(be.SiluMul(gate, up, x_down));

  // ---- Backward. The MLP residual: d_mid = d_output + ∂(down(silu·mul(gate, up)))/∂mid.
  Tensor d_gate, d_up;
  {
    QCAL_ASSIGN_OR_RETURN(Tensor x_op, OperandOf(be, tap, x_down));
    QCAL_ASSIGN_OR_RETURN(Tensor dy_op, OperandOf(be, tap, d_output));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kDown, x_down, d_output, x_op, dy_op));
    x_op = x_down = Tensor();
    QCAL_ASSIGN_OR_RETURN(Tensor d_x_down, be.AllocUninitialized(DType::kF32, gate.shape()));
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kDown), dy_op, false, d_x_down));
    dy_op = Tensor();
    QCAL_ASSIGN_OR_RETURN(d_gate, be.AllocUninitialized(DType::kF32, gate.shape()));
    QCAL_ASSIGN_OR_RETURN(d_up, be.AllocUninitialized(DType::kF32, up.shape()));
    QCAL_RETURN_IF_ERROR(be.SiluMulBackward(gate, up, d_x_down, d_gate, d_up));
    gate = up = d_x_down = Tensor();
  }
  QCAL_ASSIGN_OR_RETURN(Tensor d_mid, be.AllocUninitialized(DType::kF32, input.shape()));
  {
    QCAL_ASSIGN_OR_RETURN(Tensor x_op, OperandOf(be, tap, x_mlp));
    QCAL_ASSIGN_OR_RETURN(Tensor d_up_op, OperandOf(be, tap, d_up));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kUp, x_mlp, d_up, x_op, d_up_op));
    d_up = Tensor();
    QCAL_ASSIGN_OR_RETURN(Tensor d_gate_op, OperandOf(be, tap, d_gate));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kGate, x_mlp, d_gate, x_op, d_gate_op));
    d_gate = x_op = x_mlp = Tensor();
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kGate), d_gate_op, false, d_mid));
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kUp), d_up_op, true, d_mid));
  }
  QCAL_RETURN_IF_ERROR(be.RmsNormBackward(mid, w.post_attention_norm, eps, d_mid, d_mid));
  QCAL_RETURN_IF_ERROR(be.Add(d_output, d_mid));
  mid = Tensor();

  // The attention residual: d_input = d_mid + ∂(o(attention(q, k, v)))/∂input.
  QCAL_ASSIGN_OR_RETURN(Tensor d_attn, be.AllocUninitialized(DType::kF32, attn.shape()));
  {
    QCAL_ASSIGN_OR_RETURN(Tensor x_op, OperandOf(be, tap, attn));
    QCAL_ASSIGN_OR_RETURN(Tensor dy_op, OperandOf(be, tap, d_mid));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kO, attn, d_mid, x_op, dy_op));
    x_op = Tensor();
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kO), dy_op, false, d_attn));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor dq, be.AllocUninitialized(DType::kF32, q.shape()));
  QCAL_ASSIGN_OR_RETURN(Tensor dk, be.AllocUninitialized(DType::kF32, k.shape()));
  QCAL_ASSIGN_OR_RETURN(Tensor dv, be.AllocUninitialized(DType::kF32, v.shape()));
  QCAL_RETURN_IF_ERROR(be.AttentionBackwardSaved(q, k, v, attn, d_attn, saved, as, dq, dk, dv));
  q = k = v = d_attn = attn = Tensor();
  saved = kernels::AttentionSaved();
  QCAL_RETURN_IF_ERROR(be.RopeBackward(dq, rope));
  QCAL_RETURN_IF_ERROR(be.RopeBackward(dk, rope));
  if (w.q_norm.defined()) {
    Tensor dqh = dq.Reshape({dq.numel() / hd, hd}), dkh = dk.Reshape({dk.numel() / hd, hd});
    QCAL_RETURN_IF_ERROR(be.RmsNormBackward(q_raw.Reshape(dqh.shape()), w.q_norm, eps, dqh, dqh));
    QCAL_RETURN_IF_ERROR(be.RmsNormBackward(k_raw.Reshape(dkh.shape()), w.k_norm, eps, dkh, dkh));
    q_raw = k_raw = Tensor();
  }
  QCAL_ASSIGN_OR_RETURN(Tensor d_input, be.AllocUninitialized(DType::kF32, input.shape()));
  {
    QCAL_ASSIGN_OR_RETURN(Tensor x_op, OperandOf(be, tap, x_qkv));
    QCAL_ASSIGN_OR_RETURN(Tensor dv_op, OperandOf(be, tap, dv));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kV, x_qkv, dv, x_op, dv_op));
    dv = Tensor();
    QCAL_ASSIGN_OR_RETURN(Tensor dk_op, OperandOf(be, tap, dk));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kK, x_qkv, dk, x_op, dk_op));
    dk = Tensor();
    QCAL_ASSIGN_OR_RETURN(Tensor dq_op, OperandOf(be, tap, dq));
    QCAL_RETURN_IF_ERROR(CallTap(tap, LinearKind::kQ, x_qkv, dq, x_op, dq_op));
    dq = x_op = x_qkv = Tensor();
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kQ), dq_op, false, d_input));
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kK), dk_op, true, d_input));
    QCAL_RETURN_IF_ERROR(LinearInputGradient(be, w.at(LinearKind::kV), dv_op, true, d_input));
  }
  QCAL_RETURN_IF_ERROR(be.RmsNormBackward(input, w.input_norm, eps, d_input, d_input));
  QCAL_RETURN_IF_ERROR(be.Add(d_mid, d_input));
  return d_input;
}

absl::StatusOr<HeadGradient> LossBackward(Model& model, const Tensor& hidden,
                                          const std::vector<int32_t>& targets) {
  const ModelConfig& c = model.config();
  const int64_t rows = hidden.rank() == 2 ? hidden.dim(0) : -1;
  if (hidden.rank() != 2 || hidden.dim(1) != c.hidden_size ||
      static_cast<int64_t>(targets.size()) != rows) {
    return absl::InvalidArgumentError(
        absl::StrCat("LossBackward: hidden is ", hidden.DebugString(), " with ", targets.size(),
                     " targets, expected [rows, ", c.hidden_size, "] and one target a row"));
  }
  const int64_t vocab = c.vocab_size;
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < -1 || targets[r] >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "LossBackward: target ", targets[r], " of row ", r, " is outside [-1, ", vocab, ")"));
    }
  }
  kernels::Backend& be = model.backend();
  if (!be.SupportsOp(kernels::Op::kBackward)) {
    return absl::UnimplementedError(
        absl::StrCat("LossBackward: the ", be.name(), " backend has no backward ops"));
  }
  const float eps = static_cast<float>(c.rms_norm_eps);
  QCAL_ASSIGN_OR_RETURN(Tensor normed, be.Alloc(DType::kF32, hidden.shape()));
  QCAL_RETURN_IF_ERROR(be.RmsNorm(hidden, model.final_norm(), eps, normed));
  // NllBackward takes −1 (no prediction); Nll does not, so its copy predicts token 0 there and
  // those rows are left out of the sum.
  Tensor target_t = Tensor::Zeros(DType::kI32, {rows}),
         nll_target_t = Tensor::Zeros(DType::kI32, {rows});
  for (int64_t r = 0; r < rows; ++r) {
    target_t.data<int32_t>()[r] = targets[r];
    nll_target_t.data<int32_t>()[r] = std::max(targets[r], 0);
  }

  // Logits of at most kMaxLogitBytes at a time: a 128k vocabulary times a whole chunk's rows would
  // not fit beside the activations.
  constexpr int64_t kMaxLogitBytes = int64_t{256} << 20;
  const int64_t slice = std::max<int64_t>(1, kMaxLogitBytes / (vocab * int64_t{sizeof(float)}));
  HeadGradient out;
  QCAL_ASSIGN_OR_RETURN(out.d_hidden, be.Alloc(DType::kF32, hidden.shape()));
  QCAL_ASSIGN_OR_RETURN(Tensor nll, be.Alloc(DType::kF32, {rows}));
  for (int64_t r0 = 0; r0 < rows; r0 += slice) {
    const int64_t r1 = std::min(rows, r0 + slice);
    const Tensor x = normed.Rows(r0, r1), t = target_t.Rows(r0, r1);
    QCAL_ASSIGN_OR_RETURN(Tensor logits, be.Alloc(DType::kF32, {r1 - r0, vocab}));
    QCAL_RETURN_IF_ERROR(be.Linear(x, model.lm_head(), nullptr, logits, false));
    Tensor nll_rows = nll.Rows(r0, r1);
    QCAL_RETURN_IF_ERROR(be.Nll(logits, nll_target_t.Rows(r0, r1), nll_rows));
    QCAL_RETURN_IF_ERROR(be.NllBackward(logits, t, 1.0f, logits));
    Tensor d_normed = out.d_hidden.Rows(r0, r1);
    QCAL_RETURN_IF_ERROR(be.Gemm(logits, false, model.lm_head(), false, 1.0f, 0.0f, d_normed));
  }
  QCAL_RETURN_IF_ERROR(
      be.RmsNormBackward(hidden, model.final_norm(), eps, out.d_hidden, out.d_hidden));
  // One transfer for the whole loss, after the last slice is queued.
  QCAL_ASSIGN_OR_RETURN(Tensor nll_host, be.ToHost(nll));
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] >= 0) out.loss += nll_host.data<float>()[r];
  }
  return out;
}

}  // namespace qcal::engine
