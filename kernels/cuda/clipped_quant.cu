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

}  // namespace

cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  ClippedFakeQuantKernel<<<blocks, kThreads, 0, stream>>>(layout, w, gamma, beta, w_hat, total);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
