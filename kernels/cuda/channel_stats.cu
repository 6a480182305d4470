#include <algorithm>

#include "kernels/cuda/channel_stats.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Rows per segment at least, and segments at most: enough blocks to fill the GPU for a 4096-wide
// input of a few thousand rows, few enough that the second pass is negligible.
constexpr int64_t kMinRowsPerSegment = 64;
constexpr int64_t kMaxSegments = 128;

struct Partials {
  float* max_abs;
  double* sum_abs;
  int* bad;
};

Partials Split(void* scratch, int64_t segments, int64_t width) {
  const int64_t n = segments * width;
  double* sums = static_cast<double*>(scratch);
  float* maxes = reinterpret_cast<float*>(sums + n);
  int* bad = reinterpret_cast<int*>(maxes + n);
  return {maxes, sums, bad};
}

// One thread per (column, segment): the segment's rows in order. Threads of a warp read
// consecutive columns of one row.
__global__ void SegmentKernel(const float* x, int64_t rows, int64_t width, int64_t seq_len,
                              int64_t rows_per_segment, Partials out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= width) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_segment;
  const int64_t end = begin + rows_per_segment < rows ? begin + rows_per_segment : rows;
  float m = 0.0f;
  double s = 0.0;
  int bad = 0;
  // The position of row r in its sample, stepped instead of r % seq_len (a 64-bit remainder a
  // row, which made the kernel instruction-bound).
  int64_t pos = seq_len > 0 ? begin % seq_len : 1;
  const float* p = x + begin * width + j;
#pragma unroll 4
  for (int64_t r = begin; r < end; ++r, p += width) {
    const float v = __ldcs(p);  // read once: streamed past the cache
    if (!isfinite(v)) bad = 1;
    const bool bos = seq_len > 0 && pos == 0;
    if (seq_len > 0 && ++pos == seq_len) pos = 0;
    if (bos) continue;
    const float a = fabsf(v);
    m = fmaxf(m, a);
    s += static_cast<double>(a);
  }
  const int64_t k = static_cast<int64_t>(blockIdx.y) * width + j;
  out.max_abs[k] = m;
  out.sum_abs[k] = s;
  out.bad[k] = bad;
}

// One thread per column: the segments in order.
__global__ void CombineKernel(Partials in, int64_t segments, int64_t width, float* max_abs,
                              double* sum_abs, int* bad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= width) return;
  float m = 0.0f;
  double s = 0.0;
  int b = 0;
  for (int64_t g = 0; g < segments; ++g) {
    m = fmaxf(m, in.max_abs[g * width + j]);
    s += in.sum_abs[g * width + j];
    b |= in.bad[g * width + j];
  }
  max_abs[j] = m;
  sum_abs[j] = s;
  bad[j] = b;
}

}  // namespace

int64_t ChannelStatsSegments(int64_t rows) {
  const int64_t by_rows = (rows + kMinRowsPerSegment - 1) / kMinRowsPerSegment;
  return std::max<int64_t>(1, std::min(kMaxSegments, by_rows));
}

cudaError_t LaunchChannelStats(const float* x, int64_t rows, int64_t width, int64_t seq_len,
                               void* partials, float* max_abs, double* sum_abs, int* bad,
                               cudaStream_t stream) {
  if (width <= 0) return cudaSuccess;
  const int64_t segments = ChannelStatsSegments(rows);
  const int64_t per = (rows + segments - 1) / segments;
  const Partials p = Split(partials, segments, width);
  const unsigned col_blocks = static_cast<unsigned>((width + kThreads - 1) / kThreads);
  SegmentKernel<<<dim3(col_blocks, static_cast<unsigned>(segments)), kThreads, 0, stream>>>(
      x, rows, width, seq_len, per > 0 ? per : 1, p);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  CombineKernel<<<col_blocks, kThreads, 0, stream>>>(p, segments, width, max_abs, sum_abs, bad);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
