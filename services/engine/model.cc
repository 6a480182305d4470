#include "services/engine/model.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"

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

std::vector<LinearKind> ConsumersOf(LinearInput input) {
  std::vector<LinearKind> out;
  for (LinearKind k : kAllLinears) {
    if (InputOf(k) == input) out.push_back(k);
  }
  return out;
}

namespace {

absl::StatusOr<Tensor> LoadTo(kernels::Backend* backend, const CheckpointReader& reader,
                              const std::string& name, const Shape& shape,
                              std::map<std::string, DType>* dtypes) {
  QCAL_ASSIGN_OR_RETURN(Tensor host, reader.GetF32(name, shape));
  QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader.Info(name));
  (*dtypes)[name] = info.dtype;
  return backend->ToDevice(host);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   kernels::Backend* backend,
                                                   const LinearWeightFn& linear_weight) {
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  QCAL_ASSIGN_OR_RETURN(auto reader, CheckpointReader::Open(dir));
  const int64_t d = config.hidden_size, f = config.intermediate_size, v = config.vocab_size;
  const int64_t qd = config.q_dim(), kvd = config.kv_dim();
  auto model = std::unique_ptr<Model>(new Model());
  model->config_ = config;
  model->backend_ = backend;
  QCAL_ASSIGN_OR_RETURN(model->embed_tokens_, LoadTo(backend, *reader, "model.embed_tokens.weight",
                                                     {v, d}, &model->source_dtypes_));
  QCAL_ASSIGN_OR_RETURN(model->final_norm_,
                        LoadTo(backend, *reader, "model.norm.weight", {d}, &model->source_dtypes_));
  if (config.tie_word_embeddings && !reader->Has("lm_head.weight")) {
    model->lm_head_ = model->embed_tokens_;
  } else {
    QCAL_ASSIGN_OR_RETURN(model->lm_head_, LoadTo(backend, *reader, "lm_head.weight", {v, d},
                                                  &model->source_dtypes_));
  }
  for (int b = 0; b < config.num_layers; ++b) {
    BlockWeights bw;
    const std::string p = absl::StrCat("model.layers.", b, ".");
    QCAL_ASSIGN_OR_RETURN(bw.input_norm, LoadTo(backend, *reader, p + "input_layernorm.weight", {d},
                                                &model->source_dtypes_));
    QCAL_ASSIGN_OR_RETURN(bw.post_attention_norm,
                          LoadTo(backend, *reader, p + "post_attention_layernorm.weight", {d},
                                 &model->source_dtypes_));
    for (LinearKind k : kAllLinears) {
      int64_t out = 0, in = 0;
      bool has_bias = false;
      switch (k) {
        case LinearKind::kQ:
          out = qd;
          in = d;
          has_bias = config.attention_bias;
          break;
        case LinearKind::kK:
        case LinearKind::kV:
          out = kvd;
          in = d;
          has_bias = config.attention_bias;
          break;
        case LinearKind::kO:
          out = d;
          in = qd;
          has_bias = config.o_bias;
          break;
        case LinearKind::kGate:
        case LinearKind::kUp:
          out = f;
          in = d;
          has_bias = config.mlp_bias;
          break;
        case LinearKind::kDown:
          out = d;
          in = f;
          has_bias = config.mlp_bias;
          break;
      }
      const std::string prefix = LinearPrefix(b, k);
      if (linear_weight) {
        QCAL_ASSIGN_OR_RETURN(Tensor host, linear_weight(*reader, prefix, out, in));
        if (host.shape() != Shape{out, in} || host.dtype() != DType::kF32) {
          return absl::InternalError(
              absl::StrCat(prefix, ": weight loader returned ", host.DebugString()));
        }
        QCAL_ASSIGN_OR_RETURN(bw.at(k).weight, backend->ToDevice(host));
      } else {
        QCAL_ASSIGN_OR_RETURN(bw.at(k).weight, LoadTo(backend, *reader, prefix + ".weight",
                                                      {out, in}, &model->source_dtypes_));
      }
      if (has_bias || reader->Has(prefix + ".bias")) {
        QCAL_ASSIGN_OR_RETURN(bw.at(k).bias, LoadTo(backend, *reader, prefix + ".bias", {out},
                                                    &model->source_dtypes_));
      }
    }
    model->blocks_.push_back(std::move(bw));
  }
  return model;
}

DType Model::SourceDType(const std::string& name) const {
  auto it = source_dtypes_.find(name);
  return it == source_dtypes_.end() ? DType::kF32 : it->second;
}

std::unique_ptr<Model> Model::FromWeights(const ModelConfig& config, kernels::Backend* backend,
                                          Tensor embed_tokens, Tensor final_norm, Tensor lm_head,
                                          std::vector<BlockWeights> blocks) {
  auto model = std::unique_ptr<Model>(new Model());
  model->config_ = config;
  model->backend_ = backend;
  model->embed_tokens_ = std::move(embed_tokens);
  model->final_norm_ = std::move(final_norm);
  model->lm_head_ = std::move(lm_head);
  model->blocks_ = std::move(blocks);
  return model;
}

absl::StatusOr<Tensor> Model::Embed(const std::vector<int>& ids) {
  Tensor id_tensor = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(ids.size())});
  std::memcpy(id_tensor.raw(), ids.data(), ids.size() * sizeof(int));
  QCAL_ASSIGN_OR_RETURN(
      Tensor hidden,
      backend_->Alloc(DType::kF32, {static_cast<int64_t>(ids.size()), config_.hidden_size}));
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

absl::Status Model::ApplyLinear(const Linear& l, const Tensor& x, Tensor& y, bool accumulate) {
  kernels::Backend& be = *backend_;
  const Tensor* bias = l.bias.defined() ? &l.bias : nullptr;
  if (l.act_bits < 16) {
    QCAL_ASSIGN_OR_RETURN(Tensor xq, be.Alloc(DType::kF32, x.shape()));
    QCAL_RETURN_IF_ERROR(be.ActQuant(x, l.act_bits, xq));
    QCAL_RETURN_IF_ERROR(be.Linear(xq, l.weight, bias, y, accumulate));
  } else {
    QCAL_RETURN_IF_ERROR(be.Linear(x, l.weight, bias, y, accumulate));
  }
  if (l.lora_a.defined()) {
    QCAL_ASSIGN_OR_RETURN(Tensor t, be.Alloc(DType::kF32, {x.dim(0), l.lora_b.dim(0)}));
    QCAL_RETURN_IF_ERROR(be.Linear(x, l.lora_b, nullptr, t, false));
    QCAL_RETURN_IF_ERROR(be.Linear(t, l.lora_a, nullptr, y, true));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> Model::Project(int b, LinearKind kind, const Tensor& x) {
  const Linear& l = blocks_[b].at(kind);
  QCAL_ASSIGN_OR_RETURN(Tensor y, backend_->Alloc(DType::kF32, {x.dim(0), l.weight.dim(0)}));
  QCAL_RETURN_IF_ERROR(ApplyLinear(l, x, y, false));
  return y;
}

absl::StatusOr<Tensor> Model::NormedInput(int b, const Tensor& hidden, LinearInput input) {
  if (input != LinearInput::kQkv && input != LinearInput::kGateUp) {
    return absl::InvalidArgumentError("NormedInput: only the q/k/v and gate/up inputs are normed");
  }
  const BlockWeights& w = blocks_[b];
  QCAL_ASSIGN_OR_RETURN(Tensor h, backend_->Alloc(DType::kF32, hidden.shape()));
  QCAL_RETURN_IF_ERROR(
      backend_->RmsNorm(hidden, input == LinearInput::kQkv ? w.input_norm : w.post_attention_norm,
                        static_cast<float>(config_.rms_norm_eps), h));
  return h;
}

absl::StatusOr<Tensor> Model::Attend(int b, const Tensor& x, const SeqShape& shape,
                                     KvCache* cache) {
  kernels::Backend& be = *backend_;
  const int64_t rows = int64_t(shape.batch) * shape.seq_len;
  QCAL_ASSIGN_OR_RETURN(Tensor q, Project(b, LinearKind::kQ, x));
  QCAL_ASSIGN_OR_RETURN(Tensor k, Project(b, LinearKind::kK, x));
  QCAL_ASSIGN_OR_RETURN(Tensor v, Project(b, LinearKind::kV, x));
  kernels::RopeShape rope{shape.seq_len, shape.offset, config_.head_dim, config_.rope_theta};
  QCAL_RETURN_IF_ERROR(be.Rope(q, rope));
  QCAL_RETURN_IF_ERROR(be.Rope(k, rope));
  kernels::AttentionShape as;
  as.batch = shape.batch;
  as.q_len = shape.seq_len;
  as.num_heads = config_.num_heads;
  as.num_kv_heads = config_.num_kv_heads;
  as.head_dim = config_.head_dim;
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
  QCAL_ASSIGN_OR_RETURN(Tensor attn, be.Alloc(DType::kF32, {rows, config_.q_dim()}));
  QCAL_RETURN_IF_ERROR(be.Attention(q, keys, values, as, attn));
  return attn;
}

absl::StatusOr<Tensor> Model::AttentionOutput(int b, const Tensor& x, const SeqShape& shape) {
  return Attend(b, x, shape, nullptr);
}

absl::StatusOr<Tensor> Model::MlpProduct(int b, const Tensor& x) {
  QCAL_ASSIGN_OR_RETURN(Tensor gate, Project(b, LinearKind::kGate, x));
  QCAL_ASSIGN_OR_RETURN(Tensor up, Project(b, LinearKind::kUp, x));
  QCAL_RETURN_IF_ERROR(backend_->SiluMul(gate, up, gate));
  return gate;
}

absl::Status Model::AddProjection(int b, LinearKind kind, const Tensor& input, Tensor& hidden) {
  if (kind != LinearKind::kO && kind != LinearKind::kDown) {
    return absl::InvalidArgumentError(
        "AddProjection: only o_proj and down_proj add to the residual");
  }
  return ApplyLinear(blocks_[b].at(kind), input, hidden, true);
}

absl::Status Model::BlockForward(int b, Tensor& hidden, const SeqShape& shape, KvCache* cache,
                                 const Tap& tap) {
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
  QCAL_ASSIGN_OR_RETURN(Tensor attn, Attend(b, h, shape, cache));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kO, attn, &stop));
  if (stop) return absl::OkStatus();
  QCAL_RETURN_IF_ERROR(AddProjection(b, LinearKind::kO, attn, hidden));

  // MLP.
  QCAL_ASSIGN_OR_RETURN(h, NormedInput(b, hidden, LinearInput::kGateUp));
  QCAL_RETURN_IF_ERROR(call_tap(LinearInput::kGateUp, h, &stop));
  if (stop) return absl::OkStatus();
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
