#include <cuda_bf16.h>

#include <cmath>

#include "kernels/cuda/attention.cuh"

namespace qcal::kernels::cuda {
namespace {

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

template <bool kBf16>
__device__ __forceinline__ float Operand(float x) {
  return kBf16 ? __bfloat162float(__float2bfloat16_rn(x)) : x;
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

template <int kMaxD, bool kBf16>
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
    q_t[c * kLd + r] =
        (q0 + r < a.q_len && c < d) ? Operand<kBf16>(q[int64_t(q0 + r) * q_width + c]) : 0.0f;
  }
  // Keys past the last query of the tile are masked for every row: stop there.
  const int last_row = min(q0 + kBq, a.q_len) - 1;
  const int kv_end = min(a.kv_len, a.q_offset + last_row + 1);

  float m[4], l[4], o[4][4 * kGroups];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < 4 * kGroups; ++c) o[i][c] = 0.0f;
  }

  // fp32: one pass with rescaling (online softmax). bf16: pass 0 finds each row's maximum and sum,
  // pass 1 forms the normalised, rounded probabilities and accumulates p·v.
  constexpr int kPasses = kBf16 ? 2 : 1;
  for (int pass = 0; pass < kPasses; ++pass) {
    const bool output_pass = pass == kPasses - 1;
    for (int k0 = 0; k0 < kv_end; k0 += kBk) {
      __syncthreads();  // the previous tile is no longer read (and the q tile is stored)
      for (int i = tid; i < kBk * dp; i += kThreads) {
        const int j = i / dp, c = i % dp;
        k_t[c * kLd + j] =
            (k0 + j < kv_end && c < d) ? Operand<kBf16>(k[int64_t(k0 + j) * kv_width + c]) : 0.0f;
      }
      if (output_pass) {
        for (int i = tid; i < kBk * dp; i += kThreads) {
          const int j = i / dp, c = i % dp;
          v_s[j * kMaxD + c] =
              (k0 + j < kv_end && c < d) ? Operand<kBf16>(v[int64_t(k0 + j) * kv_width + c]) : 0.0f;
        }
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
          const bool visible = row < a.q_len && key < kv_end && key <= a.q_offset + row;
          s[i][j] = visible ? s[i][j] * scale : -INFINITY;
        }
      }

      // s becomes the tile's probabilities (unnormalised for fp32, final for bf16's pass 1).
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (pass == 0) {
          const float m_new =
              fmaxf(m[i], RowMax(fmaxf(fmaxf(s[i][0], s[i][1]), fmaxf(s[i][2], s[i][3]))));
          // While a row has seen only masked keys, exponentiate against 0: every p is 0.
          const float base = m_new == -INFINITY ? 0.0f : m_new;
          const float alpha = expf(m[i] - base);
#pragma unroll
          for (int j = 0; j < 4; ++j) s[i][j] = expf(s[i][j] - base);
          l[i] = l[i] * alpha + RowSum((s[i][0] + s[i][1]) + (s[i][2] + s[i][3]));
          m[i] = m_new;
          if (!kBf16) {
#pragma unroll
            for (int c = 0; c < 4 * kGroups; ++c) o[i][c] *= alpha;
          }
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            s[i][j] = s[i][j] == -INFINITY ? 0.0f : Operand<true>(expf(s[i][j] - m[i]) / l[i]);
          }
        }
      }
      if (!output_pass) continue;

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
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty * 4 + i;
    if (row >= a.q_len) continue;
    const float inv = kBf16 ? 1.0f : 1.0f / l[i];
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

template <int kMaxD, bool kBf16>
cudaError_t Launch(const AttentionArgs& a, cudaStream_t stream) {
  constexpr int kBytes = SharedFloats<kMaxD>() * int(sizeof(float));
  cudaError_t error = cudaFuncSetAttribute(AttentionKernel<kMaxD, kBf16>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
  if (error != cudaSuccess) return error;
  const dim3 grid((a.q_len + kBq - 1) / kBq, a.num_heads, a.batch);
  const float scale = 1.0f / sqrtf(float(a.head_dim));
  AttentionKernel<kMaxD, kBf16><<<grid, kThreads, kBytes, stream>>>(a, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchAttention(const AttentionArgs& args, bool bf16_operands, cudaStream_t stream) {
  if (args.head_dim <= 0 || args.head_dim > kAttentionMaxHeadDim || args.num_kv_heads <= 0 ||
      args.num_heads % args.num_kv_heads != 0 || args.num_heads > 65535 || args.batch > 65535 ||
      args.q_offset < 0 || args.q_offset + args.q_len > args.kv_len) {
    return cudaErrorInvalidValue;
  }
  if (args.batch == 0 || args.q_len == 0 || args.num_heads == 0) return cudaSuccess;
  if (args.head_dim <= 64) {
    return bf16_operands ? Launch<64, true>(args, stream) : Launch<64, false>(args, stream);
  }
  return bf16_operands ? Launch<128, true>(args, stream) : Launch<128, false>(args, stream);
}

}  // namespace qcal::kernels::cuda
