#include <algorithm>

#include "kernels/cuda/fill.cuh"
#include "kernels/hash_random.h"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void FillUniformKernel(float* x, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = HashUniform(seed, static_cast<uint64_t>(i), lo, hi);
  }
}

}  // namespace

cudaError_t LaunchFillUniform(float* x, int64_t n, uint64_t seed, float lo, float hi,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
  FillUniformKernel<<<grid, kThreads, 0, stream>>>(x, n, seed, lo, hi);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
