// The sequential quantization driver (DESIGN section 2, step 3), one block at a time: accumulate
// statistics of every linear's input on the quantized path, solve each linear (RTN or GPTQ, with
// smoothing and error reconstruction), replace its weights by the quantized ones, and push the
// calibration activations through the quantized block to feed the next.
//
// The public entry points. The pieces live in services/engine/driver/: results.h (what they pass
// each other), block_runner.h (one block as separately callable phases: statistics → solve →
// install → push), install.h (putting results into the model), memory_plan.h (what stays on the
// device) and artifacts.h (activation checkpoints and the serialized artifacts), all included here.
//
// The stepwise API (EmbedCalibration, QuantizeBlock, InstallBlock, Save/LoadActivations) is what
// the worker drives, committing each block's artifacts and checkpointing boundary activations so a
// job can resume at a block boundary with bit-identical results. QuantizeModel runs all blocks.
//
// Memory: the calibration activations of the quantized path ([N·L, hidden] fp32, as chunks of
// kCalibChunk samples) plus one block's statistics; a recipe that retrains holds three times the
// activations (the full-precision path and the block's inputs besides; block_runner.h). Statistics
// are formed per chunk and summed by the canonical reduction (gang/reduction.h: a fixed pairwise
// tree over the chunk indices, holding at most about 2·log2(C) partials of a statistic at once), so
// the result does not depend on how chunks are scheduled or split across workers. On a device
// backend the chunks stay on the device while Backend::AvailableMemory leaves room for a block's
// working set, and are parked in pinned host memory otherwise. QuantizeBlock advances acts in
// place: after an error, acts, like the block's weights, is not usable any more.
#pragma once

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "services/engine/driver/artifacts.h"
#include "services/engine/driver/install.h"
#include "services/engine/driver/results.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"
#include "services/engine/oac/gradient_pass.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/quant/gptq.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

// Embeds the calibration samples (equal length, BOS first): the inputs of block 0.
absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples);
// The same for one gang member: `samples` is the whole calibration set, of which only the chunks
// [chunks.begin, chunks.end) are embedded (first_chunk and total_chunks set accordingly; no chunk
// for an empty range). InvalidArgument for a range outside the set's chunks.
absl::StatusOr<CalibActivations> EmbedCalibration(Model& model,
                                                  const std::vector<std::vector<int>>& samples,
                                                  ChunkRange chunks);

// Quantizes block acts.next_block of `model` in place and advances `acts` through the quantized
// block (all phases of a BlockRunner). Returns the block's linears in BlockLinears order. `oac`:
// the output-adaptive statistics, required when recipe.hessian != layer or the recipe needs the
// Fisher (BlockRunner). `seed`: the calibration seed, which seeds retraining (BlockRunner);
// `before_training`: BlockRunner::set_before_training.
absl::StatusOr<std::vector<LayerResult>> QuantizeBlock(
    Model& model, CalibActivations& acts, const Recipe& recipe, StageTimes* times = nullptr,
    const OacSource& oac = nullptr, uint64_t seed = 0,
    const std::function<absl::Status(int)>& before_training = nullptr);

struct QuantizeOutcome {
  // Recipes with hessian != layer: the gradient pass that ran before block 0.
  GradientPassStats gradient_pass;
  std::vector<LayerReport> layers;
  std::map<std::string, QuantizedLinear> quantized;  // by linear name
  CheckpointExtras extras;  // folded tensors and low-rank adapters, for the export
  StageTimes times;
};

// Progress: blocks done, blocks total.
using BlockProgressFn = std::function<void(int blocks_done, int blocks_total)>;

// All blocks, in order; with hessian != layer or a recipe that needs the Fisher, the gradient
// pass first (its statistics held in host memory). `seed` seeds retraining (QuantizeBlock).
absl::StatusOr<QuantizeOutcome> QuantizeModel(Model& model,
                                              const std::vector<std::vector<int>>& samples,
                                              const Recipe& recipe,
                                              const BlockProgressFn& progress = nullptr,
                                              uint64_t seed = 0);

}  // namespace qcal::engine
