// Launcher of the per-token activation fake-quantization kernel (spec: ref::ActQuant). Returns the
// launch's cudaError_t and runs on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// out = per-row dynamic symmetric fake-quantization of x [rows, width] to `bits` (2..8),
// bit-identical to ref::ActQuant (fp32, IEEE division, no fused multiply-add). out may alias x.
cudaError_t LaunchActQuant(const float* x, int64_t rows, int64_t width, int bits, float* out,
                           cudaStream_t stream);

}  // namespace qcal::kernels::cuda
