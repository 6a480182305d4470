// Launchers of the smoothing fold's scaling kernels (spec: the host loops of
// services/engine/aser/smoothing.cc). Return the launch's cudaError_t and run on `stream`.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// w[r, j] *= m[j] for w [rows, width] (row-major fp32); one rounded product per element.
cudaError_t LaunchScaleColumns(float* w, int64_t rows, int64_t width, const float* m,
                               cudaStream_t stream);

// w[r, j] /= m[r] for w [rows, width]; IEEE division (no reciprocal), as on the host.
cudaError_t LaunchDivideRows(float* w, int64_t rows, int64_t width, const float* m,
                             cudaStream_t stream);

}  // namespace qcal::kernels::cuda
