#include <algorithm>

#include "kernels/cuda/rope.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One thread per (row, head, frequency) pair. The explicit _rn products keep nvcc from fusing
// a*c - b*s into an FMA, so the result is bit-identical to the reference's. kInverse rotates by
// the negative angle (Rᵀ, the backward).
template <bool kInverse>
__global__ void RopeKernel(float* x, int64_t pairs, int64_t width, int seq_len, int head_dim,
                           const float* cos_sin) {
  const int half = head_dim / 2;
  const int64_t pairs_per_row = width / 2;
  for (int64_t t = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; t < pairs;
       t += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = t / pairs_per_row, in_row = t % pairs_per_row;
    const int64_t head = in_row / half;
    const int i = static_cast<int>(in_row % half);
    const float* cs = cos_sin + (int64_t(r % seq_len) * half + i) * 2;
    const float c = cs[0], s = kInverse ? -cs[1] : cs[1];
    float* v = x + r * width + head * head_dim;
    const float a = v[i], b = v[i + half];
    v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[i + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
  }
}

template <bool kInverse>
cudaError_t Launch(float* x, int64_t rows, int64_t width, int seq_len, int head_dim,
                   const float* cos_sin, cudaStream_t stream) {
  const int64_t pairs = rows * (width / 2);
  if (pairs == 0) return cudaSuccess;
  const unsigned grid =
      static_cast<unsigned>(std::min<int64_t>((pairs + kThreads - 1) / kThreads, 1 << 16));
  RopeKernel<kInverse><<<grid, kThreads, 0, stream>>>(x, pairs, width, seq_len, head_dim, cos_sin);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchRope(float* x, int64_t rows, int64_t width, int seq_len, int head_dim,
                       const float* cos_sin, cudaStream_t stream) {
  return Launch<false>(x, rows, width, seq_len, head_dim, cos_sin, stream);
}

cudaError_t LaunchRopeBackward(float* x, int64_t rows, int64_t width, int seq_len, int head_dim,
                               const float* cos_sin, cudaStream_t stream) {
  return Launch<true>(x, rows, width, seq_len, head_dim, cos_sin, stream);
}

}  // namespace qcal::kernels::cuda
