// Launcher of the small square SVD (spec: kernels/small_svd.h; CPU reference:
// kernels/cpu/small_svd_ref.h, which it equals bit for bit). Error reconstruction's randomized SVD
// (cuda_low_rank.cc) factors its k x k triangle with it. Returns the launch's cudaError_t, runs on
// `stream` asynchronously and knows nothing of tensors or absl.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// The largest k whose matrices (A, V, the norms and their ranks: (2k² + 2k) doubles) the kernel
// holds in shared memory; a larger k works in `scratch` (global memory, through L1), slower.
constexpr int64_t kSmallSvdSharedMaxK = 112;

// The largest k the launcher takes (k² indexes in int).
constexpr int64_t kSmallSvdMaxK = 4096;

// Doubles of `scratch` LaunchSmallSvd needs for k: (2k² + 2k).
constexpr int64_t SmallSvdScratchDoubles(int64_t k) { return 2 * k * k + 2 * k; }

// a (column-major [k, k], read only) = u · diag(sigma) · vᵀ by one-sided Jacobi in one thread
// block: u and v column-major [k, k] (leading dimension k), sigma [k] descending. *info = 0 on
// success, + 1 when kSmallSvdMaxSweeps sweeps did not converge, + 2 when a singular value is not
// finite (NaN or Inf in a); cudaErrorInvalidValue unless 1 <= k <= kSmallSvdMaxK; *sweeps (when not
// null) = the sweeps run. scratch: SmallSvdScratchDoubles(k) doubles, used only when k >
// kSmallSvdSharedMaxK (may be null below).
cudaError_t LaunchSmallSvd(const double* a, int64_t k, double* scratch, double* u, double* sigma,
                           double* v, int32_t* info, int32_t* sweeps, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
