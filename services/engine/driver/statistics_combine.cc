// The canonical reduction's combines of a block's statistics (block_runner.h): partial Gram
// matrices summed on the device, |x| statistics merged, and a completed tree mirrored. Apart from
// BlockRunner so that the gang's payload code and its tests link without the driver.
#include <utility>

#include "common/status.h"
#include "services/engine/driver/block_runner.h"

namespace qcal::engine {

Combine<InputStatistics> InputStatisticsCombine(kernels::Backend& backend) {
  return [&backend](InputStatistics& left, const InputStatistics& right) -> absl::Status {
    if (left.input != right.input || left.gram.shape() != right.gram.shape() ||
        left.abs_stats.has_value() != right.abs_stats.has_value()) {
      return absl::InvalidArgumentError(
          "partial statistics of different inputs or shapes cannot be summed");
    }
    // Partial Gram matrices hold their lower triangles (GramLower); completion mirrors the sum.
    QCAL_RETURN_IF_ERROR(backend.AddLower(right.gram, left.gram));
    if (left.abs_stats) QCAL_RETURN_IF_ERROR(left.abs_stats->Merge(*right.abs_stats));
    return absl::OkStatus();
  };
}

Combine<ActivationStats> ActivationStatsCombine() {
  return [](ActivationStats& left, const ActivationStats& right) { return left.Merge(right); };
}

absl::StatusOr<InputStatistics> CompleteInputStatistics(kernels::Backend& backend,
                                                        InputPartials all, int total_chunks) {
  QCAL_ASSIGN_OR_RETURN(InputStatistics stats, CompleteTree(std::move(all), total_chunks,
                                                            InputStatisticsCombine(backend)));
  QCAL_RETURN_IF_ERROR(backend.MirrorLower(stats.gram));
  return stats;
}

}  // namespace qcal::engine
