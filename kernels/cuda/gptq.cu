#include <algorithm>
#include <climits>

#include "kernels/cuda/gptq.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kThreads = 256;
// Weight rows (threads) per block of the column loop: one warp, so that the ~130 blocks of a
// 4096-row weight spread over every multiprocessor.
constexpr int kBlockRows = 32;
// Shared memory of the column loop per row and column: the weight (then its error e), the
// dequantized value and the code.
constexpr int kBytesPerEntry = 2 * sizeof(float) + sizeof(uint8_t);
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

// One thread per weight row; the block's rows staged in shared memory with an odd row stride so
// that the 32 threads of a warp, each at the same column of its own row, hit 32 different banks.
__global__ void GptqBlockKernel(GptqBlockArgs a, int stride) {
  extern __shared__ float4 shared4[];
  const int rows_per_block = blockDim.x;
  float* w_s = reinterpret_cast<float*>(shared4);  // weights; column c becomes its error e
  float* deq_s = w_s + rows_per_block * stride;    // dequantized values
  uint8_t* code_s = reinterpret_cast<uint8_t*>(deq_s + rows_per_block * stride);
  const int width = static_cast<int>(a.i2 - a.i1);
  const int64_t o0 = int64_t(blockIdx.x) * rows_per_block;
  const int rows = static_cast<int>(min(int64_t{rows_per_block}, a.d_out - o0));

  for (int idx = threadIdx.x; idx < rows * width; idx += rows_per_block) {
    const int r = idx / width, c = idx % width;
    w_s[r * stride + c] = a.wp[(o0 + r) * a.n + a.i1 + c];
  }
  __syncthreads();

  const int r = threadIdx.x;
  if (r < rows) {
    const int64_t o = o0 + r, g = a.group_size;
    float* row = w_s + r * stride;
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
        // A group reaching past the block starts the block (the host cuts blocks so): its later
        // columns are current in wp, with every earlier block's update applied.
        p = i + len <= a.i2 ? FitGroup(row + c, len, 1, a.spec)
                            : FitGroup(a.wp + o * a.n + i, len, 1, a.spec);
        a.scales[(i / g) * a.d_out + o] = p.scale;
        a.zeros[(i / g) * a.d_out + o] = p.zero;
        if (!isfinite(p.scale) && failure.x == 0) {
          failure = make_int2(kGptqScaleOverflow, static_cast<int>(i));
        }
      }
      const float wi = row[c];
      const int32_t code = QuantizeCode(wi, p, a.spec);
      if (a.pre_round != nullptr) a.pre_round[o * a.n + __ldg(a.perm + i)] = wi;
      const float wq = Dequantize<float>(code, p, a.spec);
      const float e = (wi - wq) / __ldg(a.u + i * a.n + i);
      if (!isfinite(e) && failure.x == 0) {
        failure = make_int2(kGptqNonFiniteError, static_cast<int>(i));
      }
      code_s[r * stride + c] = static_cast<uint8_t>(code);
      deq_s[r * stride + c] = wq;
      const float* u_row = a.u + i * a.n + a.i1;
#pragma unroll 8
      for (int j = c + 1; j < width; ++j) {
        row[j] = __fsub_rn(row[j], __fmul_rn(e, __ldg(u_row + j)));
      }
      row[c] = e;
    }
    a.failures[o] = failure;
  }
  __syncthreads();

  for (int idx = threadIdx.x; idx < rows * width; idx += rows_per_block) {
    const int rr = idx / width, c = idx % width;
    const int64_t o = o0 + rr, col = a.perm[a.i1 + c];
    a.err[o * a.err_ld + c] = w_s[rr * stride + c];
    a.codes[o * a.n + col] = code_s[rr * stride + c];
    a.dequantized[o * a.n + col] = deq_s[rr * stride + c];
  }
}

// One thread per (row, group), groups of a row on consecutive threads.
__global__ void QuantizeRtnKernel(const float* w, int64_t d_out, int64_t d_in, int64_t g,
                                  int64_t n_groups, QuantSpec spec, uint8_t* codes,
                                  float* dequantized, float* scales, int32_t* zeros,
                                  int32_t* overflow) {
  const int64_t total = d_out * n_groups;
  for (int64_t idx = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; idx < total;
       idx += int64_t{gridDim.x} * blockDim.x) {
    const int64_t o = idx / n_groups, k = idx % n_groups;
    const int64_t j0 = k * g, j1 = min(j0 + g, d_in);
    const float* row = w + o * d_in;
    const GroupParams p = FitGroup(row + j0, j1 - j0, 1, spec);
    if (!isfinite(p.scale)) atomicMin(overflow + o, static_cast<int32_t>(k));
    scales[k * d_out + o] = p.scale;
    zeros[k * d_out + o] = p.zero;
    for (int64_t j = j0; j < j1; ++j) {
      const int32_t code = QuantizeCode(row[j], p, spec);
      codes[o * d_in + j] = static_cast<uint8_t>(code);
      dequantized[o * d_in + j] = Dequantize<float>(code, p, spec);
    }
  }
}

int RowsPerBlock(int stride) {
  const int64_t fit = kMaxSharedBytes / (int64_t{stride} * kBytesPerEntry);
  return static_cast<int>(std::min<int64_t>(kBlockRows, fit));
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

int64_t GptqMaxBlockWidth() { return kMaxSharedBytes / kBytesPerEntry - 1; }

cudaError_t LaunchGptqBlock(const GptqBlockArgs& args, cudaStream_t stream) {
  const int64_t width = args.i2 - args.i1;
  if (width <= 0 || width > GptqMaxBlockWidth() || args.group_size <= 0 || args.n > INT_MAX ||
      args.err_ld < width) {
    return cudaErrorInvalidValue;
  }
  if (args.d_out == 0) return cudaSuccess;
  const int stride = static_cast<int>(width | 1);
  const int rows = RowsPerBlock(stride);
  // Rounded up to 16 bytes per array so that each starts aligned.
  const int64_t bytes = int64_t{rows} * stride * kBytesPerEntry + 16;
  cudaError_t error = cudaFuncSetAttribute(
      GptqBlockKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (error != cudaSuccess) return error;
  const int64_t blocks = (args.d_out + rows - 1) / rows;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  GptqBlockKernel<<<static_cast<unsigned>(blocks), rows, bytes, stream>>>(args, stride);
  return cudaGetLastError();
}

cudaError_t LaunchQuantizeRtn(const float* w, int64_t d_out, int64_t d_in, int64_t group_size,
                              const QuantSpec& spec, uint8_t* codes, float* dequantized,
                              float* scales, int32_t* zeros, int32_t* overflow,
                              cudaStream_t stream) {
  if (group_size <= 0) return cudaErrorInvalidValue;
  const int64_t n_groups = (d_in + group_size - 1) / group_size;
  if (d_out * n_groups == 0) return cudaSuccess;
  QuantizeRtnKernel<<<GridFor(d_out * n_groups), kThreads, 0, stream>>>(
      w, d_out, d_in, group_size, n_groups, spec, codes, dequantized, scales, zeros, overflow);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
