#include <algorithm>
#include <climits>

#include "kernels/cuda/gptq.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Weight rows (warps) per block of the column loop, at most.
constexpr int kLoopWarps = 16;
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

// One warp per weight row. The row's block columns live in shared memory; column c is rounded by
// every lane at once (the same operations on the same value, so the same bits), and the update of
// the later columns j > c is spread over the lanes, j on lane (j - c - 1) % 32. Every weight still
// sees the CPU reference's operations in the CPU's order: only independent updates run side by
// side. A group's range is a warp reduction (GridRange: order-independent). With kUShared the
// block of U, [width, width], is staged in shared memory once for all the block's rows; wider
// blocks read U through the read-only cache.
template <bool kUShared>
__global__ void GptqBlockKernel(GptqBlockArgs a, int width_pad) {
  extern __shared__ float4 shared4[];
  const int warps = static_cast<int>(blockDim.x / 32);
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int width = static_cast<int>(a.i2 - a.i1);
  float* u_s = reinterpret_cast<float*>(shared4);  // [width, width_pad] when kUShared
  float* rows_s = u_s + (kUShared ? int64_t{width} * width_pad : 0);
  float* w_s = rows_s + int64_t{warp} * 3 * width_pad;  // the weights, then rounded and updated
  float* e_s = w_s + width_pad;                         // e of each column
  float* deq_s = e_s + width_pad;                       // dequantized values
  uint8_t* code_s = reinterpret_cast<uint8_t*>(rows_s + int64_t{warps} * 3 * width_pad) +
                    int64_t{warp} * width_pad;
  const float* u_block = a.u + a.i1 * a.n + a.i1;  // U(i1 + c, i1 + j) = u_block[c * n + j]
  if (kUShared) {
    for (int idx = static_cast<int>(threadIdx.x); idx < width * width; idx += blockDim.x) {
      const int c = idx / width, j = idx % width;
      if (j >= c) u_s[c * width_pad + j] = __ldg(u_block + c * a.n + j);
    }
    __syncthreads();
  }
  const int64_t o = int64_t{blockIdx.x} * warps + warp;
  if (o >= a.d_out) return;  // the whole warp; nothing below synchronizes the block
  const float* wrow = a.wp + o * a.n;
  for (int c = lane; c < width; c += 32) w_s[c] = wrow[a.i1 + c];
  __syncwarp();

  const int64_t g = a.group_size;
  int2 failure = a.failures[o];
  GroupParams p;
  if (a.i1 % g != 0) {  // the block continues a group fitted in an earlier block
    p.scale = a.scales[(a.i1 / g) * a.d_out + o];
    p.zero = a.zeros[(a.i1 / g) * a.d_out + o];
  }
  for (int c = 0; c < width; ++c) {
    const int64_t i = a.i1 + c;
    if (i % g == 0) {
      const int64_t len = min(g, a.n - i);
      GridRange<float> r;
      if (i + len <= a.i2) {
        for (int j = c + lane; j < c + len; j += 32)
          ExtendRange(&r, GridValue(w_s[j], a.spec.grid));
      } else {
        // A group reaching past the block starts the block (the host cuts blocks so): its later
        // columns are current in wp, with every earlier block's update applied.
        for (int64_t j = i + lane; j < i + len; j += 32) {
          ExtendRange(&r, GridValue(wrow[j], a.spec.grid));
        }
      }
      for (int offset = 16; offset > 0; offset /= 2) {
        GridRange<float> other;
        other.xmin = __shfl_xor_sync(0xffffffffu, r.xmin, offset);
        other.xmax = __shfl_xor_sync(0xffffffffu, r.xmax, offset);
        JoinRange(&r, other);
      }
      p = FitRange(r, a.spec);
      if (lane == 0) {
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
    if (lane == c % 32) {
      e_s[c] = e;
      deq_s[c] = wq;
      code_s[c] = static_cast<uint8_t>(code);
      if (a.pre_round != nullptr) a.pre_round[o * a.n + __ldg(a.perm + i)] = wi;
    }
    for (int j = c + 1 + lane; j < width; j += 32) {
      w_s[j] = __fsub_rn(w_s[j], __fmul_rn(e, kUShared ? u_row[j] : __ldg(u_row + j)));
    }
    __syncwarp();
  }
  if (lane == 0) a.failures[o] = failure;
  for (int c = lane; c < width; c += 32) {
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
  const int64_t u_bytes = u_shared ? width * pad * int64_t{sizeof(float)} : 0;
  const int64_t warps = std::min<int64_t>(
      {kLoopWarps, (kMaxSharedBytes - u_bytes) / (pad * kBytesPerEntry), args.d_out});
  const int64_t bytes = u_bytes + warps * pad * kBytesPerEntry;
  const auto kernel = u_shared ? GptqBlockKernel<true> : GptqBlockKernel<false>;
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(bytes));
  if (error != cudaSuccess) return error;
  const int64_t blocks = (args.d_out + warps - 1) / warps;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(32 * warps), bytes, stream>>>(
      args, static_cast<int>(pad));
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
