// Per-channel activation statistics of one linear input (DESIGN.md section 3, "Smoothing"): the
// maximum and the mean of |X_tj| over the calibration tokens, excluding each sample's BOS position.
// Smoothing reads the maxima (a_j); the LQER diagonal whitening reads the means (s_j).
//
// Determinism. Statistics are formed per chunk of samples (Accumulate() on empty statistics: the
// chunk's sums in double, token order) and merged by the canonical reduction (DESIGN.md section 2,
// gang/reduction.h: Merge() is its combine), so they are bit-identical however the chunks were
// spread over workers. Accumulate() into non-empty statistics forms the chunk's partial first and
// then adds it, exactly as Merge() of a separately accumulated partial would. Maxima are exact in
// any order.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace qcal::engine {

class ActivationStats {
 public:
  // Empty statistics of a `width`-channel input (width >= 0).
  explicit ActivationStats(int64_t width);

  // Adds one chunk x [rows, width] (row-major, host fp32) holding rows / seq_len samples of seq_len
  // tokens each, sample-major: row r is position r % seq_len of its sample, and the rows with
  // r % seq_len == 0 (BOS) are skipped. Errors (InvalidArgument, the statistics are unchanged):
  // width mismatch, seq_len < 1, rows not a multiple of seq_len, a non-finite value (named by row
  // and column).
  absl::Status Accumulate(const float* x, int64_t rows, int64_t width, int64_t seq_len);
  // Adds another accumulator's totals (the next chunk's partial). Error: width mismatch.
  absl::Status Merge(const ActivationStats& other);
  // Adds a chunk's totals computed elsewhere (a device's Backend::ChannelAbsStats): per-channel
  // max |x| and Σ|x| over `tokens` counted rows, `skipped` BOS rows. Errors (InvalidArgument, the
  // statistics are unchanged): width mismatch, negative counts.
  absl::Status AddTotals(const std::vector<float>& max_abs, const std::vector<double>& sum_abs,
                         int64_t tokens, int64_t skipped);

  int64_t width() const { return static_cast<int64_t>(max_abs_.size()); }
  // Tokens counted (BOS positions excluded).
  int64_t tokens() const { return tokens_; }
  // BOS positions skipped.
  int64_t skipped() const { return skipped_; }
  // a_j = max |X_tj| over the counted tokens; 0 before any token.
  const std::vector<float>& max_abs() const { return max_abs_; }
  // Σ_t |X_tj| over the counted tokens, in double.
  const std::vector<double>& sum_abs() const { return sum_abs_; }
  // mean |X_tj| = sum_abs / tokens; all 0 before any token.
  std::vector<double> MeanAbs() const;

 private:
  std::vector<float> max_abs_;
  std::vector<double> sum_abs_;
  int64_t tokens_ = 0;
  int64_t skipped_ = 0;
};

}  // namespace qcal::engine
