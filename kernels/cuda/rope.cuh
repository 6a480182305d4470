// Launchers of the CUDA rotary-embedding kernel (spec: ref::Rope, Hugging Face half-split) and of
// its backward (spec: ref::RopeBackward).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// Rotates every head of a row-major x [rows, width] in place. Row r is at position
// (r % seq_len) of the table; `cos_sin` [seq_len, head_dim/2, 2] holds the (cos, sin) pairs
// of each position and frequency, computed on the host by ref::RopeAngle so that both backends
// use the same angles. width is a multiple of head_dim, head_dim is even.
cudaError_t LaunchRope(float* x, int64_t rows, int64_t width, int seq_len, int head_dim,
                       const float* cos_sin, cudaStream_t stream);
// The same rotation by the negative angles (the transpose of LaunchRope's): the gradient of Rope.
cudaError_t LaunchRopeBackward(float* x, int64_t rows, int64_t width, int seq_len, int head_dim,
                               const float* cos_sin, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
