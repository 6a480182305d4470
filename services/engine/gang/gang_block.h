// One block of a job for one rank of a gang (DESIGN section 2, step 3, and section 7): the
// BlockRunner phases on this rank's chunks, with the statistics reduced and the solved linears
// shared over a Transport. Every rank of the plan calls RunGangBlock for the same block at the
// same time; the results are bit-identical to one worker holding every chunk (W = 1 runs the same
// code and sends nothing), whatever W and the chunk split.
//
// Per step (MessageKey.step; item as transport.h says):
//   smoothing (kStepSmoothing, recipes that smooth): every rank sends its partial ActivationStats
//     of input i to plan.StatOwner(i) (kPartials; the owner keeps its own); the owner completes
//     the tree and sends the statistic (kStatistic) to every other rank, so that every rank
//     computes and folds the same smoothing;
//   group g (StepOf(g)): every rank sends its partial statistics of g to plan.StatOwner(g); the
//     owner completes them and sends them (kStatistic) to the other owners of g's consumers;
//     owners solve their linears and send each solved linear (kLayer, item = LinearKind) to every
//     other rank; every rank installs the group's linears in forward order (its own from the
//     device, the others' from their artifacts: the same bits, as InstallWeight dequantizes codes
//     with the solver's own formula) and, with true_sequential, pushes its chunks.
//   Without true_sequential the statistics of all groups come from one full-precision pass (all
//   partials are sent first), then each group is reduced, solved and installed, then PushBlock.
// All sends of a step precede its receives, so no rank waits on a message that waits on it.
//
// Thread safety: one call per rank; ranks may be threads of one process (each with its own model,
// backend and activations).
#pragma once

#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "services/engine/driver/results.h"
#include "services/engine/gang/plan.h"
#include "services/engine/gang/transport.h"
#include "services/engine/model.h"
#include "services/engine/oac/oac_statistics.h"
#include "services/engine/recipe.h"

namespace qcal::engine {

struct GangBlockOptions {
  // How long a rank waits for one message of a peer before failing the block
  // (DEADLINE_EXCEEDED naming the message). Default: 30 minutes.
  absl::Duration receive_timeout = absl::Minutes(30);
  // The gradient pass (JobSession::RunGradientPass) calls this as it reaches block b's statistics
  // (last block first), before anything of the block is sent or written: progress, and the
  // worker's fault point `gradient` on a worker without peers. An error stops the pass. Default:
  // none.
  std::function<absl::Status(int block)> gradient_block;
  // Retraining: called on the training rank with block b once the block's inputs and targets are
  // gathered, before its training starts (JobSession::RunNextBlock passes it without peers too):
  // the worker's fault point `retrain`. An error stops the block. Default: none.
  std::function<absl::Status(int block)> retrain_block;
  // InvalidArgument for a timeout that is not positive.
  absl::Status Validate() const;
};

// Runs block acts.next_block of `model` as rank plan.rank: acts must hold exactly the rank's
// chunks (plan.local() of plan.total_chunks), `transport` connects the ranks (nullptr only when
// plan.world == 1). Returns all the block's linears in BlockLinears order (solved here or
// received), and advances acts to the next block. `times` accumulates the stage times. Errors:
// an invalid plan or options, activations that do not match the plan (InvalidArgument), the
// transport's (a refused message, a peer that does not answer in time), the solves'. `oac`: the
// output-adaptive statistics of the linears this rank owns, required when recipe.hessian != layer.
absl::StatusOr<std::vector<LayerResult>> RunGangBlock(
    Model& model, CalibActivations& acts, const Recipe& recipe, const GangPlan& plan,
    Transport* transport, const GangBlockOptions& options, StageTimes& times,
    const OacSource& oac = nullptr, uint64_t seed = 0);

}  // namespace qcal::engine
