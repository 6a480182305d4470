// Device-side reductions across a thread block, in a fixed order (warp butterflies, then one warp
// over the per-warp results), so that a reduction gives bit-identical results run to run.
// Included by .cu files only.
#pragma once

#include <cuda_runtime.h>

namespace qcal::kernels::cuda {

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};

// Reduces `value` over the calling block (blockDim.x a multiple of 32, at most 1024) and returns
// the result to every thread. `identity` is op's neutral element (0 for sums, -inf for maxima).
// `scratch` holds 32 values in shared memory; the call ends with a barrier, so it may be reused
// right after.
template <typename T, typename ReduceOp>
__device__ T BlockReduce(T value, ReduceOp op, T identity, T* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
  }
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < warps ? scratch[lane] : identity;
    for (int offset = 16; offset > 0; offset >>= 1) {
      value = op(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    if (lane == 0) scratch[0] = value;
  }
  __syncthreads();
  value = scratch[0];
  __syncthreads();
  return value;
}

}  // namespace qcal::kernels::cuda
