// The quantization benchmark behind `qcal bench` (DESIGN section 9): GPTQ of a synthetic
// Llama-architecture model of a published shape, timed per stage, with the FLOPs it does and how
// far it is from the performance model's floors.
//
// Nothing is read from disk: the model's weights are drawn on the backend's device
// (Backend::FillUniform, a block at a time just before the block is quantized, and freed after),
// and the calibration tokens are random. The quantization itself is the real driver
// (EmbedCalibration, then QuantizeBlock per block) with the given recipe, so the numbers are those
// of `qcal quantize` less the disk I/O, the tokenizer and the export. With fewer blocks than the
// model has, the whole-model time is extrapolated from the blocks run (leaving out the first,
// which pays library and memory-pool warm-up, when more than one ran), and the result says so.
//
// Mixture-of-experts shapes (`--shape mixtral-8x7b|qwen3-30b-a3b`, issue 17): the same driver runs
// an MoE block as a job does (docs/MOE.md: routing per chunk, per-expert Hessians over the routed
// rows, the moe.min_tokens fallback); the router is drawn like every other linear, and the result
// counts the experts that fell back and the routed tokens per expert.
//
// Output-adaptive recipes (hessian != layer; `qcal bench --recipe docs/recipes/oac.yaml`): every
// block is drawn first, the gradient pass runs over the whole full-precision model (all blocks,
// whatever `blocks` says: the pass cannot be cut short) with its statistics in device memory when
// the pass can plan room for them (else page-locked host memory), then the blocks are quantized
// with them. A job persists them to its scratch directory instead (disk I/O, left out here). The
// whole-job time is the pass plus the (extrapolated) blocks; the same recipe with hessian layer
// (GPTQ alone) then runs on the same weights and tokens for comparison.
//
// RunErBench (`qcal bench --er`) times the device error-reconstruction ops on the 7B shape's
// linears instead, and projects their whole-model cost. RunDecodeBench (`qcal bench --decode`)
// times greedy decoding with a KV cache through the dense path and the ABQ kernels.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "kernels/backend.h"
#include "services/engine/bench_shapes.h"
#include "services/engine/oac/gradient_pass.h"
#include "services/engine/quantize.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

struct BenchOptions {
  // The model (its num_layers blocks). Required.
  ModelConfig config;
  // Calibration samples and their length in tokens (BOS first). Default: 128 x 2048.
  int samples = 128;
  int seq_len = 2048;
  // Blocks to quantize; 0 = all. With fewer than the model has, the total is extrapolated.
  // Default: 0.
  int blocks = 0;
  // Seed of the weights and tokens. Default: 0.
  uint64_t seed = 0;
  // With a retraining recipe: time the parts of every training step (RetrainOptions::profile).
  // The breakdown synchronizes the device several times a step, so the block times it reports
  // include the kernel launches the synchronizations expose. Default: off.
  bool retrain_profile = false;
  // With a retraining recipe: the training step of every block bracketed for a profiler
  // (RetrainOptions::profiler_step). Default: -1, none.
  int64_t retrain_profiler_step = -1;
  // Default: GPTQ W4 g128 with the recipe defaults (damp 0.01, block 128, true-sequential).
  Recipe recipe = DefaultRecipe();

  static Recipe DefaultRecipe();
  // InvalidArgument naming the field: a config without layers or heads, samples or seq_len < 1,
  // blocks < 0, an invalid recipe.
  absl::Status Validate() const;
};

struct BenchResult {
  std::string device_kind;  // Backend::DeviceKind()
  int blocks_run = 0;
  int blocks_total = 0;
  bool extrapolated = false;  // model_seconds is extrapolated from blocks_run blocks
  double setup_seconds = 0;   // drawing weights and tokens (not counted below)
  double embed_seconds = 0;   // embedding the calibration tokens
  StageTimes times;           // summed over the blocks run
  std::vector<double> block_seconds;
  double measured_seconds = 0;  // embedding plus the blocks run
  double model_seconds = 0;     // the whole model: measured, or extrapolated
  BenchFlops flops;             // of the whole model
  double tflops = 0;            // flops.total() / model_seconds, in TFLOP/s
  double mean_rel_error = 0;    // over the layers quantized
  double mean_rel_error_rtn = 0;
  // With error reconstruction: the mean error after it (rel_error where a layer has none), the
  // mean rank, and the parameters of the low-rank branches and of the quantized weights.
  double mean_rel_error_er = 0;
  double mean_rank = 0;
  double extra_params = 0;
  double base_params = 0;
  // The least Backend::AvailableMemory() seen after a block (-1 on host backends).
  int64_t min_available_bytes = -1;
  // Output-adaptive recipes: the gradient pass (its seconds are part of model_seconds), and the
  // whole-model seconds of the same recipe with hessian layer (GPTQ alone); 0 otherwise.
  bool has_gradient_pass = false;
  GradientPassStats gradient_pass;
  bool oac_on_device = false;  // the statistics were kept in device memory (else host)
  double layer_model_seconds = 0;
  // MoE models, over the routed experts of the blocks run: the recipe's moe.min_tokens, the experts
  // calibrated on every token because fewer than min_tokens were routed to them (docs/MOE.md), and
  // the routed calibration tokens per expert (-1 without experts) and in all.
  int moe_min_tokens = 0;
  int fallback_experts = 0;
  int64_t min_routed_tokens = -1;
  int64_t max_routed_tokens = -1;
  int64_t routed_tokens = 0;
};

// Progress lines for humans.
using BenchLogFn = std::function<void(const std::string& line)>;

// Runs the benchmark on `backend`.
absl::StatusOr<BenchResult> RunBench(kernels::Backend& backend, const BenchOptions& options,
                                     const BenchLogFn& log = nullptr);

// The error-reconstruction benchmark behind `qcal bench --er` (DESIGN section 3, "Error
// reconstruction (ASER)"): for each layer shape, W drawn on the device (uniform, standard deviation
// 1/sqrt(d_in)), Ŵ its RTN W4 g128 (Backend::QuantizeRtn), G = XᵀX for X of random tokens with
// correlated channels (8 shared latent factors plus independent noise, Backend::AccumulateGram),
// then Backend::CholeskyWhitening and Backend::ReconstructError with both SVD methods, each timed
// as the median of `runs` runs after one warm-up run. Needs a backend with the device solver ops
// (SupportsSolverOp(kQuantizeRtn) and (kErrorReconstruction)); others get Unimplemented.
struct ErBenchOptions {
  // Layer shapes (d_out, d_in). Default: the 7B shape's three: 4096 x 4096 (q, k, v, o),
  // 11008 x 4096 (gate, up), 4096 x 11008 (down).
  std::vector<std::pair<int64_t, int64_t>> shapes = {{4096, 4096}, {11008, 4096}, {4096, 11008}};
  // The correction's rank, >= 1. Default: 64.
  int rank = 64;
  // Randomized SVD: sketch oversampling >= 0 and power iterations >= 0. Default: 16 and 2.
  int oversample = 16;
  int power_iterations = 2;
  // Rows of X (calibration tokens), >= 1. Default: 2048.
  int tokens = 2048;
  // Whitening damping λ (δ = λ·mean(diag G)), >= 0. Default: 0.01.
  double damp = 0.01;
  // Timed runs of each op after the warm-up, >= 1. Default: 3.
  int runs = 3;
  // Seed of W, X and the randomized SVD's test matrix. Default: 0.
  uint64_t seed = 0;

  // InvalidArgument naming the field.
  absl::Status Validate() const;
};

struct ErBenchLayer {
  int64_t d_out = 0;
  int64_t d_in = 0;
  // Medians over the timed runs, in seconds, each ending with the backend synchronized.
  double whitening_seconds = 0;   // CholeskyWhitening of the [d_in, d_in] Gram matrix
  double full_seconds = 0;        // ReconstructError, SvdMethod::kFull
  double randomized_seconds = 0;  // ReconstructError, SvdMethod::kRandomized
  // ‖E·S‖_F, and the whitened error left by each method's rank-r correction.
  double error_before = 0;
  double error_after_full = 0;
  double error_after_randomized = 0;
};

// The whole-model cost of error reconstruction with the randomized SVD for the 7B shape (32
// blocks; per block q, k, v, o 4096 x 4096, gate, up 11008 x 4096 and down 4096 x 11008, and four
// whitening factors: the inputs of q/k/v, o and gate/up are 4096 wide, down's is 11008), projected
// from the per-layer medians. Absent (blocks == 0) unless the three 7B shapes were measured.
struct ErProjection {
  int blocks = 0;
  double randomized_seconds = 0;  // ReconstructError of the 224 linears
  double whitening_seconds = 0;   // CholeskyWhitening of the 128 inputs
  double full_seconds = 0;        // the same linears with SvdMethod::kFull, for comparison
};

struct ErBenchResult {
  std::string device_kind;  // Backend::DeviceKind()
  std::vector<ErBenchLayer> layers;
  ErProjection projection_7b;
};

// Runs the error-reconstruction benchmark on `backend`.
absl::StatusOr<ErBenchResult> RunErBench(kernels::Backend& backend, const ErBenchOptions& options,
                                         const BenchLogFn& log = nullptr);

// The decode benchmark behind `qcal bench --decode` (DESIGN section 3, "Arbitrary-bit inference
// kernels (ABQ)"): tokens per second of greedy decoding with a KV cache (GenerateGreedy, batch 1)
// on a synthetic model of `config` whose weights are drawn as RunBench draws them, in these
// configurations, one model resident at a time:
//   bf16   every linear dense (Backend::Linear). On a CUDA backend with bf16 compute the weights
//          are stored in bf16 (cuBLAS reads 2 bytes a weight: the engine's bf16 baseline);
//          otherwise in fp32.
//   W4A16  every block linear RTN W4 (group `group_size`) and run by the a16 kernel;
//   W4A8   the same planes (not placed again) through the b1 kernel, then the int8 kernel;
//   W2*A8  RTN on the balanced grid (three planes) through b1, then int8.
// The quantized configurations hold only their packed planes, scales and zeros on the device
// (each linear is drawn, quantized on the backend and packed, then its dense copy is freed).
// Embeddings, lm_head, norms and attention are the same dense ops in every configuration (lm_head
// in the dense linears' dtype). The prompt is `prompt` random tokens; a run of 1 generated token
// (the prompt's prefill and the first step) is timed and subtracted from a run of tokens + 1, so
// the rate is that of the steps alone; both follow a warm-up run. Each configuration's generated
// ids are kept: b1 and int8 compute the same integers, so their tokens must agree. Needs
// SupportsOp(kAbqLinear) and SupportsSolverOp(kQuantizeRtn).
struct DecodeBenchOptions {
  // The model. Required.
  ModelConfig config;
  // Prompt tokens (prefilled, not counted). Default: 16.
  int prompt = 16;
  // Decode steps timed. Default: 64.
  int tokens = 64;
  // Weight group size of the quantized configurations (-1 or a multiple of 32). Default: 128.
  int group_size = 128;
  // Seed of the weights and the prompt. Default: 0.
  uint64_t seed = 0;

  // InvalidArgument naming the field: a config without layers or heads, prompt or tokens < 1, a
  // group size the ABQ kernels do not take.
  absl::Status Validate() const;
};

struct DecodeBenchRow {
  std::string config;  // "bf16", "W4A16", "W4A8" or "W2*A8"
  std::string kernel;  // "dense" (Backend::Linear), "a16", "b1" or "int8"
  double seconds = 0;  // the `tokens` decode steps
  double tokens_per_second = 0;
  // Bytes of the block linears' weights on the device (dense tensors, or planes + s_w + z), and
  // all device memory in use when the model was built (Backend::MemoryInUse; -1 when the backend
  // does not account it).
  int64_t weight_bytes = 0;
  int64_t device_bytes = -1;
  std::vector<int> generated;  // the ids of the timed run
};

struct DecodeBenchResult {
  std::string device_kind;  // Backend::DeviceKind()
  std::string dense_dtype;  // "bf16" or "f32": how the dense configuration stores its weights
  std::vector<DecodeBenchRow> rows;
};

absl::StatusOr<DecodeBenchResult> RunDecodeBench(kernels::Backend& backend,
                                                 const DecodeBenchOptions& options,
                                                 const BenchLogFn& log = nullptr);

}  // namespace qcal::engine
