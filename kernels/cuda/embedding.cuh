// Launcher of the CUDA embedding gather (spec: ref::Embedding).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// out[r] = table[ids[r]] for n device ids; every id must be in [0, vocab) (the backend checks on
// the host before copying them).
cudaError_t LaunchEmbedding(const float* table, int64_t width, const int32_t* ids, int64_t n,
                            float* out, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
