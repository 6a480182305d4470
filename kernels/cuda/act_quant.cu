#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/act_quant.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row; the maximum is exact in any order. Each thread reads its columns before the
// reduction and writes them after it, so out may alias x. `store(c, s, q)` writes column c's
// result from the row's scale s and its code q (0 where s == 0). Returns s to every thread.
template <typename Store>
__device__ float ActQuantRow(const float* xr, int64_t width, float qmax, Store store) {
  __shared__ float scratch[32];
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) amax = fmaxf(amax, fabsf(xr[c]));
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);
  const float s = amax / qmax;
  for (int64_t c = threadIdx.x; c < width; c += kThreads) {
    // Subnormal s can push |x / s| past qmax: the clamp keeps the code on the grid.
    store(c, s, s == 0.0f ? 0.0f : fminf(fmaxf(RoundHalfEven(xr[c] / s), -qmax), qmax));
  }
  return s;
}

__global__ void ActQuantKernel(const float* x, int64_t width, float qmax, float* out) {
  float* yr = out + blockIdx.x * width;
  ActQuantRow(x + blockIdx.x * width, width, qmax,
              [&](int64_t c, float s, float q) { yr[c] = s == 0.0f ? 0.0f : __fmul_rn(s, q); });
}

__global__ void ActQuantBf16Kernel(const float* x, int64_t width, float qmax, __nv_bfloat16* out,
                                   int64_t ld) {
  __nv_bfloat16* yr = out + blockIdx.x * ld;
  ActQuantRow(x + blockIdx.x * width, width, qmax, [&](int64_t c, float s, float q) {
    yr[c] = __float2bfloat16_rn(s == 0.0f ? 0.0f : __fmul_rn(s, q));
  });
}

__global__ void ActQuantCodesKernel(const float* x, int64_t width, float qmax, double* codes,
                                    float* scales) {
  double* cr = codes + blockIdx.x * width;
  const float s = ActQuantRow(x + blockIdx.x * width, width, qmax,
                              [&](int64_t c, float, float q) { cr[c] = q; });
  if (threadIdx.x == 0) scales[blockIdx.x] = s;
}

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
}

__global__ void WidenKernel(const float* w, int64_t n, double* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = w[i];
  }
}

__global__ void WidenBf16Kernel(const __nv_bfloat16* w, int64_t n, double* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    out[i] = __bfloat162float(w[i]);
  }
}

template <bool kAccumulate>
__global__ void ScaleRowsKernel(const double* sums, const float* scales, const float* bias,
                                int64_t m, int64_t n, float* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < m * n;
       i += int64_t{gridDim.x} * blockDim.x) {
    float v = __double2float_rn(__dmul_rn(static_cast<double>(scales[i / n]), sums[i]));
    if (bias != nullptr) v = __fadd_rn(v, bias[i % n]);
    y[i] = kAccumulate ? __fadd_rn(y[i], v) : v;
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

cudaError_t LaunchActQuantBf16(const float* x, int64_t rows, int64_t width, int bits,
                               __nv_bfloat16* out, int64_t ld, cudaStream_t stream) {
  if (rows == 0 || width == 0) return cudaSuccess;
  if (rows > 0x7fffffff || bits < 2 || bits > 8 || ld < width) return cudaErrorInvalidValue;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  ActQuantBf16Kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, width, qmax, out, ld);
  return cudaGetLastError();
}

cudaError_t LaunchActQuantCodes(const float* x, int64_t rows, int64_t width, int bits,
                                double* codes, float* scales, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || bits < 2 || bits > 8) return cudaErrorInvalidValue;
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  ActQuantCodesKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, width, qmax, codes,
                                                                            scales);
  return cudaGetLastError();
}

cudaError_t LaunchWidenToF64(const void* w, bool bf16, int64_t n, double* out,
                             cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (bf16) {
    WidenBf16Kernel<<<GridFor(n), kThreads, 0, stream>>>(static_cast<const __nv_bfloat16*>(w), n,
                                                         out);
  } else {
    WidenKernel<<<GridFor(n), kThreads, 0, stream>>>(static_cast<const float*>(w), n, out);
  }
  return cudaGetLastError();
}

cudaError_t LaunchActQuantScaleRows(const double* sums, const float* scales, const float* bias,
                                    int64_t m, int64_t n, bool accumulate, float* y,
                                    cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if (accumulate) {
    ScaleRowsKernel<true><<<GridFor(m * n), kThreads, 0, stream>>>(sums, scales, bias, m, n, y);
  } else {
    ScaleRowsKernel<false><<<GridFor(m * n), kThreads, 0, stream>>>(sums, scales, bias, m, n, y);
  }
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
