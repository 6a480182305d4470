#include <algorithm>
#include <climits>

#include "kernels/cuda/device_info.cuh"
#include "kernels/cuda/gptq.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Warps per block of the column loop, at most.
constexpr int kLoopWarps = 16;
// Lanes a weight row in the column loop over a lazy block whose U is staged in shared memory (a
// power of two, at most 32): 32 / kRowLanes rows a warp.
constexpr int kRowLanes = 8;
// Shared memory of the column loop per row and column: the weight, its error e, the dequantized
// value and the code.
constexpr int kBytesPerEntry = 3 * sizeof(float) + sizeof(uint8_t);
// The widest lazy block whose U is staged in shared memory ([width, width] fp32, 64 KiB at 128).
constexpr int kSharedUWidth = 128;
// Opt-in shared memory per block on sm_90 (227 KiB).
constexpr int64_t kMaxSharedBytes = 227 * 1024;

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16));
}

__global__ void BuildReversedHessianKernel(const float* h, int64_t n, const int32_t* perm,
                                           const uint8_t* removed, float damp_add, float* a) {
  const int64_t total = n * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = idx / n, r = idx % n;
    const int64_t p = n - 1 - r, q = n - 1 - c;
    const int64_t i = perm[p], j = perm[q];
    float v;
    if (removed[i] || removed[j]) {
      v = p == q ? 1.0f : 0.0f;
    } else {
      v = i <= j ? h[i * n + j] : h[j * n + i];
    }
    a[idx] = p == q ? v + damp_add : v;
  }
}

__global__ void ExtractUKernel(const float* linv, int64_t n, float* u) {
  const int64_t total = n * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t a = idx / n, b = idx % n;
    u[idx] = b >= a ? linv[(n - 1 - b) * n + (n - 1 - a)] : 0.0f;
  }
}

__global__ void GatherColumnsKernel(const float* w, int64_t d_out, int64_t n, const int32_t* perm,
                                    const uint8_t* removed, float* wp) {
  const int64_t total = d_out * n;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = idx / n, j = perm[idx % n];
    wp[idx] = removed[j] ? 0.0f : w[o * n + j];
  }
}

__global__ void FindNonFiniteKernel(const float* x, int64_t rows, int64_t cols, bool upper_only,
                                    unsigned long long* first) {
  const int64_t total = rows * cols;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    if (upper_only && idx % cols < idx / cols) continue;
    if (!isfinite(x[idx])) atomicMin(first, static_cast<unsigned long long>(idx));
  }
}

// kLanes lanes per weight row, 32 / kLanes rows a warp. A row's block columns live in shared
// memory; column c is rounded by every lane of the row at once (the same operations on the same
// value, so the same bits), and the update of the later columns j > c is spread over the row's
// lanes, j on lane (j - c - 1) % kLanes. Every weight still sees the CPU reference's operations in
// the CPU's order: only independent updates run side by side. A group's range is a reduction over
// the row's lanes (GridRange: order-independent). With kUShared the block of U, [width, width],
// is staged in shared memory once for all the block's rows; wider blocks read U through the
// read-only cache. Rows are `row_stride` floats apart (w, e and the dequantized values at 0, pad
// and 2·pad), congruent to kLanes modulo 32 banks, so that the rows of a warp, whose lanes touch
// the same columns, hit distinct banks. Fewer lanes a row, fewer instructions a weight: the
// rounding of a column, done by each of the row's lanes, is shared by fewer of them.
template <bool kUShared, int kLanes>
__global__ void GptqBlockKernel(GptqBlockArgs a, int width_pad, int row_stride) {
  constexpr int kRows = 32 / kLanes;
  constexpr unsigned kFull = 0xffffffffu;
  extern __shared__ float4 shared4[];
  const int warps = static_cast<int>(blockDim.x / 32);
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int sub = lane % kLanes, row = warp * kRows + lane / kLanes;  // the row within the block
  const int width = static_cast<int>(a.i2 - a.i1);
  float* u_s = reinterpret_cast<float*>(shared4);  // [width, width_pad] when kUShared
  float* rows_s = u_s + (kUShared ? int64_t{width} * width_pad : 0);
  float* w_s = rows_s + int64_t{row} * row_stride;  // the weights, then rounded and updated
  float* e_s = w_s + width_pad;                     // e of each column
  float* deq_s = e_s + width_pad;                   // dequantized values
  uint8_t* code_s = reinterpret_cast<uint8_t*>(rows_s + int64_t{warps} * kRows * row_stride) +
                    int64_t{row} * width_pad;
  const float* u_block = a.u + a.i1 * a.n + a.i1;  // U(i1 + c, i1 + j) = u_block[c * n + j]
  if (kUShared) {
    for (int idx = static_cast<int>(threadIdx.x); idx < width * width; idx += blockDim.x) {
      const int c = idx / width, j = idx % width;
      if (j >= c) u_s[c * width_pad + j] = __ldg(u_block + c * a.n + j);
    }
    __syncthreads();
  }
  const int64_t first = (int64_t{blockIdx.x} * warps + warp) * kRows;
  if (first >= a.d_out) return;  // the whole warp; nothing below synchronizes the block
  // A row past d_out (in the warp's last rows) runs on zeros and writes nothing: the warp's
  // shuffles and __syncwarp need every lane.
  const int64_t o = int64_t{blockIdx.x} * warps * kRows + row;
  const bool live = o < a.d_out;
  const float* wrow = a.wp + (live ? o : 0) * a.n;
  for (int c = sub; c < width; c += kLanes) w_s[c] = live ? wrow[a.i1 + c] : 0.0f;
  __syncwarp();

  const int64_t g = a.group_size;
  int2 failure = live ? a.failures[o] : make_int2(0, 0);
  GroupParams p;
  if (a.i1 % g != 0 && live) {  // the block continues a group fitted in an earlier block
    p.scale = a.scales[(a.i1 / g) * a.d_out + o];
    p.zero = a.zeros[(a.i1 / g) * a.d_out + o];
  }
  for (int c = 0; c < width; ++c) {
    const int64_t i = a.i1 + c;
    if (i % g == 0) {
      const int64_t len = min(g, a.n - i);
      GridRange<float> r;
      if (i + len <= a.i2) {
        for (int j = c + sub; j < c + len; j += kLanes)
          ExtendRange(&r, GridValue(w_s[j], a.spec.grid));
      } else {
        // A group reaching past the block starts the block (the host cuts blocks so): its later
        // columns are current in wp, with every earlier block's update applied.
        for (int64_t j = i + sub; j < i + len; j += kLanes) {
          ExtendRange(&r, GridValue(live ? wrow[j] : 0.0f, a.spec.grid));
        }
      }
      for (int offset = kLanes / 2; offset > 0; offset /= 2) {
        GridRange<float> other;
        other.xmin = __shfl_xor_sync(kFull, r.xmin, offset);
        other.xmax = __shfl_xor_sync(kFull, r.xmax, offset);
        JoinRange(&r, other);
      }
      p = FitRange(r, a.spec);
      if (sub == 0 && live) {
        a.scales[(i / g) * a.d_out + o] = p.scale;
        a.zeros[(i / g) * a.d_out + o] = p.zero;
      }
      if (!isfinite(p.scale) && failure.x == 0) {
        failure = make_int2(kGptqScaleOverflow, static_cast<int>(i));
      }
    }
    const float wi = w_s[c];
    const int32_t code = QuantizeCode(wi, p, a.spec);
    const float wq = Dequantize<float>(code, p, a.spec);
    const float* u_row = kUShared ? u_s + c * width_pad : u_block + c * a.n;
    const float e = (wi - wq) / (kUShared ? u_row[c] : __ldg(u_row + c));
    if (!isfinite(e) && failure.x == 0) {
      failure = make_int2(kGptqNonFiniteError, static_cast<int>(i));
    }
    if (sub == c % kLanes) {
      e_s[c] = e;
      deq_s[c] = wq;
      code_s[c] = static_cast<uint8_t>(code);
      if (a.pre_round != nullptr && live) a.pre_round[o * a.n + __ldg(a.perm + i)] = wi;
    }
    for (int j = c + 1 + sub; j < width; j += kLanes) {
      w_s[j] = __fsub_rn(w_s[j], __fmul_rn(e, kUShared ? u_row[j] : __ldg(u_row + j)));
    }
    __syncwarp();
  }
  if (!live) return;
  if (sub == 0) a.failures[o] = failure;
  for (int c = sub; c < width; c += kLanes) {
    const int64_t col = __ldg(a.perm + a.i1 + c);
    a.err[o * a.err_ld + c] = e_s[c];
    a.codes[o * a.n + col] = code_s[c];
    a.dequantized[o * a.n + col] = deq_s[c];
  }
}

// One warp per (row, group): the lanes read the group coalesced and join their partial ranges.
// A range is a minimum and a maximum, exact in any order, so the parameters are FitGroup's.
__global__ void QuantizeRtnKernel(const float* w, int64_t d_out, int64_t d_in, int64_t g,
                                  int64_t n_groups, QuantSpec spec, uint8_t* codes,
                                  float* dequantized, float* scales, int32_t* zeros,
                                  int32_t* overflow) {
  const int lane = threadIdx.x % 32;
  const int64_t total = d_out * n_groups;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t idx = (blockIdx.x * int64_t{blockDim.x} + threadIdx.x) / 32; idx < total;
       idx += warps) {
    const int64_t o = idx / n_groups, k = idx % n_groups;
    const int64_t j0 = k * g, j1 = min(j0 + g, d_in);
    const float* row = w + o * d_in;
    GridRange<float> r;
    for (int64_t j = j0 + lane; j < j1; j += 32) ExtendRange(&r, GridValue(row[j], spec.grid));
    for (int offset = 16; offset > 0; offset /= 2) {
      GridRange<float> other;
      other.xmin = __shfl_xor_sync(0xffffffffu, r.xmin, offset);
      other.xmax = __shfl_xor_sync(0xffffffffu, r.xmax, offset);
      JoinRange(&r, other);
    }
    const GroupParams p = FitRange(r, spec);
    if (lane == 0) {
      if (!isfinite(p.scale)) atomicMin(overflow + o, static_cast<int32_t>(k));
      scales[k * d_out + o] = p.scale;
      zeros[k * d_out + o] = p.zero;
    }
    for (int64_t j = j0 + lane; j < j1; j += 32) {
      const int32_t code = QuantizeCode(row[j], p, spec);
      codes[o * d_in + j] = static_cast<uint8_t>(code);
      dequantized[o * d_in + j] = Dequantize<float>(code, p, spec);
    }
  }
}

}  // namespace

cudaError_t LaunchBuildReversedHessian(const float* h, int64_t n, const int32_t* perm,
                                       const uint8_t* removed, float damp_add, float* a,
                                       cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  BuildReversedHessianKernel<<<GridFor(n * n), kThreads, 0, stream>>>(h, n, perm, removed, damp_add,
                                                                      a);
  return cudaGetLastError();
}

cudaError_t LaunchExtractU(const float* linv, int64_t n, float* u, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  ExtractUKernel<<<GridFor(n * n), kThreads, 0, stream>>>(linv, n, u);
  return cudaGetLastError();
}

cudaError_t LaunchGatherColumns(const float* w, int64_t d_out, int64_t n, const int32_t* perm,
                                const uint8_t* removed, float* wp, cudaStream_t stream) {
  if (d_out * n == 0) return cudaSuccess;
  GatherColumnsKernel<<<GridFor(d_out * n), kThreads, 0, stream>>>(w, d_out, n, perm, removed, wp);
  return cudaGetLastError();
}

cudaError_t LaunchFindNonFinite(const float* x, int64_t rows, int64_t cols, bool upper_only,
                                unsigned long long* first, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  FindNonFiniteKernel<<<GridFor(rows * cols), kThreads, 0, stream>>>(x, rows, cols, upper_only,
                                                                     first);
  return cudaGetLastError();
}

int64_t GptqMaxBlockWidth() { return (kMaxSharedBytes - 16) / kBytesPerEntry / 4 * 4; }

cudaError_t LaunchGptqBlock(const GptqBlockArgs& args, cudaStream_t stream) {
  const int64_t width = args.i2 - args.i1;
  if (width <= 0 || width > GptqMaxBlockWidth() || args.group_size <= 0 || args.n > INT_MAX ||
      args.err_ld < width) {
    return cudaErrorInvalidValue;
  }
  if (args.d_out == 0) return cudaSuccess;
  // Padded to 4 columns so that every array starts 16-byte aligned.
  const int64_t pad = (width + 3) / 4 * 4;
  const bool u_shared = width <= kSharedUWidth;
  // kRowLanes lanes a row where U is staged (the lazy blocks of the default block size), else a
  // warp a row: the widest blocks need all the shared memory for one row.
  const int lanes = u_shared ? kRowLanes : 32;
  const int64_t rows_per_warp = 32 / lanes;
  const int64_t stride = lanes == 32 ? 3 * pad : 3 * pad + ((lanes - 3 * pad) % 32 + 32) % 32;
  const int64_t u_bytes = u_shared ? width * pad * int64_t{sizeof(float)} : 0;
  const int64_t warp_bytes = rows_per_warp * (stride * int64_t{sizeof(float)} + pad);
  // The row-warps spread over the multiprocessors: fewer warps a block where they are few (the
  // block count reaching the SM count), kLoopWarps at most, within the shared memory.
  const int64_t row_warps = (args.d_out + rows_per_warp - 1) / rows_per_warp;
  const int64_t sms = std::max(1, SmCount());
  const int64_t warps = std::min<int64_t>(
      {kLoopWarps, (kMaxSharedBytes - u_bytes) / warp_bytes, (row_warps + sms - 1) / sms});
  const int64_t bytes = u_bytes + warps * warp_bytes;
  const auto kernel = !u_shared         ? GptqBlockKernel<false, 32>
                      : kRowLanes == 32 ? GptqBlockKernel<true, 32>
                                        : GptqBlockKernel<true, kRowLanes>;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
  if (error != cudaSuccess) return error;
  const int64_t rows_per_block = warps * rows_per_warp;
  const int64_t blocks = (args.d_out + rows_per_block - 1) / rows_per_block;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(32 * warps), bytes, stream>>>(
      args, static_cast<int>(pad), static_cast<int>(stride));
  return cudaGetLastError();
}

cudaError_t LaunchQuantizeRtn(const float* w, int64_t d_out, int64_t d_in, int64_t group_size,
                              const QuantSpec& spec, uint8_t* codes, float* dequantized,
                              float* scales, int32_t* zeros, int32_t* overflow,
                              cudaStream_t stream) {
  if (group_size <= 0) return cudaErrorInvalidValue;
  const int64_t n_groups = (d_in + group_size - 1) / group_size;
  if (d_out * n_groups == 0) return cudaSuccess;
  QuantizeRtnKernel<<<GridFor(d_out * n_groups * 32), kThreads, 0, stream>>>(
      w, d_out, d_in, group_size, n_groups, spec, codes, dequantized, scales, zeros, overflow);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
