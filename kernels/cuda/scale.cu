#include "kernels/cuda/scale.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void ScaleColumnsKernel(float* w, int64_t n, int64_t width, const float* m) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    w[i] = __fmul_rn(w[i], m[i % width]);
  }
}

__global__ void DivideRowsKernel(float* w, int64_t n, int64_t width, const float* m) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    w[i] = __fdiv_rn(w[i], m[i / width]);
  }
}

unsigned Blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 16 ? b : 65535 * 16);
}

}  // namespace

cudaError_t LaunchScaleColumns(float* w, int64_t rows, int64_t width, const float* m,
                               cudaStream_t stream) {
  const int64_t n = rows * width;
  if (n == 0) return cudaSuccess;
  ScaleColumnsKernel<<<Blocks(n), kThreads, 0, stream>>>(w, n, width, m);
  return cudaGetLastError();
}

cudaError_t LaunchDivideRows(float* w, int64_t rows, int64_t width, const float* m,
                             cudaStream_t stream) {
  const int64_t n = rows * width;
  if (n == 0) return cudaSuccess;
  DivideRowsKernel<<<Blocks(n), kThreads, 0, stream>>>(w, n, width, m);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
