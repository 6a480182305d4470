// BlockRunner's smoothing phases (smoothing.method smoothquant or aser): the full-precision
// block's per-channel |x| statistics, the block's scales, and their fold into its weights.
#include <array>
#include <string>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"
#include "services/engine/driver/block_runner_internal.h"

namespace qcal::engine {

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
    QCAL_RETURN_IF_ERROR(
        driver_internal::CheckFinite(w, absl::StrCat("weight ", LinearPrefix(b_, k))));
  }
  const int begin = acts_.first_chunk;
  const int end = begin + static_cast<int>(acts_.chunks.size());
  std::vector<TreeAccumulator<ActivationStats>> acc;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    acc.emplace_back(begin, end, acts_.total_chunks, ActivationStatsCombine());
  }
  // The pass stops at the down projection's input: the other six weights are read by every chunk.
  QCAL_RETURN_IF_ERROR(
      model_.HoldWeightOperands(b_, {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO,
                                     LinearKind::kGate, LinearKind::kUp}));
  absl::Cleanup release = [this] { model_.ReleaseWeightOperands(); };
  // On the device each chunk's totals stay there (a row a chunk of each input's tensors) and are
  // read back once after the pass; the host takes them in chunk order, as ChunkAbsStats would.
  const bool on_device = SmoothingOnDevice(be_);
  const auto chunks = static_cast<int64_t>(acts_.chunks.size());
  std::array<Tensor, kNumLinearInputs> max_abs, sum_abs, bad;
  if (on_device) {
    for (int i = 0; i < kNumLinearInputs; ++i) {
      const int64_t width = widths_[i];
      QCAL_ASSIGN_OR_RETURN(max_abs[i], be_.Alloc(DType::kF32, {chunks, width}));
      QCAL_ASSIGN_OR_RETURN(sum_abs[i], be_.Alloc(DType::kF64, {chunks, width}));
      QCAL_ASSIGN_OR_RETURN(bad[i], be_.Alloc(DType::kI32, {chunks, width}));
    }
  }
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    QCAL_ASSIGN_OR_RETURN(Tensor hidden, FetchCopy(c));
    auto tap = [&](LinearInput in, const Tensor& x) -> absl::Status {
      const auto i = static_cast<size_t>(in);
      if (on_device) {
        const auto r = static_cast<int64_t>(c);
        Tensor m = max_abs[i].Rows(r, r + 1), s = sum_abs[i].Rows(r, r + 1),
               f = bad[i].Rows(r, r + 1);
        QCAL_RETURN_IF_ERROR(be_.ChannelAbsStatsInto(x, acts_.seq_len, m, s, f));
      } else {
        QCAL_ASSIGN_OR_RETURN(ActivationStats s, ChunkAbsStats(in, x));
        QCAL_RETURN_IF_ERROR(acc[i].Add(std::move(s)));
      }
      if (in == LinearInput::kDown) return absl::CancelledError("statistics taken");
      return absl::OkStatus();
    };
    QCAL_RETURN_IF_ERROR(model_.BlockForward(b_, hidden, ShapeOf(c), nullptr, tap));
  }
  if (on_device) QCAL_RETURN_IF_ERROR(AddDeviceTotals(max_abs, sum_abs, bad, acc));
  SmoothingPartials out;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    QCAL_ASSIGN_OR_RETURN(out.inputs[static_cast<size_t>(i)], acc[static_cast<size_t>(i)].Finish());
  }
  return out;
}

// The smoothing pass's device totals (a row a chunk of each input) read back and added to `acc`
// chunk by chunk, with ChunkAbsStats' checks and error.
absl::Status BlockRunner::AddDeviceTotals(const std::array<Tensor, kNumLinearInputs>& max_abs,
                                          const std::array<Tensor, kNumLinearInputs>& sum_abs,
                                          const std::array<Tensor, kNumLinearInputs>& bad,
                                          std::vector<TreeAccumulator<ActivationStats>>& acc) {
  std::array<Tensor, kNumLinearInputs> max_host, sum_host, bad_host;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    QCAL_ASSIGN_OR_RETURN(max_host[i], be_.ToHost(max_abs[i]));
    QCAL_ASSIGN_OR_RETURN(sum_host[i], be_.ToHost(sum_abs[i]));
    QCAL_ASSIGN_OR_RETURN(bad_host[i], be_.ToHost(bad[i]));
  }
  for (size_t c = 0; c < acts_.chunks.size(); ++c) {
    // Each sample's first position (BOS) is skipped, as ChunkAbsStats skips it.
    const int64_t skipped = acts_.chunk_batch[c];
    const int64_t rows = skipped * acts_.seq_len;
    for (int i = 0; i < kNumLinearInputs; ++i) {
      const int64_t width = widths_[i];
      const int64_t at = static_cast<int64_t>(c) * width;
      const int32_t* f = bad_host[i].data<int32_t>() + at;
      for (int64_t j = 0; j < width; ++j) {
        if (f[j] != 0) {
          return absl::InvalidArgumentError(
              absl::StrCat("block ", b_, ": activation statistics: channel ", j,
                           " of a linear input holds a value that is not finite"));
        }
      }
      const float* m = max_host[i].data<float>() + at;
      const double* s = sum_host[i].data<double>() + at;
      ActivationStats stats(width);
      QCAL_RETURN_IF_ERROR(
          Annotate(stats.AddTotals(std::vector<float>(m, m + width),
                                   std::vector<double>(s, s + width), rows - skipped, skipped),
                   absl::StrCat("block ", b_)));
      QCAL_RETURN_IF_ERROR(acc[static_cast<size_t>(i)].Add(std::move(stats)));
    }
  }
  return absl::OkStatus();
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

}  // namespace qcal::engine
