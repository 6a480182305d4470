// BlockRunner's frame (block_runner.h): construction, Run's order of the phases, Begin and Finish,
// installing solved linears, moving the chunks' hidden states, and the helpers the other block_*.cc
// files share (block_runner_internal.h). block_runner.h names the files of the other phases.
#include "services/engine/driver/block_runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner_internal.h"
#include "services/engine/driver/install.h"
#include "services/engine/driver/memory_plan.h"

namespace qcal::engine {
namespace driver_internal {

absl::Status CheckFinite(const Tensor& host, const std::string& what) {
  const float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(p[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, " contains NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

}  // namespace driver_internal
namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

BlockRunner::BlockRunner(Model& model, CalibActivations& acts, const Recipe& recipe,
                         StageTimes& times, OacSource oac, uint64_t seed)
    : model_(model),
      be_(model.backend()),
      acts_(acts),
      recipe_(recipe),
      t_(times),
      oac_(std::move(oac)),
      b_(acts.next_block),
      spec_(SpecOf(recipe)),
      seed_(seed),
      moe_(recipe.moe.value_or(MoeRecipe{})) {
  gopt_.damp = recipe.gptq.damp;
  gopt_.block_size = recipe.gptq.block_size;
  gopt_.act_order = recipe.gptq.act_order;
  const ModelConfig& c = model.config();
  widths_ = {c.hidden_size, c.q_dim(), c.hidden_size, c.intermediate_size};
  const int64_t chunk_rows =
      acts.chunk_batch.empty() ? 0 : int64_t(acts.chunk_batch[0]) * acts.seq_len;
  reserve_ = WorkingSetBytes(c, chunk_rows) + JoinedOperandBytes(c, chunk_rows, PlannedRank());
}

// The largest low-rank branch a linear of this job gets (the memory plan's rank): error
// reconstruction's fixed rank, or for `rank: auto` the rank at which the widest linear reaches
// max_extra_params; retraining's LoRA rank (64 when it starts from nothing).
int64_t BlockRunner::PlannedRank() const {
  const ModelConfig& c = model_.config();
  int64_t rank = 0;
  const ErrorReconstructionRecipe& er = recipe_.error_reconstruction;
  if (er.enabled) {
    const double d = double(c.hidden_size), f = double(c.intermediate_size);
    rank = er.rank == kRecipeAutoRank
               ? static_cast<int64_t>(std::ceil(er.max_extra_params * d * f / (d + f)))
               : er.rank;
  }
  if (recipe_.retrain.enabled) rank = std::max<int64_t>(rank, recipe_.retrain.rank.value_or(64));
  return rank;
}

absl::StatusOr<std::vector<LayerResult>> BlockRunner::Run() {
  QCAL_RETURN_IF_ERROR(CheckHoldsEveryChunk());
  QCAL_RETURN_IF_ERROR(Begin());
  const ModelConfig& config = model_.config();
  if (config.IsMoeBlock(b_)) {
    // Begin refused the recipes that do not run true-sequential on experts.
    for (LinearInput group : {LinearInput::kQkv, LinearInput::kO}) {
      QCAL_ASSIGN_OR_RETURN(InputPartials partials, CollectPartials(group));
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats, Complete(group, std::move(partials)));
      QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved, Solve(stats, ConsumersOf(group)));
      QCAL_RETURN_IF_ERROR(Install(std::move(solved)));
      QCAL_RETURN_IF_ERROR(Push(group));
    }
    QCAL_ASSIGN_OR_RETURN(std::vector<int64_t> counts, RouteChunks());
    QCAL_RETURN_IF_ERROR(SetExpertCounts(std::move(counts)));
    for (int u = 0; u < NumExpertUnits(config); ++u) {
      for (LinearInput group : {LinearInput::kGateUp, LinearInput::kDown}) {
        QCAL_ASSIGN_OR_RETURN(InputPartials partials, CollectExpertPartials(u, group));
        QCAL_ASSIGN_OR_RETURN(const InputStatistics stats, Complete(group, std::move(partials)));
        QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved,
                              Solve(stats, ConsumersOf(group), ExpertOfUnit(config, u)));
        QCAL_RETURN_IF_ERROR(Install(std::move(solved)));
      }
    }
    QCAL_RETURN_IF_ERROR(PushMoe());
    return Finish();
  }
  if (recipe_.smoothing.enabled()) {
    QCAL_ASSIGN_OR_RETURN(SmoothingPartials partials, CollectSmoothingPartials());
    QCAL_ASSIGN_OR_RETURN(const SmoothingStatistics stats, CompleteSmoothing(std::move(partials)));
    QCAL_ASSIGN_OR_RETURN(BlockSmoothing smoothing, SolveSmoothing(stats));
    QCAL_RETURN_IF_ERROR(InstallSmoothing(std::move(smoothing)));
  }
  if (recipe_.gptq.true_sequential) {
    for (LinearInput group : kAllLinearInputs) {
      QCAL_ASSIGN_OR_RETURN(InputPartials partials, CollectPartials(group));
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats, Complete(group, std::move(partials)));
      QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved, Solve(stats, ConsumersOf(group)));
      QCAL_RETURN_IF_ERROR(Install(std::move(solved)));
      QCAL_RETURN_IF_ERROR(Push(group));
    }
  } else {
    QCAL_ASSIGN_OR_RETURN(auto partials, CollectFullPrecisionPartials());
    for (LinearInput group : kAllLinearInputs) {
      QCAL_ASSIGN_OR_RETURN(const InputStatistics stats,
                            Complete(group, std::move(partials[static_cast<int>(group)])));
      QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved, Solve(stats, ConsumersOf(group)));
      QCAL_RETURN_IF_ERROR(Install(std::move(solved)));
    }
    QCAL_RETURN_IF_ERROR(PushBlock());
  }
  if (Retrains()) {
    QCAL_RETURN_IF_ERROR(TrainBlock(x_in_, acts_.fp_chunks, acts_.chunk_batch).status());
  }
  return Finish();
}

absl::Status BlockRunner::CheckHoldsEveryChunk() const {
  if (acts_.first_chunk == 0 && static_cast<int>(acts_.chunks.size()) == acts_.total_chunks) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat("block ", b_, ": the activations hold chunks [", acts_.first_chunk, ", ",
                   acts_.first_chunk + acts_.chunks.size(), ") of ", acts_.total_chunks,
                   "; a share of the chunks runs as one rank of a gang"));
}

absl::Status BlockRunner::Begin() {
  QCAL_RETURN_IF_ERROR(recipe_.CheckForModel(model_.config()));
  if (recipe_.NeedsGradientPass() && !oac_) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", b_, ": recipe key \"hessian\" is ", RecipeName(recipe_.hessian),
                     " but the block was given no gradient-pass statistics (run the gradient "
                     "pass first)"));
  }
  if (recipe_.NeedsFisher() && !oac_) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", b_,
                     ": recipe key \"retrain.method\" is saliency but the block "
                     "was given no gradient-pass Fisher (run the gradient pass first)"));
  }
  const int held = static_cast<int>(acts_.chunks.size());
  if (acts_.total_chunks < 1 || acts_.first_chunk < 0 ||
      acts_.first_chunk + held > acts_.total_chunks ||
      acts_.chunk_batch.size() != acts_.chunks.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "block ", b_, ": the activations hold ", held, " chunks from chunk ", acts_.first_chunk,
        " of ", acts_.total_chunks, " (", acts_.chunk_batch.size(), " batch sizes)"));
  }
  QCAL_RETURN_IF_ERROR(StartFactorPrefetch());
  for (size_t c = acts_.chunks.size(); c-- > 0;) {
    QCAL_RETURN_IF_ERROR(ParkIfShort(be_, acts_.chunks[c], reserve_));
  }
  kept_.assign(acts_.chunks.size(), LinearOperand());
  normed_.assign(acts_.chunks.size(), LinearOperand());
  clock_ = Clock::now();
  if (Retrains()) QCAL_RETURN_IF_ERROR(BeginRetrain());
  if (model_.config().moe() && moe_.routing == MoeRouting::kFullPrecision) {
    // The full-precision path through the original block, its MoE blocks' routing recorded.
    QCAL_RETURN_IF_ERROR(StartFullPrecisionPath());
    fp_routing_.assign(acts_.chunks.size(), Routing());
    for (size_t c = 0; c < acts_.chunks.size(); ++c) {
      QCAL_RETURN_IF_ERROR(AdvanceFullPrecision(c, &fp_routing_[c]));
    }
    QCAL_RETURN_IF_ERROR(Charge(t_.forward));
  }
  return absl::OkStatus();
}

// Both paths enter block 0 with the embeddings; later blocks find the full-precision path in acts.
absl::Status BlockRunner::StartFullPrecisionPath() {
  if (b_ == 0 && acts_.fp_chunks.empty()) {
    for (size_t c = 0; c < acts_.chunks.size(); ++c) {
      QCAL_ASSIGN_OR_RETURN(Tensor fp, FetchCopy(c));
      QCAL_RETURN_IF_ERROR(ParkIfShort(be_, fp, reserve_));
      acts_.fp_chunks.push_back(std::move(fp));
    }
  }
  if (acts_.fp_chunks.size() != acts_.chunks.size()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "block ", b_, ": the recipe keeps the full-precision path but the activations hold ",
        acts_.fp_chunks.size(), " full-precision chunks for ", acts_.chunks.size(),
        " quantized-path chunks"));
  }
  return absl::OkStatus();
}

// Pushes full-precision chunk c through the block's original weights (before any install); with
// `routing`, an MoE block's routing of it is recorded there.
absl::Status BlockRunner::AdvanceFullPrecision(size_t c, Routing* routing) {
  Tensor& fp = acts_.fp_chunks[c];
  if (fp.shape() != acts_.chunks[c].shape()) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", b_, ": full-precision chunk ", c, " is ", ShapeString(fp.shape()),
                     ", its quantized-path chunk ", ShapeString(acts_.chunks[c].shape())));
  }
  Tensor h = fp;
  if (fp.device() != be_.device()) {
    QCAL_ASSIGN_OR_RETURN(h, be_.AllocUninitialized(DType::kF32, fp.shape()));
    QCAL_RETURN_IF_ERROR(be_.Copy(fp, h));
  }
  Tap tap;
  if (routing != nullptr && model_.config().IsMoeBlock(b_)) {
    tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
      if (in != LinearInput::kGateUp) return absl::OkStatus();
      QCAL_ASSIGN_OR_RETURN(*routing, model_.Route(b_, x));
      return absl::OkStatus();
    };
  }
  QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, h, ShapeOf(c), nullptr, tap));
  if (fp.device() != be_.device()) QCAL_RETURN_IF_ERROR(be_.Copy(h, fp));
  return absl::OkStatus();
}

absl::Status BlockRunner::Install(std::vector<SolvedLinear> solved) {
  for (SolvedLinear& s : solved) {
    const LinearKind k = s.result.report.kind;
    const LinearId id = s.result.id();
    if (Retrains()) {
      // The weight about to be replaced: full precision, smoothing folded.
      QCAL_ASSIGN_OR_RETURN(reference_[static_cast<int>(k)],
                            be_.ToHost(model_.block(b_).at(k).weight));
      if (s.retrain_base.defined()) {
        SetRetrainBase(k, std::move(s.retrain_base), std::move(s.retrain_fisher));
      }
    }
    if (s.weight.defined()) {
      model_.block(b_).at(id).weight = s.weight;
    } else {
      QCAL_RETURN_IF_ERROR(InstallWeight(model_, b_, id, s.result.quantized));
    }
    QCAL_RETURN_IF_ERROR(InstallExtras(model_, b_, id, s.result));
    results_.push_back(std::move(s.result));
    pending_.push_back(std::move(s.conversion));
  }
  const double before = t_.transfer;
  QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
  t_.solve += t_.transfer - before;
  return absl::OkStatus();
}

absl::Status BlockRunner::Push(LinearInput group) {
  if (group != LinearInput::kO && group != LinearInput::kDown) return absl::OkStatus();
  const LinearKind proj = group == LinearInput::kO ? LinearKind::kO : LinearKind::kDown;
  const bool recompute = std::any_of(kept_.begin(), kept_.end(),
                                     [](const LinearOperand& k) { return !k.op.defined(); });
  if (!recompute) {
    QCAL_RETURN_IF_ERROR(model_.HoldWeightOperands(b_, {proj}));
  } else if (group == LinearInput::kO) {
    QCAL_RETURN_IF_ERROR(
        model_.HoldWeightOperands(b_, {LinearKind::kQ, LinearKind::kK, LinearKind::kV, proj}));
  } else {
    QCAL_RETURN_IF_ERROR(model_.HoldWeightOperands(b_, {LinearKind::kGate, LinearKind::kUp, proj}));
  }
  absl::Cleanup release = [this] { model_.ReleaseWeightOperands(); };
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    LinearOperand x = std::move(kept_[c]);
    kept_[c] = LinearOperand();
    if (!x.op.defined()) {
      if (group == LinearInput::kO) {
        QCAL_ASSIGN_OR_RETURN(x.x, AttentionOf(h, c));
      } else {
        QCAL_ASSIGN_OR_RETURN(x.x, MlpOf(h, c));
      }
    }
    QCAL_RETURN_IF_ERROR(model_.AddProjection(b_, proj, x, h));
    x = LinearOperand();
    QCAL_RETURN_IF_ERROR(Store(c, h));
  }
  return Charge(t_.forward);
}

absl::Status BlockRunner::PushBlock() {
  QCAL_RETURN_IF_ERROR(
      model_.HoldWeightOperands(b_, {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO,
                                     LinearKind::kGate, LinearKind::kUp, LinearKind::kDown}));
  absl::Cleanup release = [this] { model_.ReleaseWeightOperands(); };
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, h, ShapeOf(c)));
    QCAL_RETURN_IF_ERROR(Store(c, h));
  }
  return Charge(t_.forward);
}

absl::StatusOr<std::vector<LayerResult>> BlockRunner::Finish() {
  QCAL_RETURN_IF_ERROR(WaitForConversions());
  if (prefetch_ != nullptr) {
    // The taken factors' last readers are done before their memory goes back to the side queue.
    QCAL_RETURN_IF_ERROR(be_.Synchronize());
    prefetch_.reset();
  }
  x_in_.clear();
  acts_.next_block = b_ + 1;
  return std::move(results_);
}

// A working copy of chunk c's hidden state for a statistics pass that must not advance it.
absl::StatusOr<Tensor> BlockRunner::FetchCopy(size_t c) {
  QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
  if (be_.device() == Device::kHost) return h.Clone();
  QCAL_ASSIGN_OR_RETURN(Tensor hidden, be_.AllocUninitialized(DType::kF32, h.shape()));
  QCAL_RETURN_IF_ERROR(be_.Copy(h, hidden));
  return hidden;
}

// Adds the time since the last charge to `slot`, once the device has done the work queued
// meanwhile.
absl::Status BlockRunner::Charge(double& slot) {
  QCAL_RETURN_IF_ERROR(be_.Synchronize());
  const auto now = Clock::now();
  slot += std::chrono::duration<double>(now - clock_).count();
  clock_ = now;
  return absl::OkStatus();
}

SeqShape BlockRunner::ShapeOf(size_t c) const {
  return SeqShape{acts_.chunk_batch[c], acts_.seq_len, 0};
}

// Chunk c's hidden state on the device: the chunk itself, or a device copy of a parked one.
absl::StatusOr<Tensor> BlockRunner::Fetch(size_t c) {
  const Tensor& chunk = acts_.chunks[c];
  if (chunk.device() == be_.device()) return chunk;
  QCAL_ASSIGN_OR_RETURN(Tensor d, be_.AllocUninitialized(chunk.dtype(), chunk.shape()));
  QCAL_RETURN_IF_ERROR(be_.Copy(chunk, d));
  return d;
}
// Writes back a hidden state that Fetch copied from a parked chunk.
absl::Status BlockRunner::Store(size_t c, const Tensor& h) {
  if (acts_.chunks[c].device() == be_.device()) return absl::OkStatus();
  return be_.Copy(h, acts_.chunks[c]);
}
// Whether an intermediate may stay on the device for a later stage (else it is recomputed).
bool BlockRunner::KeepOnDevice() {
  const int64_t available = be_.AvailableMemory();
  return available < 0 || available >= reserve_;
}

absl::StatusOr<Tensor> BlockRunner::AttentionOf(const Tensor& h, size_t c) {
  QCAL_ASSIGN_OR_RETURN(const LinearOperand x, TakeNormed(h, c, LinearInput::kQkv));
  return model_.AttentionOutput(b_, x, ShapeOf(c));
}
absl::StatusOr<Tensor> BlockRunner::MlpOf(const Tensor& h, size_t c) {
  QCAL_ASSIGN_OR_RETURN(const LinearOperand x, TakeNormed(h, c, LinearInput::kGateUp));
  return model_.MlpProduct(b_, x);
}
absl::StatusOr<LinearOperand> BlockRunner::TakeNormed(const Tensor& h, size_t c,
                                                      LinearInput input) {
  LinearOperand x = std::move(normed_[c]);
  normed_[c] = LinearOperand();
  if (!x.op.defined()) {
    QCAL_ASSIGN_OR_RETURN(x.x, model_.NormedInput(b_, h, input));
  }
  return x;
}

bool BlockRunner::NeedsInput() const {
  return recipe_.activations.bits < 16 ||
         (recipe_.error_reconstruction.enabled &&
          recipe_.error_reconstruction.whitening == Whitening::kDiagonal);
}

LinearOperand BlockRunner::KeptForm(LinearOperand x) const {
  if (recipe_.activations.bits >= 16) x.x = Tensor();
  return x;
}

}  // namespace qcal::engine
