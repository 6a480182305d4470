#include "kernels/cuda/embedding_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Block (u, column tile): token plan[u], one column per thread.
__global__ void EmbeddingBackwardKernel(const int32_t* plan, int64_t count, const float* dout,
                                        int64_t width, float* dtable) {
  const int64_t c = blockIdx.y * int64_t{kThreads} + threadIdx.x;
  if (c >= width) return;
  const int64_t u = blockIdx.x;
  const int32_t* starts = plan + count;
  const int32_t* rows = starts + count + 1;
  float* dst = dtable + int64_t(plan[u]) * width + c;
  float acc = *dst;
  for (int32_t i = starts[u]; i < starts[u + 1]; ++i) acc += dout[int64_t(rows[i]) * width + c];
  *dst = acc;
}

}  // namespace

cudaError_t LaunchEmbeddingBackward(const int32_t* plan, int64_t count, const float* dout,
                                    int64_t width, float* dtable, cudaStream_t stream) {
  if (count == 0 || width == 0) return cudaSuccess;
  const int64_t column_tiles = (width + kThreads - 1) / kThreads;
  if (count > 0x7fffffff || column_tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(count), static_cast<unsigned>(column_tiles));
  EmbeddingBackwardKernel<<<grid, kThreads, 0, stream>>>(plan, count, dout, width, dtable);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
