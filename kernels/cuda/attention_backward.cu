#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/attention_backward.cuh"
#include "kernels/cuda/mma_sync.cuh"

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
template <typename Args>
__device__ __forceinline__ bool Visible(const Args& a, int row, int key) {
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

// ---- bf16 operands: tensor cores (see the header) ----
//
// Both kernels give each of 4 warps 16 rows of the block's 64 (queries for dq, keys for dk and
// dv) and stream the other side in tiles of 64 through shared memory, double-buffered with
// cp.async. A warp's row fragments are re-read from shared memory for every tile (ldmatrix), which
// keeps the register count low enough for two blocks per SM. Scores are kept in log2 units
// (scale·log2(e)·q·k) so that every exponential is one Exp2.
constexpr int kTcRows = 64;  // the block's own rows: 4 warps x 16
constexpr int kTcCols = 64;  // rows of each streamed tile
constexpr int kTcThreads = 128;
static_assert(kTcThreads == 2 * kTcCols, "the dk/dv kernel loads a tile's lse and D in one step");
static_assert(kTcRows == 16 * kTcThreads / 32, "a warp owns 16 of the block's rows");
static_assert(kTcRows == kTcCols, "own and streamed tiles share one shared-memory layout");

// 2^x in one MUFU.EX2 instruction (flush to zero, 2^-22 relative error; 2^-inf = 0). exp2f would
// add the denormal handling, and on these kernels the non-tensor instructions rival the
// tensor-core time per tile.
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <int kD>
struct TcLayout {
  // Shared rows are padded by 16 bytes: the 8 rows of an ldmatrix read land in distinct banks.
  static constexpr int kLd = kD + 8;
  static constexpr int kTileElems = kTcRows * kLd;
  // Two resident tiles (q and dout, or k and v) and two double-buffered streamed ones; the dk/dv
  // kernel adds the streamed queries' logsumexp and D, double-buffered.
  static constexpr int kBytes = 6 * kTileElems * 2;
  static constexpr int kDkDvBytes = kBytes + 4 * kTcCols * int(sizeof(float));
};

// s[n] = A·Bᵀ for the warp's 16 rows `a` and kN·8 rows `b` (both row-major bf16, leading
// dimension kLd), reduced over the dp features: the accumulator tiles of a 16 x kN·8 product.
template <int kD, int kN>
__device__ __forceinline__ void ScoreTile(const __nv_bfloat16* a, const __nv_bfloat16* b, int dp,
                                          int lane, float (&s)[kN][4]) {
  constexpr int kLd = TcLayout<kD>::kLd;
#pragma unroll
  for (int n = 0; n < kN; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    if (ks * 16 >= dp) continue;
    uint32_t af[4];
    mma::LdMatrixX4(af, a + ((lane & 7) + ((lane >> 3) & 1) * 8) * kLd + ks * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int p = 0; p < kN / 2; ++p) {
      uint32_t bf[4];
      const int row = p * 16 + (lane & 7) + (lane >> 4) * 8;
      mma::LdMatrixX4(bf, b + row * kLd + ks * 16 + ((lane >> 3) & 1) * 8);
      mma::Mma(s[2 * p], af, bf[0], bf[1]);
      mma::Mma(s[2 * p + 1], af, bf[2], bf[3]);
    }
  }
}

// o += A·B for A = kK k-steps of 16 columns in A-fragment form (packed bf16) and B = the kK·16
// rows `b` (row-major bf16 over the dp features, leading dimension kLd): the warp's 16 x kD result.
template <int kD, int kK>
__device__ __forceinline__ void AccumulateTile(const uint32_t (&pa)[kK][4], const __nv_bfloat16* b,
                                               int dp, int lane, float (&o)[kD / 8][4]) {
  constexpr int kLd = TcLayout<kD>::kLd;
#pragma unroll
  for (int kk = 0; kk < kK; ++kk) {
#pragma unroll
    for (int dq = 0; dq < kD / 16; ++dq) {
      if (dq * 16 >= dp) continue;
      uint32_t bf[4];
      const int row = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
      mma::LdMatrixX4Trans(bf, b + row * kLd + dq * 16 + (lane >> 4) * 8);
      mma::Mma(o[2 * dq], pa[kk], bf[0], bf[1]);
      mma::Mma(o[2 * dq + 1], pa[kk], bf[2], bf[3]);
    }
  }
}

// Copies `rows` rows of dp bf16 features from src (row stride `stride` elements), starting at row
// r0, into dst (leading dimension kLd); rows at or past `end` become zeros.
template <int kD>
__device__ __forceinline__ void LoadRowsAsync(__nv_bfloat16* dst, const __nv_bfloat16* src,
                                              int64_t stride, int r0, int end, int rows, int dp) {
  constexpr int kLd = TcLayout<kD>::kLd;
  const int chunks = dp / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < rows * chunks; i += kTcThreads) {
    const int r = i / chunks, c = (i % chunks) * 8;
    const bool in = r0 + r < end;
    mma::CopyAsync16(dst + r * kLd + c, src + (in ? int64_t(r0 + r) * stride : 0) + c, in ? 16 : 0);
  }
}

// Writes a warp's 16 x kD fp32 accumulators (rows row_lo and row_lo + 8 of each tile, times
// `scale`) to dst (row stride `stride`), skipping rows at or past `end` and columns past d.
template <int kD>
__device__ __forceinline__ void StoreRows(const float (&o)[kD / 8][4], float scale, float* dst,
                                          int64_t stride, int row_lo, int end, int d, int t4) {
#pragma unroll
  for (int t = 0; t < kD / 8; ++t) {
    const int c = 8 * t + 2 * t4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row_lo + 8 * half;
      if (row >= end) continue;
      float* p = dst + int64_t(row) * stride + c;
      if (c < d) p[0] = o[t][2 * half] * scale;
      if (c + 1 < d) p[1] = o[t][2 * half + 1] * scale;
    }
  }
}

// Steps 1 and 2: one block per (64 queries, head, sequence); the grid's z runs over query tiles
// from the last (which sees the most keys) so that the longest blocks start first.
template <int kD>
__global__ void __launch_bounds__(kTcThreads, 2)
    DqBf16Kernel(AttentionBackwardBf16Args a, float scale, float scale_log2) {
  using L = TcLayout<kD>;
  extern __shared__ float4 shared4[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(shared4);  // [kTcRows][kLd]
  __nv_bfloat16* do_s = q_s + L::kTileElems;                       // [kTcRows][kLd]
  __nv_bfloat16* k_s = do_s + L::kTileElems;                       // 2 x [kTcCols][kLd]
  __nv_bfloat16* v_s = k_s + 2 * L::kTileElems;                    // 2 x [kTcCols][kLd]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int h = blockIdx.x, b = blockIdx.y, q0 = (gridDim.z - 1 - blockIdx.z) * kTcRows;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int dp = a.padded_dim, d = a.head_dim, window = a.sliding_window;
  const int64_t q_row = int64_t(a.num_heads) * dp, kv_row = int64_t(a.num_kv_heads) * dp;
  const int64_t q_base = int64_t(b) * a.q_len * q_row + int64_t(h) * dp;
  const int64_t kv_base = int64_t(b) * a.kv_len * kv_row + int64_t(kvh) * dp;
  const __nv_bfloat16* k = a.k + kv_base;
  const __nv_bfloat16* v = a.v + kv_base;
  float* lse_out = a.scratch + (int64_t(b) * a.num_heads + h) * a.q_len;
  float* delta_out = lse_out + int64_t(a.batch) * a.num_heads * a.q_len;

  LoadRowsAsync<kD>(q_s, a.q + q_base, q_row, q0, a.q_len, kTcRows, dp);
  LoadRowsAsync<kD>(do_s, a.dout + q_base, q_row, q0, a.q_len, kTcRows, dp);
  // The keys any query of the block sees, as in the forward kernel.
  const int last_row = min(q0 + kTcRows, a.q_len) - 1;
  const int kv_end = min(a.kv_len, a.q_offset + last_row + 1);
  const int kv_begin = window > 0 ? max(0, a.q_offset + q0 - window + 1) / kTcCols * kTcCols : 0;
  const int tiles = kv_end > kv_begin ? (kv_end - kv_begin + kTcCols - 1) / kTcCols : 0;

  // This warp's rows: row_lo (accumulator elements 0, 1) and row_lo + 8 (elements 2, 3) of 16
  // starting at w0, and the keys that any of them sees.
  const int w0 = q0 + warp * 16, row_lo = w0 + g;
  const bool warp_active = w0 < a.q_len;
  const int warp_last_key = a.q_offset + min(w0 + 15, a.q_len - 1);
  const int warp_first_key = window > 0 ? a.q_offset + w0 - window + 1 : 0;
  const __nv_bfloat16* q_w = q_s + warp * 16 * L::kLd;
  const __nv_bfloat16* do_w = do_s + warp * 16 * L::kLd;

  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, acc[2] = {0.0f, 0.0f};
  float lse[2] = {0.0f, 0.0f}, delta[2] = {0.0f, 0.0f};
  float o[kD / 8][4];
#pragma unroll
  for (int t = 0; t < kD / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;

  // Pass 0: statistics (online softmax, D accumulated with the same rescaling as the row sum);
  // pass 1: dq. Both recompute S and dP from the same operands in the same order. With the
  // statistics given, pass 1 alone reads them.
  for (int pass = a.stats_given ? 1 : 0; pass < 2; ++pass) {
    if (pass == 1 && a.stats_given) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_lo + 8 * half;
        lse[half] = row < a.q_len ? lse_out[row] : 0.0f;
        delta[half] = row < a.q_len ? delta_out[row] : 0.0f;
      }
    } else if (pass == 1) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row_lo + 8 * half;
        // Every query sees at least itself; rows past the sequence have nothing.
        const bool live = row < a.q_len && l[half] > 0.0f;
        lse[half] = live ? m[half] + log2f(l[half]) : 0.0f;
        delta[half] = live ? acc[half] / l[half] : 0.0f;
        if (t4 == 0 && row < a.q_len) {
          lse_out[row] = lse[half];
          delta_out[row] = delta[half];
        }
      }
    }
    if (tiles > 0) {
      LoadRowsAsync<kD>(k_s, k, kv_row, kv_begin, kv_end, kTcCols, dp);
      LoadRowsAsync<kD>(v_s, v, kv_row, kv_begin, kv_end, kTcCols, dp);
    }
    mma::CopyAsyncCommit();
    for (int t = 0; t < tiles; ++t) {
      const int k0 = kv_begin + t * kTcCols, buf = t & 1;
      if (t + 1 < tiles) {
        LoadRowsAsync<kD>(k_s + (buf ^ 1) * L::kTileElems, k, kv_row, k0 + kTcCols, kv_end, kTcCols,
                          dp);
        LoadRowsAsync<kD>(v_s + (buf ^ 1) * L::kTileElems, v, kv_row, k0 + kTcCols, kv_end, kTcCols,
                          dp);
        mma::CopyAsyncCommit();
        mma::CopyAsyncWait<1>();
      } else {
        mma::CopyAsyncWait<0>();
      }
      __syncthreads();
      if (warp_active && k0 <= warp_last_key && k0 + kTcCols - 1 >= warp_first_key) {
        const __nv_bfloat16* kt = k_s + buf * L::kTileElems;
        float s[kTcCols / 8][4], dpv[kTcCols / 8][4];
        ScoreTile<kD, kTcCols / 8>(q_w, kt, dp, lane, s);
        ScoreTile<kD, kTcCols / 8>(do_w, v_s + buf * L::kTileElems, dp, lane, dpv);
        // Tiles wholly inside every mask skip the per-element test.
        const bool full = w0 + 15 < a.q_len && k0 + kTcCols <= a.kv_len &&
                          k0 + kTcCols - 1 <= a.q_offset + w0 &&
                          (window <= 0 || k0 > a.q_offset + w0 + 15 - window);
        // Element e of tile n: row row_lo + 8·(e / 2), key k0 + 8n + 2·t4 + e % 2.
#pragma unroll
        for (int n = 0; n < kTcCols / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = row_lo + (e >> 1) * 8, key = k0 + 8 * n + 2 * t4 + (e & 1);
            s[n][e] = full || Visible(a, row, key) ? s[n][e] * scale_log2 : -INFINITY;
          }
        }
        if (pass == 0) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float mx = -INFINITY;
#pragma unroll
            for (int n = 0; n < kTcCols / 8; ++n) {
              mx = fmaxf(mx, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
            }
            const float m_new = fmaxf(m[half], mma::QuadMax(mx));
            // While a row has seen only masked keys, exponentiate against 0: every p is 0.
            const float base = m_new == -INFINITY ? 0.0f : m_new;
            float ps = 0.0f, pd = 0.0f;
#pragma unroll
            for (int n = 0; n < kTcCols / 8; ++n) {
#pragma unroll
              for (int e = 2 * half; e < 2 * half + 2; ++e) {
                const float p = Exp2(s[n][e] - base);
                ps += p;
                pd += p * dpv[n][e];
              }
            }
            const float alpha = Exp2(m[half] - base);
            l[half] = l[half] * alpha + mma::QuadSum(ps);
            acc[half] = acc[half] * alpha + mma::QuadSum(pd);
            m[half] = m_new;
          }
        } else {
          // dS = P ⊙ (dP − D) as the A operand of dS·k, 16 keys per k-step.
          uint32_t dsa[kTcCols / 16][4];
#pragma unroll
          for (int kk = 0; kk < kTcCols / 16; ++kk) {
#pragma unroll
            for (int x = 0; x < 4; ++x) {
              const int n = 2 * kk + (x >> 1), half = x & 1;
              float ds[2];
#pragma unroll
              for (int u = 0; u < 2; ++u) {
                const int e = 2 * half + u;
                ds[u] = Exp2(s[n][e] - lse[half]) * (dpv[n][e] - delta[half]);
              }
              dsa[kk][x] = mma::PackBf16(ds[0], ds[1]);
            }
          }
          AccumulateTile<kD, kTcCols / 16>(dsa, kt, dp, lane, o);
        }
      }
      __syncthreads();  // the buffer is rewritten by the next iteration's prefetch
    }
  }
  const int64_t out_row = int64_t(a.num_heads) * d;
  StoreRows<kD>(o, scale, a.dq + int64_t(b) * a.q_len * out_row + int64_t(h) * d, out_row, row_lo,
                a.q_len, d, t4);
}

// Step 3: one block per (64 keys, kv head, sequence), looping over the group's query heads and
// their visible query tiles in order; the grid's z runs over key tiles from the first (which the
// most queries see).
template <int kD>
__global__ void __launch_bounds__(kTcThreads, 2)
    DkDvBf16Kernel(AttentionBackwardBf16Args a, float scale, float scale_log2) {
  using L = TcLayout<kD>;
  extern __shared__ float4 shared4[];
  __nv_bfloat16* k_s = reinterpret_cast<__nv_bfloat16*>(shared4);     // [kTcRows][kLd]
  __nv_bfloat16* v_s = k_s + L::kTileElems;                           // [kTcRows][kLd]
  __nv_bfloat16* q_s = v_s + L::kTileElems;                           // 2 x [kTcCols][kLd]
  __nv_bfloat16* do_s = q_s + 2 * L::kTileElems;                      // 2 x [kTcCols][kLd]
  float* lse_s = reinterpret_cast<float*>(do_s + 2 * L::kTileElems);  // 2 x [kTcCols]
  float* delta_s = lse_s + 2 * kTcCols;                               // 2 x [kTcCols]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
  const int kvh = blockIdx.x, b = blockIdx.y, k0 = blockIdx.z * kTcRows;
  const int n_rep = a.num_heads / a.num_kv_heads;
  const int dp = a.padded_dim, d = a.head_dim, window = a.sliding_window;
  const int64_t q_row = int64_t(a.num_heads) * dp, kv_row = int64_t(a.num_kv_heads) * dp;
  const int64_t kv_base = int64_t(b) * a.kv_len * kv_row + int64_t(kvh) * dp;
  const int64_t stats = int64_t(a.batch) * a.num_heads * a.q_len;

  // The query tiles that see a key of this block: query i sees key j when j <= q_offset + i and,
  // with a window W, j > q_offset + i - W.
  const int last_key = min(k0 + kTcRows, a.kv_len) - 1;
  const int q_begin = max(0, k0 - a.q_offset) / kTcCols * kTcCols;
  const int q_end = window > 0 ? min(a.q_len, last_key - a.q_offset + window) : a.q_len;
  const int q_tiles = q_end > q_begin ? (q_end - q_begin + kTcCols - 1) / kTcCols : 0;
  const int iterations = n_rep * q_tiles;  // (query head, query tile) pairs, head-major

  // Queries and dout of iteration `it` into buffer `buf`.
  auto prefetch = [&](int it, int buf) {
    const int h = kvh * n_rep + it / q_tiles, i0 = q_begin + (it % q_tiles) * kTcCols;
    const int64_t q_base = int64_t(b) * a.q_len * q_row + int64_t(h) * dp;
    LoadRowsAsync<kD>(q_s + buf * L::kTileElems, a.q + q_base, q_row, i0, a.q_len, kTcCols, dp);
    LoadRowsAsync<kD>(do_s + buf * L::kTileElems, a.dout + q_base, q_row, i0, a.q_len, kTcCols, dp);
  };
  if (iterations > 0) {
    LoadRowsAsync<kD>(k_s, a.k + kv_base, kv_row, k0, a.kv_len, kTcRows, dp);
    LoadRowsAsync<kD>(v_s, a.v + kv_base, kv_row, k0, a.kv_len, kTcRows, dp);
    prefetch(0, 0);
  }
  mma::CopyAsyncCommit();

  // This warp's keys: key_lo (accumulator elements 0, 1) and key_lo + 8 (elements 2, 3) of 16
  // starting at w0.
  const int w0 = k0 + warp * 16, key_lo = w0 + g;
  const bool warp_active = w0 < a.kv_len;
  const __nv_bfloat16* k_w = k_s + warp * 16 * L::kLd;
  const __nv_bfloat16* v_w = v_s + warp * 16 * L::kLd;

  float dk[kD / 8][4], dv[kD / 8][4];
#pragma unroll
  for (int t = 0; t < kD / 8; ++t) {
    dk[t][0] = dk[t][1] = dk[t][2] = dk[t][3] = 0.0f;
    dv[t][0] = dv[t][1] = dv[t][2] = dv[t][3] = 0.0f;
  }
  for (int it = 0; it < iterations; ++it) {
    const int buf = it & 1;
    const int h = kvh * n_rep + it / q_tiles, i0 = q_begin + (it % q_tiles) * kTcCols;
    if (it + 1 < iterations) {
      prefetch(it + 1, buf ^ 1);
      mma::CopyAsyncCommit();
      mma::CopyAsyncWait<1>();
    } else {
      mma::CopyAsyncWait<0>();
    }
    // The tile's logsumexp and D (buffer `buf` was last read two iterations ago).
    {
      const int64_t at = (int64_t(b) * a.num_heads + h) * a.q_len;
      const int c = threadIdx.x % kTcCols, row = i0 + c;
      const float x =
          row < a.q_len ? a.scratch[(threadIdx.x < kTcCols ? 0 : stats) + at + row] : 0.0f;
      (threadIdx.x < kTcCols ? lse_s : delta_s)[buf * kTcCols + c] = x;
    }
    __syncthreads();
    const int row_last = min(i0 + kTcCols, a.q_len) - 1;
    // Whether any key of the warp is seen by a query of the tile.
    if (warp_active && w0 <= a.q_offset + row_last &&
        (window <= 0 || w0 + 15 > a.q_offset + i0 - window)) {
      const __nv_bfloat16* qt = q_s + buf * L::kTileElems;
      const __nv_bfloat16* dot = do_s + buf * L::kTileElems;
      const float* lse = lse_s + buf * kTcCols;
      const float* delta = delta_s + buf * kTcCols;
      float s[kTcCols / 8][4], dpv[kTcCols / 8][4];  // [key][query]: Sᵀ and dPᵀ
      ScoreTile<kD, kTcCols / 8>(k_w, qt, dp, lane, s);
      ScoreTile<kD, kTcCols / 8>(v_w, dot, dp, lane, dpv);
      const bool full = w0 + 15 < a.kv_len && i0 + kTcCols <= a.q_len &&
                        w0 + 15 <= a.q_offset + i0 &&
                        (window <= 0 || w0 > a.q_offset + i0 + kTcCols - 1 - window);
      // Pᵀ and dSᵀ as A operands over the tile's queries, 16 per k-step. Element e of tile n:
      // key key_lo + 8·(e / 2), query i0 + 8n + 2·t4 + e % 2.
      uint32_t pa[kTcCols / 16][4], dsa[kTcCols / 16][4];
#pragma unroll
      for (int kk = 0; kk < kTcCols / 16; ++kk) {
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int n = 2 * kk + (x >> 1), half = x & 1;
          float p[2], ds[2];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const int e = 2 * half + u, c = 8 * n + 2 * t4 + u;
            const int key = key_lo + 8 * half, row = i0 + c;
            p[u] = full || Visible(a, row, key) ? Exp2(s[n][e] * scale_log2 - lse[c]) : 0.0f;
            ds[u] = p[u] * (dpv[n][e] - delta[c]);
          }
          pa[kk][x] = mma::PackBf16(p[0], p[1]);
          dsa[kk][x] = mma::PackBf16(ds[0], ds[1]);
        }
      }
      AccumulateTile<kD, kTcCols / 16>(pa, dot, dp, lane, dv);
      AccumulateTile<kD, kTcCols / 16>(dsa, qt, dp, lane, dk);
    }
    __syncthreads();  // the buffers are rewritten by the next iteration's prefetch
  }
  const int64_t out_row = int64_t(a.num_kv_heads) * d;
  const int64_t out_base = int64_t(b) * a.kv_len * out_row + int64_t(kvh) * d;
  StoreRows<kD>(dk, scale, a.dk + out_base, out_row, key_lo, a.kv_len, d, t4);
  StoreRows<kD>(dv, 1.0f, a.dv + out_base, out_row, key_lo, a.kv_len, d, t4);
}

template <int kD>
cudaError_t LaunchBf16(const AttentionBackwardBf16Args& a, cudaStream_t stream) {
  constexpr int kDqBytes = TcLayout<kD>::kBytes;
  constexpr int kDkDvBytes = TcLayout<kD>::kDkDvBytes;
  cudaError_t error =
      cudaFuncSetAttribute(DqBf16Kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, kDqBytes);
  if (error != cudaSuccess) return error;
  error = cudaFuncSetAttribute(DkDvBf16Kernel<kD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               kDkDvBytes);
  if (error != cudaSuccess) return error;
  const float scale = 1.0f / sqrtf(float(a.head_dim));
  const float scale_log2 = scale * 1.4426950408889634f;  // log2(e)
  if (a.q_len > 0) {
    const dim3 grid(a.num_heads, a.batch, (a.q_len + kTcRows - 1) / kTcRows);
    DqBf16Kernel<kD><<<grid, kTcThreads, kDqBytes, stream>>>(a, scale, scale_log2);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  // With no queries this still runs: every dk and dv row becomes zero.
  const dim3 grid(a.num_kv_heads, a.batch, (a.kv_len + kTcRows - 1) / kTcRows);
  DkDvBf16Kernel<kD><<<grid, kTcThreads, kDkDvBytes, stream>>>(a, scale, scale_log2);
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

cudaError_t LaunchAttentionBackwardBf16(const AttentionBackwardBf16Args& args,
                                        cudaStream_t stream) {
  const int64_t tiles = (int64_t(std::max(args.q_len, args.kv_len)) + kTcRows - 1) / kTcRows;
  if (args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim ||
      args.padded_dim != AttentionPaddedDim(args.head_dim) || args.num_kv_heads <= 0 ||
      args.num_heads <= 0 || args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 ||
      args.batch < 0 || args.batch > 65535 || args.q_len < 0 || args.q_offset < 0 ||
      args.q_offset + args.q_len > args.kv_len || args.sliding_window < 0 || tiles > 65535) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.kv_len == 0) return cudaSuccess;
  if (args.padded_dim <= 64) return LaunchBf16<64>(args, stream);
  return LaunchBf16<128>(args, stream);
}

namespace {

// One warp per (query, head): lanes stride over the head's features, then a fixed butterfly.
__global__ void AttentionDeltaKernel(const float* dout, const float* out, int q_len, int num_heads,
                                     int head_dim, int64_t pairs, float* delta) {
  const int64_t pair = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (pair >= pairs) return;
  const int64_t row = pair / num_heads;  // b·q_len + i
  const int h = static_cast<int>(pair % num_heads);
  const int64_t at = row * num_heads * head_dim + int64_t(h) * head_dim;
  float sum = 0.0f;
  for (int c = lane; c < head_dim; c += 32) {
    sum += __bfloat162float(__float2bfloat16_rn(dout[at + c])) * out[at + c];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) {
    const int64_t b = row / q_len, i = row % q_len;
    delta[(b * num_heads + h) * q_len + i] = sum;
  }
}

}  // namespace

cudaError_t LaunchAttentionDelta(const float* dout, const float* out, int batch, int q_len,
                                 int num_heads, int head_dim, float* delta, cudaStream_t stream) {
  const int64_t pairs = int64_t(batch) * q_len * num_heads;
  if (pairs == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (pairs * 32 + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  AttentionDeltaKernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      dout, out, q_len, num_heads, head_dim, pairs, delta);
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
