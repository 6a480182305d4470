// The gradient pass (DESIGN section 2, step 4 and "Memory"): the output-adaptive Hessians (and the
// diagonal Fisher) of every linear, from the full-precision model's summed next-token
// cross-entropy over this rank's calibration chunks.
//
// Layer-major: every chunk forward block by block, keeping the block inputs of every k-th block
// (k = boundary_every, chosen to fit device memory, then host memory, then the scratch disk when
// 0; the blocks between are recomputed from the nearest kept boundary), the loss head, then
// backward block by block from the last, recomputing each block from its input and carrying
// ∂ℓ/∂h for every chunk. In the backward of block b, each linear's per-sample statistics are
// accumulated per chunk in zeroed partials and summed by the canonical reduction over this rank's
// chunk range (gang/reduction.h); the block's covers go to the sink, which persists them (or sends
// them to their owners) before the pass moves down to block b − 1. One worker holding every chunk
// gets the roots: the complete statistics, bit-identical to any gang's.
//
// The sample's loss ℓ_n is the summed NLL of its L − 1 next-token predictions (position t predicts
// token t + 1); the chunk's loss is the sum over its samples (Γ of one sample is unaffected by the
// other samples of its chunk).
#pragma once

#include <array>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "services/engine/gang/reduction.h"
#include "services/engine/model.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

struct GradientPassOptions {
  HessianKind kind = HessianKind::kOutputAdaptive;  // kOutputAdaptive or kOutputAdaptiveToken
  bool fisher = false;     // also form the diagonal Fisher. Default: false.
  int boundary_every = 0;  // k >= 1; 0 = chosen to fit. Default: 0.
  // Where kept boundaries that fit neither device nor host memory are spilled. Default: "" (none:
  // an error when they do not fit in memory).
  std::string scratch_dir;
  // Device memory the sink keeps per block of statistics handed to it (statistics left on the
  // device, as the bench's sink does). The plan keeps room for them: at the backward of block b
  // the statistics of blocks b..B−1 are live beside the boundaries below b. Default: 0.
  int64_t sink_device_bytes_per_block = 0;
};

// This rank's calibration chunks: chunk c (global index first_chunk + c) holds chunk_batch[c]
// samples of seq_len token ids, sample-major (the model input, BOS included where the model has
// one).
struct GradientChunks {
  int seq_len = 0;
  int first_chunk = 0;
  int total_chunks = 0;
  std::vector<std::vector<int32_t>> ids;
  std::vector<int> chunk_batch;
};

// Per block, this rank's cover of every linear's statistics (LinearKind order), on the backend.
using BlockOacPartials = std::array<TreePartials<LinearOac>, kNumLinears>;
// Called once per block, last block first, with this rank's partials (one root partial each when
// the rank holds every chunk). Persisting or sending them is the sink's; an error stops the pass.
using OacSink = std::function<absl::Status(int block, BlockOacPartials partials)>;

struct GradientPassStats {
  double seconds = 0;
  double forward_seconds = 0;   // the forward sweep and recomputation
  double backward_seconds = 0;  // block backwards and the loss head
  double hessian_seconds = 0;   // the per-sample accumulations
  double head_seconds = 0;      // the loss head (part of backward_seconds)
  double sink_seconds = 0;      // handing each block's partials to the sink (persisting them)
  double loss = 0;              // Σ NLL over this rank's predictions
  int64_t tokens = 0;           // predictions
  int boundary_every = 0;       // the k used
  int64_t peak_device_bytes = -1;
};

// Where the pass keeps the block inputs it needs again (DESIGN section 2, "Memory").
enum class BoundaryTier { kDevice, kHost, kScratch };
// The dtype of the kept boundaries: BF16 when the backend computes with bf16 operands (the GEMMs
// round every block's inputs to bf16 anyway; the recomputed block starts from the rounded
// residual, a difference of the order of that rounding, and half the bytes let the 7B shape keep
// every block's input on one H200: k = 1, no recomputation), else F32 (exact recomputation).
DType BoundaryDType(const kernels::Backend& be);
const char* BoundaryTierName(BoundaryTier tier);  // "device", "host", "scratch"

// How RunGradientPass holds the activations of this rank's chunks: the segment in hand (k block
// inputs) and the carried hidden state or gradient on the device, the other segments' first
// inputs (the kept boundaries) in `tier`. The smallest k (the least recomputation) of the first
// tier that holds them, in the order device memory (Backend::AvailableMemory; a host backend
// that plans none: the host's available memory), pinned host memory (device backends only), the
// scratch disk (options.scratch_dir's free space); options.boundary_every fixes k.
struct GradientPassPlan {
  int boundary_every = 1;
  BoundaryTier tier = BoundaryTier::kDevice;
  int64_t activation_bytes = 0;        // one block input of every chunk of the rank (fp32)
  DType boundary_dtype = DType::kF32;  // BoundaryDType
  int64_t kept_bytes = 0;              // the kept boundaries outside the segment in hand, in `tier`
  // The planned peak on the device: k + 1 activations, the working set (one chunk's block
  // internals, the loss head's logits, the statistics being summed) and the most that the kept
  // boundaries (device tier) and the sink's device statistics
  // (options.sink_device_bytes_per_block) hold at once.
  int64_t device_bytes = 0;
};
// ResourceExhausted naming the sizes when no tier holds the pass; InvalidArgument for bad chunks
// or options (as RunGradientPass).
absl::StatusOr<GradientPassPlan> PlanGradientPass(Model& model, const GradientChunks& chunks,
                                                  const GradientPassOptions& options);

// Runs the pass on `model` (streaming or resident; a streaming model's blocks are acquired in
// turn, last to first for the backward). Progress lines go to `log` when set.
absl::StatusOr<GradientPassStats> RunGradientPass(
    Model& model, const GradientChunks& chunks, const GradientPassOptions& options,
    const OacSink& sink, const std::function<void(const std::string&)>& log = nullptr);

}  // namespace qcal::engine
