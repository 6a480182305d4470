// BlockRunner's calibration statistics (block_runner.h, "Statistics"): each chunk's Gram matrix
// and |x| statistics of a linear input, this rank's partials and their completion by the canonical
// reduction.
#include <array>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"

namespace qcal::engine {

// The group's input is computed from each chunk's current hidden state: the normed block input
// (q/k/v), the attention output through the installed q/k/v (o), the normed post-attention
// residual (gate/up) or the MLP product through the installed gate/up (down). Each is rounded to
// its GEMM operand once (by the norm or the SiLU product itself where nothing reads the fp32
// values: NeedsInput), for the Gram matrix and for the forward that reads it next (the next
// group's statistics, or Push(kO) and Push(kDown)): kept for them while they fit.
absl::StatusOr<InputPartials> BlockRunner::CollectPartials(LinearInput group) {
  TreeAccumulator<InputStatistics> acc = NewInputAccumulator();
  if (group == LinearInput::kO) {
    QCAL_RETURN_IF_ERROR(
        model_.HoldWeightOperands(b_, {LinearKind::kQ, LinearKind::kK, LinearKind::kV}));
  } else if (group == LinearInput::kDown) {
    QCAL_RETURN_IF_ERROR(model_.HoldWeightOperands(b_, {LinearKind::kGate, LinearKind::kUp}));
  }
  absl::Cleanup release = [this] { model_.ReleaseWeightOperands(); };
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor h, Fetch(c));
    LinearOperand in;
    switch (group) {
      case LinearInput::kQkv:
      case LinearInput::kGateUp: {
        QCAL_ASSIGN_OR_RETURN(in, model_.NormedOperand(b_, h, group, NeedsInput()));
        break;
      }
      case LinearInput::kO: {
        QCAL_ASSIGN_OR_RETURN(const Tensor x, AttentionOf(h, c));
        QCAL_ASSIGN_OR_RETURN(in, model_.MakeOperand(x));
        break;
      }
      case LinearInput::kDown: {
        QCAL_ASSIGN_OR_RETURN(const LinearOperand normed, TakeNormed(h, c, LinearInput::kGateUp));
        QCAL_ASSIGN_OR_RETURN(in, model_.MlpOperand(b_, normed, NeedsInput()));
        break;
      }
    }
    QCAL_RETURN_IF_ERROR(Charge(t_.forward));
    QCAL_ASSIGN_OR_RETURN(InputStatistics partial, ChunkStatistics(group, in));
    QCAL_RETURN_IF_ERROR(acc.Add(std::move(partial)));
    QCAL_RETURN_IF_ERROR(Charge(t_.hessian));
    if (KeepOnDevice()) {
      const bool normed = group == LinearInput::kQkv || group == LinearInput::kGateUp;
      (normed ? normed_ : kept_)[c] = KeptForm(std::move(in));
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
  auto stats = CompleteInputStatistics(be_, std::move(all), acts_.total_chunks);
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

// The canonical reduction over this rank's chunks.
TreeAccumulator<InputStatistics> BlockRunner::NewInputAccumulator() {
  const int begin = acts_.first_chunk;
  return TreeAccumulator<InputStatistics>(begin, begin + static_cast<int>(acts_.chunks.size()),
                                          acts_.total_chunks, InputStatisticsCombine(be_));
}

// One chunk's statistics of input `in`: xᵀx's lower triangle (GramLower) and, with LQER's
// diagonal whitening, the chunk's |x| statistics.
absl::StatusOr<InputStatistics> BlockRunner::ChunkStatistics(LinearInput in, const Tensor& x,
                                                             int64_t width) {
  // x is its own operand: the backend's Gram rounds it as the products would.
  return ChunkStatistics(in, LinearOperand{x, x}, width);
}

absl::StatusOr<InputStatistics> BlockRunner::ChunkStatistics(LinearInput in, const LinearOperand& x,
                                                             int64_t width) {
  InputStatistics stats;
  stats.input = in;
  if (width == 0) width = widths_[static_cast<int>(in)];
  if (!x.op.defined()) {
    QCAL_ASSIGN_OR_RETURN(stats.gram, be_.Alloc(DType::kF32, {width, width}));
    return stats;
  }
  if (x.op.rank() != 2 || x.op.dim(1) != width) {
    return absl::InvalidArgumentError(absl::StrCat("block ", b_, ": input ", LinearInputName(in),
                                                   " is ", x.op.DebugString(), ", expected ", width,
                                                   " columns"));
  }
  QCAL_ASSIGN_OR_RETURN(stats.gram, be_.GramLower(x.op));
  if (recipe_.error_reconstruction.enabled &&
      recipe_.error_reconstruction.whitening == Whitening::kDiagonal) {
    QCAL_ASSIGN_OR_RETURN(stats.abs_stats, ChunkAbsStats(in, x.x));
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

}  // namespace qcal::engine
