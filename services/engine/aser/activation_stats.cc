#include "services/engine/aser/activation_stats.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {

ActivationStats::ActivationStats(int64_t width)
    : max_abs_(static_cast<size_t>(std::max<int64_t>(width, 0)), 0.0f),
      sum_abs_(static_cast<size_t>(std::max<int64_t>(width, 0)), 0.0) {}

absl::Status ActivationStats::Accumulate(const float* x, int64_t rows, int64_t width,
                                         int64_t seq_len) {
  if (width != this->width()) {
    return absl::InvalidArgumentError(absl::StrCat("activation statistics: input width ", width,
                                                   " does not match ", this->width()));
  }
  if (seq_len < 1 || rows < 0 || rows % seq_len != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "activation statistics: ", rows, " rows are not whole samples of ", seq_len, " tokens"));
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      if (!std::isfinite(x[r * width + j])) {
        return absl::InvalidArgumentError(absl::StrCat("activation statistics: x[", r, ", ", j,
                                                       "] is ", x[r * width + j], " (not finite)"));
      }
    }
  }
  // The chunk's own partial first, then one addition per channel: the same bits as Merge().
  ActivationStats partial(width);
  for (int64_t r = 0; r < rows; ++r) {
    if (r % seq_len == 0) {
      ++partial.skipped_;
      continue;
    }
    const float* xr = x + r * width;
    for (int64_t j = 0; j < width; ++j) {
      const float v = std::fabs(xr[j]);
      partial.max_abs_[j] = std::max(partial.max_abs_[j], v);
      partial.sum_abs_[j] += v;
    }
    ++partial.tokens_;
  }
  return Merge(partial);
}

absl::Status ActivationStats::Merge(const ActivationStats& other) {
  if (other.width() != width()) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation statistics: merging width ", other.width(), " into ", width()));
  }
  for (size_t j = 0; j < max_abs_.size(); ++j) {
    max_abs_[j] = std::max(max_abs_[j], other.max_abs_[j]);
    sum_abs_[j] += other.sum_abs_[j];
  }
  tokens_ += other.tokens_;
  skipped_ += other.skipped_;
  return absl::OkStatus();
}

absl::Status ActivationStats::AddTotals(const std::vector<float>& max_abs,
                                        const std::vector<double>& sum_abs, int64_t tokens,
                                        int64_t skipped) {
  if (static_cast<int64_t>(max_abs.size()) != width() ||
      static_cast<int64_t>(sum_abs.size()) != width() || tokens < 0 || skipped < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("activation statistics: totals of width ", max_abs.size(), "/", sum_abs.size(),
                     " (", tokens, " tokens, ", skipped, " skipped) do not fit width ", width()));
  }
  ActivationStats partial(width());
  partial.max_abs_ = max_abs;
  partial.sum_abs_ = sum_abs;
  partial.tokens_ = tokens;
  partial.skipped_ = skipped;
  return Merge(partial);
}

std::vector<double> ActivationStats::MeanAbs() const {
  std::vector<double> mean(sum_abs_.size(), 0.0);
  if (tokens_ == 0) return mean;
  for (size_t j = 0; j < mean.size(); ++j) mean[j] = sum_abs_[j] / static_cast<double>(tokens_);
  return mean;
}

}  // namespace qcal::engine
