// BlockRunner's mixture-of-experts phases (block_runner.h, docs/MOE.md): routing the chunks, each
// expert unit's statistics on its routed rows, and the push through the quantized experts.
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "services/engine/driver/block_runner.h"

namespace qcal::engine {

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

}  // namespace qcal::engine
