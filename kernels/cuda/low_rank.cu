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

// The back substitution of LaunchSolveUpperByBlocks. CTA (x, y) owns row block j = nb − 1 − x of
// column chunk y (kTriBlock columns of b): b_j −= T[j, l]·X_l for l = nb − 1 down to j + 1, each
// X_l taken once its CTA has published it (ready[y·nb + l]), then X_j = T_jj⁻¹·b_j written over
// b_j and published. A CTA's (x, y) is its ticket, taken from a counter as it starts (x the ticket
// modulo the row blocks), not its launch index: a CTA waits only for CTAs of lower ticket, which
// started before it and so are resident or done, whatever order the hardware dispatches in. Each
// thread owns a 4 x 4 piece of the 64 x 64 tile (rows tr + 16a, columns tc + 16c); the sums run
// over l descending, then the tile's 64 products in order: a fixed order, so run-to-run identical.
constexpr int kSolveThreads = 256;
constexpr int kSolveLd = kTriBlock + 1;  // shared-memory tiles padded against bank conflicts
static_assert(kTriBlock == 64 && kSolveThreads == 256, "the 4 x 4 pieces assume these sizes");

__global__ void __launch_bounds__(kSolveThreads)
    SolveUpperByBlocksKernel(const double* t, int64_t n, const double* inv, double* b, int64_t k,
                             int32_t* ready) {
  extern __shared__ double tiles[];
  double* tt = tiles;                         // T block or T_jj⁻¹, [col * kSolveLd + row]
  double* tx = tiles + kTriBlock * kSolveLd;  // X_l or b_j, [col * kSolveLd + row]
  const int64_t nb = (n + kTriBlock - 1) / kTriBlock;
  __shared__ int64_t ticket;
  if (threadIdx.x == 0) {
    ticket = atomicAdd(
        reinterpret_cast<unsigned long long*>(ready + 2 * ((nb * gridDim.y + 1) / 2)), 1ull);
  }
  __syncthreads();
  const int64_t cx = ticket % nb, cy = ticket / nb;
  const int64_t j = nb - 1 - cx;
  const int64_t r0 = j * kTriBlock, c0 = cy * kTriBlock;
  const int m = static_cast<int>(n - r0 < kTriBlock ? n - r0 : kTriBlock);
  const int cols = static_cast<int>(k - c0 < kTriBlock ? k - c0 : kTriBlock);
  const int tid = static_cast<int>(threadIdx.x), tr = tid % 16, tc = tid / 16;
  int32_t* flags = ready + cy * nb;
  double acc[4][4];
  for (int a = 0; a < 4; ++a) {
    for (int c = 0; c < 4; ++c) {
      const int row = tr + 16 * a, col = tc + 16 * c;
      acc[a][c] = row < m && col < cols ? b[(c0 + col) * n + r0 + row] : 0.0;
    }
  }
  // T[j, l] waits for no CTA: the next tile's elements are loaded into registers while this one
  // is multiplied. X_l's are loaded together once published, then stored (one round trip).
  constexpr int kPerThread = kTriBlock * kTriBlock / kSolveThreads;
  double t_next[kPerThread];
  auto load_t = [&](int64_t l) {
    const int64_t q0 = l * kTriBlock;
    const int ml = static_cast<int>(n - q0 < kTriBlock ? n - q0 : kTriBlock);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kSolveThreads, row = e % kTriBlock, col = e / kTriBlock;
      t_next[i] = row < m && col < ml ? t[(q0 + col) * n + r0 + row] : 0.0;
    }
  };
  if (nb - 1 > j) load_t(nb - 1);
  for (int64_t l = nb - 1; l > j; --l) {
    if (tid == 0) {
      while (atomicAdd(flags + l, 0) == 0) {
      }
      __threadfence();
    }
    __syncthreads();
    const int64_t q0 = l * kTriBlock;
    const int ml = static_cast<int>(n - q0 < kTriBlock ? n - q0 : kTriBlock);
    double x_now[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kSolveThreads, row = e % kTriBlock, col = e / kTriBlock;
      x_now[i] = row < ml && col < cols ? __ldcg(b + (c0 + col) * n + q0 + row) : 0.0;
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int e = tid + i * kSolveThreads, row = e % kTriBlock, col = e / kTriBlock;
      tt[col * kSolveLd + row] = t_next[i];
      tx[col * kSolveLd + row] = x_now[i];
    }
    if (l - 1 > j) load_t(l - 1);
    __syncthreads();
    for (int p = 0; p < kTriBlock; ++p) {
      double tv[4], xv[4];
      for (int a = 0; a < 4; ++a) tv[a] = tt[p * kSolveLd + tr + 16 * a];
      for (int c = 0; c < 4; ++c) xv[c] = tx[(tc + 16 * c) * kSolveLd + p];
      for (int a = 0; a < 4; ++a) {
        for (int c = 0; c < 4; ++c) acc[a][c] -= tv[a] * xv[c];
      }
    }
    __syncthreads();
  }
  // X_j = T_jj⁻¹·b_j.
  const double* inv_j = inv + j * kTriBlock * kTriBlock;
  for (int e = tid; e < kTriBlock * kTriBlock; e += kSolveThreads) {
    tt[e / kTriBlock * kSolveLd + e % kTriBlock] = inv_j[e];
  }
  for (int a = 0; a < 4; ++a) {
    for (int c = 0; c < 4; ++c) tx[(tc + 16 * c) * kSolveLd + tr + 16 * a] = acc[a][c];
  }
  __syncthreads();
  for (int a = 0; a < 4; ++a) {
    for (int c = 0; c < 4; ++c) {
      double sum = 0;
      for (int p = 0; p < kTriBlock; ++p) {
        sum += tt[p * kSolveLd + tr + 16 * a] * tx[(tc + 16 * c) * kSolveLd + p];
      }
      const int row = tr + 16 * a, col = tc + 16 * c;
      if (row < m && col < cols) b[(c0 + col) * n + r0 + row] = sum;
    }
  }
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    __threadfence();  // the block's writes, seen at the barrier, ordered before the flag
    atomicExch(flags + j, 1);
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

int64_t SolveUpperByBlocksWords(int64_t n, int64_t k) {
  const int64_t flags = ((n + kTriBlock - 1) / kTriBlock) * ((k + kTriBlock - 1) / kTriBlock);
  return 2 * ((flags + 1) / 2) + 2;
}

cudaError_t LaunchSolveUpperByBlocks(const double* t, int64_t n, const double* inv, double* b,
                                     int64_t k, int32_t* ready, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  const int64_t blocks = (n + kTriBlock - 1) / kTriBlock;
  const int64_t chunks = (k + kTriBlock - 1) / kTriBlock;
  if (blocks > 0x7fffffff || chunks > 65535) return cudaErrorInvalidValue;
  // The flags, then the ticket counter (8 bytes, 8-aligned).
  cudaError_t error =
      cudaMemsetAsync(ready, 0, sizeof(int32_t) * SolveUpperByBlocksWords(n, k), stream);
  if (error != cudaSuccess) return error;
  const int bytes = static_cast<int>(2 * kTriBlock * kSolveLd * sizeof(double));
  error = cudaFuncSetAttribute(SolveUpperByBlocksKernel,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (error != cudaSuccess) return error;
  SolveUpperByBlocksKernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(chunks)),
                             kSolveThreads, bytes, stream>>>(t, n, inv, b, k, ready);
  return cudaGetLastError();
}

cudaError_t LaunchDotF64(const float* x, const float* y, int64_t count, double* out,
                         cudaStream_t stream) {
  DotF64Kernel<<<1, kDotThreads, 0, stream>>>(x, y, count, out);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
