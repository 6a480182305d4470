// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the group fit and the STE sums are the
// CPU reference's separately rounded operations in its order.
#include <algorithm>

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

}  // namespace

cudaError_t LaunchClippedFakeQuantBackward(const ClipView& layout, const float* w,
                                           const float* gamma, const float* beta,
                                           const float* d_w_hat, float* d_gamma, float* d_beta,
                                           float* d_w, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  ClippedFakeQuantBackwardKernel<<<blocks, kThreads, 0, stream>>>(layout, w, gamma, beta, d_w_hat,
                                                                  d_gamma, d_beta, d_w, total);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
