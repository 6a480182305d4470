#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr int kTile = 64;      // queries and keys per tile
constexpr int kThreads = 256;  // 16 x 16 threads, each owning 4 rows x 4 columns of a tile
// Leading dimension of the feature-major and transposed tiles: the padding keeps rows 16-byte
// aligned for float4 reads and spreads the transposing stores over banks (as in attention.cu).
constexpr int kLd = kTile + 4;

// Shared memory of the two kernels: four [kMaxD][kLd] operand tiles, plus one (dq) or two (dk, dv)
// [kTile][kLd] tiles of P or dS.
template <int kMaxD>
constexpr int DqSharedBytes() {
  return (4 * kMaxD * kLd + kTile * kLd) * int(sizeof(float));
}
template <int kMaxD>
constexpr int DkDvSharedBytes() {
  return (4 * kMaxD * kLd + 2 * kTile * kLd) * int(sizeof(float));
}

// A GEMM operand: rounded to bf16 (to nearest even) when the backend computes in bf16.
template <bool kBf16>
__device__ __forceinline__ float Operand(float x) {
  if constexpr (kBf16) {
    return __bfloat162float(__float2bfloat16_rn(x));
  } else {
    return x;
  }
}

// dst[c * kLd + r] = src row r0 + r, column c, for r < kTile and c < dp: a feature-major tile.
// Rows at or past `end` and columns past d are zeros.
template <bool kBf16>
__device__ void LoadFeatureMajor(float* dst, const float* src, int64_t stride, int r0, int end,
                                 int d, int dp) {
  for (int i = threadIdx.x; i < kTile * dp; i += kThreads) {
    const int r = i / dp, c = i % dp;
    dst[c * kLd + r] =
        (r0 + r < end && c < d) ? Operand<kBf16>(src[int64_t(r0 + r) * stride + c]) : 0.0f;
  }
}

// dst[r * kMaxD + c]: the same tile row-major.
template <int kMaxD, bool kBf16>
__device__ void LoadRowMajor(float* dst, const float* src, int64_t stride, int r0, int end, int d,
                             int dp) {
  for (int i = threadIdx.x; i < kTile * dp; i += kThreads) {
    const int r = i / dp, c = i % dp;
    dst[r * kMaxD + c] =
        (r0 + r < end && c < d) ? Operand<kBf16>(src[int64_t(r0 + r) * stride + c]) : 0.0f;
  }
}

// s[i][j] += Σ_c a[c][ty*4 + i] · b[c][tx*4 + j] over the dp features of two feature-major tiles:
// this thread's 4 x 4 block of a 64 x 64 product with a reduction over features.
__device__ __forceinline__ void TileProduct(const float* a, const float* b, int dp, int ty, int tx,
                                            float (&s)[4][4]) {
#pragma unroll 4
  for (int c = 0; c < dp; ++c) {
    const float4 av4 = *reinterpret_cast<const float4*>(a + c * kLd + ty * 4);
    const float4 bv4 = *reinterpret_cast<const float4*>(b + c * kLd + tx * 4);
    const float av[4] = {av4.x, av4.y, av4.z, av4.w}, bv[4] = {bv4.x, bv4.y, bv4.z, bv4.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] += av[i] * bv[j];
    }
  }
}

// o[i][g*4 + u] += Σ_j p[j][ty*4 + i] · x[j][g*64 + tx*4 + u] over the kTile rows j of a
// transposed tile p (leading dimension kLd) and a row-major tile x (leading dimension kMaxD): this
// thread's 4 rows x (4 per 64 features) of a product with a reduction over the tile's rows.
template <int kMaxD>
__device__ __forceinline__ void AccumulateProduct(const float* p, const float* x, int dp, int ty,
                                                  int tx, float (&o)[4][kMaxD / 16]) {
  constexpr int kGroups = kMaxD / 64;
#pragma unroll 4
  for (int j = 0; j < kTile; ++j) {
    const float4 pv4 = *reinterpret_cast<const float4*>(p + j * kLd + ty * 4);
    const float pv[4] = {pv4.x, pv4.y, pv4.z, pv4.w};
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
      if (g * 64 + tx * 4 >= dp) continue;
      const float4 xv4 = *reinterpret_cast<const float4*>(x + j * kMaxD + g * 64 + tx * 4);
      const float xv[4] = {xv4.x, xv4.y, xv4.z, xv4.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int u = 0; u < 4; ++u) o[i][g * 4 + u] += pv[i] * xv[u];
      }
    }
  }
}

// Whether query `row` (of a sequence) attends key `key`: the forward's causal and window masks.
__device__ __forceinline__ bool Visible(const AttentionBackwardArgs& a, int row, int key) {
  return row < a.q_len && key < a.kv_len && key <= a.q_offset + row &&
         (a.sliding_window <= 0 || key > a.q_offset + row - a.sliding_window);
}

// Max and sum over the 16 threads that share a query row (lanes 0-15 or 16-31 of a warp); the
// butterfly leaves the same value, bit for bit, in every lane.
__device__ __forceinline__ float RowMax(float v) {
  for (int offset = 8; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}
__device__ __forceinline__ float RowSum(float v) {
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Steps 1 and 2 (see the header): one block per (query tile, head, sequence). Thread (ty, tx)
// owns queries ty*4 .. ty*4+3 of the tile and keys tx*4 .. tx*4+3 of each key tile.
template <int kMaxD, bool kBf16>
__global__ void __launch_bounds__(kThreads) DqKernel(AttentionBackwardArgs a, float scale) {
  extern __shared__ float4 shared4[];
  float* q_t = reinterpret_cast<float*>(shared4);  // [kMaxD][kLd]: queries, feature-major
  float* do_t = q_t + kMaxD * kLd;                 // [kMaxD][kLd]: dout, feature-major
  float* k_t = do_t + kMaxD * kLd;                 // [kMaxD][kLd]: keys, feature-major
  // [kMaxD][kLd]: values, feature-major; once dP is formed, the keys row-major [kTile][kMaxD].
  float* v_t = k_t + kMaxD * kLd;
  float* ds_t = v_t + kMaxD * kLd;  // [kTile][kLd]: dS, key-major

  constexpr int kGroups = kMaxD / 64;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int q0 = blockIdx.x * kTile, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int d = a.head_dim, dp = (d + 3) & ~3;
  const int64_t q_width = int64_t(a.num_heads) * d, kv_width = int64_t(a.num_kv_heads) * d;
  const int64_t q_base = int64_t(b) * a.q_len * q_width + int64_t(h) * d;
  const int64_t kv_base = int64_t(b) * a.kv_len * kv_width + int64_t(kvh) * d;
  const float* q = a.q + q_base;
  const float* dout = a.dout + q_base;
  float* dq = a.dq + q_base;
  const float* k = a.k + kv_base;
  const float* v = a.v + kv_base;
  float* lse_out = a.scratch + (int64_t(b) * a.num_heads + h) * a.q_len;
  float* delta_out = lse_out + int64_t(a.batch) * a.num_heads * a.q_len;

  LoadFeatureMajor<kBf16>(q_t, q, q_width, q0, a.q_len, d, dp);
  LoadFeatureMajor<kBf16>(do_t, dout, q_width, q0, a.q_len, d, dp);
  // The keys any query of the tile sees, as in the forward kernel.
  const int last_row = min(q0 + kTile, a.q_len) - 1;
  const int kv_end = min(a.kv_len, a.q_offset + last_row + 1);
  const int kv_begin =
      a.sliding_window > 0 ? max(0, a.q_offset + q0 - a.sliding_window + 1) / kTile * kTile : 0;

  // Step 1: online softmax statistics, and D_i = Σ_j P_ij dP_ij accumulated with the same
  // rescaling as the row sum (so it needs no output of the forward).
  float m[4], l[4], acc[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    acc[i] = 0.0f;
  }
  for (int k0 = kv_begin; k0 < kv_end; k0 += kTile) {
    __syncthreads();  // the previous tile is no longer read (and the query tiles are stored)
    LoadFeatureMajor<kBf16>(k_t, k, kv_width, k0, kv_end, d, dp);
    LoadFeatureMajor<kBf16>(v_t, v, kv_width, k0, kv_end, d, dp);
    __syncthreads();
    float s[4][4] = {}, dpv[4][4] = {};
    TileProduct(q_t, k_t, dp, ty, tx, s);
    TileProduct(do_t, v_t, dp, ty, tx, dpv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty * 4 + i;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = Visible(a, row, k0 + tx * 4 + j) ? s[i][j] * scale : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      const float m_new = fmaxf(m[i], RowMax(mx));
      // While a row has seen only masked keys, exponentiate against 0: every p is 0.
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[i] - base);
      float ps = 0.0f, pd = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = expf(s[i][j] - base);
        ps += p;
        pd += p * dpv[i][j];
      }
      l[i] = l[i] * alpha + RowSum(ps);
      acc[i] = acc[i] * alpha + RowSum(pd);
      m[i] = m_new;
    }
  }
  float lse[4], delta[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty * 4 + i;
    // Every query sees at least itself; rows past the sequence have nothing.
    const bool live = row < a.q_len && l[i] > 0.0f;
    lse[i] = live ? m[i] + logf(l[i]) : 0.0f;
    delta[i] = live ? acc[i] / l[i] : 0.0f;
    if (tx == 0 && row < a.q_len) {
      lse_out[row] = lse[i];
      delta_out[row] = delta[i];
    }
  }

  // Step 2: dq = scale · dS · k over the same keys.
  float o[4][4 * kGroups];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int c = 0; c < 4 * kGroups; ++c) o[i][c] = 0.0f;
  }
  for (int k0 = kv_begin; k0 < kv_end; k0 += kTile) {
    __syncthreads();  // the previous tile's row-major keys and dS are no longer read
    LoadFeatureMajor<kBf16>(k_t, k, kv_width, k0, kv_end, d, dp);
    LoadFeatureMajor<kBf16>(v_t, v, kv_width, k0, kv_end, d, dp);
    __syncthreads();
    float s[4][4] = {}, dpv[4][4] = {};
    TileProduct(q_t, k_t, dp, ty, tx, s);
    TileProduct(do_t, v_t, dp, ty, tx, dpv);
    float ds[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float p = Visible(a, row, k0 + tx * 4 + j) ? expf(s[i][j] * scale - lse[i]) : 0.0f;
        ds[i][j] = p * (dpv[i][j] - delta[i]);
      }
    }
    __syncthreads();  // every thread has read v_t: it now takes the row-major keys
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float4*>(ds_t + (tx * 4 + j) * kLd + ty * 4) =
          make_float4(ds[0][j], ds[1][j], ds[2][j], ds[3][j]);
    }
    LoadRowMajor<kMaxD, kBf16>(v_t, k, kv_width, k0, kv_end, d, dp);
    __syncthreads();
    AccumulateProduct<kMaxD>(ds_t, v_t, dp, ty, tx, o);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty * 4 + i;
    if (row >= a.q_len) continue;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = g * 64 + tx * 4 + u;
        if (c < d) dq[int64_t(row) * q_width + c] = o[i][g * 4 + u] * scale;
      }
    }
  }
}

// Step 3: one block per (key tile, kv head, sequence), looping over the group's query heads and
// their visible query tiles in order. Thread (ty, tx) owns keys ty*4 .. ty*4+3 of the tile and
// queries tx*4 .. tx*4+3 of each query tile.
template <int kMaxD, bool kBf16>
__global__ void __launch_bounds__(kThreads) DkDvKernel(AttentionBackwardArgs a, float scale) {
  extern __shared__ float4 shared4[];
  float* k_t = reinterpret_cast<float*>(shared4);  // [kMaxD][kLd]: the block's keys, feature-major
  float* v_t = k_t + kMaxD * kLd;                  // [kMaxD][kLd]: its values, feature-major
  // [kMaxD][kLd]: queries (dout) feature-major for the scores, then row-major [kTile][kMaxD].
  float* q_buf = v_t + kMaxD * kLd;
  float* do_buf = q_buf + kMaxD * kLd;
  float* p_s = do_buf + kMaxD * kLd;  // [kTile][kLd]: P, query-major
  float* ds_s = p_s + kTile * kLd;    // [kTile][kLd]: dS, query-major

  constexpr int kGroups = kMaxD / 64;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int k0 = blockIdx.x * kTile, kvh = blockIdx.y, b = blockIdx.z;
  const int n_rep = a.num_heads / a.num_kv_heads;
  const int d = a.head_dim, dp = (d + 3) & ~3;
  const int64_t q_width = int64_t(a.num_heads) * d, kv_width = int64_t(a.num_kv_heads) * d;
  const int64_t kv_base = int64_t(b) * a.kv_len * kv_width + int64_t(kvh) * d;
  const int64_t stats = int64_t(a.batch) * a.num_heads * a.q_len;

  LoadFeatureMajor<kBf16>(k_t, a.k + kv_base, kv_width, k0, a.kv_len, d, dp);
  LoadFeatureMajor<kBf16>(v_t, a.v + kv_base, kv_width, k0, a.kv_len, d, dp);
  // The query tiles that see a key of this tile: query i sees key j when j <= q_offset + i and,
  // with a window W, j > q_offset + i - W.
  const int last_key = min(k0 + kTile, a.kv_len) - 1;
  const int q_begin = max(0, k0 - a.q_offset) / kTile * kTile;
  const int q_end =
      a.sliding_window > 0 ? min(a.q_len, last_key - a.q_offset + a.sliding_window) : a.q_len;

  float dk[4][4 * kGroups], dv[4][4 * kGroups];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int c = 0; c < 4 * kGroups; ++c) dk[j][c] = dv[j][c] = 0.0f;
  }
  for (int rep = 0; rep < n_rep; ++rep) {
    const int h = kvh * n_rep + rep;
    const int64_t q_base = int64_t(b) * a.q_len * q_width + int64_t(h) * d;
    const float* q = a.q + q_base;
    const float* dout = a.dout + q_base;
    const float* lse = a.scratch + (int64_t(b) * a.num_heads + h) * a.q_len;
    const float* delta = lse + stats;
    for (int i0 = q_begin; i0 < q_end; i0 += kTile) {
      __syncthreads();  // the previous query tile is no longer read (and the key tiles are stored)
      LoadFeatureMajor<kBf16>(q_buf, q, q_width, i0, a.q_len, d, dp);
      LoadFeatureMajor<kBf16>(do_buf, dout, q_width, i0, a.q_len, d, dp);
      __syncthreads();
      float s[4][4] = {}, dpv[4][4] = {};  // [key][query], transposed scores and dP
      TileProduct(k_t, q_buf, dp, ty, tx, s);
      TileProduct(v_t, do_buf, dp, ty, tx, dpv);
      float row_lse[4], row_delta[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i0 + tx * 4 + i;
        row_lse[i] = row < a.q_len ? lse[row] : 0.0f;
        row_delta[i] = row < a.q_len ? delta[row] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float p = Visible(a, i0 + tx * 4 + i, k0 + ty * 4 + j)
                              ? expf(s[j][i] * scale - row_lse[i])
                              : 0.0f;
          s[j][i] = p;
          dpv[j][i] = p * (dpv[j][i] - row_delta[i]);
        }
      }
      __syncthreads();  // every thread has read the feature-major tiles: they take row-major ones
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        *reinterpret_cast<float4*>(p_s + (tx * 4 + i) * kLd + ty * 4) =
            make_float4(s[0][i], s[1][i], s[2][i], s[3][i]);
        *reinterpret_cast<float4*>(ds_s + (tx * 4 + i) * kLd + ty * 4) =
            make_float4(dpv[0][i], dpv[1][i], dpv[2][i], dpv[3][i]);
      }
      LoadRowMajor<kMaxD, kBf16>(q_buf, q, q_width, i0, a.q_len, d, dp);
      LoadRowMajor<kMaxD, kBf16>(do_buf, dout, q_width, i0, a.q_len, d, dp);
      __syncthreads();
      AccumulateProduct<kMaxD>(p_s, do_buf, dp, ty, tx, dv);
      AccumulateProduct<kMaxD>(ds_s, q_buf, dp, ty, tx, dk);
    }
  }

  float* dk_out = a.dk + kv_base;
  float* dv_out = a.dv + kv_base;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int key = k0 + ty * 4 + j;
    if (key >= a.kv_len) continue;
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = g * 64 + tx * 4 + u;
        if (c < d) {
          dk_out[int64_t(key) * kv_width + c] = dk[j][g * 4 + u] * scale;
          dv_out[int64_t(key) * kv_width + c] = dv[j][g * 4 + u];
        }
      }
    }
  }
}

template <int kMaxD, bool kBf16>
cudaError_t Launch(const AttentionBackwardArgs& a, cudaStream_t stream) {
  constexpr int kDqBytes = DqSharedBytes<kMaxD>();
  constexpr int kDkDvBytes = DkDvSharedBytes<kMaxD>();
  cudaError_t error = cudaFuncSetAttribute(DqKernel<kMaxD, kBf16>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kDqBytes);
  if (error != cudaSuccess) return error;
  error = cudaFuncSetAttribute(DkDvKernel<kMaxD, kBf16>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize, kDkDvBytes);
  if (error != cudaSuccess) return error;
  const float scale = 1.0f / sqrtf(float(a.head_dim));
  if (a.q_len > 0) {
    const dim3 grid((a.q_len + kTile - 1) / kTile, a.num_heads, a.batch);
    DqKernel<kMaxD, kBf16><<<grid, kThreads, kDqBytes, stream>>>(a, scale);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  // With no queries this still runs: every dk and dv row becomes zero.
  const dim3 grid((a.kv_len + kTile - 1) / kTile, a.num_kv_heads, a.batch);
  DkDvKernel<kMaxD, kBf16><<<grid, kThreads, kDkDvBytes, stream>>>(a, scale);
  return cudaGetLastError();
}

}  // namespace

int64_t AttentionBackwardScratchFloats(int batch, int num_heads, int q_len) {
  return 2 * int64_t(batch) * num_heads * q_len;
}

cudaError_t LaunchAttentionBackward(const AttentionBackwardArgs& args, cudaStream_t stream) {
  if (args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim || args.num_kv_heads <= 0 ||
      args.num_heads <= 0 || args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 ||
      args.batch < 0 || args.batch > 65535 || args.q_len < 0 || args.q_offset < 0 ||
      args.q_offset + args.q_len > args.kv_len || args.sliding_window < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.kv_len == 0) return cudaSuccess;
  if (args.head_dim <= 64) {
    return args.bf16_operands ? Launch<64, true>(args, stream) : Launch<64, false>(args, stream);
  }
  return args.bf16_operands ? Launch<128, true>(args, stream) : Launch<128, false>(args, stream);
}

}  // namespace qcal::kernels::cuda
