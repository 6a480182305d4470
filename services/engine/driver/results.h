// What the sequential driver's pieces pass each other (DESIGN section 2, step 3): a linear's
// report and committed result, the per-stage times of a job, and the calibration activations of
// the quantized path between blocks.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "nlohmann/json_fwd.hpp"
#include "services/engine/model.h"
#include "services/engine/quant/quantized_linear.h"
#include "services/engine/retrain/block_trainer.h"

namespace qcal::engine {

// What retraining did to one block (DESIGN section 3, "Retraining"), in the report: the mean
// training loss of every epoch, stage by stage, and the output MSE of the quantized block against
// the full-precision block over the calibration samples before and after training.
struct BlockRetrainReport {
  struct Epoch {
    std::string stage;  // "weight", "mixed", "output"
    int epoch = 0;      // within the stage
    double loss = 0;  // c_out·output_mse + c_reg·λ·regularizer, the mean over the epoch's steps
    double output_mse = 0;
    double regularizer = 0;
  };
  std::vector<Epoch> epochs;
  double output_mse_before = 0;
  double output_mse_after = 0;
};

// Per-linear outcome, in the report.
struct LayerReport {
  int block = 0;
  LinearKind kind = LinearKind::kQ;
  // The linear's expert in an MoE block (kNoExpert, kSharedExpert or j >= 0; model.h).
  int expert = kNoExpert;
  std::string name;  // its checkpoint prefix: "model.layers.{i}.{module}.{proj}", or an expert's
  // A routed expert's linears (docs/MOE.md, "min_tokens"): the calibration tokens routed to the
  // expert over all chunks, and whether that was fewer than moe.min_tokens, so that its
  // statistics were taken on all of the block's tokens instead.
  int64_t routed_tokens = 0;
  bool fallback = false;
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
  // Whether error reconstruction ran (rel_error_er and the whitened errors are its).
  bool reconstructed = false;
  // Retraining: the linear's LoRA and clipping were trained (rank and extra_params are then the
  // LoRA's), and its relative output error ‖(W − Q(W̃; γ, β) − L_A·L_B)Xᵀ‖/‖WXᵀ‖ after training,
  // X the retrained block's quantized-path inputs of the linear (all calibration samples).
  bool retrained = false;
  double rel_error_retrained = 0;
  // The block's retraining, carried by its first linear (q_proj) only.
  std::optional<BlockRetrainReport> block_retrain;
  double solve_seconds = 0;  // timing: never in the deterministic report
};

// The report's JSON for one layer (qcal_report.json's "layers"; artifacts and the gang's kLayer
// payloads carry it), and back: DataLoss for a malformed report. The timing solve_seconds is
// not in it. (driver/layer_report.cc)
nlohmann::ordered_json LayerReportJson(const LayerReport& r);
absl::StatusOr<LayerReport> LayerReportFromJson(const nlohmann::json& j);

struct LayerResult {
  LayerReport report;
  LinearId id() const { return LinearId(report.kind, report.expert); }
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
  // Output-adaptive factors computed ahead on the side queue (their wait is in `factor`).
  int prefetched_factors = 0;
  double smooth = 0;       // smoothing: the full-precision statistics pass, scales and folding
  double reconstruct = 0;  // error reconstruction: whitening, SVD and factors (part of `solve`)
  // Retraining: the full-precision block's outputs (the targets), gathering and training, and the
  // retrained block's push with its output errors.
  double retrain = 0;
  // Set by the caller (the bench) to have the trainer time the parts of its steps into
  // retrain_parts (a few synchronizations a step).
  bool profile_retrain = false;
  // Passed to RetrainOptions::profiler_step (the bench's --retrain-profiler-step).
  int64_t retrain_profiler_step = -1;
  RetrainSeconds retrain_parts;
};

// The quantized-path hidden states entering the next block, one tensor per chunk of kCalibChunk
// samples ([batch·seq_len, hidden] on the backend's device). A gang member holds only its own
// contiguous chunks [first_chunk, first_chunk + chunks.size()) of the job's total_chunks; a single
// worker holds them all (first_chunk 0).
struct CalibActivations {
  int seq_len = 0;
  int next_block = 0;  // the block these activations enter
  std::vector<Tensor> chunks;
  std::vector<int> chunk_batch;  // samples per chunk
  int first_chunk = 0;           // the global index of chunks[0]
  int total_chunks = 0;          // C: the chunks of the whole calibration set
  // Recipes that retrain (DESIGN section 2, step 3.5): the full-precision path's hidden states
  // entering the next block (the original model's, block by block), aligned with `chunks` (same
  // shapes; on the device or parked like them). Empty otherwise, and at block 0, where both paths
  // start from the embeddings (the first retraining block copies `chunks`). With them a job holds
  // about three times the activations of one path while a block trains: these, the quantized path
  // advancing in place, and the block's quantized-path inputs kept for training and the push.
  std::vector<Tensor> fp_chunks;
};

}  // namespace qcal::engine
