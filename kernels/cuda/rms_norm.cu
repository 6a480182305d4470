#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/rms_norm.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__device__ inline void StoreAs(float* p, float v) { *p = v; }
__device__ inline void StoreAs(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// One block per row. Every thread reads and writes only its own columns after the reduction, so
// y may alias x.
template <typename T>
__global__ void RmsNormKernel(const float* x, const float* weight, float eps, T* y, int64_t width) {
  __shared__ double scratch[32];
  const float* xr = x + blockIdx.x * width;
  T* yr = y + blockIdx.x * width;
  double ss = 0;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) ss += double(xr[c]) * xr[c];
  ss = BlockReduce(ss, SumOp(), 0.0, scratch);
  const float inv = float(1.0 / sqrt(ss / double(width) + double(eps)));
  for (int64_t c = threadIdx.x; c < width; c += kThreads) StoreAs(yr + c, xr[c] * inv * weight[c]);
}

template <typename T>
cudaError_t Launch(const float* x, const float* weight, float eps, T* y, int64_t rows,
                   int64_t width, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  RmsNormKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, weight, eps, y, width);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, float* y, int64_t rows,
                          int64_t width, cudaStream_t stream) {
  return Launch(x, weight, eps, y, rows, width, stream);
}

cudaError_t LaunchRmsNorm(const float* x, const float* weight, float eps, __nv_bfloat16* y,
                          int64_t rows, int64_t width, cudaStream_t stream) {
  return Launch(x, weight, eps, y, rows, width, stream);
}

}  // namespace qcal::kernels::cuda
