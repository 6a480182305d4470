// Model's loading side (model.h): reading a checkpoint's tensors on the host (F32, F16 or BF16),
// placing them on the backend, and block residency (every block at once, or streamed one block
// ahead on a reader thread).
#include <malloc.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <future>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/memory_usage.h"
#include "common/status.h"
#include "services/engine/model.h"
#include "services/engine/model_internal.h"

namespace qcal::engine {

namespace model_internal {

void ConvertInto(const Tensor& src, Tensor& dst) {
  float* out = dst.data<float>();
  const int64_t n = src.numel();
  switch (src.dtype()) {
    case DType::kF32:
      std::memcpy(out, src.raw(), n * sizeof(float));
      break;
    case DType::kF16: {
      const uint16_t* in = src.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = HalfToFloat(in[i]);
      break;
    }
    case DType::kBF16: {
      const uint16_t* in = src.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
      break;
    }
    default:
      QCAL_CHECK(false);  // callers check the dtype first
  }
}

absl::StatusOr<Tensor> Place(kernels::Backend& be, const Tensor& host) {
  if (host.device() == be.device()) return host;
  return be.ToDevice(host);
}

}  // namespace model_internal

using model_internal::ConvertInto;
using model_internal::Place;

namespace {

// Shape and bias of linear `kind` in a model of `c`.
struct LinearGeometry {
  int64_t d_out = 0, d_in = 0;
  bool bias = false;
};
LinearGeometry GeometryOf(const ModelConfig& c, LinearKind kind) {
  const auto [d_out, d_in] = LinearShape(c, kind);
  switch (kind) {
    case LinearKind::kQ:
    case LinearKind::kK:
    case LinearKind::kV:
      return {d_out, d_in, c.attention_bias};
    case LinearKind::kO:
      return {d_out, d_in, c.o_bias};
    case LinearKind::kGate:
    case LinearKind::kUp:
    case LinearKind::kDown:
      return {d_out, d_in, c.mlp_bias};
  }
  return {};
}

// A tensor of the checkpoint in its stored dtype, checking the shape and that the dtype is a
// floating type the model can run.
absl::StatusOr<Tensor> ReadFloat(const CheckpointReader& reader, const std::string& name,
                                 const Shape& shape) {
  QCAL_ASSIGN_OR_RETURN(Tensor t, reader.Get(name));
  if (t.shape() != shape ||
      (t.dtype() != DType::kF32 && t.dtype() != DType::kF16 && t.dtype() != DType::kBF16)) {
    QCAL_ASSIGN_OR_RETURN(std::string file, reader.FileOf(name));
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor \"", name, "\" is ",
                                                   t.DebugString(), ", expected ",
                                                   ShapeString(shape), " of F32, F16 or BF16"));
  }
  return t;
}

// One block's tensors read on the host, before they are placed on the backend.
struct HostBlock {
  int b = -1;
  BlockWeights weights;                 // host fp32 tensors
  std::map<std::string, DType> dtypes;  // stored dtype of every tensor read
  // The linears read packed (LinearPackFn) instead of into weights.at(k).weight.
  std::array<std::optional<kernels::AbqWeights>, kNumLinears> packed;
};

}  // namespace

// Reads blocks from a checkpoint on the host, one tensor at a time, optionally one block ahead on
// a thread of its own. The reader thread touches only the checkpoint files and host memory (the
// backend's AllocHost, which is thread-safe, for pinned buffers).
class Model::BlockSource {
 public:
  BlockSource(std::unique_ptr<CheckpointReader> reader, const ModelConfig& config,
              kernels::Backend* backend, LinearWeightFn linear_weight, LinearPackFn linear_pack)
      : reader_(std::move(reader)),
        config_(config),
        backend_(backend),
        linear_weight_(std::move(linear_weight)),
        linear_pack_(std::move(linear_pack)) {}
  ~BlockSource() {
    if (pending_.valid()) pending_.wait();
  }

  const CheckpointReader& reader() const { return *reader_; }

  // Starts reading block b in the background unless a read is already pending.
  void Prefetch(int b) {
    if (pending_.valid() || b < 0 || b >= config_.num_layers) return;
    pending_block_ = b;
    pending_ = std::async(std::launch::async, [this, b] { return Read(b); });
  }

  // Block b: the background read's result when it is for b, else read here.
  absl::StatusOr<HostBlock> Take(int b) {
    if (pending_.valid()) {
      absl::StatusOr<HostBlock> r = pending_.get();
      if (pending_block_ == b) return r;
    }
    return Read(b);
  }

 private:
  // A host fp32 buffer: pinned on device backends (uploads at bus speed).
  absl::StatusOr<Tensor> HostF32(const Shape& shape) const {
    if (backend_->device() == Device::kHost) return Tensor::ZerosMapped(DType::kF32, shape);
    return backend_->AllocHost(DType::kF32, shape);
  }
  absl::StatusOr<Tensor> ReadF32(const std::string& name, const Shape& shape,
                                 std::map<std::string, DType>* dtypes) const {
    QCAL_ASSIGN_OR_RETURN(Tensor stored, ReadFloat(*reader_, name, shape));
    (*dtypes)[name] = stored.dtype();
    QCAL_ASSIGN_OR_RETURN(Tensor out, HostF32(shape));
    ConvertInto(stored, out);
    return out;
  }

  absl::StatusOr<HostBlock> Read(int b) const {
    HostBlock hb;
    hb.b = b;
    const int64_t d = config_.hidden_size;
    const std::string p = absl::StrCat("model.layers.", b, ".");
    QCAL_ASSIGN_OR_RETURN(hb.weights.input_norm,
                          ReadF32(p + "input_layernorm.weight", {d}, &hb.dtypes));
    QCAL_ASSIGN_OR_RETURN(hb.weights.post_attention_norm,
                          ReadF32(p + "post_attention_layernorm.weight", {d}, &hb.dtypes));
    if (config_.qk_norm) {
      const int64_t hd = config_.head_dim;
      QCAL_ASSIGN_OR_RETURN(hb.weights.q_norm,
                            ReadF32(p + "self_attn.q_norm.weight", {hd}, &hb.dtypes));
      QCAL_ASSIGN_OR_RETURN(hb.weights.k_norm,
                            ReadF32(p + "self_attn.k_norm.weight", {hd}, &hb.dtypes));
    }
    // The linears are read, converted (or dequantized) on threads of their own: one thread
    // converting a 70B block's 3.4 GB takes longer than the GPU takes to quantize it. An MoE
    // block's experts are read by kMoeReaders threads, expert j by thread j % kMoeReaders.
    const bool moe = config_.IsMoeBlock(b);
    constexpr int kMoeReaders = 8;
    std::vector<LinearKind> dense;
    for (LinearKind k : kAllLinears) {
      if (HasDenseLinear(config_, b, k)) dense.push_back(k);
    }
    const int readers = moe ? std::min(kMoeReaders, config_.num_experts) : 0;
    std::vector<std::map<std::string, DType>> dtypes(dense.size() + readers + 1);
    std::vector<std::future<absl::Status>> reads;
    for (size_t i = 0; i < dense.size(); ++i) {
      reads.push_back(std::async(std::launch::async, [this, b, k = dense[i], &hb, &dtypes, i] {
        const LinearGeometry g = GeometryOf(config_, k);
        return ReadLinear(LinearPrefix(b, k), g, hb.weights.at(k), &hb.packed[static_cast<int>(k)],
                          &dtypes[i]);
      }));
    }
    MoeWeights& m = hb.weights.moe;
    if (moe) {
      m.experts.resize(config_.num_experts);
      for (int t = 0; t < readers; ++t) {
        reads.push_back(std::async(std::launch::async, [this, b, t, readers, &m, &dtypes, &dense] {
          for (int j = t; j < config_.num_experts; j += readers) {
            QCAL_RETURN_IF_ERROR(
                ReadExpert([&](LinearKind k) { return ExpertLinearPrefix(config_, b, j, k); },
                           config_.moe_intermediate_size, m.experts[j], &dtypes[dense.size() + t]));
          }
          return absl::OkStatus();
        }));
      }
    }
    absl::Status status;
    for (auto& r : reads) status.Update(r.get());
    QCAL_RETURN_IF_ERROR(status);
    if (moe) {
      auto* types = &dtypes.back();
      QCAL_ASSIGN_OR_RETURN(m.router,
                            ReadF32(RouterWeightName(config_, b), {config_.num_experts, d}, types));
      if (config_.shared_expert_intermediate_size > 0) {
        QCAL_RETURN_IF_ERROR(ReadExpert([&](LinearKind k) { return SharedExpertPrefix(b, k); },
                                        config_.shared_expert_intermediate_size, m.shared, types));
        QCAL_ASSIGN_OR_RETURN(m.shared_expert_gate,
                              ReadF32(SharedExpertGateWeightName(b), {1, d}, types));
      }
    }
    for (const auto& types : dtypes) hb.dtypes.insert(types.begin(), types.end());
    return hb;
  }

  // One expert's gate/up/down linears (`inter` wide), named by prefix_of(kind).
  absl::Status ReadExpert(const std::function<std::string(LinearKind)>& prefix_of, int64_t inter,
                          ExpertWeights& e, std::map<std::string, DType>* dtypes) const {
    const int64_t d = config_.hidden_size;
    QCAL_RETURN_IF_ERROR(
        ReadLinear(prefix_of(LinearKind::kGate), {inter, d, false}, e.gate, nullptr, dtypes));
    QCAL_RETURN_IF_ERROR(
        ReadLinear(prefix_of(LinearKind::kUp), {inter, d, false}, e.up, nullptr, dtypes));
    return ReadLinear(prefix_of(LinearKind::kDown), {d, inter, false}, e.down, nullptr, dtypes);
  }

  // Linear `prefix` into l, or, when `packed` is given and the checkpoint packs it
  // (LinearPackFn), into *packed with no dense weight (AcquireBlock places the packed one).
  absl::Status ReadLinear(const std::string& prefix, const LinearGeometry& g, Linear& l,
                          std::optional<kernels::AbqWeights>* packed,
                          std::map<std::string, DType>* dtypes) const {
    if (packed != nullptr && linear_pack_) {
      QCAL_ASSIGN_OR_RETURN(*packed, linear_pack_(*reader_, prefix, g.d_out, g.d_in));
      if (packed->has_value() && ((*packed)->n != g.d_out || (*packed)->k != g.d_in)) {
        return absl::InternalError(absl::StrCat(prefix, ": packed weights are [", (*packed)->n,
                                                ", ", (*packed)->k, "], expected [", g.d_out, ", ",
                                                g.d_in, "]"));
      }
    }
    if (packed != nullptr && packed->has_value()) {
      // No dense weight: the backend gets the packed one (AcquireBlock).
    } else if (linear_weight_) {
      QCAL_ASSIGN_OR_RETURN(l.weight, linear_weight_(*reader_, prefix, g.d_out, g.d_in));
      if (l.weight.shape() != Shape{g.d_out, g.d_in} || l.weight.dtype() != DType::kF32) {
        return absl::InternalError(
            absl::StrCat(prefix, ": weight loader returned ", l.weight.DebugString()));
      }
    } else {
      QCAL_ASSIGN_OR_RETURN(l.weight, ReadF32(prefix + ".weight", {g.d_out, g.d_in}, dtypes));
    }
    if (g.bias || reader_->Has(prefix + ".bias")) {
      QCAL_ASSIGN_OR_RETURN(l.bias, ReadF32(prefix + ".bias", {g.d_out}, dtypes));
    }
    return absl::OkStatus();
  }

  std::unique_ptr<CheckpointReader> reader_;
  const ModelConfig config_;
  kernels::Backend* backend_;
  const LinearWeightFn linear_weight_;
  const LinearPackFn linear_pack_;
  std::future<absl::StatusOr<HostBlock>> pending_;
  int pending_block_ = -1;
};

Model::Model() = default;
Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   kernels::Backend* backend,
                                                   const ModelLoadOptions& options) {
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  QCAL_ASSIGN_OR_RETURN(auto reader, CheckpointReader::Open(dir));
  // Blocks are read later, one at a time, but per-block state is sized now by config.json: a
  // num_hidden_layers the checkpoint does not have must be an error here, not a huge allocation.
  const std::string last_block =
      absl::StrCat("model.layers.", config.num_layers - 1, ".input_layernorm.weight");
  if (!reader->Has(last_block)) {
    return absl::InvalidArgumentError(absl::StrCat(
        (std::filesystem::path(dir) / "config.json").string(), ": num_hidden_layers is ",
        config.num_layers, " but the checkpoint has no tensor \"", last_block, "\""));
  }
  const int64_t d = config.hidden_size, v = config.vocab_size;
  auto model = std::unique_ptr<Model>(new Model());
  model->config_ = config;
  model->backend_ = backend;
  model->on_block_loaded_ = options.on_block_loaded;
  model->abq_kernel_ = options.abq_kernel;
  if (options.linear_pack && !backend->SupportsOp(kernels::Op::kAbqLinear)) {
    return absl::UnimplementedError(
        absl::StrCat("the ABQ kernels are not supported by the ", backend->name(), " backend"));
  }
  auto place_f32 = [&](const std::string& name, const Shape& shape) -> absl::StatusOr<Tensor> {
    QCAL_ASSIGN_OR_RETURN(Tensor stored, ReadFloat(*reader, name, shape));
    model->source_dtypes_[name] = stored.dtype();
    QCAL_ASSIGN_OR_RETURN(Tensor f32, stored.ToF32());
    return Place(*backend, f32);
  };
  // The embedding table stays on the host in its stored dtype; Embed gathers rows.
  QCAL_ASSIGN_OR_RETURN(model->embed_tokens_,
                        ReadFloat(*reader, "model.embed_tokens.weight", {v, d}));
  model->source_dtypes_["model.embed_tokens.weight"] = model->embed_tokens_.dtype();
  QCAL_ASSIGN_OR_RETURN(model->final_norm_, place_f32("model.norm.weight", {d}));
  if (config.tie_word_embeddings && !reader->Has("lm_head.weight")) {
    QCAL_ASSIGN_OR_RETURN(Tensor f32, model->embed_tokens_.ToF32());
    QCAL_ASSIGN_OR_RETURN(model->lm_head_, Place(*backend, f32));
  } else {
    QCAL_ASSIGN_OR_RETURN(model->lm_head_, place_f32("lm_head.weight", {v, d}));
  }
  model->blocks_.resize(config.num_layers);
  model->resident_.assign(config.num_layers, false);
  model->source_ = std::make_unique<BlockSource>(std::move(reader), config, backend,
                                                 options.linear_weight, options.linear_pack);
  if (options.residency == BlockResidency::kStreaming) {
    model->source_->Prefetch(0);
    return model;
  }
  for (int b = 0; b < config.num_layers; ++b) QCAL_RETURN_IF_ERROR(model->AcquireBlock(b));
  model->source_.reset();  // every block is resident: the checkpoint is not read again
  return model;
}

bool Model::resident(int b) const { return b >= 0 && b < num_blocks() && resident_[b]; }

absl::Status Model::AcquireBlock(int b, int next) {
  if (b < 0 || b >= num_blocks()) {
    return absl::OutOfRangeError(absl::StrCat("block ", b, " of a model with ", num_blocks()));
  }
  auto prefetch_next = [&] {
    if (next >= 0 && next < num_blocks() && !resident_[next]) source_->Prefetch(next);
  };
  if (resident_[b]) {
    if (source_) prefetch_next();
    return absl::OkStatus();
  }
  if (!source_) return absl::FailedPreconditionError(absl::StrCat("block ", b, " was released"));
  QCAL_ASSIGN_OR_RETURN(HostBlock hb, source_->Take(b));
  // Start the next read before the uploads: the reader thread and the copies overlap.
  prefetch_next();
  BlockWeights w;
  QCAL_ASSIGN_OR_RETURN(w.input_norm, Place(*backend_, hb.weights.input_norm));
  QCAL_ASSIGN_OR_RETURN(w.post_attention_norm, Place(*backend_, hb.weights.post_attention_norm));
  if (hb.weights.q_norm.defined()) {
    QCAL_ASSIGN_OR_RETURN(w.q_norm, Place(*backend_, hb.weights.q_norm));
    QCAL_ASSIGN_OR_RETURN(w.k_norm, Place(*backend_, hb.weights.k_norm));
  }
  // A linear's weight: its packed ABQ weights (`packed`, given for the seven block linears read
  // through LinearPackFn) prepared on the backend, else its dense weight.
  auto place_linear = [&](const Linear& h, Linear& out,
                          std::optional<kernels::AbqWeights>* packed) -> absl::Status {
    if (packed != nullptr && packed->has_value()) {
      QCAL_ASSIGN_OR_RETURN(out.abq, backend_->PrepareAbqLinear(**packed));
      out.abq_kernel = abq_kernel_;
      packed->reset();
    } else {
      if (!h.weight.defined()) return absl::OkStatus();
      QCAL_ASSIGN_OR_RETURN(out.weight, Place(*backend_, h.weight));
    }
    if (h.bias.defined()) {
      QCAL_ASSIGN_OR_RETURN(out.bias, Place(*backend_, h.bias));
    }
    return absl::OkStatus();
  };
  for (LinearKind k : kAllLinears) {
    QCAL_RETURN_IF_ERROR(place_linear(hb.weights.at(k), w.at(k), &hb.packed[static_cast<int>(k)]));
  }
  if (hb.weights.moe.defined()) {
    const MoeWeights& hm = hb.weights.moe;
    MoeWeights& m = w.moe;
    QCAL_ASSIGN_OR_RETURN(m.router, Place(*backend_, hm.router));
    m.experts.resize(hm.experts.size());
    auto place_expert = [&](const ExpertWeights& h, ExpertWeights& out) -> absl::Status {
      QCAL_RETURN_IF_ERROR(place_linear(h.gate, out.gate, nullptr));
      QCAL_RETURN_IF_ERROR(place_linear(h.up, out.up, nullptr));
      return place_linear(h.down, out.down, nullptr);
    };
    for (size_t j = 0; j < hm.experts.size(); ++j) {
      QCAL_RETURN_IF_ERROR(place_expert(hm.experts[j], m.experts[j]));
    }
    QCAL_RETURN_IF_ERROR(place_expert(hm.shared, m.shared));
    if (hm.shared_expert_gate.defined()) {
      QCAL_ASSIGN_OR_RETURN(m.shared_expert_gate, Place(*backend_, hm.shared_expert_gate));
    }
  }
  for (const auto& [name, dtype] : hb.dtypes) source_dtypes_[name] = dtype;
  hb = HostBlock();  // pinned buffers back to the pool before the hook allocates
  if (on_block_loaded_) QCAL_RETURN_IF_ERROR(on_block_loaded_(b, w));
  blocks_[b] = std::move(w);
  resident_[b] = true;
  return absl::OkStatus();
}

void Model::ReleaseBlock(int b) {
  if (!source_ || b < 0 || b >= num_blocks()) return;
  blocks_[b] = BlockWeights();
  resident_[b] = false;
  // The heap keeps freed memory for the per-op scratch tensors (common/tensor.cc). On a host
  // backend a block's activations and transient buffers (unpacked codes, conversions) of changing
  // sizes live there too: hand the pages they left behind back to the system, so the resident set
  // does not creep up block after block. (Not on a device backend: there the host heap holds
  // only same-sized per-block buffers, and re-faulting them would cost the GPU's time.)
  if (backend_->device() == Device::kHost) malloc_trim(0);
}

bool HasDenseLinear(const ModelConfig& config, int b, LinearKind kind) {
  return !config.IsMoeBlock(b) || static_cast<int>(kind) <= static_cast<int>(LinearKind::kO);
}

int64_t BlockBytesOf(const ModelConfig& config, int b) {
  const bool moe = config.IsMoeBlock(b);
  int64_t elements = 2 * config.hidden_size + (config.qk_norm ? 2 * config.head_dim : 0);
  for (LinearKind k : kAllLinears) {
    if (!HasDenseLinear(config, b, k)) continue;
    const LinearGeometry g = GeometryOf(config, k);
    elements += g.d_out * g.d_in + (g.bias ? g.d_out : 0);
  }
  if (moe) {
    const int64_t d = config.hidden_size;
    elements += int64_t{config.num_experts} * d * (1 + 3 * int64_t{config.moe_intermediate_size});
    if (config.shared_expert_intermediate_size > 0) {
      elements += d * (1 + 3 * int64_t{config.shared_expert_intermediate_size});
    }
  }
  return elements * static_cast<int64_t>(sizeof(float));
}

int64_t BlockBytesOf(const ModelConfig& config) {
  int64_t most = 0;
  for (int b = 0; b < config.num_layers; ++b) most = std::max(most, BlockBytesOf(config, b));
  return most;
}

BlockResidency ResidencyToFit(const ModelConfig& config, kernels::Backend& backend) {
  const int64_t available =
      backend.device() == Device::kHost ? AvailableHostMemoryBytes() : backend.AvailableMemory();
  if (available < 0) return BlockResidency::kAll;
  // The blocks, lm_head in fp32, and a quarter of what is left for activations and workspaces.
  int64_t need = int64_t{config.vocab_size} * config.hidden_size * 4;
  for (int b = 0; b < config.num_layers; ++b) need += BlockBytesOf(config, b);
  return need <= available / 4 * 3 ? BlockResidency::kAll : BlockResidency::kStreaming;
}

int64_t Model::BlockBytes() const { return BlockBytesOf(config_); }

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
  model->resident_.assign(blocks.size(), true);
  model->blocks_ = std::move(blocks);
  return model;
}
}  // namespace qcal::engine
