// Launcher of one AdamW step (spec: ref::AdamWStep in kernels/cpu/train_ref.h; the per-element
// update: kernels/train_math.h's AdamWElement). Returns the launch's cudaError_t; the backend
// validates shapes and options first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/train_math.h"

namespace qcal::kernels::cuda {

// AdamWElement(p[i], g[i], m[i], v[i], c) for i < n, one thread per element, compiled without
// fused multiply-add (IEEE division and square root): bit-identical to ref::AdamWStep<float> given
// the same coefficients (AdamWCoefficientsOf<float>, computed on the host).
cudaError_t LaunchAdamWStep(float* p, const float* g, float* m, float* v, int64_t n,
                            const AdamWCoefficients<float>& c, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
