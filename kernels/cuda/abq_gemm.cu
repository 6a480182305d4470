// The ABQ GEMM kernels and their dispatch (launchers and contracts in abq_gemm.cuh; spec
// kernels/cpu/abq_ref.h): the tiled b1, int8 IMMA and weight-only A16 kernels. The activation
// prologue is abq_prologue.cu, the b1 decode kernel abq_decode.cu, the b1 GEMV kernel abq_gemv.cu
// and the fused one-token layer abq_gemv_fused.cu. Built with
// -fmad=false, and the epilogue spells its arithmetic with __dadd_rn / __dmul_rn /
// __double2float_rn, so it performs AbqEpilogue's operations and no others.
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
//     rows 4·t4 + [0, 4) of column g; b1 = rows 16 + 4·t4 + [0, 4) (byte e = k 4·t4 + e). Four
//     mmas cover four plane words of one k-group, in a k order that both operands share (a sum
//     does not depend on it): lane t4 brings word w + t4, and in mma σ its k 4·t4 + e is that
//     word's bit 2σ + 8·e and its k 16 + 4·t4 + e bit 2σ + 1 + 8·e, so that each lane loads
//     only its own word and a register's four bytes come from one shift and one mask per plane
//     (PlanesToBytes).
//   bf16 m16n8k16 (mma_sync.cuh): A a0 = row g, k 2·t4, 2·t4 + 1; a1 = row g + 8; a2 = row g,
//     k 8 + 2·t4, +1; a3 = row g + 8; B b0 = k 2·t4, +1 of column g; b1 = k 8 + 2·t4, +1 (the
//     lower k in the lower half). Eight mmas cover four plane words of one k-group, in a k order
//     both operands share: lane t4 brings word w + t4, and in mma μ its k pair t4 (a0, b0) is
//     that word's bits s and s + 16 for s = 2μ and its k pair 4 + t4 (a2, b1) the same for
//     s = 2μ + 1, so that a register's pair comes from one shift and one mask per plane
//     (WeightPair).
// Roles: weights are the A operand (their 16 rows are what a block streams from memory) and tokens
// the B operand's 8 columns, so decode (m <= 16) wastes no weight bandwidth on padding. In the b1
// kernel an A row is one weight plane (row r = o·wb + j, consecutive in memory) and a B column
// one activation plane (column c of n-tile nt = token (8·nt + c) / ab, plane c % ab: activation
// plane row t0·ab + 8·nt + c, also consecutive); the popcounts are combined with the plane
// weights sgn_i·2^(i+j) when a k-group ends.
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "kernels/abq_ops.h"
#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kSplitWarps = 16;                 // warps per GEMM block; they split K
constexpr int kGemmThreads = kSplitWarps * 32;  //
constexpr int kTileRows = 16;                   // weight rows (mma A rows) per GEMM block
constexpr int kTileTokens = 16;                 // tokens per GEMM block (grid.y walks the rest)
constexpr int kRoundBytes = 32 * 1024;          // shared memory of one round of k-groups
constexpr int kPrefetchBytes = 64 * 1024;       // weights a block asks L2 for at its start

// ---- The block structure shared by the GEMMs -------------------------------------------------
//
// A block owns kTileRows weight rows (the mma A operand) and up to kTileTokens tokens, over all
// of K. Its k-groups are taken in rounds of plan.groups groups; each group is cut into plan.parts
// parts (1 when there are at least kSplitWarps groups), and the round's (group, part) units are
// dealt to the kSplitWarps warps. A warp computes a unit's sums for its 16 rows and the block's
// tokens and stores them in the unit's slot in shared memory ([16 rows][ts tokens]); after a
// barrier one thread per (output, token) runs the epilogue over the round's groups in order,
// adding a group's parts (integers: exact in any order; A16: fp32 in part order), and keeps its
// accumulator (integer kernels: fp64; A16: fp32) across rounds. Each unit slot is written by one
// warp and each output by one thread, without atomics: results are bit-identical run to run. The
// round's s_w, z and Σa are copied to shared memory asynchronously (cp.async) while the warps
// stream the weights.

struct RoundPlan {
  int groups = 1;  // k-groups per round
  int parts = 1;   // units per k-group
  int ts = 1;      // token stride of a unit slot: min(m, kTileTokens)
};

struct GemmParams {
  AbqDeviceWeights w;
  const uint32_t* a_planes;
  const float* a_scales;
  const int32_t* a_sums;
  int64_t m;
  float* y;
  int32_t* dot;
  RoundPlan plan;
};

// Shared bytes per k-group of a round: the unit slots, s_w and z [kTileRows], Σa [ts].
int RoundBytesPerGroup(const RoundPlan& plan) {
  return 4 * (plan.parts * kTileRows * plan.ts + 2 * kTileRows + plan.ts);
}

RoundPlan PlanRounds(int n_groups, int64_t m) {
  RoundPlan plan;
  plan.ts = static_cast<int>(std::min<int64_t>(m, kTileTokens));
  plan.parts = n_groups >= kSplitWarps ? 1 : (kSplitWarps + n_groups - 1) / n_groups;
  plan.groups = std::clamp(kRoundBytes / RoundBytesPerGroup(plan), 1, n_groups);
  return plan;
}

// The calling thread's place: lane coordinates in the mma fragments (g = lane / 4,
// t4 = lane % 4), the block's first output o0 (outs outputs a block along grid.x), first token
// t0 and token count mt (kTileTokens a block along grid.y).
struct BlockTile {
  int lane, warp, g, t4;
  int64_t o0, t0;
  int mt;
};

__device__ __forceinline__ BlockTile MakeBlockTile(int outs, int64_t m) {
  BlockTile b;
  b.lane = threadIdx.x & 31;
  b.warp = threadIdx.x >> 5;
  b.g = b.lane >> 2;
  b.t4 = b.lane & 3;
  b.o0 = static_cast<int64_t>(blockIdx.x) * outs;
  b.t0 = static_cast<int64_t>(blockIdx.y) * kTileTokens;
  b.mt = static_cast<int>(min(static_cast<int64_t>(kTileTokens), m - b.t0));
  return b;
}

__device__ __forceinline__ uint32_t LoadWord(const uint32_t* row, int word, int end) {
  return (row != nullptr && word < end) ? __ldg(row + word) : 0u;
}

__device__ __forceinline__ void CopyAsyncWait() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Asks L2 for the first kPrefetchBytes of the block's weight rows (contiguous: the planes of
// outputs o0 .. o0 + outs − 1), one 128-byte line per thread and step, without waiting: the whole
// slab is requested from DRAM at once instead of one unit's words per warp at a time.
__device__ __forceinline__ void PrefetchWeights(const AbqDeviceWeights& w, int64_t o0, int outs) {
  const int64_t out_bytes = static_cast<int64_t>(w.weight_bits) * w.words * 4;  // wb planes
  const int64_t bytes = min(static_cast<int64_t>(kPrefetchBytes),
                            min(static_cast<int64_t>(outs), w.n - o0) * out_bytes);
  const char* base = reinterpret_cast<const char*>(w.planes) + o0 * out_bytes;
  for (int64_t off = threadIdx.x * int64_t{128}; off < bytes; off += kGemmThreads * int64_t{128}) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(base + off));
  }
}

// The round's shared memory.
struct RoundShared {
  uint32_t* units;  // [groups · parts][kTileRows][ts]
  float* scales;    // s_w [groups][kTileRows]
  int32_t* zeros;   // z [groups][kTileRows]
  int32_t* sums;    // Σa [groups][ts]
  __device__ const uint32_t* Slot(const RoundPlan& plan, int group, int part) const {
    return units + (group * plan.parts + part) * kTileRows * plan.ts;
  }
};

// One unit of work: words [begin, end) of k-group `group`, whose sums go to slot[row · ts +
// token]; slot is null for the empty units that pad a warp's last batch.
struct UnitWork {
  int group, begin, end;
  uint32_t* slot;
};

// Runs the rounds: unit(batch) on each warp's units, kBatch at a time (UnitWork[kBatch]: units
// u, u + kSplitWarps, ..., so that a warp can have the loads of several units in flight), then
// epilogue(g0, rg, shared) on every thread after the round's barrier.
template <int kBatch, typename Unit, typename Epilogue>
__device__ __forceinline__ void RunRounds(const AbqDeviceWeights& w, const RoundPlan& plan,
                                          const BlockTile& b, int outs, const int32_t* a_sums,
                                          Unit unit, Epilogue epilogue) {
  extern __shared__ uint32_t round_smem[];
  PrefetchWeights(w, b.o0, outs);
  // Launched programmatically after the prologue (LaunchGemmKernel): the weights' prefetch above
  // overlaps it; everything below may read its outputs. A no-op for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  RoundShared sh;
  sh.units = round_smem;
  sh.scales = reinterpret_cast<float*>(sh.units + plan.groups * plan.parts * kTileRows * plan.ts);
  sh.zeros = reinterpret_cast<int32_t*>(sh.scales + plan.groups * kTileRows);
  sh.sums = sh.zeros + plan.groups * kTileRows;
  for (int g0 = 0; g0 < w.n_groups; g0 += plan.groups) {
    const int rg = min(plan.groups, w.n_groups - g0);
    for (int i = threadIdx.x; i < rg * kTileRows; i += kGemmThreads) {
      const int ol = i % kTileRows;
      const int64_t o = b.o0 + ol;
      if (ol < outs && o < w.n) {
        const int64_t gi = static_cast<int64_t>(g0 + i / kTileRows) * w.n + o;
        CopyAsync4(sh.scales + i, w.scales + gi);
        CopyAsync4(sh.zeros + i, w.zeros + gi);
      }
    }
    if (a_sums != nullptr) {
      for (int i = threadIdx.x; i < rg * b.mt; i += kGemmThreads) {
        const int gl = i / b.mt, tl = i % b.mt;
        CopyAsync4(sh.sums + gl * plan.ts + tl, a_sums + (b.t0 + tl) * w.n_groups + g0 + gl);
      }
    }
    const int nu = rg * plan.parts;
    for (int u0 = b.warp; u0 < nu; u0 += kSplitWarps * kBatch) {
      UnitWork batch[kBatch];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int u = u0 + i * kSplitWarps;
        if (u < nu) {
          const int group = g0 + u / plan.parts, part = u % plan.parts;
          const int gb = group * w.group_words, ge = min(gb + w.group_words, w.words);
          const int len = (ge - gb + plan.parts - 1) / plan.parts;
          const int begin = min(gb + part * len, ge);
          batch[i] = {group, begin, min(begin + len, ge), sh.units + u * kTileRows * plan.ts};
        } else {
          batch[i] = {0, 0, 0, nullptr};
        }
      }
      unit(batch);
    }
    CopyAsyncWait();
    __syncthreads();
    epilogue(g0, rg, sh);
    __syncthreads();
  }
}

// The integer epilogue of the calling thread's (output ol, token tl) over one round: dot_G = the
// sum of the group's parts, each Σ_j 2^j·slot[ol·kRowsPerOut + j] (b1: a row per weight plane;
// int8: one row per output), then AbqEpilogue's steps.
template <int kRowsPerOut>
__device__ __forceinline__ double IntegerEpilogueRound(const GemmParams& p, const BlockTile& b,
                                                       int ol, int tl, int g0, int rg,
                                                       const RoundShared& sh, double acc) {
  const int ts = p.plan.ts;
  const int64_t o = b.o0 + ol, t = b.t0 + tl;
#pragma unroll 4
  for (int gl = 0; gl < rg; ++gl) {
    uint32_t dot = 0;
    for (int part = 0; part < p.plan.parts; ++part) {
      const uint32_t* slot = sh.Slot(p.plan, gl, part);
#pragma unroll
      for (int j = 0; j < kRowsPerOut; ++j) dot += slot[(ol * kRowsPerOut + j) * ts + tl] << j;
    }
    const uint32_t za = static_cast<uint32_t>(sh.zeros[gl * kTileRows + ol]) *
                        static_cast<uint32_t>(sh.sums[gl * ts + tl]);
    const int32_t c = static_cast<int32_t>(dot - za);
    if (p.dot != nullptr) {
      p.dot[(t * p.w.n + o) * p.w.n_groups + g0 + gl] = static_cast<int32_t>(dot);
    }
    acc = __dadd_rn(acc, __dmul_rn(static_cast<double>(c),
                                   static_cast<double>(sh.scales[gl * kTileRows + ol])));
  }
  return acc;
}

// The integer GEMMs' block: rounds with `unit`, the epilogue above, y = acc·s_a.
template <int kRowsPerOut, int kBatch, typename Unit>
__device__ __forceinline__ void RunIntegerGemm(const GemmParams& p, const BlockTile& b, int outs,
                                               Unit unit) {
  const int ol = threadIdx.x / b.mt, tl = threadIdx.x % b.mt;
  const bool mine = ol < outs && b.o0 + ol < p.w.n;  // threads past outs·mt have ol >= outs
  double acc = 0.0;
  RunRounds<kBatch>(p.w, p.plan, b, outs, p.a_sums, unit,
                    [&](int g0, int rg, const RoundShared& sh) {
                      if (mine)
                        acc = IntegerEpilogueRound<kRowsPerOut>(p, b, ol, tl, g0, rg, sh, acc);
                    });
  if (mine) {
    p.y[(b.t0 + tl) * p.w.n + b.o0 + ol] =
        __double2float_rn(__dmul_rn(static_cast<double>(p.a_scales[b.t0 + tl]), acc));
  }
}

// ---- b1 AND + popcount -----------------------------------------------------------------------

// kTiles n8 tiles of activation plane columns (kTiles <= 16 / (8 / kAb)); the block's 16 A rows
// are the planes of 16 / kWb outputs (wb = 3: 5 outputs, row 15 unused).
template <int kWb, int kAb, int kTiles>
__global__ void __launch_bounds__(kGemmThreads, kTiles <= 4 ? 2 : 1)
    AbqBinaryGemmKernel(GemmParams p) {
  constexpr int kOuts = 16 / kWb;
  constexpr int kRows = kOuts * kWb;
  constexpr int kTokensPerTile = 8 / kAb;  // tokens per n8 tile
  const BlockTile b = MakeBlockTile(kOuts, p.m);
  const int g = b.g, t4 = b.t4, mt = b.mt;
  const int tiles = min(kTiles, (mt + kTokensPerTile - 1) / kTokensPerTile);
  const int64_t words = p.w.words;
  auto weight_row = [&](int r) -> const uint32_t* {
    return (r < kRows && b.o0 + r / kWb < p.w.n) ? p.w.planes + (b.o0 * kWb + r) * words : nullptr;
  };
  const uint32_t* w_lo = weight_row(g);
  const uint32_t* w_hi = weight_row(g + 8);
  // Column c of n-tile nt: activation plane row t0·ab + 8·nt + c (token (8·nt + c) / ab).
  const uint32_t* a_base = p.a_planes + (b.t0 * kAb + g) * words;
  auto a_row = [&](int nt) -> const uint32_t* {
    return (nt * 8 + g) / kAb < mt ? a_base + nt * 8 * words : nullptr;
  };
  // Units in flight per warp, and whether the activation words are loaded with the weights
  // (registers: decode of one n-tile only).
  constexpr int kBatch = kTiles == 1 ? 2 : 1;
  constexpr bool kLoadAhead = kTiles == 1;
  RunIntegerGemm<kWb, kBatch>(p, b, kOuts, [&](const UnitWork(&units)[kBatch]) {
    int acc[kBatch][kTiles][4];
    int steps = 0;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      steps = max(steps, units[i].end - units[i].begin);
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        acc[i][nt][0] = acc[i][nt][1] = acc[i][nt][2] = acc[i][nt][3] = 0;
      }
    }
    for (int s = 0; s < steps; s += 8) {
      // The loads of the batch's step first, then the mmas: k256 over 8 words, k128 when at
      // most 4 are left in the unit (e.g. group 128), nothing when the unit is done.
      uint32_t a[kBatch][4], bw[kBatch][kLoadAhead ? kTiles : 1][2];
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int w = units[i].begin + s, end = units[i].end;
        const int lo = w + t4, hi = w + 4 + t4;
        a[i][0] = LoadWord(w_lo, lo, end);
        a[i][1] = LoadWord(w_hi, lo, end);
        a[i][2] = LoadWord(w_lo, hi, end);
        a[i][3] = LoadWord(w_hi, hi, end);
#pragma unroll
        for (int nt = 0; nt < (kLoadAhead ? kTiles : 0); ++nt) {
          const uint32_t* ar = nt < tiles ? a_row(nt) : nullptr;
          bw[i][nt][0] = LoadWord(ar, lo, end);
          bw[i][nt][1] = LoadWord(ar, hi, end);
        }
      }
#pragma unroll
      for (int i = 0; i < kBatch; ++i) {
        const int w = units[i].begin + s, end = units[i].end, left = end - w;
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < tiles && left > 0) {
            uint32_t b0, b1;
            if constexpr (kLoadAhead) {
              b0 = bw[i][nt][0];
              b1 = bw[i][nt][1];
            } else {
              const uint32_t* ar = a_row(nt);
              b0 = LoadWord(ar, w + t4, end);
              b1 = LoadWord(ar, w + 4 + t4, end);
            }
            if (left > 4) {
              MmaB1K256(acc[i][nt], a[i][0], a[i][1], a[i][2], a[i][3], b0, b1);
            } else {
              MmaB1K128(acc[i][nt], a[i][0], a[i][1], b0);
            }
          }
        }
      }
    }
    // Activation planes: lane (g, t4) holds columns 2·t4 and 2·t4 + 1 of rows g and g + 8; the
    // quad (ab = 8) or lane pair (ab = 4) holding one token's planes adds them with their weights.
    const int ts = p.plan.ts;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      uint32_t* slot = units[i].slot;
      if (slot == nullptr) continue;  // warp-uniform
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        if (nt < tiles) {
          const uint32_t wt0 = ActPlaneWeight<kAb>((2 * t4) % kAb);
          const uint32_t wt1 = ActPlaneWeight<kAb>((2 * t4 + 1) % kAb);
          uint32_t lo = static_cast<uint32_t>(acc[i][nt][0]) * wt0 +
                        static_cast<uint32_t>(acc[i][nt][1]) * wt1;
          uint32_t hi = static_cast<uint32_t>(acc[i][nt][2]) * wt0 +
                        static_cast<uint32_t>(acc[i][nt][3]) * wt1;
          lo += __shfl_xor_sync(kFull, lo, 1);
          hi += __shfl_xor_sync(kFull, hi, 1);
          if (kAb == 8) {
            lo += __shfl_xor_sync(kFull, lo, 2);
            hi += __shfl_xor_sync(kFull, hi, 2);
          }
          const int tl = nt * kTokensPerTile + (kAb == 8 ? 0 : t4 >> 1);
          if ((kAb == 8 ? t4 == 0 : (t4 & 1) == 0) && tl < mt) {
            slot[g * ts + tl] = lo;
            slot[(g + 8) * ts + tl] = hi;
          }
        }
      }
    }
  });
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

// Four codes (columns s, s + 8, s + 16, s + 24 of one word: byte e = column s + 8·e) as bytes,
// from their kBits planes: unsigned (weights, u8), or two's complement sign-extended to 8 bits
// (activations, s8: the top plane fills bits kBits−1..7 of its byte; each byte of `bits` is 0 or
// 1, so the product has no carries).
template <int kBits, bool kSigned>
__device__ __forceinline__ uint32_t PlanesToBytes(const uint32_t (&planes)[kBits], int s) {
  uint32_t r = 0;
#pragma unroll
  for (int i = 0; i < kBits; ++i) {
    const uint32_t bits = (planes[i] >> s) & 0x01010101u;
    if (kSigned && i == kBits - 1) {
      r |= bits * ((0xFFu << i) & 0xFFu);
    } else {
      r |= bits << i;
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

// Token n-tiles of the int8 and A16 kernels: kTileTokens / 8.
constexpr int kTokenTiles = kTileTokens / 8;

// C layout of the 16-output × 16-token tile: element e of n-tile nt is output row
// g + 8·(e / 2) and token 8·nt + 2·t4 + e % 2.
template <typename T, int kTiles>
__device__ __forceinline__ void StoreTile(const T (&acc)[kTiles][4], int g, int t4, int mt, int ts,
                                          uint32_t* slot) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e >> 1), tl = nt * 8 + 2 * t4 + (e & 1);
      if (tl < mt) {
        uint32_t bits;
        memcpy(&bits, &acc[nt][e], sizeof(bits));
        slot[row * ts + tl] = bits;
      }
    }
  }
}

// kTiles n8 tiles of tokens: 1 (m <= 8) or kTokenTiles.
template <int kWb, int kAb, int kTiles>
__global__ void __launch_bounds__(kGemmThreads, kTiles == 1 ? 2 : 1)
    AbqInt8GemmKernel(GemmParams p) {
  const BlockTile b = MakeBlockTile(16, p.m);
  const int g = b.g, t4 = b.t4, mt = b.mt;
  const int tiles = (mt + 7) / 8;
  const int64_t words = p.w.words;
  const uint32_t* w_lo = b.o0 + g < p.w.n ? p.w.planes + (b.o0 + g) * kWb * words : nullptr;
  const uint32_t* w_hi = b.o0 + g + 8 < p.w.n ? p.w.planes + (b.o0 + g + 8) * kWb * words : nullptr;
  const uint32_t* a_tok[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    a_tok[nt] = nt * 8 + g < mt ? p.a_planes + (b.t0 + nt * 8 + g) * kAb * words : nullptr;
  }
  RunIntegerGemm<1, 1>(p, b, 16, [&](const UnitWork(&units)[1]) {
    const int begin = units[0].begin, end = units[0].end;
    if (units[0].slot == nullptr) return;
    int acc[kTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
    }
    // Steps of 4 words: lane (g, t4) loads word w + t4 only (zero past the unit's end), and the
    // step's 4 mmas σ take bits 2σ + 8·e (a0, b0) and 2σ + 1 + 8·e (a2, b1) of each lane's word.
#pragma unroll 1
    for (int w = begin; w < end; w += 4) {
      const int word = w + t4;
      const bool in = word < end;
      uint32_t lo[kWb], hi[kWb], act[kTiles][kAb];
      LoadPlanes<kWb>(lo, in ? w_lo : nullptr, words, word);
      LoadPlanes<kWb>(hi, in ? w_hi : nullptr, words, word);
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        LoadPlanes<kAb>(act[nt], in && nt < tiles ? a_tok[nt] : nullptr, words, word);
      }
#pragma unroll
      for (int sigma = 0; sigma < 4; ++sigma) {
        const int s0 = 2 * sigma, s1 = s0 + 1;
        const uint32_t a0 = PlanesToBytes<kWb, false>(lo, s0);
        const uint32_t a1 = PlanesToBytes<kWb, false>(hi, s0);
        const uint32_t a2 = PlanesToBytes<kWb, false>(lo, s1);
        const uint32_t a3 = PlanesToBytes<kWb, false>(hi, s1);
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          if (nt < tiles) {
            MmaU8S8(acc[nt], a0, a1, a2, a3, PlanesToBytes<kAb, true>(act[nt], s0),
                    PlanesToBytes<kAb, true>(act[nt], s1));
          }
        }
      }
    }
    StoreTile(acc, g, t4, mt, p.plan.ts, units[0].slot);
  });
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

// bf16x2 (128 + z, 128 + z): exact for z <= 16 (wb <= 4).
__device__ __forceinline__ uint32_t BiasedZeroPair(int z) {
  return mma::PackBf16(static_cast<float>(128 + z), static_cast<float>(128 + z));
}

// q − z at columns s (low half) and s + 16 (high half), as a bf16 pair (exact: |q − z| <= 256).
// For wb <= 4 the codes go straight into the mantissa of 128 (bf16 0x4300 | q is 128 + q, q <
// 128) and one bf16x2 subtraction of biased_z = BiasedZeroPair(z) leaves q − z, exactly (a small
// integer); wb = 8 converts through fp32.
template <int kWb>
__device__ __forceinline__ uint32_t WeightPair(const uint32_t (&planes)[kWb], int s, int z,
                                               uint32_t biased_z) {
  if constexpr (kWb <= 4) {
    uint32_t r = 0x43004300u;
#pragma unroll
    for (int j = 0; j < kWb; ++j) r |= ((planes[j] >> s) & 0x00010001u) << j;
    __nv_bfloat162 v, b;
    memcpy(&v, &r, sizeof(r));
    memcpy(&b, &biased_z, sizeof(b));
    v = __hsub2(v, b);
    memcpy(&r, &v, sizeof(r));
    return r;
  } else {
    return mma::PackBf16(static_cast<float>(CodeAt<kWb>(planes, s) - z),
                         static_cast<float>(CodeAt<kWb>(planes, s + 16) - z));
  }
}

__device__ __forceinline__ float LoadX(const float* row, int64_t c, int64_t k) {
  return (row != nullptr && c < k) ? __ldg(row + c) : 0.0f;
}

// Per unit: Σ_{k in unit} bf16(x)·(q − z) on the tensor cores (fp32); per k-group the parts are
// added in order to acc_G, then out = fma(acc_G, s_w, out). Padding columns have code 0 but x = 0
// there, so they add nothing.
template <int kWb>
__global__ void __launch_bounds__(kGemmThreads, 2)
    AbqWeightOnlyKernel(AbqDeviceWeights wt, const float* x, int64_t m, float* y, RoundPlan plan) {
  const BlockTile b = MakeBlockTile(16, m);
  const int g = b.g, t4 = b.t4, mt = b.mt;
  const int tiles = (mt + 7) / 8;
  const int64_t words = wt.words, k = wt.k;
  const bool lo_ok = b.o0 + g < wt.n, hi_ok = b.o0 + g + 8 < wt.n;
  const uint32_t* w_lo = lo_ok ? wt.planes + (b.o0 + g) * kWb * words : nullptr;
  const uint32_t* w_hi = hi_ok ? wt.planes + (b.o0 + g + 8) * kWb * words : nullptr;
  const float* x_tok[kTokenTiles];
#pragma unroll
  for (int nt = 0; nt < kTokenTiles; ++nt) {
    x_tok[nt] = nt * 8 + g < mt ? x + (b.t0 + nt * 8 + g) * k : nullptr;
  }
  const int ol = threadIdx.x / mt, tl = threadIdx.x % mt;
  const bool mine = ol < 16 && b.o0 + ol < wt.n;
  float out = 0.0f;
  auto unit = [&](const UnitWork(&units)[1]) {
    const int group = units[0].group, begin = units[0].begin, end = units[0].end;
    if (units[0].slot == nullptr) return;
    const int64_t gi = static_cast<int64_t>(group) * wt.n;
    const int z_lo = lo_ok ? __ldg(wt.zeros + gi + b.o0 + g) : 0;
    const int z_hi = hi_ok ? __ldg(wt.zeros + gi + b.o0 + g + 8) : 0;
    const uint32_t bz_lo = BiasedZeroPair(z_lo), bz_hi = BiasedZeroPair(z_hi);
    float acc[kTokenTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTokenTiles; ++nt) {
      acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    }
    // Steps of 4 words: lane (g, t4) loads word w + t4 only, and the step's 8 mmas μ take the
    // column pairs s = 2μ (a0, b0) and 2μ + 1 (a2, b1) of each lane's word (x is 0 past the
    // unit's end, where the weights are 0 too).
    for (int w = begin; w < end; w += 4) {
      const int word = w + t4;
      const bool in = word < end;
      uint32_t lo[kWb], hi[kWb];
      LoadPlanes<kWb>(lo, in ? w_lo : nullptr, words, word);
      LoadPlanes<kWb>(hi, in ? w_hi : nullptr, words, word);
      const int64_t c = static_cast<int64_t>(word) * 32;
      const int64_t c_end = in ? k : 0;
#pragma unroll
      for (int mu = 0; mu < 8; ++mu) {
        const int s0 = 2 * mu, s1 = s0 + 1;
        const uint32_t a[4] = {
            WeightPair<kWb>(lo, s0, z_lo, bz_lo), WeightPair<kWb>(hi, s0, z_hi, bz_hi),
            WeightPair<kWb>(lo, s1, z_lo, bz_lo), WeightPair<kWb>(hi, s1, z_hi, bz_hi)};
#pragma unroll
        for (int nt = 0; nt < kTokenTiles; ++nt) {
          if (nt < tiles) {
            const float* xr = x_tok[nt];
            mma::Mma(acc[nt], a,
                     mma::PackBf16(LoadX(xr, c + s0, c_end), LoadX(xr, c + s0 + 16, c_end)),
                     mma::PackBf16(LoadX(xr, c + s1, c_end), LoadX(xr, c + s1 + 16, c_end)));
          }
        }
      }
    }
    StoreTile(acc, g, t4, mt, plan.ts, units[0].slot);
  };
  RunRounds<1>(wt, plan, b, 16, nullptr, unit, [&](int, int rg, const RoundShared& sh) {
    if (!mine) return;
    for (int gl = 0; gl < rg; ++gl) {
      float sum = 0.0f;
      for (int part = 0; part < plan.parts; ++part) {
        const float v = __uint_as_float(sh.Slot(plan, gl, part)[ol * plan.ts + tl]);
        sum = part == 0 ? v : __fadd_rn(sum, v);
      }
      out = __fmaf_rn(sum, sh.scales[gl * kTileRows + ol], out);
    }
  });
  if (mine) y[(b.t0 + tl) * wt.n + b.o0 + ol] = out;
}

// ---- Dispatch --------------------------------------------------------------------------------

bool TokenGridOk(int64_t m) { return m >= 1 && (m + kTileTokens - 1) / kTileTokens <= 65535; }

dim3 GemmGrid(int64_t n, int outs, int64_t m) {
  return dim3(static_cast<unsigned>((n + outs - 1) / outs),
              static_cast<unsigned>((m + kTileTokens - 1) / kTileTokens));
}

size_t RoundSharedBytes(const RoundPlan& plan) {
  return static_cast<size_t>(plan.groups) * RoundBytesPerGroup(plan);
}

template <typename Kernel>
cudaError_t LaunchGemmKernel(Kernel kernel, const GemmParams& p, dim3 grid, cudaStream_t stream) {
  return LaunchPdl(kernel, p, grid, kGemmThreads, RoundSharedBytes(p.plan), stream);
}

// The tiled b1 kernel with the fewest n-tiles that hold the block's tokens: 1 (m = 1, or 2 for
// A4), 4 or all of kTileTokens.
template <int kWb, int kAb>
cudaError_t LaunchBinary(const GemmParams& p, cudaStream_t stream) {
  constexpr int kTokensPerTile = 8 / kAb;
  constexpr int kMaxTiles = kTileTokens / kTokensPerTile;
  const int tiles = (p.plan.ts + kTokensPerTile - 1) / kTokensPerTile;
  const dim3 grid = GemmGrid(p.w.n, 16 / kWb, p.m);
  if (tiles <= 1) return LaunchGemmKernel(AbqBinaryGemmKernel<kWb, kAb, 1>, p, grid, stream);
  if (tiles <= 4) return LaunchGemmKernel(AbqBinaryGemmKernel<kWb, kAb, 4>, p, grid, stream);
  return LaunchGemmKernel(AbqBinaryGemmKernel<kWb, kAb, kMaxTiles>, p, grid, stream);
}

static_assert(kAbqDecodeTokens <= kTileTokens, "the decode kernel takes one token tile");

template <int kWb, int kAb>
cudaError_t LaunchGemmFor(AbqMma mma, const GemmParams& p, cudaStream_t stream) {
  if (mma == AbqMma::kBinary && AbqGemvApplies(p.w, p.m, kAb)) {
    return LaunchAbqBinaryGemv(p.w, p.a_planes, p.a_scales, p.a_sums, p.m, kAb, p.y, p.dot, stream);
  }
  if ((mma == AbqMma::kBinary || mma == AbqMma::kBinaryRing) && AbqDecodeApplies(p.w, p.m, kAb)) {
    return LaunchAbqBinaryDecode(p.w, p.a_planes, p.a_scales, p.a_sums, p.m, kAb, p.y, p.dot,
                                 stream);
  }
  if (mma != AbqMma::kInt8) return LaunchBinary<kWb, kAb>(p, stream);
  const dim3 grid = GemmGrid(p.w.n, 16, p.m);
  if (p.plan.ts <= 8) return LaunchGemmKernel(AbqInt8GemmKernel<kWb, kAb, 1>, p, grid, stream);
  return LaunchGemmKernel(AbqInt8GemmKernel<kWb, kAb, kTokenTiles>, p, grid, stream);
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

}  // namespace

cudaError_t LaunchAbqGemm(AbqMma mma, const AbqDeviceWeights& w, const AbqDeviceActivations& a,
                          float* y, int32_t* dot, cudaStream_t stream) {
  if (!AbqWeightsOk(w) || !TokenGridOk(a.m)) return cudaErrorInvalidValue;
  const GemmParams p{w, a.planes, a.scales, a.sums, a.m, y, dot, PlanRounds(w.n_groups, a.m)};
  if (a.act_bits == 4) return LaunchGemmAb<4>(mma, p, stream);
  if (a.act_bits == 8) return LaunchGemmAb<8>(mma, p, stream);
  return cudaErrorInvalidValue;
}

cudaError_t LaunchAbqWeightOnly(const float* x, int64_t m, const AbqDeviceWeights& w, float* y,
                                cudaStream_t stream) {
  if (!AbqWeightsOk(w) || !TokenGridOk(m)) return cudaErrorInvalidValue;
  const dim3 grid = GemmGrid(w.n, 16, m);
  const RoundPlan plan = PlanRounds(w.n_groups, m);
  const size_t shared = RoundSharedBytes(plan);
  switch (w.weight_bits) {
    case 2:
      AbqWeightOnlyKernel<2><<<grid, kGemmThreads, shared, stream>>>(w, x, m, y, plan);
      break;
    case 3:
      AbqWeightOnlyKernel<3><<<grid, kGemmThreads, shared, stream>>>(w, x, m, y, plan);
      break;
    case 4:
      AbqWeightOnlyKernel<4><<<grid, kGemmThreads, shared, stream>>>(w, x, m, y, plan);
      break;
    case 8:
      AbqWeightOnlyKernel<8><<<grid, kGemmThreads, shared, stream>>>(w, x, m, y, plan);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
