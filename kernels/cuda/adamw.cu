// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): every product and sum of the update is
// rounded on its own, as on the host.
#include <algorithm>

#include "kernels/cuda/adamw.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void AdamWKernel(float* p, const float* g, float* m, float* v, int64_t n,
                            AdamWCoefficients<float> c) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    float pi = p[i], mi = m[i], vi = v[i];
    AdamWElement(pi, g[i], mi, vi, c);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

cudaError_t LaunchAdamWStep(float* p, const float* g, float* m, float* v, int64_t n,
                            const AdamWCoefficients<float>& c, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
  AdamWKernel<<<blocks, kThreads, 0, stream>>>(p, g, m, v, n, c);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
