// The sequential quantization driver (DESIGN section 2, step 3), one block at a time: accumulate
// statistics of every linear's input on the quantized path, solve each linear (RTN or GPTQ),
// replace its weights by the quantized ones, and push the calibration activations through the
// quantized block to feed the next.
//
// The stepwise API (EmbedCalibration, QuantizeBlock, InstallBlock, Save/LoadActivations) is what
// the worker drives, committing each block's artifacts and checkpointing boundary activations so a
// job can resume at a block boundary with bit-identical results. QuantizeModel runs all blocks.
//
// Memory: the calibration activations of the quantized path ([N·L, hidden] fp32, as chunks of
// kCalibChunk samples) plus one block's statistics. Statistics are formed per chunk and summed in
// chunk order, so the result does not depend on how chunks are scheduled.
//
// Work per block. With true_sequential the block runs once, in stages (Model::NormedInput,
// AttentionOutput, MlpProduct, AddProjection): each group's statistics are taken from the stage
// before it, with the attention outputs and MLP products of a stage kept for the next while they
// fit in the backend's memory and recomputed otherwise; the results are bit-identical to running
// the block from its start for every group. Without it: one full-precision statistics pass, the
// solves, one pass through the quantized block. On a backend with the solver ops (CUDA) the solves
// run on the device and only codes, scales and zeros travel to the host. On a device backend the
// chunks stay on the device while Backend::AvailableMemory leaves room for a block's working set,
// and are parked in pinned host memory otherwise. QuantizeBlock advances acts in place: after an
// error, acts, like the block's weights, is not usable any more.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/model.h"
#include "services/engine/quant/gptq.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Per-linear outcome, in the report.
struct LayerReport {
  int block = 0;
  LinearKind kind = LinearKind::kQ;
  std::string name;  // "model.layers.{i}.{module}.{proj}"
  int64_t d_out = 0, d_in = 0;
  // Relative output error ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ on the quantized-path calibration inputs.
  double rel_error = 0;
  // The same for plain RTN of the same weights (a reference point for GPTQ).
  double rel_error_rtn = 0;
  int dead_columns = 0;
  double damp_used = 0;
  // Smoothing (ASER): input columns extracted from the quantized part (0 otherwise).
  int outlier_columns = 0;
  // Error reconstruction (rank 0: off): the rank kept, the relative output error after the
  // low-rank correction (rel_error is the error before it), the whitened errors ‖E·S‖_F and
  // ‖(E − L_A·L_B)·S‖_F, and the extra parameters rank·(d_out + d_in) as a fraction of d_out·d_in.
  int64_t rank = 0;
  double rel_error_er = 0;
  double whitened_error_before = 0;
  double whitened_error_after = 0;
  double extra_params = 0;
  double solve_seconds = 0;  // timing: never in the deterministic report
};

struct LayerResult {
  LayerReport report;
  QuantizedLinear quantized;
  // Error reconstruction, host fp32 (empty when off): L_A [d_out][rank] and L_B [rank][d_in],
  // row-major (rank = report.rank).
  std::vector<float> lora_a;
  std::vector<float> lora_b;
  // Activation bits of the linear's weight branch (16: off).
  int act_bits = 16;
  // Full-precision tensors that folded smoothing changed, carried by this layer's artifact: its
  // input's RMSNorm weight (q_proj, gate_proj) and its own bias (v_proj, up_proj), by checkpoint
  // name; host fp32 holding values of the source checkpoint's dtype (what is exported and what the
  // in-memory model uses).
  std::map<std::string, Tensor> folded;
};

struct StageTimes {
  double forward = 0;  // block forwards (statistics passes and the quantized-path push)
  double hessian = 0;  // Gram accumulation
  double solve = 0;    // RTN/GPTQ solves: the sum of the four parts below
  // Parts of `solve`: Hessian factorizations (the device solver; the host solver factors inside
  // `quantize`), the RTN and GPTQ column loops with their lazy updates, the report's output
  // errors, and moving statistics, weights and results between the device and the host.
  double factor = 0;
  double quantize = 0;
  double error = 0;
  double transfer = 0;
  double smooth = 0;       // smoothing: the full-precision statistics pass, scales and folding
  double reconstruct = 0;  // error reconstruction: whitening, SVD and factors (part of `solve`)
};

// The quantized-path hidden states entering the next block, one tensor per chunk of kCalibChunk
// samples ([batch·seq_len, hidden] on the backend's device).
struct CalibActivations {
  int seq_len = 0;
  int next_block = 0;  // the block these activations enter
  std::vector<Tensor> chunks;
  std::vector<int> chunk_batch;  // samples per chunk
};

// The weight quantizer spec of a recipe.
QuantSpec SpecOf(const Recipe& recipe);

// Embeds the calibration samples (equal length, BOS first): the inputs of block 0.
absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples);

// Quantizes block acts.next_block of `model` in place and advances `acts` through the quantized
// block. Returns the block's seven linears in forward order.
absl::StatusOr<std::vector<LayerResult>> QuantizeBlock(Model& model, CalibActivations& acts,
                                                       const Recipe& recipe,
                                                       StageTimes* times = nullptr);

// Installs a block's committed results (from artifacts: quantized weights, low-rank factors,
// activation bits, folded tensors) into block `b`, in forward order.
absl::Status InstallBlock(Model& model, int b, const std::vector<LayerResult>& linears);

// Boundary checkpoints: the activations as one safetensors file (deterministic bytes).
absl::Status SaveActivations(kernels::Backend& backend, const CalibActivations& acts,
                             const std::string& path);
absl::StatusOr<CalibActivations> LoadActivations(kernels::Backend& backend,
                                                 const std::string& path);

// Deterministic serialization of one quantized linear (a safetensors byte string).
std::string SerializeQuantizedLinear(const QuantizedLinear& q);
absl::StatusOr<QuantizedLinear> ParseQuantizedLinear(const std::string& bytes);
// The same for a layer's whole artifact: the quantized linear plus the low-rank factors, the
// activation bits and the folded tensors (the report travels separately, as JSON).
std::string SerializeLayerArtifact(const LayerResult& r);
absl::StatusOr<LayerResult> ParseLayerArtifact(const std::string& bytes);

struct QuantizeOutcome {
  std::vector<LayerReport> layers;
  std::map<std::string, QuantizedLinear> quantized;  // by linear name
  CheckpointExtras extras;  // folded tensors and low-rank adapters, for the export
  StageTimes times;
};

// Adds a layer's folded tensors and low-rank factors to what the export writes besides the
// quantized linears.
void AddToExtras(const LayerResult& r, CheckpointExtras& extras);

// Progress: blocks done, blocks total.
using BlockProgressFn = std::function<void(int blocks_done, int blocks_total)>;

// All blocks, in order.
absl::StatusOr<QuantizeOutcome> QuantizeModel(Model& model,
                                              const std::vector<std::vector<int>>& samples,
                                              const Recipe& recipe,
                                              const BlockProgressFn& progress = nullptr);

}  // namespace qcal::engine
