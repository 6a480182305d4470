#include "services/engine/driver/block_runner.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <future>
#include <memory>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/install.h"
#include "services/engine/driver/memory_plan.h"
#include "services/engine/oac/factor_prefetch.h"
#include "services/engine/quant/quantized_linear.h"

namespace qcal::engine {
namespace {

using Clock = std::chrono::steady_clock;

absl::Status CheckFinite(const Tensor& host, const std::string& what) {
  const float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) {
    if (!std::isfinite(p[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, " contains NaN or Inf"));
    }
  }
  return absl::OkStatus();
}

// CheckFinite for a tensor in host memory, before a solve: the error names the statistics or the
// weight as a whole. Device tensors are left to the solver ops, which check their inputs on the
// device and name the first bad value.
absl::Status CheckFiniteOnHost(const Tensor& t, const std::string& what) {
  return t.device() == Device::kHost ? CheckFinite(t, what) : absl::OkStatus();
}

// A QuantizedLinear from a device solve's results, with codes, scales and zeros already on the
// host.
QuantizedLinear ToQuantizedLinear(const kernels::QuantizedTensors& q, const QuantSpec& spec,
                                  const Tensor& codes, const Tensor& scales, const Tensor& zeros) {
  QuantizedLinear out;
  out.d_out = q.d_out;
  out.d_in = q.d_in;
  out.spec = spec;
  out.group_size = q.group_size;
  out.n_groups = q.n_groups;
  const uint8_t* c = codes.data<uint8_t>();
  out.codes.assign(c, c + codes.numel());
  const float* s = scales.data<float>();
  out.scales.assign(s, s + scales.numel());
  const int32_t* z = zeros.data<int32_t>();
  out.zeros.assign(z, z + zeros.numel());
  out.g_idx = q.g_idx;
  out.perm = q.perm;
  return out;
}

// Runs fn on a thread of its own when one can be started, else right here.
std::future<QuantizedLinear> RunAsync(const std::function<QuantizedLinear()>& fn) {
  try {
    return std::async(std::launch::async, fn);
  } catch (const std::system_error&) {
    std::promise<QuantizedLinear> done;
    done.set_value(fn());
    return done.get_future();
  }
}

// out = w_hat + a·b (host, row-major [d_out][d_in]; a [d_out][r], b [r][d_in]).
std::vector<float> AddLowRank(const std::vector<float>& w_hat, const std::vector<float>& a,
                              const std::vector<float>& b, int64_t d_out, int64_t d_in, int64_t r) {
  std::vector<float> out = w_hat;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(d_out),
              static_cast<int>(d_in), static_cast<int>(r), 1.0f, a.data(), static_cast<int>(r),
              b.data(), static_cast<int>(d_in), 1.0f, out.data(), static_cast<int>(d_in));
  return out;
}

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
  reserve_ = WorkingSetBytes(model.config(), chunk_rows);
}

absl::Status SmoothLinearOac(const std::vector<float>& m, LinearOac& oac) {
  if (m.empty()) return absl::OkStatus();
  const int64_t n = static_cast<int64_t>(m.size());
  for (size_t j = 0; j < m.size(); ++j) {
    if (!std::isfinite(m[j]) || !(m[j] > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("smoothing scale ", j, " is ", m[j], "; it must be finite and > 0"));
    }
  }
  Tensor& h = oac.hessian;
  if (h.defined()) {
    if (h.device() != Device::kHost || h.dtype() != DType::kF32 || h.shape() != Shape{n, n}) {
      return absl::InvalidArgumentError(
          absl::StrCat("an output-adaptive Hessian to smooth must be a host F32 [", n, ", ", n,
                       "] tensor, got ", ShapeString(h.shape())));
    }
    float* hp = h.data<float>();
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) hp[i * n + j] = hp[i * n + j] / m[i] / m[j];
    }
  }
  Tensor& f = oac.fisher;
  if (!f.defined()) return absl::OkStatus();
  if (f.device() != Device::kHost || f.dtype() != DType::kF32 || f.shape().size() != 2 ||
      f.dim(1) != n) {
    return absl::InvalidArgumentError(absl::StrCat("a Fisher to smooth must be a host F32 [d_out, ",
                                                   n, "] tensor, got ", ShapeString(f.shape())));
  }
  float* fp = f.data<float>();
  for (int64_t o = 0; o < f.dim(0); ++o) {
    for (int64_t j = 0; j < n; ++j) fp[o * n + j] = fp[o * n + j] / m[j] / m[j];
  }
  return absl::OkStatus();
}

Combine<InputStatistics> InputStatisticsCombine(kernels::Backend& backend) {
  return [&backend](InputStatistics& left, const InputStatistics& right) -> absl::Status {
    if (left.input != right.input || left.gram.shape() != right.gram.shape() ||
        left.abs_stats.has_value() != right.abs_stats.has_value()) {
      return absl::InvalidArgumentError(
          "partial statistics of different inputs or shapes cannot be summed");
    }
    QCAL_RETURN_IF_ERROR(backend.Add(right.gram, left.gram));
    if (left.abs_stats) QCAL_RETURN_IF_ERROR(left.abs_stats->Merge(*right.abs_stats));
    return absl::OkStatus();
  };
}

Combine<ActivationStats> ActivationStatsCombine() {
  return [](ActivationStats& left, const ActivationStats& right) { return left.Merge(right); };
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
  kept_.assign(acts_.chunks.size(), Tensor());
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
    QCAL_ASSIGN_OR_RETURN(h, be_.Alloc(DType::kF32, fp.shape()));
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

absl::StatusOr<SmoothingPartials> BlockRunner::CollectSmoothingPartials() {
  // Name a bad weight before its NaNs reach the statistics (on the device where it can).
  for (LinearKind k : kAllLinears) {
    const Tensor& weight = model_.block(b_).at(k).weight;
    if (SmoothingOnDevice(be_)) {
      QCAL_ASSIGN_OR_RETURN(kernels::ChannelStats c, be_.ChannelAbsStats(weight, 0));
      if (c.first_bad_column >= 0) {
        return absl::InvalidArgumentError(absl::StrCat("weight ", LinearPrefix(b_, k), ": column ",
                                                       c.first_bad_column,
                                                       " holds a value that is not finite"));
      }
      continue;
    }
    QCAL_ASSIGN_OR_RETURN(Tensor w, be_.ToHost(weight));
    QCAL_RETURN_IF_ERROR(CheckFinite(w, absl::StrCat("weight ", LinearPrefix(b_, k))));
  }
  const int begin = acts_.first_chunk;
  const int end = begin + static_cast<int>(acts_.chunks.size());
  std::vector<TreeAccumulator<ActivationStats>> acc;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    acc.emplace_back(begin, end, acts_.total_chunks, ActivationStatsCombine());
  }
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor hidden, FetchCopy(c));
    auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
      QCAL_ASSIGN_OR_RETURN(ActivationStats s, ChunkAbsStats(in, x));
      QCAL_RETURN_IF_ERROR(acc[static_cast<size_t>(in)].Add(std::move(s)));
      if (in == LinearInput::kDown) return absl::CancelledError("statistics taken");
      return absl::OkStatus();
    };
    QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, hidden, ShapeOf(c), nullptr, tap));
  }
  SmoothingPartials out;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    QCAL_ASSIGN_OR_RETURN(out.inputs[static_cast<size_t>(i)], acc[static_cast<size_t>(i)].Finish());
  }
  return out;
}

absl::StatusOr<SmoothingStatistics> BlockRunner::CompleteSmoothing(SmoothingPartials all) const {
  SmoothingStatistics stats;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    auto s = CompleteTree(std::move(all.inputs[static_cast<size_t>(i)]), acts_.total_chunks,
                          ActivationStatsCombine());
    if (!s.ok()) {
      return Annotate(s.status(), absl::StrCat("block ", b_, ": smoothing statistics of input ",
                                               LinearInputName(static_cast<LinearInput>(i))));
    }
    stats.inputs[static_cast<size_t>(i)] = *std::move(s);
  }
  return stats;
}

absl::StatusOr<BlockSmoothing> BlockRunner::SolveSmoothing(const SmoothingStatistics& stats) {
  SmoothingOptions so;
  so.method = recipe_.smoothing.method;
  so.alpha = recipe_.smoothing.alpha;
  so.outlier_channels = recipe_.smoothing.outlier_channels;
  std::array<const ActivationStats*, kNumLinearInputs> ptrs{};
  for (int i = 0; i < kNumLinearInputs; ++i) {
    ptrs[i] = stats.inputs[i] ? &*stats.inputs[i] : nullptr;
  }
  auto scales = ComputeBlockSmoothing(be_, model_.block(b_), model_.config(), ptrs, so);
  if (!scales.ok()) return Annotate(scales.status(), absl::StrCat("smoothing of block ", b_));
  return scales;
}

absl::Status BlockRunner::InstallSmoothing(BlockSmoothing smoothing) {
  smoothing_ = std::move(smoothing);
  BlockWeights& bw = model_.block(b_);
  QCAL_RETURN_IF_ERROR(Annotate(FoldBlockSmoothing(be_, model_.config(), smoothing_, bw),
                                absl::StrCat("smoothing of block ", b_)));
  const std::string p = absl::StrCat("model.layers.", b_, ".");
  if (!smoothing_.at(LinearInput::kQkv).m.empty()) {
    QCAL_RETURN_IF_ERROR(RoundFolded(LinearKind::kQ, p + "input_layernorm.weight", bw.input_norm));
  }
  if (!smoothing_.at(LinearInput::kGateUp).m.empty()) {
    QCAL_RETURN_IF_ERROR(RoundFolded(LinearKind::kGate, p + "post_attention_layernorm.weight",
                                     bw.post_attention_norm));
  }
  for (auto [in, k] : {std::pair{LinearInput::kO, LinearKind::kV},
                       std::pair{LinearInput::kDown, LinearKind::kUp}}) {
    if (!smoothing_.at(in).m.empty() && bw.at(k).bias.defined()) {
      QCAL_RETURN_IF_ERROR(RoundFolded(k, LinearPrefix(b_, k) + ".bias", bw.at(k).bias));
    }
  }
  return Charge(t_.smooth);
}

// The group's input is computed from each chunk's current hidden state: the normed block input
// (q/k/v), the attention output through the installed q/k/v (o), the normed post-attention
// residual (gate/up) or the MLP product through the installed gate/up (down). The last two of
// these are what Push(kO) and Push(kDown) add projections of: kept for them while they fit.
absl::StatusOr<InputPartials> BlockRunner::CollectPartials(LinearInput group) {
  TreeAccumulator<InputStatistics> acc = NewInputAccumulator();
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    Tensor x;
    switch (group) {
      case LinearInput::kQkv:
      case LinearInput::kGateUp: {
        QCAL_ASSIGN_OR_RETURN(x, model_.NormedInput(b_, h, group));
        break;
      }
      case LinearInput::kO: {
        QCAL_ASSIGN_OR_RETURN(x, AttentionOf(h, c));
        break;
      }
      case LinearInput::kDown: {
        QCAL_ASSIGN_OR_RETURN(x, MlpOf(h));
        break;
      }
    }
    QCAL_RETURN_IF_ERROR(Charge(t_.forward));
    QCAL_ASSIGN_OR_RETURN(InputStatistics partial, ChunkStatistics(group, x));
    QCAL_RETURN_IF_ERROR(acc.Add(std::move(partial)));
    QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
    if ((group == LinearInput::kO || group == LinearInput::kDown) && KeepOnDevice()) {
      kept_[c] = std::move(x);
    }
  }
  return acc.Finish();
}

absl::StatusOr<std::array<InputPartials, kNumLinearInputs>>
BlockRunner::CollectFullPrecisionPartials() {
  std::vector<TreeAccumulator<InputStatistics>> acc;
  for (int i = 0; i < kNumLinearInputs; ++i) acc.push_back(NewInputAccumulator());
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor hidden, FetchCopy(c));
    auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
      QCAL_RETURN_IF_ERROR(Charge(t_.forward));
      QCAL_ASSIGN_OR_RETURN(InputStatistics partial, ChunkStatistics(in, x));
      QCAL_RETURN_IF_ERROR(acc[static_cast<size_t>(in)].Add(std::move(partial)));
      QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
      // Stop the forward once the last input has been seen.
      if (in == LinearInput::kDown) return absl::CancelledError("statistics taken");
      return absl::OkStatus();
    };
    QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, hidden, ShapeOf(c), nullptr, tap));
  }
  std::array<InputPartials, kNumLinearInputs> out;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    QCAL_ASSIGN_OR_RETURN(out[static_cast<size_t>(i)], acc[static_cast<size_t>(i)].Finish());
  }
  return out;
}

absl::StatusOr<InputStatistics> BlockRunner::Complete(LinearInput group, InputPartials all) {
  auto stats = CompleteTree(std::move(all), acts_.total_chunks, InputStatisticsCombine(be_));
  if (!stats.ok()) {
    return Annotate(stats.status(),
                    absl::StrCat("block ", b_, ": statistics of input ", LinearInputName(group)));
  }
  if (stats->input != group) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b_, ": statistics of input ",
                                                   LinearInputName(stats->input), " given as ",
                                                   LinearInputName(group)));
  }
  QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
  return stats;
}

absl::StatusOr<std::vector<SolvedLinear>> BlockRunner::Solve(const InputStatistics& stats,
                                                             const std::vector<LinearKind>& kinds,
                                                             int expert) {
  QCAL_RETURN_IF_ERROR(Charge(t_.forward));
  const double before = t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct;
  QCAL_ASSIGN_OR_RETURN(std::vector<SolvedLinear> solved, SolveInput(stats, kinds, expert));
  QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
  t_.solve += t_.factor + t_.quantize + t_.error + t_.transfer + t_.reconstruct - before;
  return solved;
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
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    Tensor x = std::move(kept_[c]);
    kept_[c] = Tensor();
    if (!x.defined()) {
      if (group == LinearInput::kO) {
        QCAL_ASSIGN_OR_RETURN(x, AttentionOf(h, c));
      } else {
        QCAL_ASSIGN_OR_RETURN(x, MlpOf(h));
      }
    }
    QCAL_RETURN_IF_ERROR(model_.AddProjection(b_, proj, x, h));
    x = Tensor();
    QCAL_RETURN_IF_ERROR(Store(c, h));
  }
  return Charge(t_.forward);
}

absl::StatusOr<std::vector<int64_t>> BlockRunner::RouteChunks() {
  const ModelConfig& config = model_.config();
  if (!config.IsMoeBlock(b_)) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", b_, " is not a mixture-of-experts block"));
  }
  routing_.clear();
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
    QCAL_ASSIGN_OR_RETURN(Routing r, model_.Route(b_, x));
    routing_.push_back(std::move(r));
  }
  const bool fp = moe_.routing == MoeRouting::kFullPrecision;
  if (fp && fp_routing_.size() != routing_.size()) {
    return absl::FailedPreconditionError(absl::StrCat("block ", b_, ": full-precision routing of ",
                                                      fp_routing_.size(), " chunks for ",
                                                      routing_.size(), " (Begin first)"));
  }
  std::vector<int64_t> counts(static_cast<size_t>(config.num_experts), 0);
  for (const Routing& r : fp ? fp_routing_ : routing_) {
    for (int32_t e : r.experts) ++counts[static_cast<size_t>(e)];
  }
  QCAL_RETURN_IF_ERROR(Charge(t_.forward));
  return counts;
}

absl::Status BlockRunner::SetExpertCounts(std::vector<int64_t> counts) {
  if (static_cast<int>(counts.size()) != model_.config().num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b_, ": token counts of ",
                                                   counts.size(), " experts for ",
                                                   model_.config().num_experts));
  }
  expert_tokens_ = std::move(counts);
  fallback_.clear();
  for (int64_t n : expert_tokens_) fallback_.push_back(n < moe_.min_tokens);
  return absl::OkStatus();
}

std::vector<int32_t> BlockRunner::ExpertRows(int unit, size_t c, bool* all) const {
  const int expert = ExpertOfUnit(model_.config(), unit);
  *all = expert == kSharedExpert || fallback_[static_cast<size_t>(expert)];
  if (*all) return {};
  const Routing& r = moe_.routing == MoeRouting::kFullPrecision ? fp_routing_[c] : routing_[c];
  std::vector<int32_t> rows;
  std::vector<float> weights;
  r.RowsOf(expert, &rows, &weights);
  return rows;
}

absl::StatusOr<InputPartials> BlockRunner::CollectExpertPartials(int unit, LinearInput group) {
  const ModelConfig& config = model_.config();
  if (!config.IsMoeBlock(b_) || unit < 0 || unit >= NumExpertUnits(config) ||
      (group != LinearInput::kGateUp && group != LinearInput::kDown)) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b_, ": no statistics of expert unit ",
                                                   unit, " input ", LinearInputName(group)));
  }
  if (routing_.size() != acts_.chunks.size() ||
      static_cast<int>(expert_tokens_.size()) != config.num_experts) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", b_, ": expert statistics before RouteChunks and SetExpertCounts"));
  }
  const int expert = ExpertOfUnit(config, unit);
  const int64_t width = LinearShape(config, b_, LinearId(ConsumersOf(group)[0], expert)).second;
  TreeAccumulator<InputStatistics> acc = NewInputAccumulator();
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
    bool all = false;
    const std::vector<int32_t> rows = ExpertRows(unit, c, &all);
    Tensor xe;
    if (all) {
      xe = x;
    } else if (!rows.empty()) {
      QCAL_ASSIGN_OR_RETURN(xe, model_.GatherRows(x, rows));
    }
    if (group == LinearInput::kDown && xe.defined()) {
      QCAL_ASSIGN_OR_RETURN(xe, model_.ExpertProduct(b_, expert, xe));
    }
    QCAL_RETURN_IF_ERROR(Charge(t_.forward));
    QCAL_ASSIGN_OR_RETURN(InputStatistics partial, ChunkStatistics(group, xe, width));
    QCAL_RETURN_IF_ERROR(acc.Add(std::move(partial)));
    QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
  }
  return acc.Finish();
}

absl::Status BlockRunner::PushMoe() {
  if (routing_.size() != acts_.chunks.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat("block ", b_, ": PushMoe before RouteChunks"));
  }
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
    QCAL_RETURN_IF_ERROR(model_.AddMoeOutput(b_, x, routing_[c], h));
    QCAL_RETURN_IF_ERROR(Store(c, h));
  }
  routing_.clear();
  fp_routing_.clear();
  return Charge(t_.forward);
}

absl::Status BlockRunner::PushBlock() {
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
  QCAL_ASSIGN_OR_RETURN(Tensor hidden, be_.Alloc(DType::kF32, h.shape()));
  QCAL_RETURN_IF_ERROR(be_.Copy(h, hidden));
  return hidden;
}

// The canonical reduction over this rank's chunks.
TreeAccumulator<InputStatistics> BlockRunner::NewInputAccumulator() {
  const int begin = acts_.first_chunk;
  return TreeAccumulator<InputStatistics>(begin, begin + static_cast<int>(acts_.chunks.size()),
                                          acts_.total_chunks, InputStatisticsCombine(be_));
}

// One chunk's statistics of input `in`: xᵀx in a zeroed tensor and, with LQER's diagonal
// whitening, the chunk's |x| statistics.
absl::StatusOr<InputStatistics> BlockRunner::ChunkStatistics(LinearInput in, const Tensor& x,
                                                             int64_t width) {
  InputStatistics stats;
  stats.input = in;
  if (width == 0) width = widths_[static_cast<int>(in)];
  QCAL_ASSIGN_OR_RETURN(stats.gram, be_.Alloc(DType::kF32, {width, width}));
  if (!x.defined()) return stats;
  QCAL_RETURN_IF_ERROR(be_.AccumulateGram(x, stats.gram));
  if (recipe_.error_reconstruction.enabled &&
      recipe_.error_reconstruction.whitening == Whitening::kDiagonal) {
    QCAL_ASSIGN_OR_RETURN(stats.abs_stats, ChunkAbsStats(in, x));
  }
  return stats;
}

// The |x| statistics of x, one chunk of input `in`.
absl::StatusOr<ActivationStats> BlockRunner::ChunkAbsStats(LinearInput in, const Tensor& x) {
  ActivationStats s(widths_[static_cast<int>(in)]);
  if (SmoothingOnDevice(be_)) {
    // On the device: only the per-channel totals come back.
    QCAL_ASSIGN_OR_RETURN(kernels::ChannelStats c, be_.ChannelAbsStats(x, acts_.seq_len));
    if (c.first_bad_column >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b_, ": activation statistics: channel ", c.first_bad_column,
                       " of a linear input holds a value that is not finite"));
    }
    QCAL_RETURN_IF_ERROR(Annotate(s.AddTotals(c.max_abs, c.sum_abs, c.tokens, c.skipped),
                                  absl::StrCat("block ", b_)));
    return s;
  }
  QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(x));
  QCAL_RETURN_IF_ERROR(
      Annotate(s.Accumulate(host.data<float>(), host.dim(0), host.dim(1), acts_.seq_len),
               absl::StrCat("block ", b_)));
  return s;
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
  QCAL_ASSIGN_OR_RETURN(Tensor d, be_.Alloc(chunk.dtype(), chunk.shape()));
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

// Rounds a folded tensor to its checkpoint dtype in place and records it for kind's artifact.
absl::Status BlockRunner::RoundFolded(LinearKind kind, const std::string& name, Tensor& t) {
  QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(t));
  host = host.Clone();
  const DType dtype = model_.SourceDType(name);
  if (dtype != DType::kF32) {
    QCAL_ASSIGN_OR_RETURN(Tensor stored, host.ConvertTo(dtype));
    QCAL_ASSIGN_OR_RETURN(host, stored.ToF32());
    QCAL_ASSIGN_OR_RETURN(t, be_.ToDevice(host));
  }
  folded_[static_cast<int>(kind)][name] = host;
  return absl::OkStatus();
}

// The attention output of chunk c's current hidden state h.
absl::StatusOr<Tensor> BlockRunner::AttentionOf(const Tensor& h, size_t c) {
  QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kQkv));
  return model_.AttentionOutput(b_, x, ShapeOf(c));
}
// The MLP product of the post-attention hidden state h.
absl::StatusOr<Tensor> BlockRunner::MlpOf(const Tensor& h) {
  QCAL_ASSIGN_OR_RETURN(Tensor x, model_.NormedInput(b_, h, LinearInput::kGateUp));
  return model_.MlpProduct(b_, x);
}

// A host copy of a device result, in the backend's transfer memory.
absl::StatusOr<Tensor> BlockRunner::Download(const Tensor& t) {
  QCAL_ASSIGN_OR_RETURN(Tensor host, be_.AllocHost(t.dtype(), t.shape()));
  QCAL_RETURN_IF_ERROR(be_.Copy(t, host));
  return host;
}

LayerResult BlockRunner::NewResult(LinearId id, int64_t d_out, int64_t d_in) const {
  LayerResult r;
  r.report.block = b_;
  r.report.kind = id.kind;
  r.report.expert = id.expert;
  r.report.name = LinearPrefix(model_.config(), b_, id);
  if (id.expert >= 0) {
    r.report.routed_tokens = expert_tokens_[static_cast<size_t>(id.expert)];
    r.report.fallback = fallback_[static_cast<size_t>(id.expert)];
  }
  r.report.d_out = d_out;
  r.report.d_in = d_in;
  return r;
}

// The columns ASER extracted from input `in` (empty otherwise).
const std::vector<int32_t>& BlockRunner::OutliersOf(LinearInput in) const {
  return smoothing_.at(in).outliers;
}

// ASER's extracted columns are restored by the low-rank branch only: a fixed rank (after
// clamping) below their number is an error naming the layer.
absl::Status BlockRunner::CheckOutliersFitRank(LinearInput in, const LayerResult& r) const {
  const int rank = recipe_.error_reconstruction.rank;
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const int64_t outliers = static_cast<int64_t>(OutliersOf(in).size());
  if (rank == kRecipeAutoRank || outliers <= std::min<int64_t>(rank, std::min(d_out, d_in))) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(r.report.name, ": recipe key \"smoothing.outlier_channels\" extracts ", outliers,
                   " columns, more than the rank ", std::min<int64_t>(rank, std::min(d_out, d_in)),
                   " of this ", d_out, "x", d_in, " layer can restore"));
}

// Error reconstruction runs on the device when the backend has the ops.
bool BlockRunner::DeviceReconstruction() const {
  return recipe_.error_reconstruction.enabled &&
         be_.SupportsSolverOp(kernels::SolverOp::kErrorReconstruction);
}

// The engine's options for error reconstruction of a linear fed by `in`.
ErrorReconstructionOptions BlockRunner::ErOptions(LinearInput in) const {
  const ErrorReconstructionRecipe& er = recipe_.error_reconstruction;
  ErrorReconstructionOptions opt;
  opt.rank = er.rank == kRecipeAutoRank ? kAutoRank : er.rank;
  opt.energy = er.energy;
  opt.max_extra_params = er.max_extra_params;
  opt.min_rank = static_cast<int>(OutliersOf(in).size());
  return opt;
}

// Error reconstruction of one linear on the device with the randomized SVD: the factors are
// fitted and the corrected layer's output error measured there; only the factors come back to
// the host. Rank auto computes the largest rank the rule allows (MaxRank), applies ChooseRank to
// those leading singular values plus one value carrying the rest of ‖E·S‖_F², and keeps the
// leading columns of L_A and rows of L_B (the best rank-r factors within the sketch).
absl::Status BlockRunner::ReconstructOnDevice(LinearInput in, const Tensor& w, const Tensor& w_hat,
                                              const Tensor& gram, const Tensor& whitening,
                                              double denom, LayerResult& r) {
  QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const ErrorReconstructionOptions eopt = ErOptions(in);
  kernels::LowRankOptions opt;
  opt.rank = static_cast<int>(MaxRank(d_out, d_in, eopt));
  opt.svd = kernels::SvdMethod::kRandomized;
  auto lr = be_.ReconstructError(w, w_hat, whitening, opt);
  if (!lr.ok()) return Annotate(lr.status(), r.report.name);
  QCAL_ASSIGN_OR_RETURN(Tensor a_all, be_.ToHost(lr->a));
  QCAL_ASSIGN_OR_RETURN(Tensor b_all, be_.ToHost(lr->b));
  const int64_t computed = lr->rank;
  int64_t rank = computed;
  double error_after = lr->error_after;
  if (eopt.rank == kAutoRank) {
    std::vector<double> sigma = lr->singular_values;
    double kept = 0;
    for (double v : sigma) kept += v * v;
    const double total = lr->error_before * lr->error_before;
    sigma.push_back(std::sqrt(std::max(0.0, total - kept)));
    rank = std::min(ChooseRank(sigma, d_out, d_in, eopt), computed);
    double kept_r = 0;
    for (int64_t i = 0; i < rank; ++i) kept_r += sigma[i] * sigma[i];
    error_after = std::sqrt(std::max(0.0, total - kept_r));
  }
  r.report.rank = static_cast<int>(rank);
  r.report.reconstructed = true;
  r.report.whitened_error_before = lr->error_before;
  r.report.whitened_error_after = error_after;
  r.report.extra_params = static_cast<double>(rank * (d_out + d_in)) /
                          (static_cast<double>(d_out) * static_cast<double>(d_in));
  // L_A's leading `rank` columns and L_B's leading `rank` rows.
  r.lora_a.resize(static_cast<size_t>(d_out * rank));
  for (int64_t o = 0; o < d_out; ++o) {
    std::copy_n(a_all.data<float>() + o * computed, rank, r.lora_a.begin() + o * rank);
  }
  r.lora_b.assign(b_all.data<float>(), b_all.data<float>() + rank * d_in);
  Tensor a = lr->a, b = lr->b;
  if (rank != computed) {
    QCAL_ASSIGN_OR_RETURN(a, be_.ToDevice(Tensor::FromVector(r.lora_a, {d_out, rank})));
    QCAL_ASSIGN_OR_RETURN(b, be_.ToDevice(Tensor::FromVector(r.lora_b, {rank, d_in})));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor w_eff, be_.Alloc(DType::kF32, w_hat.shape()));
  QCAL_RETURN_IF_ERROR(be_.Copy(w_hat, w_eff));
  QCAL_RETURN_IF_ERROR(be_.AddLowRank(a, b, w_eff));
  QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, w_eff, gram));
  r.report.rel_error_er = error / denom;
  return absl::OkStatus();
}

// Error reconstruction of one linear on the host (DESIGN section 3): E = w − w_hat, where w is
// W' (smoothed) and w_hat the dequantized Q(W'_normal); fills the factors and the report.
absl::Status BlockRunner::Reconstruct(LinearInput in, const float* w,
                                      const std::vector<float>& w_hat, const Tensor& gram_host,
                                      const WhiteningFactor& whitening, double denom,
                                      LayerResult& r) {
  const int64_t d_out = r.report.d_out, d_in = r.report.d_in;
  const ErrorReconstructionOptions opt = ErOptions(in);
  QCAL_RETURN_IF_ERROR(CheckOutliersFitRank(in, r));
  auto lr = ReconstructError<float>(w, w_hat.data(), d_out, d_in, whitening, opt);
  if (!lr.ok()) return Annotate(lr.status(), r.report.name);
  r.report.rank = lr->rank;
  r.report.reconstructed = true;
  r.report.whitened_error_before = lr->error_before;
  r.report.whitened_error_after = lr->error_after;
  r.report.extra_params =
      static_cast<double>(lr->extra_params()) / (static_cast<double>(d_out) * d_in);
  const std::vector<float> w_eff = AddLowRank(w_hat, lr->a, lr->b, d_out, d_in, lr->rank);
  r.report.rel_error_er =
      OutputError(w, w_eff.data(), gram_host.data<float>(), d_out, d_in) / denom;
  r.lora_a = std::move(lr->a);
  r.lora_b = std::move(lr->b);
  return absl::OkStatus();
}

// The whitening factor of input `in` for error reconstruction, from its Gram matrix (host) or
// its quantized-path statistics.
absl::StatusOr<WhiteningFactor> BlockRunner::WhiteningOf(const InputStatistics& stats,
                                                         const Tensor& gram_host) {
  const Whitening kind = recipe_.error_reconstruction.whitening;
  const int64_t n = gram_host.dim(0);
  if (kind == Whitening::kCholesky) {
    auto f = CholeskyWhitening<float>(gram_host.data<float>(), n, recipe_.gptq.damp);
    if (!f.ok()) {
      return Annotate(f.status(),
                      absl::StrCat("whitening of block ", b_, " (", RecipeName(kind), ")"));
    }
    return f;
  }
  if (kind == Whitening::kDiagonal) {
    if (!stats.abs_stats) {
      return absl::InternalError("diagonal whitening without activation statistics");
    }
    return DiagonalWhitening(stats.abs_stats->MeanAbs());
  }
  return IdentityWhitening(n);
}

// The device whitening factor of input `in` (Backend::ReconstructError's `whitening`):
// Cholesky of the device Gram matrix, LQER's mean |x| uploaded, or undefined for plain SVD.
absl::StatusOr<Tensor> BlockRunner::DeviceWhiteningOf(const InputStatistics& stats) {
  const Whitening kind = recipe_.error_reconstruction.whitening;
  if (kind == Whitening::kCholesky) {
    auto s = be_.CholeskyWhitening(stats.gram, recipe_.gptq.damp);
    if (!s.ok()) {
      return Annotate(s.status(),
                      absl::StrCat("whitening of block ", b_, " (", RecipeName(kind), ")"));
    }
    return s;
  }
  if (kind == Whitening::kDiagonal) {
    if (!stats.abs_stats) {
      return absl::InternalError("diagonal whitening without activation statistics");
    }
    QCAL_ASSIGN_OR_RETURN(const WhiteningFactor f, DiagonalWhitening(stats.abs_stats->MeanAbs()));
    const std::vector<float> s(f.factor.begin(), f.factor.end());
    return be_.ToDevice(Tensor::FromVector(s, {f.d_in}));
  }
  return Tensor();
}

// With the backend's solver ops: one factorization per input shared by its consumers; the weights
// never leave the device (the dequantized result replaces them there). Only codes, scales and
// zeros are copied to the host; their conversion into QuantizedLinear runs on a host thread while
// the device goes on with the next stage. Error reconstruction runs on the device (randomized SVD,
// ReconstructOnDevice) when the backend has it, else on the host (LAPACK, the full SVD of the
// reference: the CPU backend's case) with the weight, its quantized form and the statistics copied
// there; that host whitening comes before the factorization, as it always has on the host.
absl::StatusOr<std::vector<SolvedLinear>> BlockRunner::SolveInput(
    const InputStatistics& stats, const std::vector<LinearKind>& kinds, int expert) {
  const LinearInput in = stats.input;
  const Tensor& gram = stats.gram;
  BlockWeights& bw = model_.block(b_);
  std::vector<SolvedLinear> solved;
  const std::vector<LinearKind> consumers = ConsumersOf(in);
  const bool gptq = recipe_.method == QuantMethod::kGptq;
  const std::vector<int32_t>& outliers = OutliersOf(in);
  auto t0 = Clock::now();
  QCAL_RETURN_IF_ERROR(
      CheckFiniteOnHost(gram, absl::StrCat("calibration statistics of block ", b_)));
  const bool device_er = DeviceReconstruction();
  Tensor gram_host;
  std::optional<WhiteningFactor> whitening;
  if (recipe_.error_reconstruction.enabled && !device_er) {
    QCAL_ASSIGN_OR_RETURN(gram_host, be_.ToHost(gram));
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    QCAL_ASSIGN_OR_RETURN(whitening, WhiteningOf(stats, gram_host));
    QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
  }
  kernels::GptqFactor factor;
  kernels::GptqSolveOptions gopt = gopt_;
  gopt.outlier_columns = outliers;
  // Output-adaptive Hessians are per linear: each consumer is factorized in the loop below.
  const bool output_adaptive = recipe_.NeedsGradientPass();
  if (gptq && !output_adaptive) {
    auto f = be_.GptqFactorize(gram, gopt);
    if (!f.ok()) {
      return Annotate(f.status(),
                      LinearPrefix(model_.config(), b_, LinearId(consumers[0], expert)));
    }
    factor = std::move(f).value();
    QCAL_RETURN_IF_ERROR(Charge(t_.factor));
  }
  Tensor device_whitening;
  if (device_er) {
    QCAL_ASSIGN_OR_RETURN(device_whitening, DeviceWhiteningOf(stats));
    QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
  }
  for (LinearKind k : kinds) {
    if (std::find(consumers.begin(), consumers.end(), k) == consumers.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(LinearPrefix(b_, k), " does not read input ", LinearInputName(in)));
    }
    const LinearId id(k, expert);
    const std::string name = LinearPrefix(model_.config(), b_, id);
    Linear& lin = bw.at(id);
    const Tensor w = lin.weight;
    QCAL_RETURN_IF_ERROR(CheckFiniteOnHost(w, absl::StrCat("weight ", name)));
    LayerResult r = NewResult(id, w.dim(0), w.dim(1));
    if (gptq && output_adaptive) {
      QCAL_ASSIGN_OR_RETURN(factor, OutputAdaptiveFactor(in, k, gopt));
      QCAL_RETURN_IF_ERROR(Charge(t_.factor));
    }
    Tensor w_normal = w;
    if (!outliers.empty() && SmoothingOnDevice(be_)) {
      // A copy with the extracted columns multiplied by 0, on the device.
      std::vector<float> keep(static_cast<size_t>(w.dim(1)), 1.0f);
      for (int32_t j : outliers) keep[j] = 0.0f;
      QCAL_ASSIGN_OR_RETURN(Tensor mask, be_.ToDevice(Tensor::FromVector(keep, {w.dim(1)})));
      QCAL_ASSIGN_OR_RETURN(w_normal, be_.Alloc(DType::kF32, w.shape()));
      QCAL_RETURN_IF_ERROR(be_.Copy(w, w_normal));
      QCAL_RETURN_IF_ERROR(be_.ScaleColumns(w_normal, mask));
    } else if (!outliers.empty()) {
      QCAL_ASSIGN_OR_RETURN(Tensor host, be_.ToHost(w));
      QCAL_ASSIGN_OR_RETURN(std::vector<float> zeroed,
                            ZeroColumns(host.data<float>(), w.dim(0), w.dim(1), outliers));
      QCAL_ASSIGN_OR_RETURN(w_normal, be_.ToDevice(Tensor::FromVector(zeroed, w.shape())));
    }
    auto rtn = be_.QuantizeRtn(w_normal, spec_);
    if (!rtn.ok()) return Annotate(rtn.status(), name);
    kernels::QuantizedTensors q = *rtn;
    if (gptq) {
      auto solved = be_.GptqSolve(w, factor, spec_, gopt_.block_size, Retrains());
      if (!solved.ok()) return Annotate(solved.status(), name);
      q = std::move(solved).value();
      r.report.dead_columns = factor.dead_columns;
      r.report.damp_used = factor.damp_used;
    }
    // Retraining's frozen base: W̃ for GPTQ, the weight RTN rounded.
    Tensor retrain_base, retrain_fisher;
    if (Retrains()) {
      QCAL_ASSIGN_OR_RETURN(retrain_base, be_.ToHost(gptq ? q.pre_round : w_normal));
      q.pre_round = Tensor();
      if (recipe_.NeedsFisher()) {
        QCAL_ASSIGN_OR_RETURN(retrain_fisher, FisherOf(in, k));
      }
    }
    r.report.outlier_columns = static_cast<int>(outliers.size());
    QCAL_RETURN_IF_ERROR(Charge(t_.quantize));
    QCAL_ASSIGN_OR_RETURN(const double norm, be_.OutputError(w, Tensor(), gram));
    if (!std::isfinite(norm)) {
      return absl::InvalidArgumentError(
          absl::StrCat("calibration statistics of block ", b_, " contain NaN or Inf"));
    }
    const double denom = norm > 0 ? norm : 1.0;
    QCAL_ASSIGN_OR_RETURN(const double error, be_.OutputError(w, q.dequantized, gram));
    double error_rtn = error;
    if (gptq) {
      QCAL_ASSIGN_OR_RETURN(error_rtn, be_.OutputError(w, rtn->dequantized, gram));
    }
    r.report.rel_error = error / denom;
    r.report.rel_error_rtn = error_rtn / denom;
    QCAL_RETURN_IF_ERROR(Charge(t_.error));
    if (device_er) {
      QCAL_RETURN_IF_ERROR(
          ReconstructOnDevice(in, w, q.dequantized, gram, device_whitening, denom, r));
      QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
    } else if (whitening) {
      QCAL_ASSIGN_OR_RETURN(Tensor w_host, be_.ToHost(w));
      QCAL_ASSIGN_OR_RETURN(Tensor w_hat_host, be_.ToHost(q.dequantized));
      const float* wh = w_hat_host.data<float>();
      const std::vector<float> w_hat(wh, wh + w_hat_host.numel());
      QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
      QCAL_RETURN_IF_ERROR(
          Reconstruct(in, w_host.data<float>(), w_hat, gram_host, *whitening, denom, r));
      QCAL_RETURN_IF_ERROR(Charge(t_.reconstruct));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor codes, Download(q.codes));
    QCAL_ASSIGN_OR_RETURN(Tensor scales, Download(q.scales));
    QCAL_ASSIGN_OR_RETURN(Tensor zeros, Download(q.zeros));
    r.act_bits = recipe_.activations.bits;
    if (expert == kNoExpert) r.folded = folded_[static_cast<int>(k)];
    const Tensor w_hat = q.dequantized;
    q.codes = q.scales = q.zeros = q.dequantized = Tensor();
    const QuantSpec spec = spec_;
    std::future<QuantizedLinear> conversion = RunAsync([q, spec, codes, scales, zeros] {
      return ToQuantizedLinear(q, spec, codes, scales, zeros);
    });
    QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
    const auto now = Clock::now();
    r.report.solve_seconds = std::chrono::duration<double>(now - t0).count();
    t0 = now;
    solved.push_back(SolvedLinear{std::move(r), std::move(retrain_base), std::move(retrain_fisher),
                                  w_hat, std::move(conversion)});
  }
  return solved;
}

namespace {

// Linear `name`'s output-adaptive statistics from `source`, its Hessian checked against its
// input's width.
absl::StatusOr<LinearOac> FetchOac(const OacSource& source, int block, LinearKind k, int64_t d_in,
                                   const std::string& name) {
  auto got = source(block, k);
  if (!got.ok()) {
    return Annotate(got.status(), absl::StrCat("output-adaptive statistics of ", name));
  }
  LinearOac stats = *std::move(got);
  if (!stats.hessian.defined() || stats.hessian.dtype() != DType::kF32 ||
      stats.hessian.shape() != Shape{d_in, d_in}) {
    return absl::InvalidArgumentError(absl::StrCat("output-adaptive Hessian of ", name,
                                                   ": expected F32 [", d_in, ", ", d_in, "], got ",
                                                   ShapeString(stats.hessian.shape())));
  }
  return stats;
}

// GptqFactorize of a host or device Hessian on `be` (uploaded there first when on the host).
// No host scan for non-finite values: GptqFactorize refuses them on every backend (naming the
// Hessian), and scanning 0.9 GB a block on the host cost a 7B job 10 s.
absl::StatusOr<kernels::GptqFactor> FactorizeOac(kernels::Backend& be, Tensor h,
                                                 const kernels::GptqSolveOptions& gopt,
                                                 const std::string& name) {
  if (h.device() != be.device()) {
    QCAL_ASSIGN_OR_RETURN(h, be.ToDevice(h));
  }
  auto f = be.GptqFactorize(h, gopt);
  if (!f.ok()) return Annotate(f.status(), name);
  return f;
}

}  // namespace

// Without smoothing, every output-adaptive factor of a dense block is known before the block
// starts: a host thread factorizes them on the backend's side queue in solve order
// (oac/factor_prefetch.h) while this thread runs the block. Only for a runner holding every chunk
// (a gang member solves only the linears it owns) on a backend with a side queue.
absl::Status BlockRunner::StartFactorPrefetch() {
  if (!recipe_.NeedsGradientPass() || recipe_.method != QuantMethod::kGptq ||
      recipe_.smoothing.enabled() || model_.config().IsMoeBlock(b_) || !oac_ ||
      !CheckHoldsEveryChunk().ok()) {
    return absl::OkStatus();
  }
  QCAL_ASSIGN_OR_RETURN(kernels::Backend * side, be_.SideBackend());
  if (side == nullptr) return absl::OkStatus();
  // Room for every factor of the block at once and one factorization's working copies, twice
  // over, beside the block's working set; else the solves factorize as they go.
  std::vector<LinearKind> kinds;
  int64_t factors = 0, widest = 0;
  for (LinearInput in : kAllLinearInputs) {
    const int64_t n = widths_[static_cast<int>(in)];
    for (LinearKind k : ConsumersOf(in)) {
      kinds.push_back(k);
      factors += n * n * int64_t{sizeof(float)};
    }
    widest = std::max(widest, n * n * int64_t{sizeof(float)});
  }
  const int64_t available = be_.AvailableMemory();
  if (available >= 0 && available < 2 * (factors + 2 * widest) + reserve_) {
    return absl::OkStatus();
  }
  auto factorize = [source = oac_, block = b_, widths = widths_, gopt = gopt_](
                       kernels::Backend& side_be,
                       LinearKind k) -> absl::StatusOr<kernels::GptqFactor> {
    const std::string name = LinearPrefix(block, k);
    QCAL_ASSIGN_OR_RETURN(LinearOac stats,
                          FetchOac(source, block, k, widths[static_cast<int>(InputOf(k))], name));
    QCAL_ASSIGN_OR_RETURN(kernels::GptqFactor f, FactorizeOac(side_be, stats.hessian, gopt, name));
    QCAL_RETURN_IF_ERROR(side_be.Synchronize());
    return f;
  };
  prefetch_ = std::make_unique<OacFactorPrefetch>(*side, std::move(kinds), std::move(factorize));
  return absl::OkStatus();
}

// Linear k's own output-adaptive Hessian from the gradient pass, smoothed like its input (the
// Fisher with it), uploaded and factorized with the options of its input (ASER's extracted columns
// among them); or the factor prefetched.
absl::StatusOr<kernels::GptqFactor> BlockRunner::OutputAdaptiveFactor(
    LinearInput in, LinearKind k, const kernels::GptqSolveOptions& gopt) {
  const std::string name = LinearPrefix(b_, k);
  if (!oac_) {
    return absl::FailedPreconditionError(
        absl::StrCat(name, ": recipe key \"hessian\" is ", RecipeName(recipe_.hessian),
                     " but the solve was given no gradient-pass statistics"));
  }
  if (prefetch_ != nullptr && prefetch_->Has(k)) {
    ++t_.prefetched_factors;
    return prefetch_->Take(k);
  }
  QCAL_ASSIGN_OR_RETURN(LinearOac stats,
                        FetchOac(oac_, b_, k, widths_[static_cast<int>(in)], name));
  const std::vector<float>& m = smoothing_.at(in).m;
  if (!m.empty()) {
    // The transform runs on the host, in one fixed order, whatever the backend.
    QCAL_ASSIGN_OR_RETURN(stats.hessian, be_.ToHost(stats.hessian));
    if (stats.fisher.defined()) {
      QCAL_ASSIGN_OR_RETURN(stats.fisher, be_.ToHost(stats.fisher));
    }
    QCAL_RETURN_IF_ERROR(
        Annotate(SmoothLinearOac(m, stats), absl::StrCat("output-adaptive statistics of ", name)));
  }
  Tensor h = stats.hessian;
  if (h.device() != be_.device()) {
    QCAL_ASSIGN_OR_RETURN(h, be_.ToDevice(h));
  }
  QCAL_RETURN_IF_ERROR(Charge(t_.transfer));
  return FactorizeOac(be_, std::move(h), gopt, name);
}

}  // namespace qcal::engine
