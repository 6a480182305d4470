#include "services/engine/model.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/model_internal.h"

namespace qcal::engine {

const char* LinearName(LinearKind kind) {
  static constexpr const char* kNames[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                           "gate_proj", "up_proj", "down_proj"};
  return kNames[static_cast<int>(kind)];
}

const char* LinearModule(LinearKind kind) {
  return static_cast<int>(kind) <= static_cast<int>(LinearKind::kO) ? "self_attn" : "mlp";
}

std::string LinearPrefix(int block, LinearKind kind) {
  return absl::StrCat("model.layers.", block, ".", LinearModule(kind), ".", LinearName(kind));
}

std::string LinearPrefix(const ModelConfig& config, int block, LinearId id) {
  if (id.expert == kNoExpert) return LinearPrefix(block, id.kind);
  if (id.expert == kSharedExpert) return SharedExpertPrefix(block, id.kind);
  return ExpertLinearPrefix(config, block, id.expert, id.kind);
}

std::pair<int64_t, int64_t> LinearShape(const ModelConfig& config, int block, LinearId id) {
  if (id.expert == kNoExpert || !config.IsMoeBlock(block)) return LinearShape(config, id.kind);
  const int64_t inter = id.expert == kSharedExpert ? config.shared_expert_intermediate_size
                                                   : config.moe_intermediate_size;
  if (id.kind == LinearKind::kDown) return {config.hidden_size, inter};
  return {inter, config.hidden_size};
}

int NumExpertUnits(const ModelConfig& config) {
  if (!config.moe()) return 0;
  return config.num_experts + (config.shared_expert_intermediate_size > 0 ? 1 : 0);
}

int ExpertOfUnit(const ModelConfig& config, int unit) {
  return unit < config.num_experts ? unit : kSharedExpert;
}

int ExpertUnitOf(const ModelConfig& config, int expert) {
  if (expert >= 0 && expert < config.num_experts) return expert;
  if (expert == kSharedExpert && NumExpertUnits(config) > config.num_experts) {
    return config.num_experts;
  }
  return -1;
}

std::vector<LinearId> BlockLinears(const ModelConfig& config, int b) {
  std::vector<LinearId> out;
  for (LinearKind k : kAllLinears) {
    if (HasDenseLinear(config, b, k)) out.emplace_back(k);
  }
  if (!config.IsMoeBlock(b)) return out;
  for (int u = 0; u < NumExpertUnits(config); ++u) {
    for (LinearKind k : {LinearKind::kGate, LinearKind::kUp, LinearKind::kDown}) {
      out.emplace_back(k, ExpertOfUnit(config, u));
    }
  }
  return out;
}

Linear& ExpertWeights::of(LinearKind kind) {
  QCAL_CHECK(kind == LinearKind::kGate || kind == LinearKind::kUp || kind == LinearKind::kDown);
  return kind == LinearKind::kGate ? gate : kind == LinearKind::kUp ? up : down;
}
const Linear& ExpertWeights::of(LinearKind kind) const {
  return const_cast<ExpertWeights*>(this)->of(kind);
}

Linear& BlockWeights::at(LinearId id) {
  if (id.expert == kNoExpert) return at(id.kind);
  if (id.expert == kSharedExpert) return moe.shared.of(id.kind);
  QCAL_CHECK(id.expert >= 0 && id.expert < static_cast<int>(moe.experts.size()));
  return moe.experts[static_cast<size_t>(id.expert)].of(id.kind);
}
const Linear& BlockWeights::at(LinearId id) const {
  return const_cast<BlockWeights*>(this)->at(id);
}

LinearInput InputOf(LinearKind kind) {
  switch (kind) {
    case LinearKind::kQ:
    case LinearKind::kK:
    case LinearKind::kV:
      return LinearInput::kQkv;
    case LinearKind::kO:
      return LinearInput::kO;
    case LinearKind::kGate:
    case LinearKind::kUp:
      return LinearInput::kGateUp;
    case LinearKind::kDown:
      return LinearInput::kDown;
  }
  return LinearInput::kQkv;
}

const char* LinearInputName(LinearInput input) {
  static const char* const kNames[] = {"qkv", "o", "gate_up", "down"};
  return kNames[static_cast<int>(input)];
}

std::vector<LinearKind> ConsumersOf(LinearInput input) {
  std::vector<LinearKind> out;
  for (LinearKind k : kAllLinears) {
    if (InputOf(k) == input) out.push_back(k);
  }
  return out;
}

std::pair<int64_t, int64_t> LinearShape(const ModelConfig& c, LinearKind k) {
  const int64_t hidden = c.hidden_size;
  switch (k) {
    case LinearKind::kQ:
      return {c.q_dim(), hidden};
    case LinearKind::kK:
    case LinearKind::kV:
      return {c.kv_dim(), hidden};
    case LinearKind::kO:
      return {hidden, c.q_dim()};
    case LinearKind::kGate:
    case LinearKind::kUp:
      return {c.intermediate_size, hidden};
    case LinearKind::kDown:
      return {hidden, c.intermediate_size};
  }
  return {0, 0};
}

using model_internal::ConvertInto;
using model_internal::Place;

absl::StatusOr<Tensor> Model::Embed(const std::vector<int>& ids) {
  const int64_t n = static_cast<int64_t>(ids.size()), d = config_.hidden_size;
  if (embed_tokens_.device() == Device::kHost) {
    // Gather rows of the host table (any float dtype) into fp32, then place them.
    for (int64_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= embed_tokens_.dim(0)) {
        return absl::InvalidArgumentError(absl::StrCat("Embed: token id ", ids[i],
                                                       " is outside the vocabulary [0, ",
                                                       embed_tokens_.dim(0), ")"));
      }
    }
    // From the backend, so that its memory accounting sees the activations.
    QCAL_ASSIGN_OR_RETURN(Tensor rows, backend_->AllocHost(DType::kF32, {n, d}));
    for (int64_t i = 0; i < n; ++i) {
      Tensor dst = rows.Rows(i, i + 1);
      ConvertInto(embed_tokens_.Rows(ids[i], ids[i] + 1), dst);
    }
    return Place(*backend_, rows);
  }
  Tensor id_tensor = Tensor::Zeros(DType::kI32, {n});
  std::memcpy(id_tensor.raw(), ids.data(), ids.size() * sizeof(int));
  QCAL_ASSIGN_OR_RETURN(Tensor hidden, backend_->Alloc(DType::kF32, {n, d}));
  QCAL_RETURN_IF_ERROR(backend_->Embedding(embed_tokens_, id_tensor, hidden));
  return hidden;
}

absl::StatusOr<KvCache> Model::NewCache(int capacity) {
  KvCache cache;
  cache.capacity = capacity;
  for (int b = 0; b < num_blocks(); ++b) {
    QCAL_ASSIGN_OR_RETURN(Tensor k, backend_->Alloc(DType::kF32, {capacity, config_.kv_dim()}));
    QCAL_ASSIGN_OR_RETURN(Tensor v, backend_->Alloc(DType::kF32, {capacity, config_.kv_dim()}));
    cache.k.push_back(std::move(k));
    cache.v.push_back(std::move(v));
  }
  return cache;
}

bool Model::ReadsOperand(const Linear& l) const {
  return l.lora_a.defined() || (!l.abq && l.act_bits >= 16);
}

bool Model::ReadsInput(const Linear& l) const { return l.abq || l.act_bits < 16; }

absl::StatusOr<LinearOperand> Model::MakeOperand(const Tensor& x) {
  QCAL_ASSIGN_OR_RETURN(Tensor op, Operand(x));
  return LinearOperand{x, std::move(op)};
}

absl::Status Model::HoldWeightOperands(int b, std::initializer_list<LinearKind> kinds) {
  ReleaseWeightOperands();
  for (LinearKind kind : kinds) {
    const Linear& l = blocks_[b].at(kind);
    if (l.abq || !l.weight.defined()) continue;
    QCAL_ASSIGN_OR_RETURN(Tensor op, Operand(l.weight));
    HeldWeight h{&l, l.weight, std::move(op), Tensor(), Tensor()};
    if (JoinsLowRank(l)) {
      QCAL_ASSIGN_OR_RETURN(h.joined, backend_->AllocUninitialized(
                                          DType::kBF16, {l.d_out(), l.d_in() + l.lora_a.dim(1)}));
      QCAL_RETURN_IF_ERROR(backend_->ConcatColumns(h.op, l.lora_a, h.joined));
      h.lora_a = l.lora_a;
    }
    held_weights_.push_back(std::move(h));
  }
  return absl::OkStatus();
}

void Model::ReleaseWeightOperands() { held_weights_.clear(); }

const Model::HeldWeight* Model::HeldOf(const Linear& l) const {
  for (const HeldWeight& h : held_weights_) {
    if (h.linear == &l && h.weight.raw() == l.weight.raw() &&
        h.weight.shape() == l.weight.shape()) {
      return &h;
    }
  }
  return nullptr;
}

const Tensor& Model::WeightOperand(const Linear& l) const {
  const HeldWeight* h = HeldOf(l);
  return h ? h->op : l.weight;
}

bool Model::OperandsAreBf16() const {
  return backend_->device() != Device::kHost &&
         backend_->compute_dtype() == kernels::ComputeDType::kBF16;
}

absl::StatusOr<LinearOperand> Model::NormedOperand(int b, const Tensor& hidden, LinearInput input,
                                                   bool need_x) {
  if (need_x || !OperandsAreBf16()) {
    QCAL_ASSIGN_OR_RETURN(Tensor x, NormedInput(b, hidden, input));
    return MakeOperand(x);
  }
  QCAL_ASSIGN_OR_RETURN(Tensor op, Normed(b, hidden, input, DType::kBF16));
  return LinearOperand{Tensor(), std::move(op)};
}

absl::StatusOr<LinearOperand> Model::MlpOperand(int b, const LinearOperand& x, bool need_x) {
  if (need_x || !OperandsAreBf16() || blocks_[b].moe.defined()) {
    QCAL_ASSIGN_OR_RETURN(Tensor product, MlpProduct(b, x));
    return MakeOperand(product);
  }
  QCAL_ASSIGN_OR_RETURN(auto gate_up, GateUp(b, x));
  QCAL_ASSIGN_OR_RETURN(Tensor op,
                        backend_->AllocUninitialized(DType::kBF16, gate_up.first.shape()));
  QCAL_RETURN_IF_ERROR(backend_->SiluMul(gate_up.first, gate_up.second, op));
  return LinearOperand{Tensor(), std::move(op)};
}

absl::StatusOr<Tensor> Model::Operand(const Tensor& t) {
  if (!OperandsAreBf16() || t.dtype() == DType::kBF16) return t;
  kernels::Backend& be = *backend_;
  QCAL_ASSIGN_OR_RETURN(Tensor out, be.AllocUninitialized(DType::kBF16, t.shape()));
  QCAL_RETURN_IF_ERROR(be.Convert(t, out));
  return out;
}

absl::StatusOr<Tensor> Model::SharedOperand(std::initializer_list<const Linear*> linears,
                                            const Tensor& x) {
  for (const Linear* l : linears) {
    if (ReadsOperand(*l)) return Operand(x);
  }
  return x;
}

absl::Status Model::ApplyLinear(const Linear& l, const Tensor& x, Tensor& y, bool accumulate) {
  if (!l.lora_a.defined()) return ApplyLinear(l, x, x, y, accumulate);
  QCAL_ASSIGN_OR_RETURN(const Tensor x_op, Operand(x));
  return ApplyLinear(l, x, x_op, y, accumulate);
}

absl::Status Model::ApplyLinear(const Linear& l, const Tensor& x, const Tensor& x_op, Tensor& y,
                                bool accumulate, JoinedOperand* joined) {
  kernels::Backend& be = *backend_;
  const Tensor* bias = l.bias.defined() ? &l.bias : nullptr;
  if (ReadsInput(l) && !x.defined()) {
    return absl::FailedPreconditionError(
        "a linear that quantizes its activations was given only the bf16 operand of its input");
  }
  if (l.abq) {
    QCAL_RETURN_IF_ERROR(be.AbqLinear(*l.abq, l.abq_kernel, x, bias, y, accumulate));
  } else if (JoinsLowRank(l) && x_op.defined() && x_op.dtype() == DType::kBF16 &&
             x_op.dim(0) >= l.d_in()) {
    return ApplyJoined(l, x, x_op, bias, y, accumulate, joined);
  } else if (l.act_bits < 16) {
    QCAL_RETURN_IF_ERROR(be.ActQuantLinear(x, l.act_bits, WeightOperand(l), bias, y, accumulate));
  } else {
    QCAL_RETURN_IF_ERROR(be.Linear(x_op, WeightOperand(l), bias, y, accumulate));
  }
  if (l.lora_a.defined()) {
    QCAL_ASSIGN_OR_RETURN(Tensor t,
                          be.AllocUninitialized(DType::kF32, {x_op.dim(0), l.lora_b.dim(0)}));
    QCAL_RETURN_IF_ERROR(be.Linear(x_op, l.lora_b, nullptr, t, false));
    QCAL_RETURN_IF_ERROR(be.Linear(t, l.lora_a, nullptr, y, true));
  }
  return absl::OkStatus();
}

bool Model::JoinsLowRank(const Linear& l) const {
  return OperandsAreBf16() && l.lora_a.defined() && !l.abq &&
         (l.act_bits < 16 || l.d_in() < 2 * l.d_out());
}

absl::Status Model::ApplyJoined(const Linear& l, const Tensor& x, const Tensor& x_op,
                                const Tensor* bias, Tensor& y, bool accumulate,
                                JoinedOperand* joined) {
  kernels::Backend& be = *backend_;
  const int64_t rows = x_op.dim(0), r = l.lora_b.dim(0), k = l.d_in();
  const int act_bits = l.act_bits < 16 ? l.act_bits : 16;
  QCAL_ASSIGN_OR_RETURN(Tensor t, be.AllocUninitialized(DType::kF32, {rows, r}));
  QCAL_RETURN_IF_ERROR(be.Linear(x_op, l.lora_b, nullptr, t, false));
  Tensor xt;
  if (joined != nullptr && joined->xt.defined() && joined->xt.shape() == Shape{rows, k + r} &&
      joined->act_bits == act_bits) {
    // The x columns are already written (an earlier linear of the same input joined them): that
    // copy, or quantization, of x, the larger part of the join, is made once for the input.
    xt = joined->xt;
    QCAL_RETURN_IF_ERROR(be.WriteColumns(t, k, xt));
  } else {
    QCAL_ASSIGN_OR_RETURN(xt, be.AllocUninitialized(DType::kBF16, {rows, k + r}));
    if (act_bits < 16) {
      QCAL_RETURN_IF_ERROR(be.ActQuantOperand(x, act_bits, xt));
      QCAL_RETURN_IF_ERROR(be.WriteColumns(t, k, xt));
    } else {
      QCAL_RETURN_IF_ERROR(be.ConcatColumns(x_op, t, xt));
    }
    if (joined != nullptr) *joined = JoinedOperand{xt, act_bits};
  }
  const HeldWeight* held = HeldOf(l);
  if (held && held->joined.defined() && held->lora_a.raw() == l.lora_a.raw() &&
      held->lora_a.shape() == l.lora_a.shape()) {
    return be.Linear(xt, held->joined, bias, y, accumulate);
  }
  QCAL_ASSIGN_OR_RETURN(Tensor wt, be.AllocUninitialized(DType::kBF16, {l.d_out(), k + r}));
  QCAL_RETURN_IF_ERROR(be.ConcatColumns(WeightOperand(l), l.lora_a, wt));
  return be.Linear(xt, wt, bias, y, accumulate);
}

absl::StatusOr<Tensor> Model::Project(int b, LinearKind kind, const Tensor& x, const Tensor& x_op,
                                      JoinedOperand* joined) {
  const Linear& l = blocks_[b].at(kind);
  const int64_t rows = x_op.defined() ? x_op.dim(0) : x.dim(0);
  // ApplyLinear without `accumulate` writes every element of y.
  QCAL_ASSIGN_OR_RETURN(Tensor y, backend_->AllocUninitialized(DType::kF32, {rows, l.d_out()}));
  QCAL_RETURN_IF_ERROR(ApplyLinear(l, x, x_op, y, false, joined));
  return y;
}

absl::StatusOr<Tensor> Model::NormedInput(int b, const Tensor& hidden, LinearInput input) {
  return Normed(b, hidden, input, DType::kF32);
}

absl::StatusOr<Tensor> Model::Normed(int b, const Tensor& hidden, LinearInput input, DType dtype) {
  if (input != LinearInput::kQkv && input != LinearInput::kGateUp) {
    return absl::InvalidArgumentError(
        "Model::Normed: only the q/k/v and gate/up inputs are normed");
  }
  const BlockWeights& w = blocks_[b];
  QCAL_ASSIGN_OR_RETURN(Tensor h, backend_->AllocUninitialized(dtype, hidden.shape()));
  QCAL_RETURN_IF_ERROR(
      backend_->RmsNorm(hidden, input == LinearInput::kQkv ? w.input_norm : w.post_attention_norm,
                        static_cast<float>(config_.rms_norm_eps), h));
  return h;
}

absl::StatusOr<Tensor> Model::Attend(int b, const LinearOperand& in, const SeqShape& shape,
                                     KvCache* cache) {
  kernels::Backend& be = *backend_;
  const int64_t rows = int64_t(shape.batch) * shape.seq_len;
  const BlockWeights& w = blocks_[b];
  const Tensor& x = in.x;
  Tensor x_op = in.op;
  if (!x_op.defined()) {
    QCAL_ASSIGN_OR_RETURN(
        x_op,
        SharedOperand({&w.at(LinearKind::kQ), &w.at(LinearKind::kK), &w.at(LinearKind::kV)}, x));
  }
  JoinedOperand joined;  // [x̂ | t] of q, k and v in turn (ApplyJoined)
  QCAL_ASSIGN_OR_RETURN(Tensor q, Project(b, LinearKind::kQ, x, x_op, &joined));
  QCAL_ASSIGN_OR_RETURN(Tensor k, Project(b, LinearKind::kK, x, x_op, &joined));
  QCAL_ASSIGN_OR_RETURN(Tensor v, Project(b, LinearKind::kV, x, x_op, &joined));
  joined = JoinedOperand();
  if (w.q_norm.defined()) {
    // Qwen3: RMSNorm over each head's features, before RoPE.
    const float eps = static_cast<float>(config_.rms_norm_eps);
    const int64_t hd = config_.head_dim;
    Tensor qh = q.Reshape({q.numel() / hd, hd}), kh = k.Reshape({k.numel() / hd, hd});
    QCAL_RETURN_IF_ERROR(be.RmsNorm(qh, w.q_norm, eps, qh));
    QCAL_RETURN_IF_ERROR(be.RmsNorm(kh, w.k_norm, eps, kh));
  }
  kernels::RopeShape rope{shape.seq_len, shape.offset, config_.head_dim, config_.rope_theta,
                          config_.rope_scaling};
  // Without a cache, a device computing in bf16 rotates q and k as it rounds them (RopeAttention).
  const bool fused_rope = cache == nullptr && OperandsAreBf16();
  if (!fused_rope) {
    QCAL_RETURN_IF_ERROR(be.Rope(q, rope));
    QCAL_RETURN_IF_ERROR(be.Rope(k, rope));
  }
  kernels::AttentionShape as;
  as.batch = shape.batch;
  as.q_len = shape.seq_len;
  as.num_heads = config_.num_heads;
  as.num_kv_heads = config_.num_kv_heads;
  as.head_dim = config_.head_dim;
  as.sliding_window = static_cast<int>(config_.sliding_window);
  Tensor keys = k, values = v;
  if (cache) {
    Tensor kd = cache->k[b].Rows(shape.offset, shape.offset + shape.seq_len);
    Tensor vd = cache->v[b].Rows(shape.offset, shape.offset + shape.seq_len);
    QCAL_RETURN_IF_ERROR(be.Copy(k, kd));
    QCAL_RETURN_IF_ERROR(be.Copy(v, vd));
    keys = cache->k[b].Rows(0, shape.offset + shape.seq_len);
    values = cache->v[b].Rows(0, shape.offset + shape.seq_len);
    as.kv_len = shape.offset + shape.seq_len;
    as.q_offset = shape.offset;
  } else {
    as.kv_len = shape.seq_len;
    as.q_offset = 0;
  }
  // Attention writes every element of its output.
  QCAL_ASSIGN_OR_RETURN(Tensor attn, be.AllocUninitialized(DType::kF32, {rows, config_.q_dim()}));
  if (fused_rope) {
    QCAL_RETURN_IF_ERROR(be.RopeAttention(q, keys, values, rope, as, attn));
  } else {
    QCAL_RETURN_IF_ERROR(be.Attention(q, keys, values, as, attn));
  }
  return attn;
}

absl::StatusOr<Tensor> Model::AttentionOutput(int b, const Tensor& x, const SeqShape& shape) {
  return Attend(b, LinearOperand{x, Tensor()}, shape, nullptr);
}

absl::StatusOr<Tensor> Model::AttentionOutput(int b, const LinearOperand& x,
                                              const SeqShape& shape) {
  return Attend(b, x, shape, nullptr);
}

absl::StatusOr<Tensor> Model::MlpProduct(int b, const Tensor& x) {
  return MlpProduct(b, LinearOperand{x, Tensor()});
}

absl::StatusOr<Tensor> Model::MlpProduct(int b, const LinearOperand& in) {
  if (blocks_[b].moe.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("MlpProduct: block ", b, " is a mixture-of-experts block"));
  }
  QCAL_ASSIGN_OR_RETURN(auto gate_up, GateUp(b, in));
  QCAL_RETURN_IF_ERROR(backend_->SiluMul(gate_up.first, gate_up.second, gate_up.first));
  return gate_up.first;
}

absl::StatusOr<std::pair<Tensor, Tensor>> Model::GateUp(int b, const LinearOperand& in) {
  const BlockWeights& bw = blocks_[b];
  const Tensor& x = in.x;
  Tensor x_op = in.op;
  if (!x_op.defined()) {
    QCAL_ASSIGN_OR_RETURN(x_op,
                          SharedOperand({&bw.at(LinearKind::kGate), &bw.at(LinearKind::kUp)}, x));
  }
  JoinedOperand joined;  // [x̂ | t] of gate and up in turn (ApplyJoined)
  QCAL_ASSIGN_OR_RETURN(Tensor gate, Project(b, LinearKind::kGate, x, x_op, &joined));
  QCAL_ASSIGN_OR_RETURN(Tensor up, Project(b, LinearKind::kUp, x, x_op, &joined));
  return std::make_pair(std::move(gate), std::move(up));
}

absl::StatusOr<Tensor> Model::ExpertMlpProduct(const ExpertWeights& e, const Tensor& x) {
  kernels::Backend& be = *backend_;
  const int64_t rows = x.dim(0);
  QCAL_ASSIGN_OR_RETURN(Tensor gate, be.Alloc(DType::kF32, {rows, e.gate.weight.dim(0)}));
  QCAL_ASSIGN_OR_RETURN(Tensor up, be.Alloc(DType::kF32, {rows, e.up.weight.dim(0)}));
  QCAL_ASSIGN_OR_RETURN(const Tensor x_op, SharedOperand({&e.gate, &e.up}, x));
  QCAL_RETURN_IF_ERROR(ApplyLinear(e.gate, x, x_op, gate, false));
  QCAL_RETURN_IF_ERROR(ApplyLinear(e.up, x, x_op, up, false));
  QCAL_RETURN_IF_ERROR(be.SiluMul(gate, up, gate));
  return gate;
}

absl::StatusOr<Tensor> Model::ExpertForward(const ExpertWeights& e, const Tensor& x) {
  QCAL_ASSIGN_OR_RETURN(Tensor product, ExpertMlpProduct(e, x));
  QCAL_ASSIGN_OR_RETURN(Tensor y, backend_->Alloc(DType::kF32, {x.dim(0), e.down.weight.dim(0)}));
  QCAL_RETURN_IF_ERROR(ApplyLinear(e.down, product, y, false));
  return y;
}

absl::StatusOr<Tensor> Model::ExpertProduct(int b, int expert, const Tensor& x) {
  const MoeWeights& m = blocks_[b].moe;
  if (!m.defined() || expert < kSharedExpert || expert >= config_.num_experts ||
      (expert == kSharedExpert && !m.shared_expert_gate.defined()) || expert == kNoExpert) {
    return absl::FailedPreconditionError(
        absl::StrCat("ExpertProduct: block ", b, " has no expert ", expert));
  }
  return ExpertMlpProduct(expert == kSharedExpert ? m.shared : m.experts[expert], x);
}

absl::StatusOr<Tensor> Model::GatherRows(const Tensor& x, const std::vector<int32_t>& rows) {
  const int64_t n = static_cast<int64_t>(rows.size());
  Tensor ids = Tensor::Zeros(DType::kI32, {n});
  std::memcpy(ids.raw(), rows.data(), n * sizeof(int32_t));
  QCAL_ASSIGN_OR_RETURN(Tensor out, backend_->Alloc(DType::kF32, {n, x.dim(1)}));
  QCAL_RETURN_IF_ERROR(backend_->Embedding(x, ids, out));
  return out;
}

absl::StatusOr<Routing> Model::Route(int b, const Tensor& x) {
  const MoeWeights& m = blocks_[b].moe;
  if (!m.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("Route: block ", b, " is not a mixture-of-experts block"));
  }
  kernels::Backend& be = *backend_;
  const int64_t rows = x.dim(0);
  QCAL_ASSIGN_OR_RETURN(Tensor logits, be.Alloc(DType::kF32, {rows, config_.num_experts}));
  QCAL_RETURN_IF_ERROR(be.Linear(x, m.router, nullptr, logits, false));
  QCAL_ASSIGN_OR_RETURN(Tensor host, be.ToHost(logits));
  const float* l = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(l[i])) {
      return absl::DataLossError(
          absl::StrCat("block ", b, ": non-finite router logit at row ", i / config_.num_experts));
    }
  }
  return RouteTokens(l, rows, config_.num_experts, config_.num_experts_per_tok,
                     config_.norm_topk_prob);
}

absl::Status Model::AddMoeOutput(int b, const Tensor& x, const Routing& routing, Tensor& hidden) {
  const MoeWeights& m = blocks_[b].moe;
  if (!m.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("AddMoeOutput: block ", b, " is not a mixture-of-experts block"));
  }
  if (routing.rows != x.dim(0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("AddMoeOutput: a routing of ", routing.rows, " rows for ", x.dim(0), " rows"));
  }
  if (!backend_->SupportsOp(kernels::Op::kBackward)) {
    return absl::UnimplementedError(
        absl::StrCat("mixture-of-experts blocks need the row gather/scatter ops, which the ",
                     backend_->name(), " backend lacks"));
  }
  kernels::Backend& be = *backend_;
  const int64_t rows = x.dim(0), d = config_.hidden_size;
  QCAL_ASSIGN_OR_RETURN(Tensor sum, be.Alloc(DType::kF32, {rows, d}));
  // Rows are gathered with Embedding (x as the table), scaled with ScaleRowsByNorm (a one-column
  // g holds the weight w >= 0; sqrt(w²) = w exactly, in double on the CPU and in fp32 on the GPU
  // for w above ~1e-19, where w² would underflow) and added back with EmbeddingBackward, which
  // adds every row in order: the sum of a token's experts runs in increasing expert order.
  std::vector<int32_t> expert_rows;
  std::vector<float> weights;
  for (int e = 0; e < config_.num_experts; ++e) {
    routing.RowsOf(e, &expert_rows, &weights);
    if (expert_rows.empty()) continue;
    const int64_t n = static_cast<int64_t>(expert_rows.size());
    Tensor ids = Tensor::Zeros(DType::kI32, {n});
    std::memcpy(ids.raw(), expert_rows.data(), n * sizeof(int32_t));
    QCAL_ASSIGN_OR_RETURN(Tensor xe, GatherRows(x, expert_rows));
    QCAL_ASSIGN_OR_RETURN(Tensor ye, ExpertForward(m.experts[e], xe));
    Tensor w = Tensor::Zeros(DType::kF32, {n, 1});
    std::memcpy(w.raw(), weights.data(), n * sizeof(float));
    QCAL_ASSIGN_OR_RETURN(Tensor wd, Place(be, w));
    QCAL_RETURN_IF_ERROR(be.ScaleRowsByNorm(wd, ye));
    QCAL_RETURN_IF_ERROR(be.EmbeddingBackward(ids, ye, sum));
  }
  if (m.shared_expert_gate.defined()) {
    // Qwen2-MoE: experts + sigmoid(shared_expert_gate(x)) * shared_expert(x).
    QCAL_ASSIGN_OR_RETURN(Tensor shared, ExpertForward(m.shared, x));
    QCAL_ASSIGN_OR_RETURN(Tensor g, be.Alloc(DType::kF32, {rows, 1}));
    QCAL_RETURN_IF_ERROR(be.Linear(x, m.shared_expert_gate, nullptr, g, false));
    QCAL_ASSIGN_OR_RETURN(Tensor gh, be.ToHost(g));
    float* gp = gh.data<float>();
    for (int64_t r = 0; r < rows; ++r) {
      gp[r] = static_cast<float>(1.0 / (1.0 + std::exp(-double(gp[r]))));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor gd, Place(be, gh));
    QCAL_RETURN_IF_ERROR(be.ScaleRowsByNorm(gd, shared));
    QCAL_RETURN_IF_ERROR(be.Add(shared, sum));
  }
  return be.Add(sum, hidden);
}

absl::Status Model::AddProjection(int b, LinearKind kind, const Tensor& input, Tensor& hidden) {
  if (kind != LinearKind::kO && kind != LinearKind::kDown) {
    return absl::InvalidArgumentError(
        "AddProjection: only o_proj and down_proj add to the residual");
  }
  return ApplyLinear(blocks_[b].at(kind), input, hidden, true);
}

absl::Status Model::AddProjection(int b, LinearKind kind, const LinearOperand& input,
                                  Tensor& hidden) {
  if (kind != LinearKind::kO && kind != LinearKind::kDown) {
    return absl::InvalidArgumentError(
        "AddProjection: only o_proj and down_proj add to the residual");
  }
  if (!input.op.defined()) return AddProjection(b, kind, input.x, hidden);
  return ApplyLinear(blocks_[b].at(kind), input.x, input.op, hidden, true);
}

absl::Status Model::BlockForward(int b, Tensor& hidden, const SeqShape& shape, KvCache* cache,
                                 const Tap& tap) {
  if (!resident(b)) {
    return absl::FailedPreconditionError(
        absl::StrCat("BlockForward: block ", b, " is not loaded (AcquireBlock first)"));
  }
  const int64_t rows = int64_t(shape.batch) * shape.seq_len;
  const int64_t d = config_.hidden_size;
  if (hidden.shape() != Shape{rows, d}) {
    return absl::InvalidArgumentError(absl::StrCat("BlockForward: hidden is ", hidden.DebugString(),
                                                   ", expected [", rows, ", ", d, "]"));
  }
  if (cache && (shape.batch != 1 || shape.offset + shape.seq_len > cache->capacity)) {
    return absl::InvalidArgumentError("BlockForward: KV cache needs batch 1 and enough capacity");
  }
  auto call_tap = [&](LinearInput in, const Tensor& x, bool* stop) -> absl::Status {
    *stop = false;
    if (!tap) return absl::OkStatus();
    absl::Status st = tap(in, x);
    if (st.code() == absl::StatusCode::kCancelled) {
      *stop = true;
      return absl::OkStatus();
    }
    return st;
  };
  bool stop = false;

  // Attention.
  QCAL_ASSIGN_OR_RETURN(Tensor h, NormedInput(b, hidden, LinearInput::kQkv));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kQkv, h, &stop));
  if (stop) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(Tensor attn, Attend(b, LinearOperand{h, Tensor()}, shape, cache));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kO, attn, &stop));
  if (stop) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(AddProjection(b, LinearKind::kO, attn, hidden));

  // MLP.
  QCAL_ASSIGN_OR_RETURN(h, NormedInput(b, hidden, LinearInput::kGateUp));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kGateUp, h, &stop));
  if (stop) return absl::OkStatus();
  if (blocks_[b].moe.defined()) {
    QCAL_ASSIGN_OR_RETURN(const Routing routing, Route(b, h));
    if (routing_observer_) routing_observer_(b, routing);
    QCAL_RETURN_IF_ERROR(AddMoeOutput(b, h, routing, hidden));
    if (cache) cache->length = shape.offset + shape.seq_len;
    return absl::OkStatus();
  }
  QCAL_ASSIGN_OR_RETURN(Tensor mlp, MlpProduct(b, h));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kDown, mlp, &stop));
  if (stop) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(AddProjection(b, LinearKind::kDown, mlp, hidden));
  if (cache) cache->length = shape.offset + shape.seq_len;
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Model::Logits(const Tensor& hidden) {
  kernels::Backend& be = *backend_;
  QCAL_ASSIGN_OR_RETURN(Tensor h, be.Alloc(DType::kF32, hidden.shape()));
  QCAL_RETURN_IF_ERROR(
      be.RmsNorm(hidden, final_norm_, static_cast<float>(config_.rms_norm_eps), h));
  QCAL_ASSIGN_OR_RETURN(Tensor logits, be.Alloc(DType::kF32, {hidden.dim(0), config_.vocab_size}));
  QCAL_RETURN_IF_ERROR(be.Linear(h, lm_head_, nullptr, logits, false));
  return logits;
}

}  // namespace qcal::engine
