// Launcher of the CUDA RMSNorm backward (spec: ref::RmsNormBackward, kernels/cpu/ref_grad.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// dx = ∂<dy, RmsNorm(x, weight, eps)>/∂x for row-major x, dy, dx [rows, width]: with
// r = 1/sqrt(mean(x²) + eps), dx_c = r·w_c·dy_c − x_c·r³·(Σ_k dy_k·w_k·x_k)/width. One block per
// row; the two row sums and r in double, as the forward's; dx may alias dy.
cudaError_t LaunchRmsNormBackward(const float* x, const float* weight, float eps, const float* dy,
                                  float* dx, int64_t rows, int64_t width, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
