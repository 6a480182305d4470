#include "tests/engine/oac/ref_model.h"

#include "common/status.h"
#include "kernels/cpu/ref_grad.h"

namespace qcal::testing {
namespace {

using engine::LinearKind;
namespace ref = kernels::ref;

std::vector<double> ToDouble(const Tensor& t) {
  if (!t.defined()) return {};
  QCAL_CHECK(t.dtype() == DType::kF32 && t.device() == Device::kHost);
  const float* p = t.data<float>();
  return std::vector<double>(p, p + t.numel());
}

void AddInto(const std::vector<double>& x, std::vector<double>& y) {
  QCAL_CHECK(x.size() == y.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] += x[i];
}

// dx [rows, d_in] (+)= dy [rows, d_out] · w [d_out, d_in]: the input gradient of y = x·wᵀ.
void LinearInputGrad(const std::vector<double>& dy, const std::vector<double>& w, int64_t rows,
                     int64_t d_out, int64_t d_in, std::vector<double>& dx, bool accumulate) {
  dx.resize(rows * d_in);
  ref::Gemm<double>(dy.data(), false, w.data(), false, rows, d_in, d_out, 1.0,
                    accumulate ? 1.0 : 0.0, dx.data(), false);
}

}  // namespace

RefModel::RefModel(const engine::Model& model) : c_(model.config()) {
  for (int b = 0; b < model.num_blocks(); ++b) {
    const engine::BlockWeights& w = model.block(b);
    Block blk;
    blk.input_norm = ToDouble(w.input_norm);
    blk.post_attention_norm = ToDouble(w.post_attention_norm);
    blk.q_norm = ToDouble(w.q_norm);
    blk.k_norm = ToDouble(w.k_norm);
    for (LinearKind k : engine::kAllLinears) {
      blk.w[static_cast<int>(k)] = ToDouble(w.at(k).weight);
      blk.bias[static_cast<int>(k)] = ToDouble(w.at(k).bias);
    }
    blocks_.push_back(std::move(blk));
  }
  QCAL_CHECK(model.embed_tokens().dtype() == DType::kF32);
  embed_ = ToDouble(model.embed_tokens());
  final_norm_ = ToDouble(model.final_norm());
  lm_head_ = ToDouble(model.lm_head());
}

int64_t RefModel::d_out(LinearKind kind) const {
  switch (kind) {
    case LinearKind::kQ:
      return c_.q_dim();
    case LinearKind::kK:
    case LinearKind::kV:
      return c_.kv_dim();
    case LinearKind::kO:
    case LinearKind::kDown:
      return c_.hidden_size;
    case LinearKind::kGate:
    case LinearKind::kUp:
      return c_.intermediate_size;
  }
  return 0;
}

int64_t RefModel::d_in(LinearKind kind) const {
  switch (kind) {
    case LinearKind::kO:
      return c_.q_dim();
    case LinearKind::kDown:
      return c_.intermediate_size;
    default:
      return c_.hidden_size;
  }
}

std::vector<double> RefModel::Project(int b, LinearKind kind, const std::vector<double>& x,
                                      int64_t rows) const {
  const int64_t n = d_out(kind), k = d_in(kind);
  std::vector<double> y(rows * n);
  ref::LinearT<double>(x.data(), blocks_[b].w[static_cast<int>(kind)].data(), y.data(), rows, n, k);
  const std::vector<double>& bias = blocks_[b].bias[static_cast<int>(kind)];
  if (!bias.empty()) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) y[r * n + j] += bias[j];
    }
  }
  return y;
}

RefModel::Trace RefModel::Forward(int b, const std::vector<double>& x, int batch,
                                  int seq_len) const {
  const Block& w = blocks_[b];
  const int64_t rows = int64_t(batch) * seq_len, d = c_.hidden_size, hd = c_.head_dim;
  Trace t;
  t.x = x;
  t.xn.resize(rows * d);
  ref::RmsNormT<double>(x.data(), w.input_norm.data(), c_.rms_norm_eps, t.xn.data(), rows, d);
  t.q_pre = Project(b, LinearKind::kQ, t.xn, rows);
  t.k_pre = Project(b, LinearKind::kK, t.xn, rows);
  t.v = Project(b, LinearKind::kV, t.xn, rows);
  t.q = t.q_pre;
  t.k = t.k_pre;
  if (c_.qk_norm) {
    ref::RmsNormT<double>(t.q_pre.data(), w.q_norm.data(), c_.rms_norm_eps, t.q.data(),
                          rows * c_.num_heads, hd);
    ref::RmsNormT<double>(t.k_pre.data(), w.k_norm.data(), c_.rms_norm_eps, t.k.data(),
                          rows * c_.num_kv_heads, hd);
  }
  const kernels::RopeShape rope{seq_len, 0, c_.head_dim, c_.rope_theta, c_.rope_scaling};
  ref::RopeT<double>(t.q.data(), rows, c_.q_dim(), rope);
  ref::RopeT<double>(t.k.data(), rows, c_.kv_dim(), rope);
  const kernels::AttentionShape as{
      batch,           seq_len,     seq_len, c_.num_heads,
      c_.num_kv_heads, c_.head_dim, 0,       static_cast<int>(c_.sliding_window)};
  t.attn.resize(rows * c_.q_dim());
  ref::AttentionT<double>(t.q.data(), t.k.data(), t.v.data(), as, t.attn.data());
  t.h1 = x;
  AddInto(Project(b, LinearKind::kO, t.attn, rows), t.h1);
  t.h1n.resize(rows * d);
  ref::RmsNormT<double>(t.h1.data(), w.post_attention_norm.data(), c_.rms_norm_eps, t.h1n.data(),
                        rows, d);
  t.gate = Project(b, LinearKind::kGate, t.h1n, rows);
  t.up = Project(b, LinearKind::kUp, t.h1n, rows);
  t.mlp.resize(t.gate.size());
  ref::SiluMulT<double>(t.gate.data(), t.up.data(), t.mlp.data(),
                        static_cast<int64_t>(t.gate.size()));
  t.out = t.h1;
  AddInto(Project(b, LinearKind::kDown, t.mlp, rows), t.out);
  return t;
}

std::vector<double> RefModel::BlockForward(int b, const std::vector<double>& x, int batch,
                                           int seq_len) const {
  return Forward(b, x, batch, seq_len).out;
}

std::vector<double> RefModel::BlockBackward(
    int b, const std::vector<double>& x, const std::vector<double>& d_output, int batch,
    int seq_len, std::array<RefLinearGrad, engine::kNumLinears>* grads) const {
  const Block& w = blocks_[b];
  const Trace t = Forward(b, x, batch, seq_len);
  const int64_t rows = int64_t(batch) * seq_len, d = c_.hidden_size, f = c_.intermediate_size;
  const int64_t hd = c_.head_dim;
  auto record = [&](LinearKind k, const std::vector<double>& in, const std::vector<double>& dy) {
    if (grads) (*grads)[static_cast<int>(k)] = {in, dy};
  };
  auto W = [&](LinearKind k) -> const std::vector<double>& { return w.w[static_cast<int>(k)]; };

  // MLP residual: out = h1 + down(silu(gate(h1n))·up(h1n)).
  std::vector<double> d_h1 = d_output;
  std::vector<double> d_mlp;
  LinearInputGrad(d_output, W(LinearKind::kDown), rows, d, f, d_mlp, false);
  record(LinearKind::kDown, t.mlp, d_output);
  std::vector<double> d_gate(t.gate.size()), d_up(t.up.size());
  ref::SiluMulBackward<double>(t.gate.data(), t.up.data(), d_mlp.data(), d_gate.data(), d_up.data(),
                               static_cast<int64_t>(t.gate.size()));
  record(LinearKind::kGate, t.h1n, d_gate);
  record(LinearKind::kUp, t.h1n, d_up);
  std::vector<double> d_h1n;
  LinearInputGrad(d_gate, W(LinearKind::kGate), rows, f, d, d_h1n, false);
  LinearInputGrad(d_up, W(LinearKind::kUp), rows, f, d, d_h1n, true);
  std::vector<double> g(rows * d);
  ref::RmsNormBackward<double>(t.h1.data(), w.post_attention_norm.data(), c_.rms_norm_eps,
                               d_h1n.data(), g.data(), rows, d);
  AddInto(g, d_h1);

  // Attention residual: h1 = x + o(attention(rope(norm(q(xn))), rope(norm(k(xn))), v(xn))).
  std::vector<double> dx = d_h1;
  std::vector<double> d_attn;
  LinearInputGrad(d_h1, W(LinearKind::kO), rows, d, c_.q_dim(), d_attn, false);
  record(LinearKind::kO, t.attn, d_h1);
  std::vector<double> dq(t.q.size()), dk(t.k.size()), dv(t.v.size());
  const kernels::AttentionShape as{
      batch,           seq_len,     seq_len, c_.num_heads,
      c_.num_kv_heads, c_.head_dim, 0,       static_cast<int>(c_.sliding_window)};
  ref::AttentionBackward<double>(t.q.data(), t.k.data(), t.v.data(), d_attn.data(), as, dq.data(),
                                 dk.data(), dv.data(), false);
  const kernels::RopeShape rope{seq_len, 0, c_.head_dim, c_.rope_theta, c_.rope_scaling};
  ref::RopeBackward<double>(dq.data(), rows, c_.q_dim(), rope);
  ref::RopeBackward<double>(dk.data(), rows, c_.kv_dim(), rope);
  if (c_.qk_norm) {
    std::vector<double> dq_pre(dq.size()), dk_pre(dk.size());
    ref::RmsNormBackward<double>(t.q_pre.data(), w.q_norm.data(), c_.rms_norm_eps, dq.data(),
                                 dq_pre.data(), rows * c_.num_heads, hd);
    ref::RmsNormBackward<double>(t.k_pre.data(), w.k_norm.data(), c_.rms_norm_eps, dk.data(),
                                 dk_pre.data(), rows * c_.num_kv_heads, hd);
    dq = std::move(dq_pre);
    dk = std::move(dk_pre);
  }
  record(LinearKind::kQ, t.xn, dq);
  record(LinearKind::kK, t.xn, dk);
  record(LinearKind::kV, t.xn, dv);
  std::vector<double> d_xn;
  LinearInputGrad(dq, W(LinearKind::kQ), rows, c_.q_dim(), d, d_xn, false);
  LinearInputGrad(dk, W(LinearKind::kK), rows, c_.kv_dim(), d, d_xn, true);
  LinearInputGrad(dv, W(LinearKind::kV), rows, c_.kv_dim(), d, d_xn, true);
  ref::RmsNormBackward<double>(x.data(), w.input_norm.data(), c_.rms_norm_eps, d_xn.data(),
                               g.data(), rows, d);
  AddInto(g, dx);
  return dx;
}

std::vector<int32_t> RefModel::Targets(const std::vector<int32_t>& ids, int seq_len) {
  std::vector<int32_t> targets(ids.size(), -1);
  for (size_t r = 0; r + 1 < ids.size(); ++r) {
    if ((r + 1) % seq_len != 0) targets[r] = ids[r + 1];
  }
  return targets;
}

std::vector<std::array<RefLinearGrad, engine::kNumLinears>> RefModel::LossGrads(
    const std::vector<int32_t>& ids, int batch, int seq_len) const {
  const int64_t rows = int64_t(batch) * seq_len, d = c_.hidden_size, v = c_.vocab_size;
  QCAL_CHECK(static_cast<int64_t>(ids.size()) == rows);
  const int nb = static_cast<int>(blocks_.size());
  std::vector<std::vector<double>> inputs(nb + 1);
  inputs[0].resize(rows * d);
  ref::EmbeddingT<double>(embed_.data(), v, d, ids.data(), rows, inputs[0].data());
  for (int b = 0; b < nb; ++b) inputs[b + 1] = BlockForward(b, inputs[b], batch, seq_len);
  std::vector<double> hn(rows * d), logits(rows * v), d_logits(rows * v), d_hn(rows * d);
  ref::RmsNormT<double>(inputs[nb].data(), final_norm_.data(), c_.rms_norm_eps, hn.data(), rows, d);
  ref::LinearT<double>(hn.data(), lm_head_.data(), logits.data(), rows, v, d);
  const std::vector<int32_t> targets = Targets(ids, seq_len);
  ref::NllBackward<double>(logits.data(), rows, v, targets.data(), 1.0, d_logits.data());
  LinearInputGrad(d_logits, lm_head_, rows, v, d, d_hn, false);
  std::vector<double> dh(rows * d);
  ref::RmsNormBackward<double>(inputs[nb].data(), final_norm_.data(), c_.rms_norm_eps, d_hn.data(),
                               dh.data(), rows, d);
  std::vector<std::array<RefLinearGrad, engine::kNumLinears>> grads(nb);
  for (int b = nb - 1; b >= 0; --b) {
    dh = BlockBackward(b, inputs[b], dh, batch, seq_len, &grads[b]);
  }
  return grads;
}

std::vector<double> RefModel::SampleLosses(const std::vector<int32_t>& ids, int batch,
                                           int seq_len) const {
  const int64_t rows = int64_t(batch) * seq_len, d = c_.hidden_size, v = c_.vocab_size;
  QCAL_CHECK(static_cast<int64_t>(ids.size()) == rows);
  std::vector<double> h(rows * d);
  ref::EmbeddingT<double>(embed_.data(), v, d, ids.data(), rows, h.data());
  for (int b = 0; b < static_cast<int>(blocks_.size()); ++b) h = BlockForward(b, h, batch, seq_len);
  std::vector<double> hn(rows * d), logits(rows * v), nll(rows);
  ref::RmsNormT<double>(h.data(), final_norm_.data(), c_.rms_norm_eps, hn.data(), rows, d);
  ref::LinearT<double>(hn.data(), lm_head_.data(), logits.data(), rows, v, d);
  const std::vector<int32_t> targets = Targets(ids, seq_len);
  ref::NllT<double>(logits.data(), rows, v, targets.data(), nll.data());
  std::vector<double> loss(batch, 0.0);
  for (int64_t r = 0; r < rows; ++r) loss[r / seq_len] += nll[r];
  return loss;
}

}  // namespace qcal::testing
