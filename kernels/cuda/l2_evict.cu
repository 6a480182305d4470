// The L2 eviction read (launcher and contract in l2_evict.cuh).
#include <algorithm>

#include "kernels/cuda/l2_evict.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 512;

__global__ void __launch_bounds__(kThreads)
    ReadThroughKernel(const uint4* buf, size_t n, uint32_t key, uint32_t* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * static_cast<size_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * kThreads) {
    const uint4 v = buf[i];
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == key) *sink = acc;
}

// Each thread's loads i, i + stride, ..., kLoads of them at most, all issued before the first use.
constexpr int kFloorThreads = 1024;
constexpr int kLoads = 8;

__global__ void __launch_bounds__(kFloorThreads)
    ReadFloorKernel(const uint4* buf, size_t n, uint32_t key, uint32_t* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kFloorThreads;
  uint32_t acc = 0;
  for (size_t base = blockIdx.x * static_cast<size_t>(kFloorThreads) + threadIdx.x; base < n;
       base += stride * kLoads) {
    uint4 v[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const size_t i = base + j * stride;
      v[j] = i < n ? __ldcs(buf + i) : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
  }
  if (acc == key) *sink = acc;
}

// The launchers' contract on buf and bytes, and the current device's multiprocessor count.
cudaError_t CheckRead(const void* buf, size_t bytes, int& sms) {
  if (bytes % 16 != 0 || reinterpret_cast<uintptr_t>(buf) % 16 != 0) return cudaErrorInvalidValue;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
}

}  // namespace

cudaError_t LaunchReadFloor(const void* buf, size_t bytes, uint32_t key, uint32_t* sink,
                            cudaStream_t stream) {
  int sms = 0;
  if (const cudaError_t err = CheckRead(buf, bytes, sms); err != cudaSuccess) return err;
  // Two blocks an SM (2048 threads, the most one SM holds), fewer only where the read has fewer
  // 16-byte pieces than threads: every SM issues its share of the loads at once.
  const size_t pieces = bytes / 16;
  const size_t wanted = (pieces + kFloorThreads - 1) / kFloorThreads;
  const int blocks = static_cast<int>(std::max<size_t>(1, std::min<size_t>(2 * sms, wanted)));
  ReadFloorKernel<<<blocks, kFloorThreads, 0, stream>>>(static_cast<const uint4*>(buf), pieces, key,
                                                        sink);
  return cudaGetLastError();
}

cudaError_t LaunchReadThrough(const void* buf, size_t bytes, uint32_t key, uint32_t* sink,
                              cudaStream_t stream) {
  int sms = 0;
  if (const cudaError_t err = CheckRead(buf, bytes, sms); err != cudaSuccess) return err;
  ReadThroughKernel<<<4 * sms, kThreads, 0, stream>>>(static_cast<const uint4*>(buf), bytes / 16,
                                                      key, sink);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
