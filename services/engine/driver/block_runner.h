// One block of the sequential driver (DESIGN section 2, step 3), as separately callable phases
// whose inputs and outputs are plain structs, so that the phases of one block can run in
// different processes (statistics on every worker for its chunks, solves on the owner, install
// and push everywhere):
//
//   smoothing (recipes with smoothing.method != none):
//     CollectSmoothingPartials → CompleteSmoothing → SolveSmoothing → InstallSmoothing
//   per sub-layer group (true_sequential: q/k/v, o, gate/up, down in turn):
//     CollectPartials(group) → Complete → Solve → Install → Push(group)
//   without true_sequential:
//     CollectFullPrecisionPartials → (Complete → Solve → Install) per group → PushBlock
//   Finish: the block's results, in forward order.
//
// The class is implemented by room, in services/engine/driver/: block_runner.cc the frame
// (construction, Run, Begin, Finish, Install, Push, PushBlock, moving the chunks' hidden states);
// block_statistics.cc the calibration statistics (CollectPartials, CollectFullPrecisionPartials,
// Complete, the combines); block_smoothing.cc the smoothing phases; block_solve.cc the solve of a
// block's linears (GPTQ or RTN, output errors, error reconstruction); block_oac.cc where
// output-adaptive Hessians enter (SmoothLinearOac, each linear's factor and their prefetch);
// block_moe.cc the mixture-of-experts phases; block_retrain.cc retraining.
// block_runner_internal.h holds the helpers they share.
//
// Statistics (DESIGN section 2, step 3.2). The runner holds the chunks CalibActivations names
// (a gang member's contiguous range, or all of them). Every statistic (the Gram matrix XᵀX of each
// linear input, the smoothing ActivationStats, the diagonal whitening's ActivationStats) is formed
// per chunk in a zeroed partial and summed by the canonical reduction (gang/reduction.h): Collect*
// returns this rank's cover of the tree; Complete* builds the statistic from the union of every
// rank's partials. One worker holding every chunk runs exactly the same code (its cover is the
// root), so the results are bit-identical for any number of workers.
//
// Run() calls the phases in order, for a runner holding every chunk (gang/gang_block.h runs one
// rank of a gang). The statistics of a group are taken on the current hidden
// states of the calibration chunks: with true_sequential the earlier groups are already installed
// and pushed, so each group sees the quantized path up to it; the hidden states advance in place
// (Push(kO) to the post-attention residual, Push(kDown) to the block output). The attention
// outputs and MLP products that a group's statistics compute are kept on the device for its Push
// while they fit (Backend::AvailableMemory) and recomputed otherwise; the results are
// bit-identical either way.
//
// Output-adaptive Hessians (recipe.hessian != layer; DESIGN section 3, "Output-adaptive
// calibration"): the runner is given an OacSource supplying each linear's own H_oac or H_tok (from
// the gradient pass). GPTQ then factorizes every linear separately with its own Hessian (q, k and
// v apart; gate and up apart) instead of the input's shared Gram matrix; with smoothing, the
// Hessian of the smoothed layer W' = W·diag(m) is diag(m)⁻¹·H·diag(m)⁻¹ (m: the scales of the
// linear's input; SmoothLinearOac), and ASER's extracted columns are dead columns of it as of the
// Gram matrix. The Gram matrix stays what the smoothing statistics, the error reconstruction's
// whitening and the report's output errors are computed from: they are about activations.
// Without smoothing, a runner holding every chunk on a backend with a side queue factorizes the
// block's output-adaptive Hessians ahead, beside the block's work (oac/factor_prefetch.h; Begin
// starts it, Finish ends it): the same factors, sooner.
//
// Retraining (recipe.retrain.enabled; DESIGN section 2, steps 3.4 and 3.5, and section 3,
// "Retraining"; the phases are in driver/block_retrain.cc):
//   Begin also pushes every chunk of acts.fp_chunks through the block's original weights (before
//   smoothing folds or any install): the full-precision block outputs, which are the training
//   targets and replace acts.fp_chunks as the next block's full-precision inputs; and keeps a copy
//   of every chunk's quantized-path input (the training inputs, from which the retrained block is
//   pushed).
//   Solve records each linear's frozen base W̃ (GPTQ's pre-rounding values; RTN: the weight it
//   rounds, ASER's extracted columns zeroed) and, for saliency, its Fisher transformed by its
//   input's smoothing like the Hessian (SmoothLinearOac); Install keeps the weight it replaces, the
//   full-precision weight in the quantized block's coordinates, as the regularizer's reference.
//   After the block's last Install and push, one rank (the lowest-index gang member) calls
//   TrainBlock with every chunk's inputs and targets; the others InstallRetrained with its result.
//   Memory: while a block trains a rank holds three sets of activations of its chunks (the
//   quantized path advancing in place, its copy at the block input, the full-precision path),
//   and the training rank also the other ranks' inputs and targets.
//
// Solve runs on the backend's solver ops (Backend::GptqFactorize, GptqSolve, QuantizeRtn,
// OutputError), which every backend has (the CPU backend runs their references,
// kernels/cpu/quant_ref.h): the weights and their quantized forms stay on the device, and only
// codes, scales and zeros travel to the host, converted on a host thread while the device goes on
// (Finish waits). Error reconstruction runs on the device where the backend has it
// (SupportsSolverOp(kErrorReconstruction): a randomized SVD whose rank auto rule sees only the
// leading singular values), else on the host with the reference's full SVD (services/engine/aser):
// the CPU backend's case, so that CPU results stay those of the reference.
//
// Not thread-safe. After an error the block's weights and the activations are not usable.
#pragma once

#include <array>
#include <chrono>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/backend.h"
#include "services/engine/aser/activation_stats.h"
#include "services/engine/aser/error_reconstruction.h"
#include "services/engine/aser/smoothing.h"
#include "services/engine/driver/results.h"
#include "services/engine/gang/reduction.h"
#include "services/engine/model.h"
#include "services/engine/oac/factor_prefetch.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Per-channel |x| statistics (maxima, sums) of every linear input of the full-precision block:
// what the smoothing scales are computed from.
struct SmoothingStatistics {
  std::array<std::optional<ActivationStats>, kNumLinearInputs> inputs;  // LinearInput order
};

// The statistics of one linear input over the calibration chunks.
struct InputStatistics {
  LinearInput input = LinearInput::kQkv;
  // F32 [width, width] on the backend's device: Σ XᵀX over the chunks (a partial: over the chunks
  // of its tree node), summed by the canonical reduction. A partial holds its lower triangle
  // (Backend::GramLower, AddLower; the strict upper triangle unspecified); a completed statistic
  // (CompleteInputStatistics) is the full symmetric matrix.
  Tensor gram;
  // Per-channel |x| statistics of the same inputs: only for LQER's diagonal whitening (the mean
  // |x| is its factor); empty otherwise.
  std::optional<ActivationStats> abs_stats;
};

// One solved linear, not yet installed.
struct SolvedLinear {
  // The report, the low-rank factors, activation bits and folded tensors; `quantized` too once
  // `conversion` (if valid) has been waited for.
  LayerResult result;
  // Retraining: the frozen base W̃ and, for saliency, the smoothed Fisher (host F32; undefined
  // otherwise and for a linear received from another rank).
  Tensor retrain_base;
  Tensor retrain_fisher;
  // The dequantized weight on the backend's device, from Solve; undefined for a linear solved
  // elsewhere (received as an artifact), which Install dequantizes from result.quantized.
  Tensor weight;
  // From Solve: the host conversion of codes, scales and zeros into result.quantized, still
  // running. A caller that sends the result elsewhere waits for it first.
  std::future<absl::StatusOr<QuantizedLinear>> conversion;
};

// Partial statistics of one rank: per linear input, its cover of the canonical reduction.
using InputPartials = TreePartials<InputStatistics>;
struct SmoothingPartials {
  std::array<TreePartials<ActivationStats>, kNumLinearInputs> inputs;  // LinearInput order
};

// The canonical reduction's combines: Gram matrices added on `backend` (and abs statistics
// merged), ActivationStats merged. Errors: mismatched shapes or presence of abs statistics.
Combine<InputStatistics> InputStatisticsCombine(kernels::Backend& backend);
// The canonical reduction's completion of partial statistics (CompleteTree with
// InputStatisticsCombine), the summed Gram matrix mirrored from its lower triangle.
absl::StatusOr<InputStatistics> CompleteInputStatistics(kernels::Backend& backend,
                                                        InputPartials all, int total_chunks);
Combine<ActivationStats> ActivationStatsCombine();

// The statistics of a linear whose input was smoothed by `m` (one scale per input column, d_in):
// the Hessian of W' = W·diag(m), H'_ij = (H_ij / m_i) / m_j (when present: a Fisher-only pass for
// saliency retraining has none), and the Fisher of W', F'_ij = (F_ij / m_j) / m_j (when present),
// in place on host tensors. Empty m: unchanged.
// InvalidArgument for a device tensor, a shape that does not match m, or a scale that is not
// finite and > 0.
absl::Status SmoothLinearOac(const std::vector<float>& m, LinearOac& oac);

class BlockRunner {
 public:
  // Block acts.next_block of `model`, with a validated recipe. `times` accumulates the stage
  // times. All three must outlive the runner. `oac` supplies the output-adaptive statistics of
  // the linears this runner solves (and the Fisher, for saliency retraining): required when
  // recipe.hessian != layer or the recipe needs the Fisher (Solve fails without it), unused
  // otherwise. `seed` (the job's calibration seed) seeds retraining's LoRA start and sample
  // order, mixed with the block index (RetrainSeed); unused without retraining.
  BlockRunner(Model& model, CalibActivations& acts, const Recipe& recipe, StageTimes& times,
              OacSource oac = nullptr, uint64_t seed = 0);

  // All phases in order; advances acts to the next block. Returns the block's linears in
  // BlockLinears order (a dense block's seven in forward order).
  absl::StatusOr<std::vector<LayerResult>> Run();

  // Parks the chunks that do not fit on the device in pinned host memory (device backends). First.
  absl::Status Begin();

  // This rank's partial smoothing statistics of the full-precision block's inputs (after checking
  // that its weights are finite): per input, the cover of its chunks.
  absl::StatusOr<SmoothingPartials> CollectSmoothingPartials();
  // The smoothing statistics from every rank's partials (per input, the union of their covers).
  absl::StatusOr<SmoothingStatistics> CompleteSmoothing(SmoothingPartials all) const;
  // The smoothing scales of the block from complete statistics.
  absl::StatusOr<BlockSmoothing> SolveSmoothing(const SmoothingStatistics& stats);
  // Folds the scales into the block, rounds the changed norm weights and biases to the
  // checkpoint's dtype (the exported values) and records them for the artifacts of their linears;
  // ASER's extracted columns are then known to Solve. Before any Solve of the block.
  absl::Status InstallSmoothing(BlockSmoothing smoothing);

  // True-sequential: this rank's partial statistics of `group` on the current hidden states.
  absl::StatusOr<InputPartials> CollectPartials(LinearInput group);
  // Without true-sequential: this rank's partial statistics of every group from one
  // full-precision pass, in LinearInput order.
  absl::StatusOr<std::array<InputPartials, kNumLinearInputs>> CollectFullPrecisionPartials();
  // The statistics of `group` from every rank's partials (the union of their covers).
  absl::StatusOr<InputStatistics> Complete(LinearInput group, InputPartials all);

  // Solves `kinds` (consumers of stats.input, in forward order; all of them: ConsumersOf) through
  // smoothing → quantization → error reconstruction. Reads the block's weights; changes nothing in
  // the model. A gang member solves only the linears it owns, with the same bits. `expert`: the
  // dense linears (kNoExpert), or the linears of that expert of an MoE block.
  absl::StatusOr<std::vector<SolvedLinear>> Solve(const InputStatistics& stats,
                                                  const std::vector<LinearKind>& kinds,
                                                  int expert = kNoExpert);
  // Puts solved linears into the model and records them for Finish.
  absl::Status Install(std::vector<SolvedLinear> solved);

  // True-sequential: advances the hidden states past the sub-layer that `group` completes
  // (kO: the attention residual; kDown: the MLP residual, giving the block output). No-op for kQkv
  // and kGateUp, whose outputs only feed the next group.
  absl::Status Push(LinearInput group);
  // Without true-sequential: the hidden states through the whole quantized block.
  absl::Status PushBlock();

  // ---- Mixture-of-experts blocks (ModelConfig::IsMoeBlock; docs/MOE.md). After the attention
  // groups (kQkv, kO) are installed and pushed, instead of the kGateUp and kDown groups:
  //   RouteChunks → SetExpertCounts (the sum over every rank) → per expert unit u
  //   (NumExpertUnits: routed experts, then the shared expert), for group kGateUp then kDown:
  //   CollectExpertPartials(u, group) → Complete(group) → Solve(..., ExpertOfUnit(u)) → Install;
  //   then PushMoe.
  // Routes this rank's chunks: the quantized path's MLP inputs (kept for PushMoe) and, with
  // moe.routing full_precision, the full-precision path's (from Begin), which then pick the
  // statistics' tokens. Returns the tokens routed to each routed expert over this rank's chunks by
  // the routing that picks them.
  absl::StatusOr<std::vector<int64_t>> RouteChunks();
  // The per-expert counts over every chunk of the job: an expert with fewer than moe.min_tokens
  // is calibrated on all of the block's tokens (all three linears).
  absl::Status SetExpertCounts(std::vector<int64_t> counts);
  // This rank's partial statistics of expert unit u's input `group`, each chunk's Gram matrix taken
  // on the unit's rows only: kGateUp, the quantized path's MLP input x on the rows routed to the
  // expert (every row for the shared expert and a fallback expert); kDown, the expert's
  // down_proj input silu(gate(x_e))·up(x_e) on those rows through its installed gate/up.
  absl::StatusOr<InputPartials> CollectExpertPartials(int unit, LinearInput group);
  // hidden += the MoE MLP output (AddMoeOutput with the quantized experts) for every chunk: the
  // block output.
  absl::Status PushMoe();

  // ---- Retraining (see above). After the last Install and Push (or PushBlock) of the block.
  // This rank's chunks' quantized-path block inputs and full-precision targets (from Begin).
  const std::vector<Tensor>& retrain_inputs() const { return x_in_; }
  const std::vector<Tensor>& retrain_targets() const { return acts_.fp_chunks; }
  // Linear k's frozen base W̃ and Fisher (saliency; undefined for apiq) as host F32 tensors, when
  // this rank solved it; undefined otherwise.
  const Tensor& retrain_base(LinearKind k) const { return base_[static_cast<int>(k)]; }
  const Tensor& retrain_fisher(LinearKind k) const { return fisher_[static_cast<int>(k)]; }
  // Sets them for a linear solved on another rank (host F32 [d_out, d_in]).
  void SetRetrainBase(LinearKind k, Tensor base, Tensor fisher);
  // Trains the block (services/engine/retrain/block_trainer.h) on every chunk of the calibration
  // set, in global chunk order: inputs[c] and targets[c] [chunk_batch[c]·seq_len, hidden] on the
  // backend, one training sample per calibration sample. Every linear must be installed and have
  // its base. Then installs the retrained linears (codes re-rounded on the clipped grid, the LoRA
  // as their low-rank branch), pushes every given chunk through the retrained block from its input
  // (this rank's own chunks become acts' hidden states), and measures each linear's relative
  // output error on those pushes' inputs (its Gram matrix summed over the chunks by the canonical
  // reduction). Returns the retrained linears in forward order, which also replace the results
  // Finish returns; the report of the first carries the block's BlockRetrainReport.
  absl::StatusOr<std::vector<LayerResult>> TrainBlock(const std::vector<Tensor>& inputs,
                                                      const std::vector<Tensor>& targets,
                                                      const std::vector<int>& chunk_batch);
  // Called by TrainBlock with the block index before training starts (a fault point, progress).
  void set_before_training(std::function<absl::Status(int block)> hook) {
    before_training_ = std::move(hook);
  }
  // The ranks that did not train: installs TrainBlock's linears (in forward order) and pushes this
  // rank's chunks through the retrained block from their kept inputs; the linears replace the
  // results Finish returns.
  absl::Status InstallRetrained(std::vector<LayerResult> trained);

  // The installed results in forward order (waiting for host conversions); advances acts to the
  // next block.
  absl::StatusOr<std::vector<LayerResult>> Finish();

 private:
  absl::Status Charge(double& slot);
  SeqShape ShapeOf(size_t c) const;
  absl::StatusOr<Tensor> Fetch(size_t c);
  absl::Status Store(size_t c, const Tensor& h);
  absl::StatusOr<Tensor> FetchCopy(size_t c);
  bool KeepOnDevice();
  absl::Status CheckHoldsEveryChunk() const;
  TreeAccumulator<InputStatistics> NewInputAccumulator();
  // One chunk's statistics of input `in` of `width` channels (0: widths_[in]); an undefined x (a
  // chunk with no row for an expert) gives a zero Gram matrix.
  absl::StatusOr<InputStatistics> ChunkStatistics(LinearInput in, const Tensor& x,
                                                  int64_t width = 0);
  // The same for x with its GEMM operand: the Gram matrix from x.op (the rounding the products
  // make), the |x| statistics from x.x.
  absl::StatusOr<InputStatistics> ChunkStatistics(LinearInput in, const LinearOperand& x,
                                                  int64_t width = 0);
  // What of a linear input computed for the statistics stays for the forward that follows: its
  // operand, and x itself where the recipe quantizes activations (they are computed from x).
  LinearOperand KeptForm(LinearOperand x) const;
  // The rows of chunk c that expert unit u's statistics are taken on; `all` set instead when they
  // are every row (the shared expert, a fallback expert).
  std::vector<int32_t> ExpertRows(int unit, size_t c, bool* all) const;
  absl::Status StartFullPrecisionPath();
  absl::Status AdvanceFullPrecision(size_t c, Routing* routing);
  absl::StatusOr<ActivationStats> ChunkAbsStats(LinearInput in, const Tensor& x);
  // The smoothing pass's per-chunk totals kept on the device (a row a chunk of each input's
  // max_abs, sum_abs and bad), read back once and added to `acc` in chunk order with
  // ChunkAbsStats' checks: the statistics ChunkAbsStats would have given.
  absl::Status AddDeviceTotals(const std::array<Tensor, kNumLinearInputs>& max_abs,
                               const std::array<Tensor, kNumLinearInputs>& sum_abs,
                               const std::array<Tensor, kNumLinearInputs>& bad,
                               std::vector<TreeAccumulator<ActivationStats>>& acc);
  absl::Status RoundFolded(LinearKind kind, const std::string& name, Tensor& t);
  // o_proj's (down_proj's) input of chunk c from its hidden state h, from the chunk's kept
  // q/k/v (gate/up) input where CollectPartials left one.
  absl::StatusOr<Tensor> AttentionOf(const Tensor& h, size_t c);
  absl::StatusOr<Tensor> MlpOf(const Tensor& h, size_t c);
  // Chunk c's kept normed input `input` (taken: the slot is emptied), else computed from h.
  absl::StatusOr<LinearOperand> TakeNormed(const Tensor& h, size_t c, LinearInput input);
  // Whether a linear input's statistics or the linears reading it need x itself, not only its
  // GEMM operand: activation quantization, or the |x| statistics of diagonal whitening.
  bool NeedsInput() const;
  // A device-to-host copy (Backend::CopyToHostAsync): host holds t once wait() is OK.
  struct PendingDownload {
    Tensor host;
    std::function<absl::Status()> wait;
  };
  // The host buffer (AllocHost) a download of t will land in; StartDownload starts the copy.
  absl::StatusOr<PendingDownload> LandingFor(const Tensor& t);
  absl::Status StartDownload(const Tensor& t, PendingDownload& d);
  LayerResult NewResult(LinearId id, int64_t d_out, int64_t d_in) const;
  const std::vector<int32_t>& OutliersOf(LinearInput in) const;
  absl::StatusOr<WhiteningFactor> WhiteningOf(const InputStatistics& stats,
                                              const Tensor& gram_host);
  absl::Status CheckOutliersFitRank(LinearInput in, const LayerResult& r) const;
  bool DeviceReconstruction() const;
  // A device whitening factor for ReconstructOnDevice: CholeskyWhitening's (order empty), LQER's
  // diagonal, none (undefined), or GPTQ's factor of the same damped Gram matrix in its visiting
  // order. A Cholesky factor of either kind has its δ (cholesky), which lets the randomized SVD
  // skip forming E·S.
  struct DeviceWhitening {
    Tensor factor;
    std::vector<int32_t> order;
    double delta = 0;
    bool cholesky = false;
  };
  absl::StatusOr<DeviceWhitening> DeviceWhiteningOf(const InputStatistics& stats,
                                                    kernels::GptqFactor& factor);
  ErrorReconstructionOptions ErOptions(LinearInput in) const;
  absl::Status ReconstructOnDevice(LinearInput in, const Tensor& w, const Tensor& w_hat,
                                   const Tensor& gram, const DeviceWhitening& whitening,
                                   double quantized_error, double denom, LayerResult& r);
  absl::Status Reconstruct(LinearInput in, const float* w, const std::vector<float>& w_hat,
                           const Tensor& gram_host, const WhiteningFactor& whitening, double denom,
                           LayerResult& r);
  absl::StatusOr<std::vector<SolvedLinear>> SolveInput(const InputStatistics& stats,
                                                       const std::vector<LinearKind>& kinds,
                                                       int expert);
  absl::StatusOr<kernels::GptqFactor> OutputAdaptiveFactor(LinearInput in, LinearKind k,
                                                           const kernels::GptqSolveOptions& gopt);
  absl::Status StartFactorPrefetch();
  bool Retrains() const { return recipe_.retrain.enabled; }
  int64_t PlannedRank() const;
  absl::Status BeginRetrain();
  absl::StatusOr<Tensor> FisherOf(LinearInput in, LinearKind k);
  absl::Status WaitForConversions();
  absl::Status PushRetrained(const std::vector<Tensor>& inputs, const std::vector<int>& batch,
                             int first, std::vector<Tensor>* grams);

  Model& model_;
  kernels::Backend& be_;
  CalibActivations& acts_;
  const Recipe& recipe_;
  StageTimes& t_;
  const OacSource oac_;
  const int b_;
  const QuantSpec spec_;
  kernels::GptqSolveOptions gopt_;
  // Channels of each linear input (LinearInput order).
  std::array<int64_t, kNumLinearInputs> widths_{};
  // Smoothing of this block (empty scales: none) and the tensors its fold changed, per linear.
  BlockSmoothing smoothing_;
  std::array<std::map<std::string, Tensor>, kNumLinears> folded_;
  // Attention outputs (after CollectPartials(kO)) or MLP products (after
  // CollectPartials(kDown)) per chunk, kept on the device for Push; undefined: recompute.
  std::vector<LinearOperand> kept_;
  // The normed q/k/v input (after CollectPartials(kQkv)) or gate/up input (after
  // CollectPartials(kGateUp)) per chunk, kept for the next group's forward; undefined: recompute.
  std::vector<LinearOperand> normed_;
  int64_t reserve_ = 0;
  std::chrono::steady_clock::time_point clock_;
  // Installed results and, aligned with them, their pending host conversions.
  std::vector<LayerResult> results_;
  std::vector<std::future<absl::StatusOr<QuantizedLinear>>> pending_;
  // Retraining: the job's seed, this rank's chunks' quantized-path block inputs, and per linear
  // the frozen base, the Fisher (saliency) and the full-precision reference (host F32).
  const uint64_t seed_ = 0;
  std::function<absl::Status(int block)> before_training_;
  std::vector<Tensor> x_in_;
  std::array<Tensor, kNumLinears> base_, fisher_, reference_;
  // Mixture-of-experts blocks: the recipe's moe section (its defaults when absent), per chunk the
  // quantized path's routing (RouteChunks, for PushMoe) and with full_precision routing the
  // full-precision path's (Begin), and per routed expert its tokens over the job and whether it
  // falls back to every token.
  const MoeRecipe moe_;
  std::vector<Routing> routing_, fp_routing_;
  std::vector<int64_t> expert_tokens_;
  std::vector<bool> fallback_;
  // Output-adaptive factors computed ahead on the side queue (StartFactorPrefetch); null when the
  // solves factorize as they go. Last: destroyed (its thread joined) first.
  std::unique_ptr<OacFactorPrefetch> prefetch_;
};

// The seed of block b's retraining for the job's calibration seed: HashBits(seed, b), so that the
// blocks' random LoRA starts differ.
uint64_t RetrainSeed(uint64_t seed, int block);

}  // namespace qcal::engine
