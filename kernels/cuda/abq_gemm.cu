// The ABQ kernels (launchers and contracts in abq_gemm.cuh; spec kernels/cpu/abq_ref.h). Built
// with -fmad=false, and the epilogue spells its arithmetic with __fmaf_rn / __fmul_rn /
// __int2float_rn, so it performs AbqEpilogue's fp32 operations and no others.
//
// Integer arithmetic: the per-group sums are formed in uint32 (wrapping) and reinterpreted as
// int32 at the end. ValidateAbqShape bounds the true values below 2^31, and sums modulo 2^32 do
// not depend on the order of the additions, so the result is AbqIntegerGemm's exactly.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k{128,256,32,16}"), with
// g = lane / 4 and t4 = lane % 4:
//   b1 m16n8k256: A (16 × 256 bits, row) a0 = row g, columns 32·t4 + [0, 32); a1 = row g + 8, the
//     same columns; a2 = row g, columns 128 + 32·t4 + [0, 32); a3 = row g + 8, the same.
//     B (256 × 8, col) b0 = rows 32·t4 + [0, 32) of column g; b1 = rows 128 + 32·t4 + [0, 32).
//     C (16 × 8 s32) c0, c1 = row g, columns 2·t4, 2·t4 + 1; c2, c3 = row g + 8, the same.
//   b1 m16n8k128: A a0 = row g, columns 32·t4 + [0, 32); a1 = row g + 8; B b0 = rows 32·t4 +
//     [0, 32) of column g; C as above.
//   So one 32-bit register holds 32 consecutive k of one row (element i = bit i), which is
//   exactly one word of the packed planes: in a k256 step over words w..w+7, lane (g, t4) loads
//   word w + t4 into a0/a1/b0 and word w + 4 + t4 into a2/a3/b1 (k128: word w + t4 only). A and B
//   see the same k for the same register and bit, which is all AND + popcount needs.
//   s8/u8 m16n8k32: A a0 = row g, columns 4·t4 + [0, 4) (byte e = column 4·t4 + e); a1 = row
//     g + 8, the same; a2 = row g, columns 16 + 4·t4 + [0, 4); a3 = row g + 8, the same. B b0 =
//     rows 4·t4 + [0, 4) of column g; b1 = rows 16 + 4·t4 + [0, 4). One mma covers one plane
//     word: its bits 4·t4..4·t4+3 and 16+4·t4..16+4·t4+3 become the four bytes of a register.
//   bf16 m16n8k16 (mma_sync.cuh): A a0 = row g, k 2·t4, 2·t4 + 1; a1 = row g + 8; a2 = row g,
//     k 8 + 2·t4, +1; a3 = row g + 8; B b0 = k 2·t4, +1 of column g; b1 = k 8 + 2·t4, +1 (the
//     lower k in the lower half). Two mmas cover one plane word (bits 0..15, then 16..31).
// Roles: weights are the A operand (their 16 rows are what a warp streams from memory) and tokens
// the B operand's 8 columns, so decode (m <= 16) wastes no weight bandwidth on padding. In the b1
// kernel an A row is one weight plane (row r = o·wb + j, consecutive in memory) and a B column
// one activation plane (column c of n-tile nt = token (8·nt + c) / ab, plane c % ab: activation
// plane row t0·ab + 8·nt + c, also consecutive); the popcounts are combined with the plane
// weights sgn_i·2^(i+j) when a k-group ends.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;        // warps per GEMM block
constexpr int kTileTokens = 16;  // tokens per GEMM block (grid.y walks the rest)
constexpr int kPrologueThreads = 256;
constexpr int kMaxPrologueGroups = 48 * 1024 / 4;  // Σa per group in shared memory

// ---- Prologue --------------------------------------------------------------------------------

// One block per token. The maximum is exact in any order; the codes are ref AbqQuantizeActivations'
// (IEEE division, RoundHalfEven, clamp that maps NaN to −qmax). Each warp packs whole words: lane
// l holds column 32·word + l, and a ballot per plane gives that plane's word with column l at bit
// l. Σa per group is an integer sum (shared-memory atomics: exact in any order).
template <int kAb>
__global__ void __launch_bounds__(kPrologueThreads)
    AbqPrologueKernel(const float* x, int64_t k, int words, int group_words, int n_groups,
                      uint32_t* planes, float* scales, int32_t* sums) {
  extern __shared__ int32_t group_sums[];
  __shared__ float scratch[32];
  constexpr float kQmax = static_cast<float>((1 << (kAb - 1)) - 1);
  const int64_t t = blockIdx.x;
  const float* xr = x + t * k;
  float amax = 0.0f;
  for (int64_t c = threadIdx.x; c < k; c += kPrologueThreads) amax = fmaxf(amax, fabsf(xr[c]));
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);
  const float s = amax / kQmax;
  if (threadIdx.x == 0) scales[t] = s;
  for (int gr = threadIdx.x; gr < n_groups; gr += kPrologueThreads) group_sums[gr] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* tp = planes + t * kAb * static_cast<int64_t>(words);
  for (int word = warp; word < words; word += kPrologueThreads / 32) {
    const int64_t c = static_cast<int64_t>(word) * 32 + lane;
    int32_t v = 0;
    if (c < k && s != 0.0f) {
      v = static_cast<int32_t>(fminf(fmaxf(RoundHalfEven(xr[c] / s), -kQmax), kQmax));
    }
    const uint32_t twos = static_cast<uint32_t>(v);  // bit i of the kAb-bit two's complement
#pragma unroll
    for (int i = 0; i < kAb; ++i) {
      const uint32_t bits = __ballot_sync(kFull, (twos >> i) & 1u);
      if (lane == i) tp[static_cast<int64_t>(i) * words + word] = bits;
    }
    const int32_t word_sum = __reduce_add_sync(kFull, v);
    if (lane == 0) atomicAdd(&group_sums[word / group_words], word_sum);
  }
  __syncthreads();
  for (int gr = threadIdx.x; gr < n_groups; gr += kPrologueThreads) {
    sums[t * n_groups + gr] = group_sums[gr];
  }
}

// ---- Shared pieces of the GEMMs --------------------------------------------------------------

struct GemmParams {
  AbqDeviceWeights w;
  const uint32_t* a_planes;
  const float* a_scales;
  const int32_t* a_sums;
  int64_t m;
  float* y;
  int32_t* dot;
};

// Where the calling lane's warp works: lane coordinates in the mma fragments (g = lane / 4,
// t4 = lane % 4), its first output o0 (outs_per_warp outputs a warp, kWarps warps a block along
// grid.x) and its block's first token t0 and token count mt (kTileTokens a block along grid.y).
struct WarpTile {
  int lane, warp, g, t4;
  int64_t o0, t0;
  int mt;
};

__device__ __forceinline__ WarpTile MakeWarpTile(int outs_per_warp, int64_t m) {
  WarpTile w;
  w.lane = threadIdx.x & 31;
  w.warp = threadIdx.x >> 5;
  w.g = w.lane >> 2;
  w.t4 = w.lane & 3;
  w.o0 = (static_cast<int64_t>(blockIdx.x) * kWarps + w.warp) * outs_per_warp;
  w.t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  w.mt = static_cast<int>(min(static_cast<int64_t>(kTileTokens), m - w.t0));
  return w;
}

__device__ __forceinline__ uint32_t LoadWord(const uint32_t* row, int word, int end) {
  return (row != nullptr && word < end) ? __ldg(row + word) : 0u;
}

// The epilogue's step for one (token t, output o, group gr) with integer sum `dot` (AbqEpilogue).
__device__ __forceinline__ float EpilogueStep(const GemmParams& p, int64_t t, int64_t o, int gr,
                                              uint32_t dot, float acc) {
  const int64_t wi = static_cast<int64_t>(gr) * p.w.n + o;
  const uint32_t za =
      static_cast<uint32_t>(p.w.zeros[wi]) * static_cast<uint32_t>(p.a_sums[t * p.w.n_groups + gr]);
  const int32_t c = static_cast<int32_t>(dot - za);
  if (p.dot != nullptr) p.dot[(t * p.w.n + o) * p.w.n_groups + gr] = static_cast<int32_t>(dot);
  return __fmaf_rn(__int2float_rn(c), p.w.scales[wi], acc);
}

// ---- b1 AND + popcount -----------------------------------------------------------------------

__device__ __forceinline__ void MmaB1K256(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void MmaB1K128(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm volatile(
      "mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0, %1, %2, %3}, {%4, %5}, "
      "{%6}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(b0));
}

// sgn_i·2^i modulo 2^32: the top activation plane carries the two's complement sign.
template <int kAb>
__device__ __forceinline__ uint32_t ActPlaneWeight(int i) {
  return i == kAb - 1 ? 0u - (1u << i) : 1u << i;
}

template <int kWb, int kAb>
__global__ void __launch_bounds__(kWarps * 32) AbqBinaryGemmKernel(GemmParams p) {
  constexpr int kOuts = 16 / kWb;  // outputs per warp (wb = 3: 5 outputs, row 15 unused)
  constexpr int kRows = kOuts * kWb;
  constexpr int kTokensPerTile = 8 / kAb;  // tokens per n8 tile
  constexpr int kTiles = kTileTokens / kTokensPerTile;
  constexpr int kPairs = (kOuts * kTileTokens + 31) / 32;  // (output, token) pairs per lane
  // Per warp: the plane-combined sums P[row][token] = Σ_i sgn_i 2^i popc of one k-group.
  __shared__ uint32_t plane_sums[kWarps][16][kTileTokens];
  const WarpTile tile = MakeWarpTile(kOuts, p.m);
  const int lane = tile.lane, g = tile.g, t4 = tile.t4, mt = tile.mt;
  const int64_t o0 = tile.o0, t0 = tile.t0;
  if (o0 >= p.w.n) return;  // whole warps only; no block-wide barrier follows
  const int tiles = (mt + kTokensPerTile - 1) / kTokensPerTile;
  const int words = p.w.words;

  auto weight_row = [&](int r) -> const uint32_t* {
    return (r < kRows && o0 + r / kWb < p.w.n) ? p.w.planes + (o0 * kWb + r) * words : nullptr;
  };
  const uint32_t* w_lo = weight_row(g);
  const uint32_t* w_hi = weight_row(g + 8);
  const uint32_t* a_row[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int col = nt * 8 + g;
    a_row[nt] = col / kAb < mt ? p.a_planes + (t0 * kAb + col) * words : nullptr;
  }
  float out[kPairs];
#pragma unroll
  for (int q = 0; q < kPairs; ++q) out[q] = 0.0f;
  uint32_t(*sums)[kTileTokens] = plane_sums[tile.warp];

  for (int gr = 0; gr < p.w.n_groups; ++gr) {
    const int begin = gr * p.w.group_words;
    const int end = min(begin + p.w.group_words, words);
    int acc[kTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
    for (int w = begin; w < end; w += 8) {
      const int lo = w + t4, hi = w + 4 + t4;
      const uint32_t a0 = LoadWord(w_lo, lo, end), a1 = LoadWord(w_hi, lo, end);
      if (end - w > 4) {
        const uint32_t a2 = LoadWord(w_lo, hi, end), a3 = LoadWord(w_hi, hi, end);
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < tiles) {
            MmaB1K256(acc[nt], a0, a1, a2, a3, LoadWord(a_row[nt], lo, end),
                      LoadWord(a_row[nt], hi, end));
          }
        }
      } else {  // at most 4 words left in the group (e.g. group 128): half the instruction
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < tiles) MmaB1K128(acc[nt], a0, a1, LoadWord(a_row[nt], lo, end));
        }
      }
    }
    // Activation planes: lane (g, t4) holds columns 2·t4 and 2·t4 + 1 of rows g and g + 8; the
    // quad (ab = 8) or lane pair (ab = 4) holding one token's planes adds them with their weights.
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      if (nt < tiles) {
        const uint32_t wt0 = ActPlaneWeight<kAb>((2 * t4) % kAb);
        const uint32_t wt1 = ActPlaneWeight<kAb>((2 * t4 + 1) % kAb);
        uint32_t lo =
            static_cast<uint32_t>(acc[nt][0]) * wt0 + static_cast<uint32_t>(acc[nt][1]) * wt1;
        uint32_t hi =
            static_cast<uint32_t>(acc[nt][2]) * wt0 + static_cast<uint32_t>(acc[nt][3]) * wt1;
        lo += __shfl_xor_sync(kFull, lo, 1);
        hi += __shfl_xor_sync(kFull, hi, 1);
        if (kAb == 8) {
          lo += __shfl_xor_sync(kFull, lo, 2);
          hi += __shfl_xor_sync(kFull, hi, 2);
        }
        if (kAb == 8 ? t4 == 0 : (t4 & 1) == 0) {
          const int tl = nt * kTokensPerTile + (kAb == 8 ? 0 : t4 >> 1);
          sums[g][tl] = lo;
          sums[g + 8][tl] = hi;
        }
      }
    }
    __syncwarp();
    // Weight planes: dot(o, t) = Σ_j 2^j P[o·wb + j][t], then the epilogue step.
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
      const int pair = lane + 32 * q;
      const int ol = pair / kTileTokens, tl = pair % kTileTokens;
      if (ol < kOuts && o0 + ol < p.w.n && tl < mt) {
        uint32_t dot = 0;
#pragma unroll
        for (int j = 0; j < kWb; ++j) dot += sums[ol * kWb + j][tl] << j;
        out[q] = EpilogueStep(p, t0 + tl, o0 + ol, gr, dot, out[q]);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int q = 0; q < kPairs; ++q) {
    const int pair = lane + 32 * q;
    const int ol = pair / kTileTokens, tl = pair % kTileTokens;
    if (ol < kOuts && o0 + ol < p.w.n && tl < mt) {
      p.y[(t0 + tl) * p.w.n + o0 + ol] = __fmul_rn(out[q], p.a_scales[t0 + tl]);
    }
  }
}

// ---- Unpack to int8 (IMMA) -------------------------------------------------------------------

__device__ __forceinline__ void MmaU8S8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Bits 0..3 of `nibble` to bit 0 of bytes 0..3. The four shifted copies (by 0, 7, 14, 21) do not
// overlap, so the product has no carries.
__device__ __forceinline__ uint32_t SpreadNibble(uint32_t nibble) {
  return (nibble * 0x00204081u) & 0x01010101u;
}

// Four codes (columns shift..shift+3 of one word) as bytes, from their kBits planes: unsigned
// (weights, u8), or two's complement sign-extended to 8 bits (activations, s8: the top plane
// fills bits kBits−1..7 of its byte).
template <int kBits, bool kSigned>
__device__ __forceinline__ uint32_t PlanesToBytes(const uint32_t (&planes)[kBits], int shift) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < kBits; ++i) {
    const uint32_t spread = SpreadNibble((planes[i] >> shift) & 0xFu);
    if (kSigned && i == kBits - 1) {
      r |= spread * ((0xFFu << i) & 0xFFu);
    } else {
      r |= spread << i;
    }
  }
  return r;
}

template <int kBits>
__device__ __forceinline__ void LoadPlanes(uint32_t (&dst)[kBits], const uint32_t* row0,
                                           int64_t stride, int word) {
#pragma unroll
  for (int i = 0; i < kBits; ++i) dst[i] = row0 != nullptr ? __ldg(row0 + i * stride + word) : 0u;
}

// C layout of the 16-output × 16-token warp tile: element e of n-tile nt is output row
// g + 8·(e / 2) and token 8·nt + 2·t4 + e % 2.
template <int kWb, int kAb>
__global__ void __launch_bounds__(kWarps * 32) AbqInt8GemmKernel(GemmParams p) {
  constexpr int kTiles = kTileTokens / 8;
  const WarpTile tile = MakeWarpTile(16, p.m);
  const int g = tile.g, t4 = tile.t4, mt = tile.mt;
  const int64_t o0 = tile.o0, t0 = tile.t0;
  if (o0 >= p.w.n) return;
  const int tiles = (mt + 7) / 8;
  const int64_t words = p.w.words;
  const uint32_t* w_lo = o0 + g < p.w.n ? p.w.planes + (o0 + g) * kWb * words : nullptr;
  const uint32_t* w_hi = o0 + g + 8 < p.w.n ? p.w.planes + (o0 + g + 8) * kWb * words : nullptr;
  const uint32_t* a_tok[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    a_tok[nt] = nt * 8 + g < mt ? p.a_planes + (t0 + nt * 8 + g) * kAb * words : nullptr;
  }
  float out[kTiles][4];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.0f;

  for (int gr = 0; gr < p.w.n_groups; ++gr) {
    const int begin = gr * p.w.group_words;
    const int end = min(begin + p.w.group_words, p.w.words);
    int acc[kTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
    for (int w = begin; w < end; ++w) {
      uint32_t lo[kWb], hi[kWb];
      LoadPlanes<kWb>(lo, w_lo, words, w);
      LoadPlanes<kWb>(hi, w_hi, words, w);
      const uint32_t a0 = PlanesToBytes<kWb, false>(lo, 4 * t4);
      const uint32_t a1 = PlanesToBytes<kWb, false>(hi, 4 * t4);
      const uint32_t a2 = PlanesToBytes<kWb, false>(lo, 16 + 4 * t4);
      const uint32_t a3 = PlanesToBytes<kWb, false>(hi, 16 + 4 * t4);
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        if (nt < tiles) {
          uint32_t act[kAb];
          LoadPlanes<kAb>(act, a_tok[nt], words, w);
          MmaU8S8(acc[nt], a0, a1, a2, a3, PlanesToBytes<kAb, true>(act, 4 * t4),
                  PlanesToBytes<kAb, true>(act, 16 + 4 * t4));
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t o = o0 + g + 8 * (e >> 1);
        const int tl = nt * 8 + 2 * t4 + (e & 1);
        if (o < p.w.n && tl < mt) {
          out[nt][e] =
              EpilogueStep(p, t0 + tl, o, gr, static_cast<uint32_t>(acc[nt][e]), out[nt][e]);
        }
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t o = o0 + g + 8 * (e >> 1);
      const int tl = nt * 8 + 2 * t4 + (e & 1);
      if (o < p.w.n && tl < mt) {
        p.y[(t0 + tl) * p.w.n + o] = __fmul_rn(out[nt][e], p.a_scales[t0 + tl]);
      }
    }
  }
}

// ---- Weight-only A16 -------------------------------------------------------------------------

// Code at column `bit` of a word from its kWb planes.
template <int kWb>
__device__ __forceinline__ int CodeAt(const uint32_t (&planes)[kWb], int bit) {
  int q = 0;
#pragma unroll
  for (int j = 0; j < kWb; ++j) q |= static_cast<int>((planes[j] >> bit) & 1u) << j;
  return q;
}

// q − z at columns bit and bit + 1, as a bf16 pair (exact: |q − z| <= 256).
template <int kWb>
__device__ __forceinline__ uint32_t WeightPair(const uint32_t (&planes)[kWb], int bit, int z) {
  return mma::PackBf16(static_cast<float>(CodeAt<kWb>(planes, bit) - z),
                       static_cast<float>(CodeAt<kWb>(planes, bit + 1) - z));
}

__device__ __forceinline__ float LoadX(const float* row, int64_t c, int64_t k) {
  return (row != nullptr && c < k) ? __ldg(row + c) : 0.0f;
}

// Per k-group: acc_G = Σ_{k in G} bf16(x)·(q − z) on the tensor cores (fp32), then
// out = fma(acc_G, s_w, out). Padding columns have code 0 but x = 0 there, so they add nothing.
template <int kWb>
__global__ void __launch_bounds__(kWarps * 32)
    AbqWeightOnlyKernel(AbqDeviceWeights wt, const float* x, int64_t m, float* y) {
  constexpr int kTiles = kTileTokens / 8;
  const WarpTile tile = MakeWarpTile(16, m);
  const int g = tile.g, t4 = tile.t4, mt = tile.mt;
  const int64_t o0 = tile.o0, t0 = tile.t0;
  if (o0 >= wt.n) return;
  const int tiles = (mt + 7) / 8;
  const int64_t words = wt.words, k = wt.k;
  const bool lo_ok = o0 + g < wt.n, hi_ok = o0 + g + 8 < wt.n;
  const uint32_t* w_lo = lo_ok ? wt.planes + (o0 + g) * kWb * words : nullptr;
  const uint32_t* w_hi = hi_ok ? wt.planes + (o0 + g + 8) * kWb * words : nullptr;
  const float* x_tok[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt)
    x_tok[nt] = nt * 8 + g < mt ? x + (t0 + nt * 8 + g) * k : nullptr;
  float out[kTiles][4];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) out[nt][0] = out[nt][1] = out[nt][2] = out[nt][3] = 0.0f;

  for (int gr = 0; gr < wt.n_groups; ++gr) {
    const int begin = gr * wt.group_words;
    const int end = min(begin + wt.group_words, wt.words);
    const int64_t gi = static_cast<int64_t>(gr) * wt.n;
    const int z_lo = lo_ok ? wt.zeros[gi + o0 + g] : 0;
    const int z_hi = hi_ok ? wt.zeros[gi + o0 + g + 8] : 0;
    float acc[kTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    for (int w = begin; w < end; ++w) {
      uint32_t lo[kWb], hi[kWb];
      LoadPlanes<kWb>(lo, w_lo, words, w);
      LoadPlanes<kWb>(hi, w_hi, words, w);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int bit = 16 * half + 2 * t4;
        const uint32_t a[4] = {WeightPair<kWb>(lo, bit, z_lo), WeightPair<kWb>(hi, bit, z_hi),
                               WeightPair<kWb>(lo, bit + 8, z_lo),
                               WeightPair<kWb>(hi, bit + 8, z_hi)};
        const int64_t c = static_cast<int64_t>(w) * 32 + bit;
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < tiles) {
            const float* xr = x_tok[nt];
            mma::Mma(acc[nt], a, mma::PackBf16(LoadX(xr, c, k), LoadX(xr, c + 1, k)),
                     mma::PackBf16(LoadX(xr, c + 8, k), LoadX(xr, c + 9, k)));
          }
        }
      }
    }
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t o = o0 + g + 8 * (e >> 1);
        if (o < wt.n) out[nt][e] = __fmaf_rn(acc[nt][e], wt.scales[gi + o], out[nt][e]);
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t o = o0 + g + 8 * (e >> 1);
      const int tl = nt * 8 + 2 * t4 + (e & 1);
      if (o < wt.n && tl < mt) y[(t0 + tl) * wt.n + o] = out[nt][e];
    }
  }
}

// ---- Dispatch --------------------------------------------------------------------------------

bool TokenGridOk(int64_t m) { return m >= 1 && (m + kTileTokens - 1) / kTileTokens <= 65535; }

dim3 GemmGrid(int64_t n, int outs_per_warp, int64_t m) {
  const int64_t per_block = static_cast<int64_t>(kWarps) * outs_per_warp;
  return dim3(static_cast<unsigned>((n + per_block - 1) / per_block),
              static_cast<unsigned>((m + kTileTokens - 1) / kTileTokens));
}

template <int kWb, int kAb>
cudaError_t LaunchGemmFor(AbqMma mma, const GemmParams& p, cudaStream_t stream) {
  if (mma == AbqMma::kBinary) {
    AbqBinaryGemmKernel<kWb, kAb><<<GemmGrid(p.w.n, 16 / kWb, p.m), kWarps * 32, 0, stream>>>(p);
  } else {
    AbqInt8GemmKernel<kWb, kAb><<<GemmGrid(p.w.n, 16, p.m), kWarps * 32, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <int kAb>
cudaError_t LaunchGemmAb(AbqMma mma, const GemmParams& p, cudaStream_t stream) {
  switch (p.w.weight_bits) {
    case 2:
      return LaunchGemmFor<2, kAb>(mma, p, stream);
    case 3:
      return LaunchGemmFor<3, kAb>(mma, p, stream);
    case 4:
      return LaunchGemmFor<4, kAb>(mma, p, stream);
    case 8:
      return LaunchGemmFor<8, kAb>(mma, p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

bool WeightsOk(const AbqDeviceWeights& w) {
  return w.n >= 1 && w.k >= 1 && w.n <= 0x7fffffff && w.words == (w.k + 31) / 32 &&
         w.group_words >= 1 && w.n_groups == (w.words + w.group_words - 1) / w.group_words;
}

}  // namespace

cudaError_t LaunchAbqPrologue(const float* x, const AbqDeviceWeights& w,
                              const AbqDeviceActivations& a, cudaStream_t stream) {
  if (!WeightsOk(w) || a.m < 1 || a.m > 0x7fffffff || w.n_groups > kMaxPrologueGroups) {
    return cudaErrorInvalidValue;
  }
  const size_t shared = static_cast<size_t>(w.n_groups) * sizeof(int32_t);
  const unsigned blocks = static_cast<unsigned>(a.m);
  if (a.act_bits == 4) {
    AbqPrologueKernel<4><<<blocks, kPrologueThreads, shared, stream>>>(
        x, w.k, w.words, w.group_words, w.n_groups, a.planes, a.scales, a.sums);
  } else if (a.act_bits == 8) {
    AbqPrologueKernel<8><<<blocks, kPrologueThreads, shared, stream>>>(
        x, w.k, w.words, w.group_words, w.n_groups, a.planes, a.scales, a.sums);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t LaunchAbqGemm(AbqMma mma, const AbqDeviceWeights& w, const AbqDeviceActivations& a,
                          float* y, int32_t* dot, cudaStream_t stream) {
  if (!WeightsOk(w) || !TokenGridOk(a.m)) return cudaErrorInvalidValue;
  const GemmParams p{w, a.planes, a.scales, a.sums, a.m, y, dot};
  if (a.act_bits == 4) return LaunchGemmAb<4>(mma, p, stream);
  if (a.act_bits == 8) return LaunchGemmAb<8>(mma, p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t LaunchAbqWeightOnly(const float* x, int64_t m, const AbqDeviceWeights& w, float* y,
                                cudaStream_t stream) {
  if (!WeightsOk(w) || !TokenGridOk(m)) return cudaErrorInvalidValue;
  const dim3 grid = GemmGrid(w.n, 16, m);
  switch (w.weight_bits) {
    case 2:
      AbqWeightOnlyKernel<2><<<grid, kWarps * 32, 0, stream>>>(w, x, m, y);
      break;
    case 3:
      AbqWeightOnlyKernel<3><<<grid, kWarps * 32, 0, stream>>>(w, x, m, y);
      break;
    case 4:
      AbqWeightOnlyKernel<4><<<grid, kWarps * 32, 0, stream>>>(w, x, m, y);
      break;
    case 8:
      AbqWeightOnlyKernel<8><<<grid, kWarps * 32, 0, stream>>>(w, x, m, y);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
