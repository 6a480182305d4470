// Launchers of block retraining's loss terms (specs: ref::SquaredError and
// ref::WeightedSquaredError in kernels/cpu/train_ref.h). Each returns the launch's cudaError_t;
// the backend validates shapes first and adds the partial sums on the host in index order.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// The number of partial sums LaunchSquaredError writes for n elements (a function of n only).
int64_t SquaredErrorBlocks(int64_t n);
// partial[b] = Σ (y_e − t_e)² (difference and square in double) over block b's elements (a
// grid-stride share, reduced in a fixed order), b < SquaredErrorBlocks(n); when dy is not null,
// dy_e = scale·(y_e − t_e) in fp32, bit-identical to the host's (dy may alias y or t).
cudaError_t LaunchSquaredError(const float* y, const float* t, int64_t n, float scale, float* dy,
                               double* partial, cudaStream_t stream);

// row_sums[o] = Σ_e F_e·d_e·d_e (double) over row o of x, r [rows, width], d_e = x_e − r_e in
// fp32, F = f or 1 when f is null (one block per row, a fixed-order reduction); g = (scale·F_e)·d_e
// in fp32 is added to g1_e and g2_e (each may be null), bit-identical to the host's.
cudaError_t LaunchWeightedSquaredError(const float* x, const float* r, const float* f, int64_t rows,
                                       int64_t width, float scale, float* g1, float* g2,
                                       double* row_sums, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
