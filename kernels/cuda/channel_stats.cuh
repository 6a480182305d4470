// Launcher of the per-channel activation statistics kernel (spec: engine::ActivationStats, the
// smoothing statistics of DESIGN section 3). Returns the launch's cudaError_t and runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// Row segments the statistics are split into: partials [segments, width] of each output.
int64_t ChannelStatsSegments(int64_t rows);

// For x [rows, width] (row-major fp32): over the rows with r % seq_len != 0 (not a sample's BOS;
// every row when seq_len == 0),
// max_abs[j] = max |x_rj| and sum_abs[j] = Σ |x_rj| summed in double; over all rows, bad[j] = 1
// when column j holds a NaN or an infinity, else 0. `partials` is scratch of
// ChannelStatsSegments(rows) · width · (sizeof(float) + sizeof(double) + sizeof(int)) bytes. Each
// segment sums its rows in order and the segments are added in order: the result is the same bits
// run to run (max_abs also equals any other order's, being exact).
cudaError_t LaunchChannelStats(const float* x, int64_t rows, int64_t width, int64_t seq_len,
                               void* partials, float* max_abs, double* sum_abs, int* bad,
                               cudaStream_t stream);

}  // namespace qcal::kernels::cuda
