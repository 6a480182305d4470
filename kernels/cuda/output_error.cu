#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/output_error.cuh"
#include "kernels/cuda/tf32_round.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void RoundTf32Kernel(const float* w, const float* w_hat, int64_t count, float* e) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    e[i] = RoundToTf32(w_hat ? w[i] - w_hat[i] : w[i]);
  }
}

__global__ void RoundBf16Kernel(const float* w, const float* w_hat, int64_t count,
                                __nv_bfloat16* e) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count;
       i += int64_t{gridDim.x} * blockDim.x) {
    e[i] = __float2bfloat16_rn(w_hat ? w[i] - w_hat[i] : w[i]);
  }
}

// One block per row j of the panel's transposed part; reads of st and g are contiguous in i.
__global__ void WeightedPanelTraceKernel(const float* st, int64_t r0, int64_t r1, const float* g,
                                         int64_t n, double* partial) {
  __shared__ double scratch[32];
  const int64_t j = blockIdx.x, width = r1 - r0;
  const float* st_row = st + j * width;
  const float* g_row = g + j * n;
  double sum = 0;
  for (int64_t i = std::max(j, r0) + threadIdx.x; i < r1; i += kThreads) {
    const double term = double(st_row[i - r0]) * double(g_row[i]);
    sum += i == j ? term : 2 * term;
  }
  sum = BlockReduce(sum, SumOp(), 0.0, scratch);
  if (threadIdx.x == 0) partial[j] += sum;
}

}  // namespace

cudaError_t LaunchRoundTf32(const float* w, const float* w_hat, int64_t count, float* e,
                            cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, 1 << 16));
  RoundTf32Kernel<<<grid, kThreads, 0, stream>>>(w, w_hat, count, e);
  return cudaGetLastError();
}

cudaError_t LaunchRoundBf16(const float* w, const float* w_hat, int64_t count, void* e,
                            cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((count + kThreads - 1) / kThreads, 1 << 16));
  RoundBf16Kernel<<<grid, kThreads, 0, stream>>>(w, w_hat, count, static_cast<__nv_bfloat16*>(e));
  return cudaGetLastError();
}

cudaError_t LaunchWeightedPanelTrace(const float* st, int64_t r0, int64_t r1, const float* g,
                                     int64_t n, double* partial, cudaStream_t stream) {
  if (r1 <= r0) return cudaSuccess;
  if (r1 > 0x7fffffff) return cudaErrorInvalidValue;
  WeightedPanelTraceKernel<<<static_cast<unsigned>(r1), kThreads, 0, stream>>>(st, r0, r1, g, n,
                                                                               partial);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
