#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/grad_elementwise.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride launches: enough blocks to fill the GPU, each thread looping over the rest.
unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
}

__global__ void SiluMulBackwardKernel(const float* gate, const float* up, const float* dout,
                                      float* dgate, float* dup, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i], u = up[i], dy = dout[i];
    const float sig = 1.0f / (1.0f + expf(-g));
    dgate[i] = dy * u * (sig * (1.0f + g * (1.0f - sig)));
    dup[i] = dy * (g * sig);
  }
}

// One block per row; every thread scales only its own columns after the reduction.
// The out-of-place form writes Out (float, or __nv_bfloat16 rounded to nearest even); in place,
// x and out are the same fp32 rows.
template <typename Out>
__global__ void ScaleRowsByNormKernel(const float* g, int64_t width_g, const float* x,
                                      int64_t width_x, Out* out) {
  __shared__ float scratch[32];
  const float* gr = g + blockIdx.x * width_g;
  const float* xr = x + blockIdx.x * width_x;
  Out* outr = out + blockIdx.x * width_x;
  float ss = 0.0f;
  for (int64_t c = threadIdx.x; c < width_g; c += kThreads)
    ss = __fadd_rn(ss, __fmul_rn(gr[c], gr[c]));
  const float norm = sqrtf(BlockReduce(ss, SumOp(), 0.0f, scratch));
  for (int64_t c = threadIdx.x; c < width_x; c += kThreads) {
    const float v = __fmul_rn(xr[c], norm);
    if constexpr (std::is_same_v<Out, float>) {
      outr[c] = v;
    } else {
      outr[c] = __float2bfloat16_rn(v);
    }
  }
}

__global__ void AccumulateSquaresKernel(const float* g, float* f, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    f[i] = __fadd_rn(f[i], __fmul_rn(g[i], g[i]));
  }
}

__global__ void ScaleKernel(float* x, int64_t n, float alpha) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] *= alpha;
  }
}

}  // namespace

cudaError_t LaunchSiluMulBackward(const float* gate, const float* up, const float* dout,
                                  float* dgate, float* dup, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SiluMulBackwardKernel<<<GridFor(n), kThreads, 0, stream>>>(gate, up, dout, dgate, dup, n);
  return cudaGetLastError();
}

cudaError_t LaunchScaleRowsByNorm(const float* g, int64_t rows, int64_t width_g, float* x,
                                  int64_t width_x, cudaStream_t stream) {
  if (rows == 0 || width_x == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  ScaleRowsByNormKernel<float>
      <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(g, width_g, x, width_x, x);
  return cudaGetLastError();
}

cudaError_t LaunchScaleRowsByNormInto(const float* g, int64_t rows, int64_t width_g, const float* x,
                                      int64_t width_x, void* out, bool bf16_out,
                                      cudaStream_t stream) {
  if (rows == 0 || width_x == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned grid = static_cast<unsigned>(rows);
  if (bf16_out) {
    ScaleRowsByNormKernel<__nv_bfloat16>
        <<<grid, kThreads, 0, stream>>>(g, width_g, x, width_x, static_cast<__nv_bfloat16*>(out));
  } else {
    ScaleRowsByNormKernel<float>
        <<<grid, kThreads, 0, stream>>>(g, width_g, x, width_x, static_cast<float*>(out));
  }
  return cudaGetLastError();
}

cudaError_t LaunchAccumulateSquares(const float* g, float* f, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AccumulateSquaresKernel<<<GridFor(n), kThreads, 0, stream>>>(g, f, n);
  return cudaGetLastError();
}

cudaError_t LaunchScale(float* x, int64_t n, float alpha, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  ScaleKernel<<<GridFor(n), kThreads, 0, stream>>>(x, n, alpha);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
