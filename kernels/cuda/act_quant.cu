#include "kernels/cuda/act_quant.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row; the maximum is exact in any order. Each thread reads its columns before the
// reduction and writes them after it, so out may alias x.
__global__ void ActQuantKernel(const float* x, int64_t width, float qmax, float* out) {
  __shared__ float scratch[32];
  const float* xr = x + blockIdx.x * width;
  float* yr = out + blockIdx.x * width;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) amax = fmaxf(amax, fabsf(xr[c]));
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);
  const float s = amax / qmax;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) {
    if (s == 0.0f) {
      yr[c] = 0.0f;
      continue;
    }
    const float q = fminf(fmaxf(RoundHalfEven(xr[c] / s), -qmax), qmax);
    yr[c] = __fmul_rn(s, q);
  }
}

}  // namespace

cudaError_t LaunchActQuant(const float* x, int64_t rows, int64_t width, int bits, float* out,
                           cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  if (rows > 0x7fffffff || bits < 2 || bits > 8) return cudaErrorInvalidValue;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  ActQuantKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, width, qmax, out);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
