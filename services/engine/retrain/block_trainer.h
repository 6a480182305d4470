// Block retraining (DESIGN section 3, "Retraining (ApiQ and saliency-aware)"; section 2, step
// 3.4): after a block is quantized, train its LoRA factors and its learnable clipping so that the
// quantized block reproduces the full-precision block. The job's block loop calls it through
// BlockRunner::TrainBlock (services/engine/driver/block_retrain.cc).
//
// Trained per linear (all seven): L_A [d_out, r] and L_B [r, d_in] (the effective weight is
// Q(W̃) + L_A·L_B, as inference computes Q(W)x + L_A(L_B x); PEFT's lora_B and lora_A, with
// α/r = 1, i.e. α/r already folded), and clipping logits γ (max) and β (min) per row and group
// (services/engine/retrain/clipped_quant.h), all starting at RetrainOptions::initial_clip_logit.
// Frozen: W̃ (the solver's pre-rounding values; W itself for RTN), norms, biases, and the
// activation quantization of the block as installed.
//
// Starting LoRA: the given factors (error reconstruction's) when a linear has them, else L_B
// uniform in [−1/√d_in, 1/√d_in) (PEFT's default for lora_A, kaiming-uniform with a = √5), drawn
// as kernels::HashUniform(HashBits(seed, l), i, ...) for element i of linear l (0..6 in forward
// order) — the same bits on every backend — and L_A = 0. The rank is clamped to min(d_out, d_in).
//
// Loss of one step on sample n (batch 1 sample, as ApiQ):
//   c_out·MSE(target_n, Block_q(x_n)) + c_reg·λ·Σ_l Σ_ij F_ij (Weff_ij − W_ij)²
// with MSE the mean over the sample's rows·hidden elements, Weff = Q(W̃; γ, β) + L_A·L_B, W the
// full-precision weight in the quantized block's coordinates (smoothing folded), F the Fisher or
// 1. Stages, in order: weight (c_out, c_reg) = (0, 1), mixed (1, 1), output (1, 0). A term whose
// coefficient (c_out, or c_reg·λ) is 0 is not computed at all: it adds nothing, so λ = 0 with only
// the output stage is ApiQ bit for bit, whatever F is.
//
// Gradients: the quantized block is recomputed forward per sample (the same ops as
// Model::BlockForward, on the backend) and differentiated with the backend's backward ops; the
// rounding of the base and of the activations passes gradients straight through (the weight
// branch's ∂/∂x through ActQuant is the identity). The fake quantizer, its STE backward, AdamW
// and the two loss terms are backend ops too (Backend::ClippedFakeQuant, ClippedFakeQuantBackward,
// AdamWStep, SquaredError, WeightedSquaredError): parameters, moments and gradients stay on the
// backend's device for the whole training; per step only the loss sums (two doubles per term)
// come back to the host. The inputs are uploaded once (Create), the results downloaded once
// (Finish). A step with only the output term takes the LoRA gradients from the rank-r
// intermediates, ∂L_A = dyᵀ·(x·L_Bᵀ) and ∂L_B = (dy·L_A)ᵀ·x (G·L_Bᵀ and L_Aᵀ·G otherwise). On a
// device backend computing in bf16 the GEMM operands (Q(W̃) included, written in bf16 by the fake
// quantizer) are converted once a step and shared by the products that take them: the values the
// backend's own conversion would give.
//
// Optimizer: AdamW (adamw.h), lr_lora for the LoRA factors and lr_clip for the logits, the same
// decoupled weight decay for both (as ApiQ's AdamW parameter groups). Each stage that trains
// starts a fresh optimizer: its moments at zero and its step count (bias correction) at 1; the
// parameters carry over. Carrying the moments across stages throttled the output stage after a
// Fisher-weighted weight stage, whose regularizer gradients are orders of magnitude larger than
// the output MSE's (docs/QUALITY.md, "Block retraining"). A recipe with one training stage (ApiQ)
// is unaffected. Sample order: epoch e (0-based, counted across
// stages) visits the samples in RetrainSampleOrder(seed, e, N).
//
// Not thread-safe: one thread drives a trainer, and the backend is used from that thread.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/model.h"
#include "services/engine/recipe.h"
#include "services/engine/retrain/adamw.h"
#include "services/engine/retrain/clipped_quant.h"

namespace qcal::engine {

enum class RetrainStage { kWeight = 0, kMixed, kOutput };
inline constexpr std::array<RetrainStage, 3> kRetrainStages = {
    RetrainStage::kWeight, RetrainStage::kMixed, RetrainStage::kOutput};
// "weight", "mixed", "output" (the recipe's retrain.epochs keys).
const char* RetrainStageName(RetrainStage stage);

// The loss coefficients of one step.
struct LossCoefficients {
  double c_out = 1;  // weight of the output MSE
  double c_reg = 0;  // weight of λ·Σ F (Weff − W)²
};
// (0, 1), (1, 1) and (1, 0).
LossCoefficients CoefficientsOf(RetrainStage stage);

struct RetrainOptions {
  // Epochs per stage; at least one > 0. Default: 0 / 0 / 20.
  RetrainEpochs epochs;
  // λ, >= 0. Default: 0.1.
  double lambda = 0.1;
  // AdamW learning rates (> 0) and decoupled weight decay (>= 0). Defaults: 5e-4, 5e-3, 0.1.
  double lr_lora = 5.0e-4;
  double lr_clip = 5.0e-3;
  double weight_decay = 0.1;
  // LoRA rank of a linear without starting factors, >= 1. Default: 64.
  int rank = 64;
  // Seeds the random LoRA start and the sample order. Default: 0.
  uint64_t seed = 0;
  // γ and β at the start (σ(4) ≈ 0.982 of the range). Default: 4.
  float initial_clip_logit = 4.0f;
  // Time the parts of every step (RetrainResult::seconds), synchronizing the backend after each
  // part: for benchmarks, which pay a few synchronizations a step for the breakdown. Default: off.
  bool profile = false;
  // Brackets training step `profiler_step` (0-based, counted over the trainer's whole training)
  // with Backend::ProfilerRange, for a profiler that captures only marked ranges. Default: -1,
  // none.
  int64_t profiler_step = -1;
  // OK when every field is in range; otherwise InvalidArgument naming the recipe key.
  absl::Status Validate() const;
};
// The recipe's retrain section with the job's seed (rank: retrain.rank or its default).
RetrainOptions RetrainOptionsOf(const RetrainRecipe& recipe, uint64_t seed);

// One linear's inputs. Host F32 tensors.
struct RetrainLinearInput {
  Tensor base;       // W̃ [d_out, d_in]: the frozen base, fake-quantized every step
  Tensor reference;  // W [d_out, d_in]: what the regularizer pulls Weff toward
  Tensor fisher;     // F [d_out, d_in], or undefined: F = 1 (ApiQ)
  Tensor lora_a;     // starting L_A [d_out, r], or undefined (random start, see above)
  Tensor lora_b;     // starting L_B [r, d_in]; defined exactly when lora_a is
  // Act-order's visiting order (groups are runs of it, as GPTQ forms them); empty: none.
  std::vector<int32_t> perm;
  // The solver's grid (QuantizedLinear::scales and zeros, [n_groups, d_out]), whose span the
  // clipping scales (ClipLayout::grid_scales: unclipped, Q(W̃) is then exactly the solver's
  // codes); empty: the span of W̃'s own min/max (RTN's fit of W̃).
  std::vector<float> grid_scales;
  std::vector<int32_t> grid_zeros;
};

struct RetrainBlockInput {
  // The quantized block as installed (on the backend): its norms, biases and act_bits are used;
  // its linears' weight and low-rank tensors are not (the trainer supplies Weff). Must outlive
  // the trainer.
  const BlockWeights* block = nullptr;
  std::array<RetrainLinearInput, kNumLinears> linears;
  // Per sample, on the backend: the quantized path's block input x_n and the full-precision
  // block's output Block_fp(x_fp,n), each [seq_len_n, hidden].
  std::vector<Tensor> inputs;
  std::vector<Tensor> targets;
};

// A linear's trainable tensors (F32, on the backend's device), or their gradients.
struct RetrainParams {
  Tensor lora_a;  // [d_out, r]
  Tensor lora_b;  // [r, d_in]
  Tensor gamma;   // [d_out, n_groups]: clip of the max, σ(γ)
  Tensor beta;    // [d_out, n_groups]: clip of the min, σ(β)
};

// The terms of one step's loss (before the update).
struct StepLoss {
  double output_mse = 0;   // MSE(target, Block_q(x)); 0 when c_out = 0 (not computed)
  double regularizer = 0;  // Σ_l Σ_ij F_ij (Weff − W)²; 0 when c_reg·λ = 0 (not computed)
  double loss = 0;         // c_out·output_mse + c_reg·λ·regularizer
};

// Where training's time goes, summed over its steps (RetrainOptions::profile).
struct RetrainSeconds {
  double weights = 0;      // fake-quantizing the frozen bases, Q(W̃; γ, β)
  double forward = 0;      // the quantized block and the output loss
  double backward = 0;     // back through the block into the weight gradients
  double regularizer = 0;  // the Fisher-weighted term
  double params = 0;       // the LoRA and clipping gradients from the weight gradients
  double optimizer = 0;    // AdamW
  // Parts of the above (with RetrainOptions::profile): the weight-gradient products dyᵀ·x inside
  // `backward`, the clipping factors' STE sums inside `params`, and the attention kernels inside
  // `forward` and `backward`.
  double weight_grads = 0;
  double clip_grads = 0;
  double attention_forward = 0;
  double attention_backward = 0;
  // Outside the steps (RetrainBlock always times these; BlockRunner::TrainBlock the last two):
  double setup = 0;    // checking and uploading the bases, references, grids and parameters
  double mse = 0;      // the output MSE over every sample before and after training
  double finish = 0;   // the trained parameters back, codes re-rounded on the clipped grid
  double gather = 0;   // the samples' inputs and targets onto the device
  double install = 0;  // installing the retrained linears, the push and their output errors
};

// Means over one epoch's steps.
struct EpochLoss {
  RetrainStage stage = RetrainStage::kOutput;
  int epoch = 0;  // within the stage
  StepLoss mean;
};

// A trained linear, ready to install and export.
struct RetrainedLinear {
  kernels::QuantizedLinear quantized;  // W̃ re-rounded on the clipped grid
  Tensor lora_a;                       // L_A [d_out, r] (host)
  Tensor lora_b;                       // L_B [r, d_in] (host)
};

struct RetrainResult {
  std::array<RetrainedLinear, kNumLinears> linears;
  std::vector<EpochLoss> epochs;
  // Mean over samples of MSE(target, Block_q(x)) at the start (σ(4) clipping, starting LoRA)
  // and after training.
  double output_mse_before = 0;
  double output_mse_after = 0;
  RetrainSeconds seconds;  // filled when RetrainOptions::profile
};

// Epoch e's visiting order of n samples: a Fisher-Yates shuffle (i = n−1 .. 1 swaps i with
// HashBits(HashBits(seed, 7 + e), i) mod (i + 1)).
std::vector<int> RetrainSampleOrder(uint64_t seed, int epoch, int n);

class BlockTrainer {
 public:
  // Errors (InvalidArgument): invalid options or spec, missing or misshapen tensors (naming the
  // linear), a sample whose input and target shapes differ, no samples.
  static absl::StatusOr<std::unique_ptr<BlockTrainer>> Create(kernels::Backend& backend,
                                                              const ModelConfig& config,
                                                              const kernels::QuantSpec& spec,
                                                              const RetrainOptions& options,
                                                              RetrainBlockInput input);
  ~BlockTrainer();

  // Runs every stage's epochs; returns the per-epoch mean losses.
  absl::StatusOr<std::vector<EpochLoss>> Train();
  // The loss of sample n at the current parameters, and its gradients (grads()).
  absl::StatusOr<StepLoss> ComputeGradients(int sample, LossCoefficients c);
  // One AdamW step with the gradients of the last ComputeGradients (errors: the backend's).
  absl::Status Step();
  // Zeroes the AdamW moments and restarts the step count (Train calls it between stages).
  absl::Status RestartOptimizer();
  // Mean over samples of MSE(target, Block_q(x)) at the current parameters.
  absl::StatusOr<double> OutputMse();
  // The linear re-rounded on its clipped grid, with its LoRA factors (copied to the host).
  absl::StatusOr<RetrainedLinear> Finish(LinearKind kind) const;

  const RetrainParams& params(LinearKind kind) const;
  const RetrainParams& grads(LinearKind kind) const;
  int num_samples() const;
  // Steps taken: in all, and since the optimizer last (re)started.
  int64_t steps() const;
  int64_t optimizer_steps() const;
  // The time of each part of the steps so far (RetrainOptions::profile; zeros without it).
  const RetrainSeconds& seconds() const;

 private:
  struct State;
  explicit BlockTrainer(std::unique_ptr<State> state);
  std::unique_ptr<State> s_;
};

// Create, OutputMse, Train, OutputMse, Finish for every linear.
absl::StatusOr<RetrainResult> RetrainBlock(kernels::Backend& backend, const ModelConfig& config,
                                           const kernels::QuantSpec& spec,
                                           const RetrainOptions& options, RetrainBlockInput input);

}  // namespace qcal::engine
