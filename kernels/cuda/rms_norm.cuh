// Launcher of the CUDA RmsNorm kernel (spec: ref::RmsNorm). Returns the launch's cudaError_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for a row-major x [rows, width]; y may alias x.
// The sum of squares is taken in double, like the reference.
cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, float* y, int64_t rows,
                          int64_t width, cudaStream_t stream);
// The same, each fp32 result rounded to bf16 as LaunchF32ToBf16 rounds it (y must not alias x).
cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, __nv_bfloat16* y,
                          int64_t rows, int64_t width, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
