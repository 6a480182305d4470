#include <algorithm>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/low_rank.cuh"
#include "kernels/hash_random.h"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Square tiles of the transposing copy, staged through shared memory so that both the reads and
// the writes of a warp are contiguous; kTileRows threads per tile column.
constexpr int kTile = 32;
constexpr int kTileRows = 8;

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
}

// Block (bx, by) writes the output tile of rows [by·32, by·32 + 32) and columns [bx·32, ...):
// a[i][j] = g[j][i] for j <= i. The tile of g it needs (rows j, columns i) is read row by row.
template <typename T>
__global__ void LowerFromUpperKernel(const float* g, int64_t n, double delta, T* a) {
  __shared__ float tile[kTile][kTile + 1];  // +1: no bank conflicts on the transposed read
  const int64_t i0 = int64_t{blockIdx.y} * kTile, j0 = int64_t{blockIdx.x} * kTile;
  const bool above = j0 > i0 + kTile - 1;  // the whole tile is in the strict upper triangle
  if (!above) {
    for (int r = threadIdx.y; r < kTile; r += kTileRows) {
      const int64_t j = j0 + r, i = i0 + threadIdx.x;
      if (j < n && i < n) tile[r][threadIdx.x] = g[j * n + i];
    }
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t i = i0 + r, j = j0 + threadIdx.x;
    if (i >= n || j >= n) continue;
    T v = 0;
    if (j <= i) {
      v = static_cast<T>(tile[threadIdx.x][r]);
      if (i == j) v = static_cast<T>(static_cast<double>(v) + delta);
    }
    a[i * n + j] = v;
  }
}

__global__ void LowerToF32Kernel(const double* a, int64_t n, float* s) {
  const int64_t total = n * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    s[idx] = idx % n <= idx / n ? static_cast<float>(a[idx]) : 0.0f;
  }
}

__global__ void WhitenedDifferenceKernel(const float* w, const float* w_hat, int64_t d_out,
                                         int64_t d_in, const float* scale, const int32_t* order,
                                         double* m) {
  const int64_t total = d_out * d_in;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = idx % d_in;
    const int64_t j = order ? order[p] : p;
    const int64_t src = idx - p + j;
    const double e = static_cast<double>(w[src]) - static_cast<double>(w_hat[src]);
    m[idx] = scale ? e * static_cast<double>(scale[j]) : e;
  }
}

__global__ void ScatterColumnsToF32Kernel(const double* src, int64_t rows, int64_t cols,
                                          const int32_t* order, float* dst) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t p = idx % cols;
    dst[idx - p + order[p]] = static_cast<float>(src[idx]);
  }
}

__global__ void DivideColumnsKernel(double* x, int64_t rank, int64_t d_in, const float* scale) {
  const int64_t total = rank * d_in;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const double s = static_cast<double>(scale[idx % d_in]);
    x[idx] = s > 0 ? x[idx] / s : 0.0;
  }
}

__global__ void GaussianKernel(double* x, int64_t count, uint64_t seed) {
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < count;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t i = static_cast<uint64_t>(idx);
    // Two uniforms with 53 random bits each; 1 - u1 is in (0, 1], so the logarithm is finite.
    const double u1 = static_cast<double>(HashBits(seed, 2 * i) >> 11) * 0x1.0p-53;
    const double u2 = static_cast<double>(HashBits(seed, 2 * i + 1) >> 11) * 0x1.0p-53;
    x[idx] = sqrt(-2.0 * log(1.0 - u1)) * cospi(2.0 * u2);
  }
}

__global__ void UpperTriangleKernel(const double* src, int64_t ld, int64_t k, double* dst) {
  const int64_t total = k * k;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = idx / k, r = idx % k;  // column-major
    dst[idx] = r <= c ? src[c * ld + r] : 0.0;
  }
}

__global__ void F64ToF32Kernel(const double* src, int64_t count, float* dst) {
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < count;
       idx += int64_t{gridDim.x} * blockDim.x) {
    dst[idx] = static_cast<float>(src[idx]);
  }
}

__global__ void LowerToF64Kernel(const float* s, int64_t n, double* a) {
  const int64_t total = n * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    a[idx] = idx % n <= idx / n ? static_cast<double>(s[idx]) : 0.0;
  }
}

__global__ void FindNonFiniteLowerKernel(const float* x, int64_t n, unsigned long long* first) {
  const int64_t total = n * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    if (idx % n > idx / n) continue;
    if (!isfinite(x[idx])) atomicMin(first, static_cast<unsigned long long>(idx));
  }
}

// One block a diagonal block, one thread a column j of its inverse: x_i = (δ_ij − Σ_{k=i+1..j}
// t_ik x_k) / t_ii for i = j down to 0, the triangle staged in shared memory.
__global__ void InvertUpperDiagonalBlocksKernel(const double* t, int64_t n, double* inv) {
  __shared__ double tri[kTriBlock * kTriBlock];
  const int64_t r0 = blockIdx.x * kTriBlock;
  const int m = static_cast<int>(n - r0 < kTriBlock ? n - r0 : kTriBlock);
  for (int e = threadIdx.x; e < kTriBlock * kTriBlock; e += blockDim.x) {
    const int row = e % kTriBlock, col = e / kTriBlock;
    tri[e] = row < m && col < m && row <= col ? t[(r0 + col) * n + r0 + row] : 0.0;
  }
  __syncthreads();
  const int j = threadIdx.x;
  double* out = inv + blockIdx.x * kTriBlock * kTriBlock + j * kTriBlock;
  double x[kTriBlock];
  for (int i = kTriBlock - 1; i >= 0; --i) {
    double sum = 0;
    if (j < m && i <= j) {
      sum = i == j ? 1.0 : 0.0;
      for (int k = i + 1; k <= j; ++k) sum -= tri[k * kTriBlock + i] * x[k];
      sum /= tri[i * kTriBlock + i];
    }
    x[i] = sum;
    out[i] = sum;
  }
}

constexpr int kDotThreads = 1024;

__global__ void __launch_bounds__(kDotThreads)
    DotF64Kernel(const float* x, const float* y, int64_t count, double* out) {
  __shared__ double scratch[32];
  double sum = 0;
  for (int64_t i = threadIdx.x; i < count; i += kDotThreads) {
    sum += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  }
  sum = BlockReduce(sum, SumOp(), 0.0, scratch);
  if (threadIdx.x == 0) *out = sum;
}

}  // namespace

cudaError_t LaunchLowerFromUpper(const float* g, int64_t n, double delta, double* a,
                                 cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  LowerFromUpperKernel<<<grid, dim3(kTile, kTileRows), 0, stream>>>(g, n, delta, a);
  return cudaGetLastError();
}

cudaError_t LaunchLowerFromUpperF32(const float* g, int64_t n, float* s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  LowerFromUpperKernel<<<grid, dim3(kTile, kTileRows), 0, stream>>>(g, n, 0.0, s);
  return cudaGetLastError();
}

cudaError_t LaunchLowerToF32(const double* a, int64_t n, float* s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  LowerToF32Kernel<<<GridFor(n * n), kThreads, 0, stream>>>(a, n, s);
  return cudaGetLastError();
}

cudaError_t LaunchWhitenedDifference(const float* w, const float* w_hat, int64_t d_out,
                                     int64_t d_in, const float* scale, const int32_t* order,
                                     double* m, cudaStream_t stream) {
  if (d_out * d_in == 0) return cudaSuccess;
  WhitenedDifferenceKernel<<<GridFor(d_out * d_in), kThreads, 0, stream>>>(w, w_hat, d_out, d_in,
                                                                           scale, order, m);
  return cudaGetLastError();
}

cudaError_t LaunchScatterColumnsToF32(const double* src, int64_t rows, int64_t cols,
                                      const int32_t* order, float* dst, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  ScatterColumnsToF32Kernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(src, rows, cols, order,
                                                                           dst);
  return cudaGetLastError();
}

cudaError_t LaunchDivideColumns(double* x, int64_t rank, int64_t d_in, const float* scale,
                                cudaStream_t stream) {
  if (rank * d_in == 0) return cudaSuccess;
  DivideColumnsKernel<<<GridFor(rank * d_in), kThreads, 0, stream>>>(x, rank, d_in, scale);
  return cudaGetLastError();
}

cudaError_t LaunchGaussian(double* x, int64_t count, uint64_t seed, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  GaussianKernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, seed);
  return cudaGetLastError();
}

cudaError_t LaunchUpperTriangle(const double* src, int64_t ld, int64_t k, double* dst,
                                cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  if (ld < k) return cudaErrorInvalidValue;
  UpperTriangleKernel<<<GridFor(k * k), kThreads, 0, stream>>>(src, ld, k, dst);
  return cudaGetLastError();
}

cudaError_t LaunchF64ToF32(const double* src, int64_t count, float* dst, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  F64ToF32Kernel<<<GridFor(count), kThreads, 0, stream>>>(src, count, dst);
  return cudaGetLastError();
}

cudaError_t LaunchLowerToF64(const float* s, int64_t n, double* a, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  LowerToF64Kernel<<<GridFor(n * n), kThreads, 0, stream>>>(s, n, a);
  return cudaGetLastError();
}

cudaError_t LaunchFindNonFiniteLower(const float* x, int64_t n, unsigned long long* first,
                                     cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  FindNonFiniteLowerKernel<<<GridFor(n * n), kThreads, 0, stream>>>(x, n, first);
  return cudaGetLastError();
}

cudaError_t LaunchInvertUpperDiagonalBlocks(const double* t, int64_t n, double* inv,
                                            cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t blocks = (n + kTriBlock - 1) / kTriBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  InvertUpperDiagonalBlocksKernel<<<static_cast<unsigned>(blocks), kTriBlock, 0, stream>>>(t, n,
                                                                                           inv);
  return cudaGetLastError();
}

cudaError_t LaunchDotF64(const float* x, const float* y, int64_t count, double* out,
                         cudaStream_t stream) {
  DotF64Kernel<<<1, kDotThreads, 0, stream>>>(x, y, count, out);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
