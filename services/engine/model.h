// The model as a sequence of transformer blocks, run one block at a time.
//
// Block weights live on the backend's device in fp32 (or, for ABQ inference, a quantized linear's
// packed bit planes: Linear::abq, ModelLoadOptions::linear_pack). Later stages feed calibration
// activations through one block at a time (BlockForward with a Tap to see every linear's input) and
// replace a block's linear weights in place.
//
// Residency (DESIGN section 2, "Memory"). A model loaded with BlockResidency::kAll holds every
// block; one loaded with kStreaming holds the embeddings, the final norm and lm_head, plus only the
// blocks in flight: AcquireBlock(b) makes block b resident (reading it from the checkpoint, one
// tensor at a time, unless the reader thread has already read it) and starts reading block b + 1
// on a reader thread while the caller computes; ReleaseBlock(b) frees it. The reader thread only
// reads and converts on the host (into pinned memory on device backends); uploads happen on the
// caller's thread, so the backend is used from one thread. The embedding table of a loaded model
// stays on the host in its stored dtype (a 128k × 8192 bf16 table is 2 GiB) and Embed gathers
// rows; lm_head lives on the device in fp32.
//
// Not thread-safe: one thread drives a Model.
#pragma once

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/safetensors.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/moe.h"

namespace qcal::engine {

// The seven linears of a block, in forward order.
enum class LinearKind { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLinears = 7;
inline constexpr std::array<LinearKind, kNumLinears> kAllLinears = {
    LinearKind::kQ,    LinearKind::kK,  LinearKind::kV,   LinearKind::kO,
    LinearKind::kGate, LinearKind::kUp, LinearKind::kDown};

// The distinct linear inputs of a block: q/k/v share one, gate/up share one.
enum class LinearInput { kQkv = 0, kO, kGateUp, kDown };
inline constexpr int kNumLinearInputs = 4;
inline constexpr std::array<LinearInput, kNumLinearInputs> kAllLinearInputs = {
    LinearInput::kQkv, LinearInput::kO, LinearInput::kGateUp, LinearInput::kDown};
// "qkv", "o", "gate_up", "down" (for errors).
const char* LinearInputName(LinearInput input);

// "q_proj", ..., "down_proj".
const char* LinearName(LinearKind kind);
// "self_attn" or "mlp".
const char* LinearModule(LinearKind kind);
// "model.layers.{block}.{self_attn|mlp}.{name}".
std::string LinearPrefix(int block, LinearKind kind);
LinearInput InputOf(LinearKind kind);
// The linears reading `input`, in forward order.
std::vector<LinearKind> ConsumersOf(LinearInput input);
// d_out and d_in of linear k of a block of `config`.
std::pair<int64_t, int64_t> LinearShape(const ModelConfig& config, LinearKind k);

// Which expert of an MoE block a linear belongs to (LinearId::expert): none (the attention linears
// and a dense block's MLP), Qwen2-MoE's shared expert, or a routed expert j >= 0.
inline constexpr int kNoExpert = -1;
inline constexpr int kSharedExpert = -2;

// One quantized linear of a block: its kind and, in an MoE block's MLP, its expert. A LinearKind
// converts to the dense linear of that kind.
struct LinearId {
  LinearKind kind = LinearKind::kQ;
  int expert = kNoExpert;
  LinearId() = default;
  LinearId(LinearKind k, int e = kNoExpert) : kind(k), expert(e) {}  // NOLINT(runtime/explicit)
  bool operator==(const LinearId&) const = default;
};
// The checkpoint prefix of linear `id` of block b: LinearPrefix(b, kind) for a dense linear,
// ExpertLinearPrefix or SharedExpertPrefix (moe.h) for an expert's.
std::string LinearPrefix(const ModelConfig& config, int block, LinearId id);
// d_out and d_in of linear `id` of block b.
std::pair<int64_t, int64_t> LinearShape(const ModelConfig& config, int block, LinearId id);
// The expert units of an MoE block, in the order the driver calibrates them: routed experts
// 0..E-1, then the shared expert when the model has one. 0 for a dense model.
int NumExpertUnits(const ModelConfig& config);
// The expert (j, or kSharedExpert) of unit u.
int ExpertOfUnit(const ModelConfig& config, int unit);
// The unit of expert j (j itself) or of kSharedExpert (num_experts); -1 for another value.
int ExpertUnitOf(const ModelConfig& config, int expert);
// Every quantized linear of block b, in the driver's order: q, k, v, o, then gate, up, down of a
// dense block, or of each expert unit in turn (NumExpertUnits) in an MoE block. The router and the
// shared expert gate are not quantized and not listed.
std::vector<LinearId> BlockLinears(const ModelConfig& config, int b);

// y = weight · ActQuant(x) + bias + lora_a · (lora_b · x): the (fake-)quantized weight branch sees
// the input quantized per token to `act_bits` (DESIGN section 3; 16 = off; Backend::ActQuantLinear,
// whose fp64 sums make it equal to the ABQ kernels bit for bit on a GPTQ checkpoint), the low-rank
// error reconstruction branch sees the unquantized input.
//
// ABQ inference (DESIGN section 3, "Arbitrary-bit inference kernels (ABQ)"): with `abq` set, the
// weight branch is Backend::AbqLinear of the packed quantized weights through `abq_kernel`, and
// there is no dense `weight`. The kernel quantizes its input itself (abq->spec().act_bits for b1
// and int8; a16 keeps it 16-bit): `act_bits` is not read. Bias and low-rank branch as above.
struct Linear {
  Tensor weight;  // [d_out, d_in]; undefined when `abq` is set
  Tensor bias;    // [d_out] or undefined
  Tensor lora_a;  // L_A [d_out, r], or undefined (no low-rank branch)
  Tensor lora_b;  // L_B [r, d_in], defined exactly when lora_a is
  int act_bits = 16;
  std::shared_ptr<const kernels::PreparedAbqLinear> abq;  // null: the dense path
  kernels::AbqKernel abq_kernel = kernels::AbqKernel::kBinaryMma;

  int64_t d_out() const { return abq ? abq->n() : weight.dim(0); }
  int64_t d_in() const { return abq ? abq->k() : weight.dim(1); }
};

// One expert's SwiGLU MLP, down(silu(gate(x)) * up(x)) (a routed expert or Qwen2-MoE's shared
// expert).
struct ExpertWeights {
  Linear gate, up, down;
  // gate, up or down for kind kGate, kUp or kDown.
  Linear& of(LinearKind kind);
  const Linear& of(LinearKind kind) const;
};

// The MLP of a mixture-of-experts block (ModelConfig::IsMoeBlock; moe.h): a router, the routed
// experts and, for Qwen2-MoE, a shared expert whose output is scaled per token by
// sigmoid(shared_expert_gate · x). The router and the shared expert gate stay in full precision.
struct MoeWeights {
  Tensor router;                       // [num_experts, hidden]
  std::vector<ExpertWeights> experts;  // num_experts
  ExpertWeights shared;                // weights defined only with a shared expert
  Tensor shared_expert_gate;           // [1, hidden], or undefined
  bool defined() const { return router.defined(); }
};

// What the smoothing fold (services/engine/aser/smoothing.h) may scale: input_norm and
// post_attention_norm (divided), the columns of every linear and the rows of v_proj and up_proj.
// q_norm and k_norm act on the q/k_proj outputs after the projection, so no fold scales through
// them and q/k_proj rows are never scaled: with them the fold stays exact.
struct BlockWeights {
  Tensor input_norm;           // [hidden]
  Tensor post_attention_norm;  // [hidden]
  // Qwen3 (ModelConfig::qk_norm): per-head RMSNorm weights of q and k [head_dim]; else undefined.
  Tensor q_norm, k_norm;
  // An MoE block leaves gate/up/down_proj undefined and holds its MLP in `moe`; a dense block
  // leaves `moe` empty.
  std::array<Linear, kNumLinears> linears;
  MoeWeights moe;
  Linear& at(LinearKind k) { return linears[static_cast<int>(k)]; }
  const Linear& at(LinearKind k) const { return linears[static_cast<int>(k)]; }
  // A dense linear, or an expert's (moe.experts[j] or moe.shared).
  Linear& at(LinearId id);
  const Linear& at(LinearId id) const;
};

// Where a batch of sequences sits: `batch` sequences of `seq_len` new tokens each, starting at
// position `offset` (non-zero only with a KV cache).
struct SeqShape {
  int batch = 1;
  int seq_len = 0;
  int offset = 0;
};

// Keys and values of every block for one sequence, for incremental decoding.
struct KvCache {
  int capacity = 0;
  int length = 0;            // tokens already cached
  std::vector<Tensor> k, v;  // per block: [capacity, kv_dim]
};

// A linear input in the two forms its linears read: x itself (fp32: activation quantization and
// the |x| statistics read it) and op, x as a GEMM operand (Model::MakeOperand: bf16 on a device
// backend computing in bf16, else x itself). x may be left undefined where no linear reads it.
struct LinearOperand {
  Tensor x;
  Tensor op;
};

// Called with each distinct linear input during BlockForward; may stop the forward early by
// returning a non-OK status of code kCancelled (see BlockForward).
using Tap = std::function<absl::Status(LinearInput input, const Tensor& x)>;

// Supplies a linear's fp32 host weight [d_out, d_in] from a checkpoint (e.g. by dequantizing GPTQ
// tensors). The default reads "<prefix>.weight".
using LinearWeightFn = std::function<absl::StatusOr<Tensor>(
    const CheckpointReader& reader, const std::string& prefix, int64_t d_out, int64_t d_in)>;

// Sees MoE block `b`'s routing of the rows of one BlockForward call.
using RoutingObserver = std::function<void(int b, const Routing& routing)>;

// Supplies a linear's packed ABQ weights from a checkpoint (e.g. by repacking its GPTQ tensors), or
// nullopt for a linear that the checkpoint keeps unquantized (read by LinearWeightFn instead).
using LinearPackFn = std::function<absl::StatusOr<std::optional<kernels::AbqWeights>>(
    const CheckpointReader& reader, const std::string& prefix, int64_t d_out, int64_t d_in)>;

// Where Load keeps the blocks.
enum class BlockResidency {
  kAll,        // every block on the backend from Load on
  kStreaming,  // only the blocks acquired and not yet released (plus one prefetched)
};

// Called with every block right after its weights are placed on the backend (streaming models:
// each time the block is loaded), e.g. to add an adapter's low-rank branches.
using BlockLoadedFn = std::function<absl::Status(int b, BlockWeights& weights)>;

// Whether block b has the dense linear `kind`: every block has q/k/v/o_proj; an MoE block
// (ModelConfig::IsMoeBlock) has no gate/up/down_proj.
bool HasDenseLinear(const ModelConfig& config, int b, LinearKind kind);
// Bytes of block b's weights in fp32 (the linears, biases and norms; an MoE block's router and
// every expert) for a model of `config`.
int64_t BlockBytesOf(const ModelConfig& config, int b);
// The largest BlockBytesOf(config, b) over the blocks: what one resident block may take.
int64_t BlockBytesOf(const ModelConfig& config);
// kAll when every block of `config` fits in the backend's memory with room to run (device memory
// for a device backend, the host's available memory otherwise), else kStreaming.
BlockResidency ResidencyToFit(const ModelConfig& config, kernels::Backend& backend);

struct ModelLoadOptions {
  // How the seven linears' weights are read (quantized checkpoints). Default: "<prefix>.weight".
  LinearWeightFn linear_weight;
  // ABQ inference: the linears this packs are placed with Backend::PrepareAbqLinear as they load
  // and run through abq_kernel (Linear::abq), holding no dense weight; the others are read by
  // linear_weight. Default: none (every linear dense).
  LinearPackFn linear_pack;
  kernels::AbqKernel abq_kernel = kernels::AbqKernel::kBinaryMma;
  // Runs after each block is loaded. Default: none.
  BlockLoadedFn on_block_loaded;
  // Default: kAll.
  BlockResidency residency = BlockResidency::kAll;
};

class Model {
 public:
  // Loads config.json, the embeddings, final norm and lm_head of a Hugging Face checkpoint
  // directory, and (kAll) every block. Tensors are read one at a time (pread; a file that changes
  // while it is read is an error naming it).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     kernels::Backend* backend,
                                                     const ModelLoadOptions& options = {});
  // A model from a config and already-built weights (synthetic models, tests); every block is
  // resident.
  static std::unique_ptr<Model> FromWeights(const ModelConfig& config, kernels::Backend* backend,
                                            Tensor embed_tokens, Tensor final_norm, Tensor lm_head,
                                            std::vector<BlockWeights> blocks);

  const ModelConfig& config() const { return config_; }
  kernels::Backend& backend() const { return *backend_; }
  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  // Block b's weights; defined only while it is resident.
  BlockWeights& block(int b) { return blocks_[b]; }
  const BlockWeights& block(int b) const { return blocks_[b]; }
  bool streaming() const { return source_ != nullptr; }
  bool resident(int b) const;
  // Makes block b resident (a no-op for a resident block) and, when streaming, starts reading
  // block b + 1 in the background. Errors name the file and tensor (a shard truncated or removed
  // while the job runs, a wrong shape); after one the model stays usable for other blocks.
  absl::Status AcquireBlock(int b) { return AcquireBlock(b, b + 1); }
  // The same, prefetching block `next` instead (none when it is out of range or resident): the
  // gradient pass walks the blocks backward.
  absl::Status AcquireBlock(int b, int next);
  // Frees block b's weights when streaming (a no-op for kAll models and FromWeights models).
  void ReleaseBlock(int b);
  // Bytes of the largest block's weights in fp32 on the backend (BlockBytesOf(config)).
  int64_t BlockBytes() const;
  // Called with every MoE block's routing during BlockForward (qcal eval --dump-routing); none
  // when unset. Default: unset.
  void set_routing_observer(RoutingObserver observer) { routing_observer_ = std::move(observer); }
  // The embedding table: on the host in the checkpoint's dtype (Load), or as given (FromWeights).
  const Tensor& embed_tokens() const { return embed_tokens_; }
  const Tensor& final_norm() const { return final_norm_; }
  const Tensor& lm_head() const { return lm_head_; }
  // The dtype a tensor had in the checkpoint Load read it from (kF32 for tensors it did not read
  // and models built FromWeights). Folded smoothing writes changed tensors back in this dtype.
  DType SourceDType(const std::string& name) const;

  ~Model();

  // hidden [ids.size(), hidden_size] = embedding rows of ids (fp32, on the backend).
  absl::StatusOr<Tensor> Embed(const std::vector<int>& ids);
  // Runs block b (which must be resident) in place on hidden [batch*seq_len, hidden_size]. With
  // `cache`, keys and values
  // are appended to it at shape.offset (batch must be 1). `tap`, when set, sees every distinct
  // linear input; when it returns kCancelled the forward stops there and OK is returned. In an MoE
  // block the tap sees kQkv, kO and kGateUp (the router's and the experts' common input), never
  // kDown (each expert has its own).
  absl::Status BlockForward(int b, Tensor& hidden, const SeqShape& shape, KvCache* cache = nullptr,
                            const Tap& tap = nullptr);
  // Block b in stages, for drivers that take statistics between sub-layers without re-running the
  // block from its start (the true-sequential quantization driver). In this order they compute
  // exactly what BlockForward computes (the same ops on the same values: bit-identical results):
  //   x = NormedInput(b, hidden, kQkv);    a = AttentionOutput(b, x, shape);
  //   AddProjection(b, kO, a, hidden);     x = NormedInput(b, hidden, kGateUp);
  //   m = MlpProduct(b, x);                AddProjection(b, kDown, m, hidden).
  // The RMS-normed hidden state: q/k/v's input (kQkv) or gate/up's (kGateUp).
  absl::StatusOr<Tensor> NormedInput(int b, const Tensor& hidden, LinearInput input);
  // o_proj's input [rows, q_dim]: attention over RoPE'd q, k, v of the q/k/v input x (no cache).
  absl::StatusOr<Tensor> AttentionOutput(int b, const Tensor& x, const SeqShape& shape);
  // The same for an input held as a LinearOperand (the staged driver keeps its statistics' input
  // this way; x may be missing where no q/k/v linear reads it, see ReadsInput).
  absl::StatusOr<Tensor> AttentionOutput(int b, const LinearOperand& x, const SeqShape& shape);
  // down_proj's input [rows, intermediate] = silu(gate_proj(x)) * up_proj(x). Not for an MoE
  // block (FailedPrecondition).
  absl::StatusOr<Tensor> MlpProduct(int b, const Tensor& x);
  absl::StatusOr<Tensor> MlpProduct(int b, const LinearOperand& x);
  // MoE block b, expert `expert` (j or kSharedExpert): its down_proj input silu(gate(x)) * up(x)
  // for rows x [n, hidden] (n >= 1), as AddMoeOutput computes it.
  absl::StatusOr<Tensor> ExpertProduct(int b, int expert, const Tensor& x);
  // Rows `rows` of x [n, d] gathered into a new [rows.size(), d] tensor (rows.size() >= 1), as
  // AddMoeOutput gathers an expert's tokens (Backend::Embedding with x as the table).
  absl::StatusOr<Tensor> GatherRows(const Tensor& x, const std::vector<int32_t>& rows);
  // MoE block b's routing of its MLP input x (NormedInput(b, hidden, kGateUp)): the router logits
  // computed on the backend and routed on the host (RouteTokens). DataLoss for non-finite logits.
  absl::StatusOr<Routing> Route(int b, const Tensor& x);
  // hidden += MoE block b's MLP output for x under `routing`: every expert with rows runs on its
  // rows (gathered), its output scaled by the routing weights and added into a zeroed [rows,
  // hidden] sum in increasing expert order (rows in order), then the gated shared expert, then
  // the sum is added to hidden. Deterministic: the same inputs give the same bits.
  absl::Status AddMoeOutput(int b, const Tensor& x, const Routing& routing, Tensor& hidden);
  // hidden += o_proj(input) (kind kO) or down_proj(input) (kind kDown), with the bias if any.
  absl::Status AddProjection(int b, LinearKind kind, const Tensor& input, Tensor& hidden);
  absl::Status AddProjection(int b, LinearKind kind, const LinearOperand& input, Tensor& hidden);
  // x with its GEMM operand (Operand(x)): what a driver keeps to feed a linear input to the
  // linears later without converting it again.
  absl::StatusOr<LinearOperand> MakeOperand(const Tensor& x);
  // NormedInput and MlpProduct as LinearOperands. Without `need_x`, where the operand is a bf16
  // copy, the norm (the SiLU product) writes the operand directly and x is left undefined: the
  // same values as MakeOperand of the fp32 result, without the fp32 tensor.
  absl::StatusOr<LinearOperand> NormedOperand(int b, const Tensor& hidden, LinearInput input,
                                              bool need_x);
  absl::StatusOr<LinearOperand> MlpOperand(int b, const LinearOperand& x, bool need_x);
  // Rounds the weights of block b's `kinds` linears (dense or activation-quantized; ABQ-packed ones
  // are left alone) to their GEMM operands once (Operand) and has the products read those until
  // ReleaseWeightOperands: for a driver's loop over chunks
  // that applies the same weights to each (the same values as rounding at every product). A held
  // operand is used only while its linear's weight is the tensor it was made from; the driver
  // must not change a held weight in place.
  absl::Status HoldWeightOperands(int b, std::initializer_list<LinearKind> kinds);
  void ReleaseWeightOperands();

  // logits [rows, vocab] = lm_head(norm(hidden)).
  absl::StatusOr<Tensor> Logits(const Tensor& hidden);
  // A cache for one sequence of up to `capacity` tokens.
  absl::StatusOr<KvCache> NewCache(int capacity);

 private:
  class BlockSource;
  Model();
  // The joined operand [x | t] that the linears of one input share (q/k/v, gate/up; ApplyJoined):
  // its x columns are x_op's (act_bits 16) or, for activation-quantized linears, the bf16
  // ActQuant(x, act_bits); the first linear that joins writes them, the others with the same
  // act_bits reuse them and write only their own t.
  struct JoinedOperand {
    Tensor xt;
    int act_bits = 16;
  };
  // y (+)= l applied to x: the weight branch (with its activation quantization and bias), then
  // the low-rank branch added. x_op is x as a GEMM operand (Operand), shared by the products that
  // read x; the overload without it makes one where two products of l share x (a low-rank branch).
  // `joined`, when given, is the joined operand of an earlier linear of the same input (empty
  // before the first).
  absl::Status ApplyLinear(const Linear& l, const Tensor& x, const Tensor& x_op, Tensor& y,
                           bool accumulate, JoinedOperand* joined = nullptr);
  absl::Status ApplyLinear(const Linear& l, const Tensor& x, Tensor& y, bool accumulate);
  // Whether l's weight and low-rank branches may run as one product, y = [x̂ | t]·[W | L_A]ᵀ with
  // t = x·L_Bᵀ (ApplyJoined), on a device computing in bf16, for a low-rank branch beside a weight
  // branch without an ABQ kernel. x̂ is x's bf16 operand, or with activation quantization the bf16
  // ActQuant(x) that the weight branch reads (the low-rank branch still reads the unquantized x:
  // DESIGN section 3). Without activation quantization only where writing y once instead of adding
  // the branch into it saves more than copying x costs (d_in < 2·d_out: fp32 y read and written
  // against bf16 x copied); with it always, since the quantization pass writes x̂ anyway.
  // ApplyLinear joins them when also its bf16 operand's rows outnumber the weight's columns (so
  // that joining the weight, when no held one is joined already, stays small beside them). The
  // operands are rounded as the two products round them (x̂, t, W and L_A to bf16); only the fp32
  // summation order differs.
  bool JoinsLowRank(const Linear& l) const;
  absl::Status ApplyJoined(const Linear& l, const Tensor& x, const Tensor& x_op, const Tensor* bias,
                           Tensor& y, bool accumulate, JoinedOperand* joined);
  // y [rows, d_out] = linear `kind` of block b applied to x (bias included); x_op and joined as
  // ApplyLinear's (the linears of one input share a joined operand: q/k/v, gate/up).
  absl::StatusOr<Tensor> Project(int b, LinearKind kind, const Tensor& x, const Tensor& x_op,
                                 JoinedOperand* joined = nullptr);
  // Whether a GEMM of l reads x as an operand (its low-rank branch, or its weight branch without
  // an ABQ kernel or activation quantization): then an Operand of x shared by several products
  // saves conversions.
  bool ReadsOperand(const Linear& l) const;
  // Whether l reads x itself rather than its operand: its weight branch quantizes activations (an
  // ABQ kernel or activation quantization).
  bool ReadsInput(const Linear& l) const;
  // NormedInput written as `dtype` (F32, or BF16 on the CUDA backend).
  absl::StatusOr<Tensor> Normed(int b, const Tensor& hidden, LinearInput input, DType dtype);
  // Whether Operand makes a bf16 copy (a device backend computing in bf16).
  bool OperandsAreBf16() const;
  // t as a GEMM operand: on a device backend computing in bf16, a BF16 copy (the rounding the
  // backend's GEMMs would make, once instead of once a product: the same values); else t itself.
  absl::StatusOr<Tensor> Operand(const Tensor& t);
  // x as the operand of `linears`, which all read x: Operand(x) where one of them reads it as a
  // GEMM operand (ReadsOperand), else x.
  absl::StatusOr<Tensor> SharedOperand(std::initializer_list<const Linear*> linears,
                                       const Tensor& x);
  // gate_proj(x) and up_proj(x) of dense block b (fp32).
  absl::StatusOr<std::pair<Tensor, Tensor>> GateUp(int b, const LinearOperand& x);
  // silu(e.gate(x)) * e.up(x), and y [rows, hidden] = e.down of it.
  absl::StatusOr<Tensor> ExpertMlpProduct(const ExpertWeights& e, const Tensor& x);
  absl::StatusOr<Tensor> ExpertForward(const ExpertWeights& e, const Tensor& x);
  // Attention of block b for the q/k/v input x, appending keys and values to `cache` when given.
  // x.op, when defined, is the q/k/v products' operand (else made from x.x).
  absl::StatusOr<Tensor> Attend(int b, const LinearOperand& x, const SeqShape& shape,
                                KvCache* cache);

  ModelConfig config_;
  kernels::Backend* backend_ = nullptr;
  Tensor embed_tokens_, final_norm_, lm_head_;
  std::vector<BlockWeights> blocks_;
  std::vector<bool> resident_;
  std::map<std::string, DType> source_dtypes_;
  std::unique_ptr<BlockSource> source_;  // streaming models only
  BlockLoadedFn on_block_loaded_;
  RoutingObserver routing_observer_;

  kernels::AbqKernel abq_kernel_ = kernels::AbqKernel::kBinaryMma;  // for packed linears

  // Weight operands held by HoldWeightOperands: the linear, the weight they were made from, the
  // operand.
  // A held weight operand; for a linear whose low-rank branch may join the weight's product
  // (JoinsLowRank), also [op | L_A] in bf16 (joined, made for lora_a), so that the chunks of a
  // pass do not each join it again.
  struct HeldWeight {
    const Linear* linear;
    Tensor weight;
    Tensor op;
    Tensor lora_a;
    Tensor joined;
  };
  std::vector<HeldWeight> held_weights_;
  // The held entry of l's current weight, or null.
  const HeldWeight* HeldOf(const Linear& l) const;
  // l's weight as its products read it: a held operand of it, else the weight.
  const Tensor& WeightOperand(const Linear& l) const;
};

}  // namespace qcal::engine
