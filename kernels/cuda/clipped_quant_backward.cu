// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the group fit and the STE sums are the
// CPU reference's separately rounded operations in its order.
#include <algorithm>

#include "kernels/cuda/clipped_quant.cuh"
#include "kernels/cuda/clipped_quant_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 128;

__global__ void ClippedFakeQuantBackwardKernel(ClipView layout, const float* w, const float* gamma,
                                               const float* beta, const float* d_w_hat,
                                               float* d_gamma, float* d_beta, float* d_w,
                                               int64_t total) {
  const int64_t n_groups = layout.n_groups();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = i / n_groups, k = i % n_groups;
    ClippedFakeQuantBackwardGroup<float>(w + o * layout.d_in, layout, o, k, gamma[i], beta[i],
                                         d_w_hat + o * layout.d_in, d_gamma + i, d_beta + i,
                                         d_w ? d_w + o * layout.d_in : nullptr);
  }
}

// The staged path (StagedGroups; clipped_quant.cu's staged kernel): the groups' weights and output
// gradients are read with coalesced loads into shared memory, and each thread runs its group's STE
// sums there. Only without d_w (the per-weight gradient is written by the direct kernel).
__global__ void ClippedFakeQuantBackwardStagedKernel(ClipView layout, const float* w,
                                                     const float* gamma, const float* beta,
                                                     const float* d_w_hat, float* d_gamma,
                                                     float* d_beta, int64_t total) {
  extern __shared__ float tile[];
  const int g = static_cast<int>(layout.group_size());
  const int64_t n_groups = layout.n_groups();
  float* tile_dy = tile + blockDim.x * (g + 1);
  for (int64_t i0 = int64_t{blockIdx.x} * blockDim.x; i0 < total;
       i0 += int64_t{gridDim.x} * blockDim.x) {
    const int count = static_cast<int>(total - i0 < blockDim.x ? total - i0 : blockDim.x);
    const int span = count * g;
    for (int e = threadIdx.x; e < span; e += blockDim.x) {
      const int at = (e / g) * (g + 1) + e % g;
      tile[at] = w[i0 * g + e];
      tile_dy[at] = d_w_hat[i0 * g + e];
    }
    __syncthreads();
    if (static_cast<int>(threadIdx.x) < count) {
      const int64_t i = i0 + threadIdx.x;
      const int at = threadIdx.x * (g + 1);
      ClippedFakeQuantBackwardGroup<float>(tile + at, GroupView(layout, i % n_groups), i / n_groups,
                                           0, gamma[i], beta[i], tile_dy + at, d_gamma + i,
                                           d_beta + i, nullptr);
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t LaunchClippedFakeQuantBackward(const ClipView& layout, const float* w,
                                           const float* gamma, const float* beta,
                                           const float* d_w_hat, float* d_gamma, float* d_beta,
                                           float* d_w, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  if (const StagedGroups staged = StagedGroupsOf(layout, 2); staged.threads > 0 && !d_w) {
    const unsigned blocks = static_cast<unsigned>(
        std::min<int64_t>((total + staged.threads - 1) / staged.threads, 1 << 16));
    ClippedFakeQuantBackwardStagedKernel<<<blocks, staged.threads, staged.shared_bytes, stream>>>(
        layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, total);
    return cudaGetLastError();
  }
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  ClippedFakeQuantBackwardKernel<<<blocks, kThreads, 0, stream>>>(layout, w, gamma, beta, d_w_hat,
                                                                  d_gamma, d_beta, d_w, total);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
