#include <algorithm>

#include "kernels/cuda/embedding.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void EmbeddingKernel(const float* table, int64_t width, const int32_t* ids, int64_t n,
                                float* out) {
  const int64_t total = n * width;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < total;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = t / width, c = t % width;
    out[t] = table[int64_t(ids[r]) * width + c];
  }
}

}  // namespace

cudaError_t LaunchEmbedding(const float* table, int64_t width, const int32_t* ids, int64_t n,
                            float* out, cudaStream_t stream) {
  const int64_t total = n * width;
  if (total == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  EmbeddingKernel<<<grid, kThreads, 0, stream>>>(table, width, ids, n, out);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
