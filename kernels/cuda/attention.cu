#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace qcal::kernels::cuda {
namespace {

using mma::CopyAsync16;
using mma::CopyAsyncCommit;
using mma::CopyAsyncWait;
using mma::LdMatrixX4;
using mma::LdMatrixX4Trans;
using mma::Mma;
using mma::PackBf16;
using mma::QuadMax;
using mma::QuadSum;

constexpr int kBq = 64;        // queries per block
constexpr int kBk = 64;        // keys per tile
constexpr int kThreads = 256;  // 16 x 16 threads, each owning 4 queries x 4 keys of a score tile
// Leading dimension of the transposed tiles (feature-major q and k, key-major p): the padding
// keeps rows 16-byte aligned for float4 reads and spreads the transposing stores over banks.
constexpr int kLd = kBq + 4;

template <int kMaxD>
constexpr int SharedFloats() {
  return 2 * kMaxD * kLd + kBk * kMaxD + kBk * kLd;
}

// Max and sum over the 16 threads that share a query row (lanes 0-15 or 16-31 of a warp). The
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

template <int kMaxD>
__global__ void __launch_bounds__(kThreads) AttentionKernel(AttentionArgs a, float scale) {
  extern __shared__ float4 shared4[];
  float* q_t = reinterpret_cast<float*>(shared4);  // [kMaxD][kLd]: q tile, feature-major
  float* k_t = q_t + kMaxD * kLd;                  // [kMaxD][kLd]: k tile, feature-major
  float* v_s = k_t + kMaxD * kLd;                  // [kBk][kMaxD]: v tile, key-major
  float* p_t = v_s + kBk * kMaxD;                  // [kBk][kLd]: probabilities, key-major

  constexpr int kGroups = kMaxD / 64;  // 4 output columns per thread per 64 features
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int q0 = blockIdx.x * kBq, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int d = a.head_dim, dp = (d + 3) & ~3;
  const int64_t q_width = int64_t(a.num_heads) * d, kv_width = int64_t(a.num_kv_heads) * d;
  const float* q = a.q + int64_t(b) * a.q_len * q_width + int64_t(h) * d;
  const float* k = a.k + int64_t(b) * a.kv_len * kv_width + int64_t(kvh) * d;
  const float* v = a.v + int64_t(b) * a.kv_len * kv_width + int64_t(kvh) * d;
  float* out = a.out + int64_t(b) * a.q_len * q_width + int64_t(h) * d;

  for (int i = tid; i < kBq * dp; i += kThreads) {
    const int r = i / dp, c = i % dp;
    q_t[c * kLd + r] = (q0 + r < a.q_len && c < d) ? q[int64_t(q0 + r) * q_width + c] : 0.0f;
  }
  // Keys past the last query of the tile are masked for every row: stop there.
  const int last_row = min(q0 + kBq, a.q_len) - 1;
  const int kv_end = min(a.kv_len, a.q_offset + last_row + 1);
  // With a sliding window, keys before the first query's window are masked for every row: start at
  // the tile holding the first visible key.
  const int kv_begin =
      a.sliding_window > 0 ? max(0, a.q_offset + q0 - a.sliding_window + 1) / kBk * kBk : 0;

  float m[4], l[4], o[4][4 * kGroups];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < 4 * kGroups; ++c) o[i][c] = 0.0f;
  }

  // One pass with rescaling (online softmax).
  for (int k0 = kv_begin; k0 < kv_end; k0 += kBk) {
    __syncthreads();  // the previous tile is no longer read (and the q tile is stored)
    for (int i = tid; i < kBk * dp; i += kThreads) {
      const int j = i / dp, c = i % dp;
      k_t[c * kLd + j] = (k0 + j < kv_end && c < d) ? k[int64_t(k0 + j) * kv_width + c] : 0.0f;
    }
    for (int i = tid; i < kBk * dp; i += kThreads) {
      const int j = i / dp, c = i % dp;
      v_s[j * kMaxD + c] = (k0 + j < kv_end && c < d) ? v[int64_t(k0 + j) * kv_width + c] : 0.0f;
    }
    __syncthreads();

    float s[4][4] = {};
#pragma unroll 4
    for (int c = 0; c < dp; ++c) {
      const float4 qa = *reinterpret_cast<const float4*>(q_t + c * kLd + ty * 4);
      const float4 kb = *reinterpret_cast<const float4*>(k_t + c * kLd + tx * 4);
      const float qv[4] = {qa.x, qa.y, qa.z, qa.w}, kv[4] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] += qv[i] * kv[j];
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty * 4 + i;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int key = k0 + tx * 4 + j;
        const bool visible = row < a.q_len && key < kv_end && key <= a.q_offset + row &&
                             (a.sliding_window <= 0 || key > a.q_offset + row - a.sliding_window);
        s[i][j] = visible ? s[i][j] * scale : -INFINITY;
      }
    }

    // s becomes the tile's unnormalised probabilities.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float m_new =
          fmaxf(m[i], RowMax(fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3]))));
      // While a row has seen only masked keys, exponentiate against 0: every p is 0.
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(m[i] - base);
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = expf(s[i][j] - base);
      l[i] = l[i] * alpha + RowSum((s[i][0] + s[i][1]) + (s[i][2] + s[i][3]));
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < 4 * kGroups; ++c) o[i][c] *= alpha;
    }

#pragma unroll
    for (int j = 0; j < 4; ++j) {
      *reinterpret_cast<float4*>(p_t + (tx * 4 + j) * kLd + ty * 4) =
          make_float4(s[0][j], s[1][j], s[2][j], s[3][j]);
    }
    __syncthreads();
#pragma unroll 4
    for (int j = 0; j < kBk; ++j) {
      const float4 pa = *reinterpret_cast<const float4*>(p_t + j * kLd + ty * 4);
      const float pv[4] = {pa.x, pa.y, pa.z, pa.w};
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        if (g * 64 + tx * 4 >= dp) continue;
        const float4 vb = *reinterpret_cast<const float4*>(v_s + j * kMaxD + g * 64 + tx * 4);
        const float vv[4] = {vb.x, vb.y, vb.z, vb.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int u = 0; u < 4; ++u) o[i][g * 4 + u] += pv[i] * vv[u];
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty * 4 + i;
    if (row >= a.q_len) continue;
    const float inv = 1.0f / l[i];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int c = g * 64 + tx * 4 + u;
        if (c < d) out[int64_t(row) * q_width + c] = o[i][g * 4 + u] * inv;
      }
    }
  }
}

template <int kMaxD>
cudaError_t Launch(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int kBytes = SharedFloats<kMaxD>() * int(sizeof(float));
  cudaError_t error = cudaFuncSetAttribute(AttentionKernel<kMaxD>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid((a.q_len + kBq - 1) / kBq, a.num_heads, a.batch);
  const float scale = 1.0f / sqrtf(float(a.head_dim));
  AttentionKernel<kMaxD><<<grid, kThreads, kBytes, stream>>>(a, scale);
  return cudaGetLastError();
}

// ---- bf16 operands: tensor cores (mma.sync m16n8k16, bf16 x bf16 -> fp32) ----
//
// A block owns 128 queries of one head (8 warps x 16 rows) and streams keys and values in tiles of
// 64 through shared memory, double-buffered with cp.async. q, k and v arrive pre-rounded to bf16
// in a padded layout (LaunchPackBf16Heads), so tiles are whole 16-byte rows. Scores S = Q·Kᵀ
// accumulate in fp32 on the tensor cores; one pass keeps each row's running maximum and sum, rounds
// the unnormalised probabilities e^(s − m) to bf16 exactly where the reference does (per 64-key
// tile, against the running maximum) and accumulates P·V, rescaled when the maximum moves; out = o
// / l. The score fragments of a warp become the A operand of P·V in registers (the C layout of two
// m16n8 tiles is the A layout of one m16k16 step). Q's fragments are read from shared memory at
// each key tile rather than held, so that a thread fits 128 registers and two blocks share an SM
// (16 warps an SM instead of 8: 88 → 77 ms over 3 7B blocks on an H100, docs/BENCHMARKS.md).
constexpr int kTcBq = 128;
constexpr int kTcBk = 64;
constexpr int kTcWarps = kTcBq / 16;
constexpr int kTcThreads = kTcWarps * 32;

// 2^x by the special-function unit (ex2.approx: 2 ulp; 2^(-inf) = 0, results below 2^-126 flushed
// to 0, where p rounds to nothing a bf16 sum of 64 keys keeps).
__device__ __forceinline__ float FastExp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <int kD>
struct TcLayout {
  // Shared rows are padded by 16 bytes: the 8 rows of an ldmatrix read land in distinct banks.
  static constexpr int kLd = kD + 8;
  static constexpr int kTileElems = kTcBk * kLd;
  static constexpr int kBytes = (kTcBq * kLd + 4 * kTileElems) * 2;  // q, 2 x k, 2 x v
};

template <int kD>
__global__ void __launch_bounds__(kTcThreads, 2)
    AttentionBf16Kernel(AttentionBf16Args a, float scale_log2e) {
  using L = TcLayout<kD>;
  extern __shared__ float4 shared4[];
  __nv_bfloat16* q_s = reinterpret_cast<__nv_bfloat16*>(shared4);  // [kTcBq][kLd]
  __nv_bfloat16* k_s = q_s + kTcBq * L::kLd;                       // 2 x [kTcBk][kLd]
  __nv_bfloat16* v_s = k_s + 2 * L::kTileElems;                    // 2 x [kTcBk][kLd]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;
  const int q0 = blockIdx.x * kTcBq, h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (a.num_heads / a.num_kv_heads);
  const int dp = a.padded_dim, chunks = dp / 8;  // 16-byte chunks per row
  const int64_t q_row = int64_t(a.num_heads) * dp, kv_row = int64_t(a.num_kv_heads) * dp;
  const __nv_bfloat16* q = a.q + int64_t(b) * a.q_len * q_row + int64_t(h) * dp;
  const __nv_bfloat16* k = a.k + int64_t(b) * a.kv_len * kv_row + int64_t(kvh) * dp;
  const __nv_bfloat16* v = a.v + int64_t(b) * a.kv_len * kv_row + int64_t(kvh) * dp;
  float* out = a.out + int64_t(b) * a.q_len * a.num_heads * a.head_dim + int64_t(h) * a.head_dim;

  const int last_row = min(q0 + kTcBq, a.q_len) - 1;
  const int kv_end = min(a.kv_len, a.q_offset + last_row + 1);
  // With a sliding window, tiles wholly before the first query's window are skipped.
  const int kv_begin =
      a.sliding_window > 0 ? max(0, a.q_offset + q0 - a.sliding_window + 1) / kTcBk * kTcBk : 0;
  const int tiles = kv_end > kv_begin ? (kv_end - kv_begin + kTcBk - 1) / kTcBk : 0;

  auto load_tile = [&](__nv_bfloat16* dst, const __nv_bfloat16* src, int k0) {
    for (int i = tid; i < kTcBk * chunks; i += kTcThreads) {
      const int j = i / chunks, c = (i % chunks) * 8;
      const bool in = k0 + j < kv_end;
      CopyAsync16(dst + j * L::kLd + c, src + int64_t(in ? k0 + j : 0) * kv_row + c, in ? 16 : 0);
    }
  };
  for (int i = tid; i < kTcBq * chunks; i += kTcThreads) {
    const int r = i / chunks, c = (i % chunks) * 8;
    const bool in = q0 + r < a.q_len;
    CopyAsync16(q_s + r * L::kLd + c, q + int64_t(in ? q0 + r : 0) * q_row + c, in ? 16 : 0);
  }

  // This warp's rows and the last key any of them sees.
  const int row_lo = q0 + warp * 16 + g, row_hi = row_lo + 8;
  const int warp_last_key = a.q_offset + min(q0 + warp * 16 + 15, a.q_len - 1);
  const bool warp_active = q0 + warp * 16 < a.q_len;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[kD / 8][4];
#pragma unroll
  for (int t = 0; t < kD / 8; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.0f;

  // One pass over the key tiles (online softmax). Per row and tile: m' = max(m, the tile's
  // scores), the running sum and output scaled by α = e^(m − m'), p = e^(s − m') added to l in
  // fp32 and rounded to bf16 as the A operand of P·V; at the end out = o / l. These are the
  // rounding points of ref::Attention's bf16 path (kernels/cpu/ref_ops.h), tile for tile. The
  // scores stay unscaled q·k here (the scale is positive: the maxima are the same keys'), and
  // the scale enters the exponent: e^(scale·(s − m)) = 2^(s·c − m·c) with c = scale·log2(e), one
  // FFMA and one ex2. Against the reference's e^(fl(s·scale) − fl(m·scale)) that moves p by a few
  // fp32 ulps of the exponent's argument, far below p's bf16 rounding, but it changes which p
  // round up (docs/OPERATIONS.md, "Where bf16 attention rounds").
  if (tiles > 0) {
    load_tile(k_s, k, kv_begin);
    load_tile(v_s, v, kv_begin);
  }
  CopyAsyncCommit();
  for (int t = 0; t < tiles; ++t) {
    const int k0 = kv_begin + t * kTcBk, buf = t & 1;
    if (t + 1 < tiles) {
      load_tile(k_s + (buf ^ 1) * L::kTileElems, k, k0 + kTcBk);
      load_tile(v_s + (buf ^ 1) * L::kTileElems, v, k0 + kTcBk);
      CopyAsyncCommit();
      CopyAsyncWait<1>();
    } else {
      CopyAsyncWait<0>();
    }
    __syncthreads();
    if (warp_active && k0 <= warp_last_key) {
      const __nv_bfloat16* kt = k_s + buf * L::kTileElems;
      float s[kTcBk / 8][4];
#pragma unroll
      for (int n = 0; n < kTcBk / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        if (ks * 16 >= dp) continue;
        uint32_t qa[4];
        LdMatrixX4(qa, q_s + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * L::kLd + ks * 16 +
                           (lane >> 4) * 8);
#pragma unroll
        for (int p = 0; p < kTcBk / 16; ++p) {
          uint32_t kb[4];
          const int key = p * 16 + (lane & 7) + (lane >> 4) * 8;
          const int c = ks * 16 + ((lane >> 3) & 1) * 8;
          LdMatrixX4(kb, kt + key * L::kLd + c);
          Mma(s[2 * p], qa, kb[0], kb[1]);
          Mma(s[2 * p + 1], qa, kb[2], kb[3]);
        }
      }
      // Mask: element e of tile n is row (e < 2 ? row_lo : row_hi), key k0 + 8n + 2 t4 + (e & 1).
      // Tiles wholly inside every mask of the warp's 16 rows (all rows in the sequence, every key
      // before kv_end and seen by the warp's first row, none out of the window of its last) skip
      // the per-element test: the same values.
      const int w0 = q0 + warp * 16;
      const bool full = w0 + 15 < a.q_len && k0 + kTcBk <= kv_end &&
                        k0 + kTcBk - 1 <= a.q_offset + w0 &&
                        (a.sliding_window <= 0 || k0 > a.q_offset + w0 + 15 - a.sliding_window);
      if (!full) {
#pragma unroll
        for (int n = 0; n < kTcBk / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = e < 2 ? row_lo : row_hi, key = k0 + 8 * n + 2 * t4 + (e & 1);
            const bool visible =
                row < a.q_len && key < kv_end && key <= a.q_offset + row &&
                (a.sliding_window <= 0 || key > a.q_offset + row - a.sliding_window);
            if (!visible) s[n][e] = -INFINITY;
          }
        }
      }
      // The running maximum and the rescaling of l and o (base = m'·c). While a row has seen only
      // masked keys, it exponentiates against 0: every p is 2^(−∞) = 0 and so is α, which leaves
      // l = o = 0.
      float base[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < kTcBk / 8; ++n) {
          mx = fmaxf(mx, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
        }
        const float m_new = fmaxf(m[half], QuadMax(mx));
        base[half] = m_new == -INFINITY ? 0.0f : m_new * scale_log2e;
        if (m_new != m[half]) {
          const float alpha = FastExp2(fmaf(m[half], scale_log2e, -base[half]));
          l[half] *= alpha;
#pragma unroll
          for (int t8 = 0; t8 < kD / 8; ++t8) {
            o[t8][2 * half] *= alpha;
            o[t8][2 * half + 1] *= alpha;
          }
          m[half] = m_new;
        }
      }
      const __nv_bfloat16* vt = v_s + buf * L::kTileElems;
      float sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int kk = 0; kk < kTcBk / 16; ++kk) {
        uint32_t pa[4];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int n = 2 * kk + (x >> 1), half = x & 1;
          float p2[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            p2[e] = FastExp2(fmaf(s[n][2 * half + e], scale_log2e, -base[half]));
            sum[half] += p2[e];
          }
          pa[x] = PackBf16(p2[0], p2[1]);
        }
#pragma unroll
        for (int dq = 0; dq < kD / 16; ++dq) {
          if (dq * 16 >= dp) continue;
          uint32_t vb[4];
          const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
          const int c = dq * 16 + (lane >> 4) * 8;
          LdMatrixX4Trans(vb, vt + key * L::kLd + c);
          Mma(o[2 * dq], pa, vb[0], vb[1]);
          Mma(o[2 * dq + 1], pa, vb[2], vb[3]);
        }
      }
      l[0] += QuadSum(sum[0]);
      l[1] += QuadSum(sum[1]);
    }
    __syncthreads();  // the buffer is rewritten by the next iteration's prefetch
  }

  if (a.lse != nullptr && t4 == 0) {
    float* lse = a.lse + (int64_t(b) * a.num_heads + h) * a.q_len;
    if (row_lo < a.q_len) lse[row_lo] = l[0] > 0.0f ? m[0] * scale_log2e + log2f(l[0]) : 0.0f;
    if (row_hi < a.q_len) lse[row_hi] = l[1] > 0.0f ? m[1] * scale_log2e + log2f(l[1]) : 0.0f;
  }
#pragma unroll
  for (int t = 0; t < kD / 8; ++t) {
    const int c = 8 * t + 2 * t4;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = half == 0 ? row_lo : row_hi;
      if (row >= a.q_len) continue;
      float* dst = out + int64_t(row) * a.num_heads * a.head_dim;
      const float lh = l[half] > 0.0f ? l[half] : 1.0f;  // a row with no visible key: o = 0
      if (c < a.head_dim) dst[c] = o[t][2 * half] / lh;
      if (c + 1 < a.head_dim) dst[c + 1] = o[t][2 * half + 1] / lh;
    }
  }
}

template <int kD>
cudaError_t LaunchBf16(const AttentionBf16Args& a, cudaStream_t stream) {
  constexpr int kBytes = TcLayout<kD>::kBytes;
  cudaError_t error = cudaFuncSetAttribute(AttentionBf16Kernel<kD>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (error != cudaSuccess) return error;
  // Two blocks an SM (their shared memory and, by the launch bounds, their registers).
  error =
      cudaFuncSetAttribute(AttentionBf16Kernel<kD>, cudaFuncAttributePreferredSharedMemoryCarveout,
                           cudaSharedmemCarveoutMaxShared);
  if (error != cudaSuccess) return error;
  const dim3 grid((a.q_len + kTcBq - 1) / kTcBq, a.num_heads, a.batch);
  const float scale_log2e = 1.4426950408889634f / sqrtf(float(a.head_dim));
  AttentionBf16Kernel<kD><<<grid, kTcThreads, kBytes, stream>>>(a, scale_log2e);
  return cudaGetLastError();
}

__global__ void PackBf16HeadsKernel(const float* x, int64_t rows, int heads, int head_dim,
                                    int padded_dim, __nv_bfloat16* out) {
  const int64_t total = rows * heads * padded_dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % padded_dim);
    const int64_t rh = i / padded_dim;  // row * heads + head
    out[i] = c < head_dim ? __float2bfloat16_rn(x[rh * head_dim + c]) : __float2bfloat16_rn(0.0f);
  }
}

// PackBf16HeadsKernel of x rotated as RopeKernel rotates it (the same _rn products), element by
// element: the packed values equal those of Rope followed by the packing.
__global__ void PackBf16HeadsRopeKernel(const float* x, int64_t rows, int heads, int head_dim,
                                        int padded_dim, int seq_len, const float* cos_sin,
                                        __nv_bfloat16* out) {
  const int half = head_dim / 2;
  const int64_t total = rows * heads * padded_dim;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % padded_dim);
    const int64_t rh = i / padded_dim;  // row * heads + head
    if (c >= head_dim) {
      out[i] = __float2bfloat16_rn(0.0f);
      continue;
    }
    const int j = c < half ? c : c - half;
    const float* cs = cos_sin + (int64_t((rh / heads) % seq_len) * half + j) * 2;
    const float co = cs[0], si = cs[1];
    const float a = x[rh * head_dim + j], b = x[rh * head_dim + j + half];
    const float r = c < half ? __fsub_rn(__fmul_rn(a, co), __fmul_rn(b, si))
                             : __fadd_rn(__fmul_rn(b, co), __fmul_rn(a, si));
    out[i] = __float2bfloat16_rn(r);
  }
}

}  // namespace

cudaError_t LaunchAttention(const AttentionArgs& args, cudaStream_t stream) {
  if (args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim || args.num_kv_heads <= 0 ||
      args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 || args.batch > 65535 ||
      args.q_offset < 0 || args.q_offset + args.q_len > args.kv_len || args.sliding_window < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.q_len == 0 || args.num_heads == 0) return cudaSuccess;
  if (args.head_dim <= 64) return Launch<64>(args, stream);
  return Launch<128>(args, stream);
}

int AttentionPaddedDim(int head_dim) { return (head_dim + 15) / 16 * 16; }

cudaError_t LaunchPackBf16Heads(const float* x, int64_t rows, int heads, int head_dim,
                                __nv_bfloat16* out, cudaStream_t stream) {
  const int64_t total = rows * heads * AttentionPaddedDim(head_dim);
  if (total == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 1 << 16));
  PackBf16HeadsKernel<<<grid, 256, 0, stream>>>(x, rows, heads, head_dim,
                                                AttentionPaddedDim(head_dim), out);
  return cudaGetLastError();
}

cudaError_t LaunchPackBf16HeadsRope(const float* x, int64_t rows, int heads, int head_dim,
                                    int seq_len, const float* cos_sin, __nv_bfloat16* out,
                                    cudaStream_t stream) {
  if (head_dim % 2 != 0 || seq_len <= 0) return cudaErrorInvalidValue;
  const int64_t total = rows * heads * AttentionPaddedDim(head_dim);
  if (total == 0) return cudaSuccess;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>((total + 255) / 256, 1 << 16));
  PackBf16HeadsRopeKernel<<<grid, 256, 0, stream>>>(
      x, rows, heads, head_dim, AttentionPaddedDim(head_dim), seq_len, cos_sin, out);
  return cudaGetLastError();
}

cudaError_t LaunchAttentionBf16(const AttentionBf16Args& args, cudaStream_t stream) {
  if (args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim ||
      args.padded_dim != AttentionPaddedDim(args.head_dim) || args.num_kv_heads <= 0 ||
      args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 || args.batch > 65535 ||
      args.q_offset < 0 || args.q_offset + args.q_len > args.kv_len || args.sliding_window < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.q_len == 0 || args.num_heads == 0) return cudaSuccess;
  if (args.padded_dim <= 64) return LaunchBf16<64>(args, stream);
  return LaunchBf16<128>(args, stream);
}

}  // namespace qcal::kernels::cuda
