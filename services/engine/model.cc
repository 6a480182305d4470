#include "services/engine/model.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <future>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/memory_usage.h"
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

// Converts a host tensor of dtype F32, F16 or BF16 into the F32 host tensor `dst` (same count).
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

// Places a host tensor on the backend (a no-op for a host backend).
absl::StatusOr<Tensor> Place(kernels::Backend& be, const Tensor& host) {
  if (host.device() == be.device()) return host;
  return be.ToDevice(host);
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

absl::Status Model::ApplyLinear(const Linear& l, const Tensor& x, Tensor& y, bool accumulate) {
  kernels::Backend& be = *backend_;
  const Tensor* bias = l.bias.defined() ? &l.bias : nullptr;
  if (l.abq) {
    QCAL_RETURN_IF_ERROR(be.AbqLinear(*l.abq, l.abq_kernel, x, bias, y, accumulate));
  } else if (l.act_bits < 16) {
    QCAL_RETURN_IF_ERROR(be.ActQuantLinear(x, l.act_bits, l.weight, bias, y, accumulate));
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
  QCAL_ASSIGN_OR_RETURN(Tensor y, backend_->Alloc(DType::kF32, {x.dim(0), l.d_out()}));
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
  const BlockWeights& w = blocks_[b];
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
  QCAL_RETURN_IF_ERROR(be.Rope(q, rope));
  QCAL_RETURN_IF_ERROR(be.Rope(k, rope));
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
  QCAL_ASSIGN_OR_RETURN(Tensor attn, be.Alloc(DType::kF32, {rows, config_.q_dim()}));
  QCAL_RETURN_IF_ERROR(be.Attention(q, keys, values, as, attn));
  return attn;
}

absl::StatusOr<Tensor> Model::AttentionOutput(int b, const Tensor& x, const SeqShape& shape) {
  return Attend(b, x, shape, nullptr);
}

absl::StatusOr<Tensor> Model::MlpProduct(int b, const Tensor& x) {
  if (blocks_[b].moe.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("MlpProduct: block ", b, " is a mixture-of-experts block"));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor gate, Project(b, LinearKind::kGate, x));
  QCAL_ASSIGN_OR_RETURN(Tensor up, Project(b, LinearKind::kUp, x));
  QCAL_RETURN_IF_ERROR(backend_->SiluMul(gate, up, gate));
  return gate;
}

absl::StatusOr<Tensor> Model::ExpertMlpProduct(const ExpertWeights& e, const Tensor& x) {
  kernels::Backend& be = *backend_;
  const int64_t rows = x.dim(0);
  QCAL_ASSIGN_OR_RETURN(Tensor gate, be.Alloc(DType::kF32, {rows, e.gate.weight.dim(0)}));
  QCAL_ASSIGN_OR_RETURN(Tensor up, be.Alloc(DType::kF32, {rows, e.up.weight.dim(0)}));
  QCAL_RETURN_IF_ERROR(ApplyLinear(e.gate, x, gate, false));
  QCAL_RETURN_IF_ERROR(ApplyLinear(e.up, x, up, false));
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
  QCAL_ASSIGN_OR_RETURN(Tensor attn, Attend(b, h, shape, cache));
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
