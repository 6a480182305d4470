#include <cmath>

#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/nll.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// One block per row: a max pass, then a pass summing exp(l - max) in double.
__global__ void NllKernel(const float* logits, int64_t vocab, const int32_t* targets, float* nll) {
  __shared__ float max_scratch[32];
  __shared__ double sum_scratch[32];
  const float* l = logits + blockIdx.x * vocab;
  float mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) mx = fmaxf(mx, l[c]);
  mx = BlockReduce(mx, MaxOp(), -INFINITY, max_scratch);
  double sum = 0;
  for (int64_t c = threadIdx.x; c < vocab; c += kThreads) sum += exp(double(l[c]) - double(mx));
  sum = BlockReduce(sum, SumOp(), 0.0, sum_scratch);
  if (threadIdx.x == 0) {
    nll[blockIdx.x] = float(double(mx) + log(sum) - double(l[targets[blockIdx.x]]));
  }
}

}  // namespace

cudaError_t LaunchNll(const float* logits, int64_t rows, int64_t vocab, const int32_t* targets,
                      float* nll, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff || vocab == 0) return cudaErrorInvalidValue;
  NllKernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(logits, vocab, targets, nll);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
