#include <algorithm>

#include "kernels/cuda/split_tf32.cuh"
#include "kernels/cuda/tf32_round.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Columns across x (consecutive threads, consecutive elements), rows across y; both grid-stride.
__global__ void SplitTf32Kernel(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                                float* dst, int64_t ld_dst, int64_t part_stride, int lo_copy) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    for (int64_t c = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; c < cols;
         c += int64_t{gridDim.x} * blockDim.x) {
      const float x = src[r * ld_src + c];
      const float hi = RoundToTf32(x);
      // x - hi is exact (hi is x rounded at bit 13), so lo is the remainder rounded once.
      const float lo = RoundToTf32(x - hi);
      float* out = dst + r * ld_dst + c;
      out[0] = lo_copy == 0 ? lo : hi;
      out[part_stride] = lo_copy == 1 ? lo : hi;
      out[2 * part_stride] = lo_copy == 2 ? lo : hi;
    }
  }
}

}  // namespace

cudaError_t LaunchSplitTf32(const float* src, int64_t rows, int64_t cols, int64_t ld_src,
                            float* dst, int64_t ld_dst, int64_t part_stride, int lo_copy,
                            cudaStream_t stream) {
  const int64_t count = rows * cols;
  if (count == 0) return cudaSuccess;
  if (lo_copy < 0 || lo_copy > 2) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 64)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  SplitTf32Kernel<<<grid, kThreads, 0, stream>>>(src, rows, cols, ld_src, dst, ld_dst, part_stride,
                                                 lo_copy);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
