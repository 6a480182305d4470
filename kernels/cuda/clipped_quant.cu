// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the group fit and rounding are the CPU
// reference's separately rounded operations.
#include <algorithm>

#include "kernels/cuda/clipped_quant.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void ClippedFakeQuantKernel(ClipView layout, const float* w, const float* gamma,
                                       const float* beta, float* w_hat, int64_t total) {
  const int64_t n_groups = layout.n_groups();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = i / n_groups, k = i % n_groups;
    ClippedFakeQuantGroup<float>(w + o * layout.d_in, layout, o, k, gamma[i], beta[i],
                                 w_hat + o * layout.d_in);
  }
}

// The staged path (StagedGroups): blockDim.x consecutive groups, contiguous in memory, are read
// with coalesced loads into shared memory (a group per row of g + 1 floats: the threads' serial
// walks hit distinct banks), each thread quantizes its group there in place with the same
// arithmetic, and the block writes them back with coalesced stores.
__global__ void ClippedFakeQuantStagedKernel(ClipView layout, const float* w, const float* gamma,
                                             const float* beta, float* w_hat, int64_t total) {
  extern __shared__ float tile[];
  const int g = static_cast<int>(layout.group_size());
  const int64_t n_groups = layout.n_groups();
  for (int64_t i0 = int64_t{blockIdx.x} * blockDim.x; i0 < total;
       i0 += int64_t{gridDim.x} * blockDim.x) {
    const int count = static_cast<int>(total - i0 < blockDim.x ? total - i0 : blockDim.x);
    const int span = count * g;
    const float* src = w + i0 * g;
    for (int e = threadIdx.x; e < span; e += blockDim.x) tile[(e / g) * (g + 1) + e % g] = src[e];
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < count) {
      const int64_t i = i0 + threadIdx.x;
      float* group = tile + threadIdx.x * (g + 1);
      ClippedFakeQuantGroup<float>(group, GroupView(layout, i % n_groups), i / n_groups, 0,
                                   gamma[i], beta[i], group);
    }
    __syncthreads();
    float* dst = w_hat + i0 * g;
    for (int e = threadIdx.x; e < span; e += blockDim.x) dst[e] = tile[(e / g) * (g + 1) + e % g];
    __syncthreads();
  }
}

}  // namespace

cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  if (const StagedGroups staged = StagedGroupsOf(layout, 1); staged.threads > 0) {
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((total + staged.threads - 1) / staged.threads, 1 << 16));
    ClippedFakeQuantStagedKernel<<<blocks, staged.threads, staged.shared_bytes, stream>>>(
        layout, w, gamma, beta, w_hat, total);
    return cudaGetLastError();
  }
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  ClippedFakeQuantKernel<<<blocks, kThreads, 0, stream>>>(layout, w, gamma, beta, w_hat, total);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
