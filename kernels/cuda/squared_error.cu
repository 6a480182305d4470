// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the fp32 gradients are the host's
// separately rounded products and differences.
#include <algorithm>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/squared_error.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

__global__ void SquaredErrorKernel(const float* y, const float* t, int64_t n, float scale,
                                   float* dy, double* partial) {
  __shared__ double scratch[32];
  double sum = 0;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const float ye = y[e], te = t[e];
    const double d = static_cast<double>(ye) - static_cast<double>(te);
    sum += d * d;
    if (dy) dy[e] = scale * (ye - te);
  }
  sum = BlockReduce(sum, SumOp(), 0.0, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void WeightedSquaredErrorKernel(const float* x, const float* r, const float* f,
                                           int64_t width, float scale, float* g1, float* g2,
                                           double* row_sums) {
  __shared__ double scratch[32];
  const int64_t base = blockIdx.x * width;
  double sum = 0;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) {
    const int64_t e = base + c;
    const float d = x[e] - r[e];
    const float fe = f ? f[e] : 1.0f;
    sum += static_cast<double>(fe) * static_cast<double>(d) * static_cast<double>(d);
    const float g = scale * fe * d;
    if (g1) g1[e] += g;
    if (g2) g2[e] += g;
  }
  sum = BlockReduce(sum, SumOp(), 0.0, scratch);
  if (threadIdx.x == 0) row_sums[blockIdx.x] = sum;
}

}  // namespace

int64_t SquaredErrorBlocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

cudaError_t LaunchSquaredError(const float* y, const float* t, int64_t n, float scale, float* dy,
                               double* partial, cudaStream_t stream) {
  SquaredErrorKernel<<<static_cast<unsigned>(SquaredErrorBlocks(n)), kThreads, 0, stream>>>(
      y, t, n, scale, dy, partial);
  return cudaGetLastError();
}

cudaError_t LaunchWeightedSquaredError(const float* x, const float* r, const float* f, int64_t rows,
                                       int64_t width, float scale, float* g1, float* g2,
                                       double* row_sums, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  WeightedSquaredErrorKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      x, r, f, width, scale, g1, g2, row_sums);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
