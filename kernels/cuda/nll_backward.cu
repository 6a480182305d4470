#include <cmath>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/nll_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Every thread reads and writes only its own columns after the reductions, so dlogits may alias
// logits.
__global__ void NllBackwardKernel(const float* logits, int64_t vocab, const int32_t* targets,
                                  float scale, float* dlogits) {
  __shared__ float max_scratch[32];
  __shared__ double sum_scratch[32];
  const float* l = logits + blockIdx.x * vocab;
  float* dl = dlogits + blockIdx.x * vocab;
  const int32_t target = targets[blockIdx.x];
  if (target < 0) {  // uniform over the block: no thread reaches the barriers below
    for (int64_t c = threadIdx.x; c < vocab; c += kThreads) dl[c] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) mx = fmaxf(mx, l[c]);
  mx = BlockReduce(mx, MaxOp(), -INFINITY, max_scratch);
  double sum = 0;
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) sum += exp(double(l[c]) - double(mx));
  sum = BlockReduce(sum, SumOp(), 0.0, sum_scratch);
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) {
    const double p = exp(double(l[c]) - double(mx)) / sum;
    dl[c] = float(double(scale) * (p - (c == target ? 1.0 : 0.0)));
  }
}

}  // namespace

cudaError_t LaunchNllBackward(const float* logits, int64_t rows, int64_t vocab,
                              const int32_t* targets, float scale, float* dlogits,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || vocab == 0) return cudaErrorInvalidValue;
  NllBackwardKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, targets,
                                                                          scale, dlogits);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
