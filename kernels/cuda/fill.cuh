// Launcher of the counter-based uniform fill (kernels/hash_random.h): synthetic weights generated
// in place on the device, equal bit for bit to the same fill on the CPU.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// x[i] = HashUniform(seed, i, lo, hi) for i < n.
cudaError_t LaunchFillUniform(float* x, int64_t n, uint64_t seed, float lo, float hi,
                              cudaStream_t stream);

}  // namespace qcal::kernels::cuda
