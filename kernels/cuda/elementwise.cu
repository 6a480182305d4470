#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/elementwise.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride launches: enough blocks to fill the GPU, each thread looping over the rest.
unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
}

__device__ inline void StoreAs(float* p, float v) { *p = v; }
__device__ inline void StoreAs(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

template <typename T>
__global__ void SiluMulKernel(const float* gate, const float* up, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = gate[i];
    StoreAs(out + i, g / (1.0f + expf(-g)) * up[i]);
  }
}

__global__ void AddKernel(const float* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] += x[i];
  }
}

template <bool kAccumulate>
__global__ void RowVectorKernel(const float* row, float* y, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    if (kAccumulate) {
      y[i] += row[i % cols];
    } else {
      y[i] = row[i % cols];
    }
  }
}

__global__ void F32ToBf16Kernel(const float* x, __nv_bfloat16* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __float2bfloat16_rn(x[i]);
  }
}

__global__ void Bf16ToF32Kernel(const __nv_bfloat16* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = __bfloat162float(x[i]);
  }
}

__device__ inline float LoadAsFloat(const float* p) { return *p; }
__device__ inline float LoadAsFloat(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename A, typename B, typename T>
__global__ void ConcatColumnsKernel(const A* a, int64_t ca, const B* b, int64_t cb, T* out,
                                    int64_t rows) {
  const int64_t width = ca + cb, n = rows * width;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / width, c = i % width;
    StoreAs(out + i, c < ca ? LoadAsFloat(a + r * ca + c) : LoadAsFloat(b + r * cb + (c - ca)));
  }
}

// The same where a and out are bf16 with whole 16-byte pieces a row (ca and cb multiples of 8,
// 16-byte aligned rows): a row a grid row, a piece of 8 values a thread, a's pieces copied as they
// are and b's 8 values converted (the general kernel's per-element 64-bit division made it about
// ten times slower than the bytes it moves).
template <typename B>
__global__ void ConcatBf16PiecesKernel(const uint4* a, int64_t a_pieces, const B* b, int64_t cb,
                                       uint4* out, int64_t out_pieces, int64_t rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const uint4* a_row = a + r * a_pieces;
    uint4* out_row = out + r * out_pieces;
    for (int64_t c = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; c < out_pieces;
         c += int64_t{gridDim.x} * blockDim.x) {
      if (c < a_pieces) {
        out_row[c] = a_row[c];
      } else {
        const B* src = b + r * cb + (c - a_pieces) * 8;
        __align__(16) __nv_bfloat16 v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = __float2bfloat16_rn(LoadAsFloat(src + k));
        out_row[c] = *reinterpret_cast<const uint4*>(v);
      }
    }
  }
}

// A row a grid row (a grid-stride loop over rows past 65535), the row's columns over the threads.
template <typename S, typename T>
__global__ void WriteColumnsKernel(const S* src, int64_t cols, T* out, int64_t ld, int64_t rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t j = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; j < cols;
         j += int64_t{gridDim.x} * blockDim.x) {
      StoreAs(out + r * ld + j, LoadAsFloat(src + r * cols + j));
    }
  }
}

// One 32x32 tile of the upper triangle per block, read as the transposed lower tile through
// shared memory so that both the reads and the writes are coalesced. The +1 column avoids bank
// conflicts on the transposed read.
constexpr int kTile = 32, kTileRows = 8;

__global__ void MirrorLowerToUpperKernel(float* h, int64_t k) {
  const int64_t tile_row = blockIdx.y, tile_col = blockIdx.x;
  if (tile_col < tile_row) return;
  __shared__ float tile[kTile][kTile + 1];
  // Source: rows tile_col*32.., columns tile_row*32.. (the mirror image in the lower triangle).
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t src_row = tile_col * kTile + r, src_col = tile_row * kTile + threadIdx.x;
    if (src_row < k && src_col < k) tile[r][threadIdx.x] = h[src_row * k + src_col];
  }
  __syncthreads();
  for (int r = threadIdx.y; r < kTile; r += kTileRows) {
    const int64_t dst_row = tile_row * kTile + r, dst_col = tile_col * kTile + threadIdx.x;
    if (dst_row < k && dst_col < k && dst_col > dst_row) {
      h[dst_row * k + dst_col] = tile[threadIdx.x][r];
    }
  }
}

// y[i, j] += x[i, j] for j <= i (row-major k x k): one row a block, the row's j <= i in strides.
__global__ void AddLowerKernel(const float* x, float* y, int64_t k) {
  const int64_t row = blockIdx.x;
  const float* xr = x + row * k;
  float* yr = y + row * k;
  for (int64_t j = threadIdx.x; j <= row; j += blockDim.x) yr[j] += xr[j];
}

}  // namespace

cudaError_t LaunchSiluMul(const float* gate, const float* up, float* out, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(n), kThreads, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(const float* gate, const float* up, __nv_bfloat16* out, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(n), kThreads, 0, stream>>>(gate, up, out, n);
  return cudaGetLastError();
}

cudaError_t LaunchAdd(const float* x, float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  AddKernel<<<GridFor(n), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchBroadcastRows(const float* row, float* y, int64_t rows, int64_t cols,
                                cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  RowVectorKernel<false><<<GridFor(rows * cols), kThreads, 0, stream>>>(row, y, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchAddRowVector(const float* row, float* y, int64_t rows, int64_t cols,
                               cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  RowVectorKernel<true><<<GridFor(rows * cols), kThreads, 0, stream>>>(row, y, rows, cols);
  return cudaGetLastError();
}

cudaError_t LaunchF32ToBf16(const float* x, __nv_bfloat16* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  F32ToBf16Kernel<<<GridFor(n), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchBf16ToF32(const __nv_bfloat16* x, float* y, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  Bf16ToF32Kernel<<<GridFor(n), kThreads, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchMirrorLowerToUpper(float* h, int64_t k, cudaStream_t stream) {
  if (k <= 1) return cudaSuccess;
  const int64_t tiles = (k + kTile - 1) / kTile;
  if (tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(tiles));
  MirrorLowerToUpperKernel<<<grid, dim3(kTile, kTileRows), 0, stream>>>(h, k);
  return cudaGetLastError();
}

cudaError_t LaunchAddLower(const float* x, float* y, int64_t k, cudaStream_t stream) {
  if (k == 0) return cudaSuccess;
  if (k > 0x7fffffff) return cudaErrorInvalidValue;
  AddLowerKernel<<<static_cast<unsigned>(k), kThreads, 0, stream>>>(x, y, k);
  return cudaGetLastError();
}

template <typename A, typename B, typename T>
cudaError_t LaunchConcatColumns(const A* a, int64_t ca, const B* b, int64_t cb, T* out,
                                int64_t rows, cudaStream_t stream) {
  if (rows * (ca + cb) == 0) return cudaSuccess;
  if constexpr (std::is_same_v<A, __nv_bfloat16> && std::is_same_v<T, __nv_bfloat16>) {
    const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0 && ca % 8 == 0 && cb % 8 == 0;
    if (aligned) {
      const int64_t out_pieces = (ca + cb) / 8;
      constexpr int kPieceThreads = 128;
      const dim3 grid(static_cast<unsigned>((out_pieces + kPieceThreads - 1) / kPieceThreads),
                      static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
      ConcatBf16PiecesKernel<<<grid, kPieceThreads, 0, stream>>>(
          reinterpret_cast<const uint4*>(a), ca / 8, b, cb, reinterpret_cast<uint4*>(out),
          out_pieces, rows);
      return cudaGetLastError();
    }
  }
  ConcatColumnsKernel<<<GridFor(rows * (ca + cb)), kThreads, 0, stream>>>(a, ca, b, cb, out, rows);
  return cudaGetLastError();
}

#define QCAL_CONCAT_COLUMNS(A, B, T)                                                          \
  template cudaError_t LaunchConcatColumns<A, B, T>(const A*, int64_t, const B*, int64_t, T*, \
                                                    int64_t, cudaStream_t);
QCAL_CONCAT_COLUMNS(float, float, float)
QCAL_CONCAT_COLUMNS(float, __nv_bfloat16, float)
QCAL_CONCAT_COLUMNS(__nv_bfloat16, float, float)
QCAL_CONCAT_COLUMNS(__nv_bfloat16, __nv_bfloat16, float)
QCAL_CONCAT_COLUMNS(float, float, __nv_bfloat16)
QCAL_CONCAT_COLUMNS(float, __nv_bfloat16, __nv_bfloat16)
QCAL_CONCAT_COLUMNS(__nv_bfloat16, float, __nv_bfloat16)
QCAL_CONCAT_COLUMNS(__nv_bfloat16, __nv_bfloat16, __nv_bfloat16)
#undef QCAL_CONCAT_COLUMNS

template <typename S, typename T>
cudaError_t LaunchWriteColumns(const S* src, int64_t cols, T* out, int64_t ld, int64_t rows,
                               cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  constexpr int kColumnThreads = 64;
  const dim3 grid(static_cast<unsigned>(
                      std::min<int64_t>((cols + kColumnThreads - 1) / kColumnThreads, 1 << 16)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  WriteColumnsKernel<<<grid, kColumnThreads, 0, stream>>>(src, cols, out, ld, rows);
  return cudaGetLastError();
}

#define QCAL_WRITE_COLUMNS(S, T)                                                         \
  template cudaError_t LaunchWriteColumns<S, T>(const S*, int64_t, T*, int64_t, int64_t, \
                                                cudaStream_t);
QCAL_WRITE_COLUMNS(float, float)
QCAL_WRITE_COLUMNS(float, __nv_bfloat16)
QCAL_WRITE_COLUMNS(__nv_bfloat16, float)
QCAL_WRITE_COLUMNS(__nv_bfloat16, __nv_bfloat16)
#undef QCAL_WRITE_COLUMNS

}  // namespace qcal::kernels::cuda
