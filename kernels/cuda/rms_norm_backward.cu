#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/rms_norm_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Every thread reads and writes only its own columns after the reductions, so dx may alias dy.
__global__ void RmsNormBackwardKernel(const float* x, const float* weight, float eps,
                                      const float* dy, float* dx, int64_t width) {
  __shared__ double scratch[32];
  const float* xr = x + blockIdx.x * width;
  const float* dyr = dy + blockIdx.x * width;
  float* dxr = dx + blockIdx.x * width;
  double ss = 0, dot = 0;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) {
    ss += double(xr[c]) * xr[c];
    dot += double(dyr[c]) * weight[c] * xr[c];
  }
  ss = BlockReduce(ss, SumOp(), 0.0, scratch);
  dot = BlockReduce(dot, SumOp(), 0.0, scratch);
  const double r = 1.0 / sqrt(ss / double(width) + double(eps));
  const double coef = r * r * r * dot / double(width);
  for (int64_t c = threadIdx.x; c < width; c += kThreads) {
    dxr[c] = float(r * weight[c] * dyr[c] - coef * xr[c]);
  }
}

}  // namespace

cudaError_t LaunchRmsNormBackward(const float* x, const float* weight, float eps, const float* dy,
                                  float* dx, int64_t rows, int64_t width, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  RmsNormBackwardKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, weight, eps, dy,
                                                                              dx, width);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
