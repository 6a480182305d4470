// BlockRunner's retraining phases (block_runner.h, "Retraining"): the full-precision targets, the
// trainer's inputs, installing the retrained linears and pushing the retrained block.
#include <cblas.h>

#include <chrono>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/hash_random.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/driver/install.h"
#include "services/engine/driver/memory_plan.h"
#include "services/engine/gang/plan.h"
#include "services/engine/retrain/block_trainer.h"

namespace qcal::engine {

using Clock = std::chrono::steady_clock;

uint64_t RetrainSeed(uint64_t seed, int block) {
  return kernels::HashBits(seed, static_cast<uint64_t>(block));
}

void BlockRunner::SetRetrainBase(LinearKind k, Tensor base, Tensor fisher) {
  base_[static_cast<int>(k)] = std::move(base);
  fisher_[static_cast<int>(k)] = std::move(fisher);
}

// The full-precision block's outputs replace acts.fp_chunks, computed with the block's original
// weights (Begin runs before smoothing folds anything); a device copy of each chunk's
// quantized-path input is kept, parked like the chunks when the device is short.
absl::Status BlockRunner::BeginRetrain() {
  QCAL_RETURN_IF_ERROR(StartFullPrecisionPath());
  x_in_.clear();
  base_ = {};
  fisher_ = {};
  reference_ = {};
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor x, FetchCopy(c));
    QCAL_RETURN_IF_ERROR(ParkIfShort(be_, x, reserve_));
    x_in_.push_back(std::move(x));
    QCAL_RETURN_IF_ERROR(AdvanceFullPrecision(c, nullptr));
  }
  return Charge(t_.retrain);
}

// Linear k's Fisher from the gradient pass, smoothed like its input (host F32 [d_out, d_in]).
absl::StatusOr<Tensor> BlockRunner::FisherOf(LinearInput in, LinearKind k) {
  const std::string name = LinearPrefix(b_, k);
  if (!oac_) {
    return absl::FailedPreconditionError(absl::StrCat(
        name, ": recipe key \"retrain.method\" is saliency but the solve has no gradient pass"));
  }
  auto got = oac_(b_, k);
  if (!got.ok()) return Annotate(got.status(), absl::StrCat("the Fisher of ", name));
  const auto [d_out, d_in] = LinearShape(model_.config(), k);
  if (!got->fisher.defined() || got->fisher.dtype() != DType::kF32 ||
      got->fisher.shape() != Shape{d_out, d_in}) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": the gradient pass left no Fisher F32 [", d_out, ", ", d_in,
                     "] (recipe key \"retrain.method\" is saliency)"));
  }
  LinearOac f;
  QCAL_ASSIGN_OR_RETURN(f.fisher, be_.ToHost(got->fisher));
  // A private copy: the transform is in place and a source may share its tensors.
  f.fisher = f.fisher.Clone();
  QCAL_RETURN_IF_ERROR(
      Annotate(SmoothLinearOac(smoothing_.at(in).m, f), absl::StrCat("the Fisher of ", name)));
  return f.fisher;
}

absl::Status BlockRunner::WaitForConversions() {
  bool converted = false;
  for (size_t i = 0; i < pending_.size(); ++i) {
    if (!pending_[i].valid()) continue;
    QCAL_ASSIGN_OR_RETURN(results_[i].quantized, pending_[i].get());
    converted = true;
  }
  pending_.clear();
  if (converted) {
    const double before = t_.transfer;
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    t_.solve += t_.transfer - before;
  }
  return absl::OkStatus();
}

// Pushes chunks `first`, `first` + 1, ... (inputs[i] holds batch[i] samples) through the block as
// installed, from copies of their inputs; the chunks this rank holds become its hidden states.
// With `grams`, also sums each linear input's Gram matrix over the given chunks by the canonical
// reduction (the caller gives every chunk of the job).
absl::Status BlockRunner::PushRetrained(const std::vector<Tensor>& inputs,
                                        const std::vector<int>& batch, int first,
                                        std::vector<Tensor>* grams) {
  std::vector<TreeAccumulator<InputStatistics>> acc;
  const int end = first + static_cast<int>(inputs.size());
  if (grams) {
    for (int i = 0; i < kNumLinearInputs; ++i) {
      acc.emplace_back(first, end, acts_.total_chunks, InputStatisticsCombine(be_));
    }
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, be_.Alloc(DType::kF32, inputs[i].shape()));
    QCAL_RETURN_IF_ERROR(be_.Copy(inputs[i], h));
    std::array<InputStatistics, kNumLinearInputs> chunk;
    Tap tap = nullptr;
    if (grams) {
      tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
        InputStatistics& s = chunk[static_cast<size_t>(in)];
        s.input = in;
        QCAL_ASSIGN_OR_RETURN(s.gram, be_.Alloc(DType::kF32, {x.dim(1), x.dim(1)}));
        return be_.AccumulateGram(x, s.gram);
      };
    }
    QCAL_RETURN_IF_ERROR(
        model_.BlockForward(b_, h, SeqShape{batch[i], acts_.seq_len, 0}, nullptr, tap));
    if (grams) {
      for (int in = 0; in < kNumLinearInputs; ++in) {
        QCAL_RETURN_IF_ERROR(acc[static_cast<size_t>(in)].Add(std::move(chunk[in])));
      }
    }
    const int local = first + static_cast<int>(i) - acts_.first_chunk;
    if (local < 0 || local >= static_cast<int>(acts_.chunks.size())) continue;
    Tensor& dst = acts_.chunks[static_cast<size_t>(local)];
    if (dst.device() == be_.device()) {
      dst = std::move(h);
    } else {
      QCAL_RETURN_IF_ERROR(be_.Copy(h, dst));
    }
  }
  if (!grams) return absl::OkStatus();
  grams->assign(kNumLinearInputs, Tensor());
  for (int in = 0; in < kNumLinearInputs; ++in) {
    QCAL_ASSIGN_OR_RETURN(InputPartials partials, acc[static_cast<size_t>(in)].Finish());
    QCAL_ASSIGN_OR_RETURN(InputStatistics stats,
                          CompleteInputStatistics(be_, std::move(partials), acts_.total_chunks));
    (*grams)[static_cast<size_t>(in)] = std::move(stats.gram);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<LayerResult>> BlockRunner::TrainBlock(
    const std::vector<Tensor>& inputs, const std::vector<Tensor>& targets,
    const std::vector<int>& chunk_batch) {
  if (!Retrains()) return absl::FailedPreconditionError("the recipe does not retrain");
  QCAL_RETURN_IF_ERROR(WaitForConversions());
  if (static_cast<int>(inputs.size()) != acts_.total_chunks || targets.size() != inputs.size() ||
      chunk_batch.size() != inputs.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", b_, ": retraining needs every chunk's inputs and targets (",
                     acts_.total_chunks, "), got ", inputs.size(), " inputs, ", targets.size(),
                     " targets and ", chunk_batch.size(), " batch sizes"));
  }
  std::array<const LayerResult*, kNumLinears> by_kind{};
  for (const LayerResult& r : results_) by_kind[static_cast<int>(r.report.kind)] = &r;
  RetrainBlockInput in;
  in.block = &model_.block(b_);
  for (LinearKind k : kAllLinears) {
    const int i = static_cast<int>(k);
    const LayerResult* r = by_kind[i];
    if (r == nullptr || !base_[i].defined() || !reference_[i].defined()) {
      return absl::FailedPreconditionError(absl::StrCat(
          LinearPrefix(b_, k), ": retraining needs the linear installed with its frozen base"));
    }
    RetrainLinearInput& l = in.linears[i];
    l.base = base_[i];
    l.reference = reference_[i];
    l.fisher = fisher_[i];
    if (r->report.rank > 0) {
      const int64_t rank = r->report.rank;
      l.lora_a = Tensor::FromVector(r->lora_a, {r->report.d_out, rank});
      l.lora_b = Tensor::FromVector(r->lora_b, {rank, r->report.d_in});
    }
    l.perm = r->quantized.perm;
    l.grid_scales = r->quantized.scales;
    l.grid_zeros = r->quantized.zeros;
  }
  const int64_t len = acts_.seq_len;
  auto t0 = Clock::now();
  // Adds the time since t0 to `slot` (once the device is done) and restarts t0.
  auto lap = [&](double& slot) -> absl::Status {
    QCAL_RETURN_IF_ERROR(be_.Synchronize());
    const auto now = Clock::now();
    slot += std::chrono::duration<double>(now - t0).count();
    t0 = now;
    return absl::OkStatus();
  };
  for (size_t c = 0; c < inputs.size(); ++c) {
    if (inputs[c].shape() != targets[c].shape() ||
        inputs[c].shape() != Shape{chunk_batch[c] * len, model_.config().hidden_size}) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", b_, ": retraining chunk ", c, " has inputs ", ShapeString(inputs[c].shape()),
          " and targets ", ShapeString(targets[c].shape()), " for ", chunk_batch[c], " samples"));
    }
    // The trainer reads its samples on the device: parked chunks come back for the training.
    Tensor x = inputs[c], y = targets[c];
    if (x.device() != be_.device()) {
      QCAL_ASSIGN_OR_RETURN(x, be_.ToDevice(x));
    }
    if (y.device() != be_.device()) {
      QCAL_ASSIGN_OR_RETURN(y, be_.ToDevice(y));
    }
    for (int64_t s = 0; s < chunk_batch[c]; ++s) {
      in.inputs.push_back(x.Rows(s * len, (s + 1) * len));
      in.targets.push_back(y.Rows(s * len, (s + 1) * len));
    }
  }
  RetrainSeconds& parts = t_.retrain_parts;
  QCAL_RETURN_IF_ERROR(lap(parts.gather));
  QCAL_RETURN_IF_ERROR(Charge(t_.retrain));
  if (before_training_) QCAL_RETURN_IF_ERROR(before_training_(b_));
  RetrainOptions options = RetrainOptionsOf(recipe_.retrain, RetrainSeed(seed_, b_));
  options.profile = t_.profile_retrain;
  options.profiler_step = t_.retrain_profiler_step;
  auto trained = RetrainBlock(be_, model_.config(), spec_, options, std::move(in));
  if (!trained.ok()) {
    return Annotate(trained.status(), absl::StrCat("retraining block ", b_));
  }
  t0 = Clock::now();
  parts.weights += trained->seconds.weights;
  parts.forward += trained->seconds.forward;
  parts.backward += trained->seconds.backward;
  parts.regularizer += trained->seconds.regularizer;
  parts.params += trained->seconds.params;
  parts.optimizer += trained->seconds.optimizer;
  parts.weight_grads += trained->seconds.weight_grads;
  parts.clip_grads += trained->seconds.clip_grads;
  parts.attention_forward += trained->seconds.attention_forward;
  parts.attention_backward += trained->seconds.attention_backward;
  parts.setup += trained->seconds.setup;
  parts.mse += trained->seconds.mse;
  parts.finish += trained->seconds.finish;
  std::vector<LayerResult> out;
  for (LinearKind k : kAllLinears) {
    const int i = static_cast<int>(k);
    RetrainedLinear& t = trained->linears[i];
    LayerResult r = *by_kind[i];
    const int64_t d_out = r.report.d_out, d_in = r.report.d_in, rank = t.lora_a.dim(1);
    r.quantized = std::move(t.quantized);
    r.lora_a.assign(t.lora_a.data<float>(), t.lora_a.data<float>() + t.lora_a.numel());
    r.lora_b.assign(t.lora_b.data<float>(), t.lora_b.data<float>() + t.lora_b.numel());
    r.report.rank = rank;
    r.report.extra_params =
        static_cast<double>(rank * (d_out + d_in)) / (static_cast<double>(d_out) * d_in);
    r.report.retrained = true;
    QCAL_RETURN_IF_ERROR(InstallWeight(model_, b_, k, r.quantized));
    QCAL_RETURN_IF_ERROR(InstallExtras(model_, b_, k, r));
    out.push_back(std::move(r));
  }
  BlockRetrainReport report;
  for (const EpochLoss& e : trained->epochs) {
    report.epochs.push_back(
        {RetrainStageName(e.stage), e.epoch, e.mean.loss, e.mean.output_mse, e.mean.regularizer});
  }
  report.output_mse_before = trained->output_mse_before;
  report.output_mse_after = trained->output_mse_after;
  out[0].report.block_retrain = std::move(report);
  std::vector<Tensor> grams;
  QCAL_RETURN_IF_ERROR(PushRetrained(inputs, chunk_batch, 0, &grams));
  // Each linear's error after training, on the retrained block's inputs of all chunks.
  for (LayerResult& r : out) {
    const LinearKind k = r.report.kind;
    const Tensor& gram = grams[static_cast<size_t>(InputOf(k))];
    QCAL_ASSIGN_OR_RETURN(Tensor w, be_.ToDevice(reference_[static_cast<int>(k)]));
    // Q(W̃; γ, β) + L_A·L_B: on the device from the installed weight and factors where the
    // backend has AddLowRank, else on the host.
    Tensor w_eff;
    const Linear& installed = model_.block(b_).at(k);
    if (be_.SupportsSolverOp(kernels::SolverOp::kErrorReconstruction) &&
        installed.lora_a.defined()) {
      QCAL_ASSIGN_OR_RETURN(w_eff, be_.AllocUninitialized(DType::kF32, installed.weight.shape()));
      QCAL_RETURN_IF_ERROR(be_.Copy(installed.weight, w_eff));
      QCAL_RETURN_IF_ERROR(be_.AddLowRank(installed.lora_a, installed.lora_b, w_eff));
    } else {
      const int d_out = static_cast<int>(r.report.d_out), d_in = static_cast<int>(r.report.d_in);
      const int rank = static_cast<int>(r.report.rank);
      std::vector<float> w_eff_host = r.quantized.Dequantized();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, d_out, d_in, rank, 1.0f,
                  r.lora_a.data(), rank, r.lora_b.data(), d_in, 1.0f, w_eff_host.data(), d_in);
      QCAL_ASSIGN_OR_RETURN(w_eff,
                            be_.ToDevice(Tensor::FromVector(w_eff_host, {r.report.d_out, d_in})));
    }
    QCAL_ASSIGN_OR_RETURN(const double norm, be_.OutputError(w, Tensor(), gram));
    QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, w_eff, gram));
    r.report.rel_error_retrained = error / (norm > 0 ? norm : 1.0);
  }
  results_ = out;
  QCAL_RETURN_IF_ERROR(lap(parts.install));
  QCAL_RETURN_IF_ERROR(Charge(t_.retrain));
  return out;
}

absl::Status BlockRunner::InstallRetrained(std::vector<LayerResult> trained) {
  if (!Retrains()) return absl::FailedPreconditionError("the recipe does not retrain");
  QCAL_RETURN_IF_ERROR(WaitForConversions());
  if (trained.size() != kAllLinears.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", b_, ": ", trained.size(), " retrained linears"));
  }
  for (size_t i = 0; i < trained.size(); ++i) {
    const LinearKind k = kAllLinears[i];
    if (trained[i].report.kind != k || trained[i].report.block != b_) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b_, ": retrained linear ", i, " is ", trained[i].report.name));
    }
    QCAL_RETURN_IF_ERROR(InstallWeight(model_, b_, k, trained[i].quantized));
    QCAL_RETURN_IF_ERROR(InstallExtras(model_, b_, k, trained[i]));
  }
  QCAL_RETURN_IF_ERROR(PushRetrained(x_in_, acts_.chunk_batch, acts_.first_chunk, nullptr));
  results_ = std::move(trained);
  return Charge(t_.retrain);
}

}  // namespace qcal::engine
