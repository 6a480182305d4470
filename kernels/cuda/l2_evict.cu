// The L2 eviction read (launcher and contract in l2_evict.cuh).
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

}  // namespace

cudaError_t LaunchReadThrough(const void* buf, size_t bytes, uint32_t key, uint32_t* sink,
                              cudaStream_t stream) {
  if (bytes % 16 != 0 || reinterpret_cast<uintptr_t>(buf) % 16 != 0) return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  ReadThroughKernel<<<4 * sms, kThreads, 0, stream>>>(static_cast<const uint4*>(buf), bytes / 16,
                                                      key, sink);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
