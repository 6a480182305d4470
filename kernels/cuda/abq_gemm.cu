// The ABQ GEMM kernels and their dispatch (launchers and contracts in abq_gemm.cuh; spec
// kernels/cpu/abq_ref.h): the tiled b1, decode b1, int8 IMMA and weight-only A16 kernels. The
// activation prologue is abq_prologue.cu, the b1 GEMV kernel abq_gemv.cu. Built with
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

// ---- b1 decode (m <= 16) ---------------------------------------------------------------------
//
// A block of kDecodeWarps warps streams the weights of kDecodeWarps row tiles (16 A rows each:
// 16 / kRowsPerOut outputs × their planes) over all of K, in chunks of kChunkWords words per row,
// through a ring of kStages shared-memory stages filled with cp.async 16-byte copies (4-byte ones
// when a plane row is not 16-byte aligned, words % 4 != 0). A stage holds the chunk of the
// block's 64 weight rows and of the tokens' activation plane rows; all stages but one are in
// flight while the warps multiply the oldest, and the copies of the weights (which do not depend
// on the prologue) are issued before griddepcontrol.wait. s_w, z (the block's outputs) and Σa are
// copied to shared memory once, at the start.
//
// Each warp multiplies its own row tile by the activation columns (as the tiled kernel's
// fragments: A row g / g + 8, B column g, lane t4 holding word 4·step + t4 of the chunk; a k256
// step when the k-groups are whole pairs of k128 steps) and keeps every k-step's counts in a
// separate accumulator slot, so that the slots' reductions are independent. A slot is reduced in
// registers: each count is weighted by its activation plane's sgn_i·2^i and its weight plane's 2^j
// (the lane's row g is plane g % kRowsPerOut, with kRowsPerOut = wb rounded up to a power of two:
// W3 has a zero fourth row per output), then a butterfly over the lanes of one output's rows and
// one token's columns (xor 1, 2 over t4; 4, 8, 16 over g) leaves dot in every one of those lanes.
// The slots are then added in k order into the running group sum, and when a k-group ends the
// lanes run AbqEpilogue's step for it, c_G = dot − z·Σa, S = S + c_G·s_w in fp64: the groups of
// an output are visited in order by one lane, so the result is the reference's bit for bit, with no
// shared-memory epilogue and no atomics. A lane holds two outputs (rows g and g + 8) per n8 tile of
// tokens.

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeRows = kDecodeWarps * 16;   // weight rows of a block (A rows)
constexpr int kChunkWords = 32;                  // words of each row per ring stage (8 k128 steps)
constexpr int kChunkStride = kChunkWords + 4;    // row stride in shared memory (words): the
                                                 // fragment reads (row g, word t4) hit 32 banks
constexpr size_t kDecodeMaxShared = 160 * 1024;  // beyond it LaunchAbqGemm uses the tiled kernel

// Rows per output in the decode kernel's A tile: wb rounded up to a power of two.
constexpr int DecodeRowsPerOut(int wb) { return wb == 3 ? 4 : wb; }

// Ring stages: deeper for one token tile (the weights are nearly all of the bytes), shallower as
// the activation rows of a stage grow.
constexpr int DecodeStages(int tiles) { return tiles == 1 ? 6 : tiles <= 4 ? 4 : 3; }

struct DecodeParams {
  AbqDeviceWeights w;
  const uint32_t* a_planes;
  const float* a_scales;
  const int32_t* a_sums;
  int m;      // tokens, 1 .. kAbqDecodeTokens
  int tiles;  // n8 tiles of activation plane columns: ceil(m·ab / 8)
  float* y;
  int32_t* dot;
};

// Shared bytes: the ring, then s_w and z [n_groups][block outputs], then Σa [m][n_groups].
size_t DecodeSharedBytes(int wb, int tiles, int n_groups, int m) {
  const size_t stage = static_cast<size_t>(kDecodeRows + 8 * tiles) * kChunkStride;
  const size_t block_outs = kDecodeWarps * (16 / DecodeRowsPerOut(wb));
  return 4 * (DecodeStages(tiles) * stage + 2 * block_outs * n_groups +
              static_cast<size_t>(m) * n_groups);
}

// Rows [0, kDecodeRows) of a stage are the block's weight rows, rows kDecodeRows + 8·nt + c the
// activation plane rows of n-tile nt (plane row 8·nt + c of the tokens, zero past the last token).
// Copies of chunk `chunk` of rows [row0, row0 + rows) into `stage`: row_src(r) is the row's
// global start, or null for a row of zeros. Past the last word (and past the last chunk: no-op)
// nothing is read.
// `any` is a valid global address, the operand of the zero-filling copies.
template <typename RowSrc>
__device__ __forceinline__ void CopyChunk(uint32_t* stage, int row0, int rows, int chunk, int words,
                                          const uint32_t* any, RowSrc row_src) {
  const int w0 = chunk * kChunkWords;
  if (w0 >= words) return;
  if (words % 4 == 0) {  // 16-byte aligned rows: 8 copies of 16 bytes per row
    for (int i = threadIdx.x; i < rows * (kChunkWords / 4); i += kDecodeThreads) {
      const int r = row0 + i / (kChunkWords / 4), q = 4 * (i % (kChunkWords / 4));
      const uint32_t* src = row_src(r);
      const bool in = src != nullptr && w0 + q < words;
      mma::CopyAsync16(stage + r * kChunkStride + q, in ? src + w0 + q : any, in ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < rows * kChunkWords; i += kDecodeThreads) {
      const int r = row0 + i / kChunkWords, q = i % kChunkWords;
      const uint32_t* src = row_src(r);
      const bool in = src != nullptr && w0 + q < words;
      CopyAsync4(stage + r * kChunkStride + q, in ? src + w0 + q : any, in ? 4 : 0);
    }
  }
}

template <int kWb, int kAb, int kTiles>
__global__ void __launch_bounds__(kDecodeThreads) AbqBinaryDecodeKernel(DecodeParams p) {
  constexpr int kRpo = DecodeRowsPerOut(kWb);
  constexpr int kOuts = 16 / kRpo;                  // outputs of a warp
  constexpr int kBlockOuts = kDecodeWarps * kOuts;  //
  constexpr int kStages = DecodeStages(kTiles);
  constexpr int kSlots = kTiles == 1 ? 8 : kTiles <= 4 ? 2 : 1;  // k-steps reduced together
  extern __shared__ uint32_t decode_smem[];
  const AbqDeviceWeights& w = p.w;
  const int words = w.words, gw = w.group_words, n_groups = w.n_groups, m = p.m;
  const int tiles = p.tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int stage_words = (kDecodeRows + 8 * tiles) * kChunkStride;
  uint32_t* ring = decode_smem;
  float* s_scales = reinterpret_cast<float*>(ring + kStages * stage_words);
  int32_t* s_zeros = reinterpret_cast<int32_t*>(s_scales + n_groups * kBlockOuts);
  int32_t* s_sums = s_zeros + n_groups * kBlockOuts;
  const int64_t ob = static_cast<int64_t>(blockIdx.x) * kBlockOuts;
  const int chunks = (words + kChunkWords - 1) / kChunkWords;

  // Weight row r of the block: warp r / 16's output r % 16 / kRpo, plane r % kRpo.
  auto weight_src = [&](int r) -> const uint32_t* {
    const int j = r % kRpo;
    const int64_t o = ob + (r / 16) * kOuts + (r % 16) / kRpo;
    return (j < kWb && o < w.n) ? w.planes + (o * kWb + j) * words : nullptr;
  };
  auto act_src = [&](int r) -> const uint32_t* {
    const int pr = r - kDecodeRows;  // plane row of token pr / kAb
    return pr / kAb < m ? p.a_planes + static_cast<int64_t>(pr) * words : nullptr;
  };
  auto copy_weights = [&](int chunk) {
    CopyChunk(ring + (chunk % kStages) * stage_words, 0, kDecodeRows, chunk, words, w.planes,
              weight_src);
  };
  auto copy_acts = [&](int chunk) {
    CopyChunk(ring + (chunk % kStages) * stage_words, kDecodeRows, 8 * tiles, chunk, words,
              w.planes, act_src);
  };

  // Before the prologue is known to be done: s_w, z and the first stages' weights.
  for (int i = threadIdx.x; i < n_groups * kBlockOuts; i += kDecodeThreads) {
    const int64_t o = ob + i % kBlockOuts, gi = static_cast<int64_t>(i / kBlockOuts) * w.n + o;
    const bool in = o < w.n;
    CopyAsync4(s_scales + i, in ? w.scales + gi : w.scales, in ? 4 : 0);
    CopyAsync4(s_zeros + i, in ? w.zeros + gi : w.zeros, in ? 4 : 0);
  }
  for (int c = 0; c < kStages - 1; ++c) {
    copy_weights(c);
    mma::CopyAsyncCommit();
  }
  // Launched programmatically after the prologue (LaunchPdl): everything below may read its
  // outputs. A no-op for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  for (int i = threadIdx.x; i < m * n_groups; i += kDecodeThreads)
    CopyAsync4(s_sums + i, p.a_sums + i);
  for (int c = 0; c < kStages - 1; ++c) copy_acts(c);
  mma::CopyAsyncCommit();

  // Per lane: plane weights of its two columns (ActPlaneWeight, times 2^j of its row's weight
  // plane j = g % kRpo; rows g and g + 8 have the same j), the running sums of the current
  // k-group for rows g and g + 8's outputs, and their fp64 accumulators, per n-tile.
  const uint32_t wt0 = ActPlaneWeight<kAb>((2 * t4) % kAb) << (g % kRpo);
  const uint32_t wt1 = ActPlaneWeight<kAb>((2 * t4 + 1) % kAb) << (g % kRpo);
  const int ol_lo = warp * kOuts + g / kRpo, ol_hi = ol_lo + 8 / kRpo;  // block-local outputs
  uint32_t dot_lo[kTiles], dot_hi[kTiles];
  double out_lo[kTiles], out_hi[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    dot_lo[nt] = dot_hi[nt] = 0;
    out_lo[nt] = out_hi[nt] = 0.0;
  }
  // Token of the lane's columns in n-tile nt (for ab = 4, columns 4..7 are the second token).
  auto token = [&](int nt) { return kAb == 8 ? nt : 2 * nt + (t4 >> 1); };
  // The epilogue step of k-group `group` for both outputs of every n-tile.
  auto end_group = [&](int group) {
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      if (nt < tiles) {
        const int t = token(nt), ts = min(t, m - 1);  // ts: a token whose Σa is in shared memory
        const uint32_t sa = static_cast<uint32_t>(s_sums[ts * n_groups + group]);
        const int gi = group * kBlockOuts;
        const int32_t c_lo =
            static_cast<int32_t>(dot_lo[nt] - static_cast<uint32_t>(s_zeros[gi + ol_lo]) * sa);
        const int32_t c_hi =
            static_cast<int32_t>(dot_hi[nt] - static_cast<uint32_t>(s_zeros[gi + ol_hi]) * sa);
        out_lo[nt] = __dadd_rn(out_lo[nt], __dmul_rn(static_cast<double>(c_lo),
                                                     static_cast<double>(s_scales[gi + ol_lo])));
        out_hi[nt] = __dadd_rn(out_hi[nt], __dmul_rn(static_cast<double>(c_hi),
                                                     static_cast<double>(s_scales[gi + ol_hi])));
        const bool writer = g % kRpo == 0 && (kAb == 8 ? t4 == 0 : (t4 & 1) == 0) && t < m;
        if (p.dot != nullptr && writer) {
          const int64_t o_lo = ob + ol_lo, o_hi = ob + ol_hi;
          if (o_lo < w.n)
            p.dot[(t * w.n + o_lo) * n_groups + group] = static_cast<int32_t>(dot_lo[nt]);
          if (o_hi < w.n)
            p.dot[(t * w.n + o_hi) * n_groups + group] = static_cast<int32_t>(dot_hi[nt]);
        }
        dot_lo[nt] = dot_hi[nt] = 0;
      }
    }
  };

  // k256 steps when every k-group is whole pairs of k128 steps (or there is one group).
  const bool pair = n_groups == 1 || gw % 8 == 0;
  const int step_words = pair ? 8 : 4, steps = kChunkWords / step_words;
  int group = 0, group_end = min(gw, words);
  const uint32_t* a_lo_base = ring + (warp * 16 + g) * kChunkStride + t4;
  const uint32_t* b_base = ring + (kDecodeRows + g) * kChunkStride + t4;
  for (int c = 0; c < chunks; ++c) {
    if (c == 0) {
      mma::CopyAsyncWait<0>();
    } else {
      mma::CopyAsyncWait<kStages - 2>();
    }
    __syncthreads();  // chunk c is visible to every warp, and chunk c − 1's stage is free
    copy_weights(c + kStages - 1);
    copy_acts(c + kStages - 1);
    mma::CopyAsyncCommit();
    const int stage = (c % kStages) * stage_words;
    const uint32_t* a_lo = a_lo_base + stage;
    const uint32_t* bp = b_base + stage;
    for (int s0 = 0; s0 < steps; s0 += kSlots) {
      int acc[kSlots][kTiles][4];
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          acc[i][nt][0] = acc[i][nt][1] = acc[i][nt][2] = acc[i][nt][3] = 0;
        }
        const int s = s0 + i, word = c * kChunkWords + s * step_words;
        if (s < steps && word < words) {
          const int off = s * step_words;
          const uint32_t a0 = a_lo[off], a1 = a_lo[off + 8 * kChunkStride];
          if (pair) {
            const uint32_t a2 = a_lo[off + 4], a3 = a_lo[off + 4 + 8 * kChunkStride];
#pragma unroll
            for (int nt = 0; nt < kTiles; ++nt) {
              const uint32_t* b = bp + nt * 8 * kChunkStride + off;
              if (nt < tiles) MmaB1K256(acc[i][nt], a0, a1, a2, a3, b[0], b[4]);
            }
          } else {
#pragma unroll
            for (int nt = 0; nt < kTiles; ++nt) {
              const uint32_t* b = bp + nt * 8 * kChunkStride + off;
              if (nt < tiles) MmaB1K128(acc[i][nt], a0, a1, b[0]);
            }
          }
        }
      }
      // The slots' reductions (independent of each other), then their sums in k order. k256
      // steps fill only the lower half of 8 slots.
      uint32_t v_lo[kSlots][kTiles], v_hi[kSlots][kTiles];
      auto reduce = [&](int i) {
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          uint32_t lo = static_cast<uint32_t>(acc[i][nt][0]) * wt0 +
                        static_cast<uint32_t>(acc[i][nt][1]) * wt1;
          uint32_t hi = static_cast<uint32_t>(acc[i][nt][2]) * wt0 +
                        static_cast<uint32_t>(acc[i][nt][3]) * wt1;
#pragma unroll
          for (int x = 1; x < 4 * kRpo; x <<= 1) {
            if (x == 2 && kAb == 4) continue;  // t4 bit 1 selects the token, not a plane
            lo += __shfl_xor_sync(kFull, lo, x);
            hi += __shfl_xor_sync(kFull, hi, x);
          }
          v_lo[i][nt] = lo;
          v_hi[i][nt] = hi;
        }
      };
#pragma unroll
      for (int i = 0; i < (kSlots + 1) / 2; ++i) reduce(i);
      if (s0 + kSlots / 2 < steps) {
#pragma unroll
        for (int i = (kSlots + 1) / 2; i < kSlots; ++i) reduce(i);
      }
#pragma unroll
      for (int i = 0; i < kSlots; ++i) {
        const int s = s0 + i, word = c * kChunkWords + s * step_words;
        if (s < steps && word < words) {
#pragma unroll
          for (int nt = 0; nt < kTiles; ++nt) {
            dot_lo[nt] += v_lo[i][nt];
            dot_hi[nt] += v_hi[i][nt];
          }
          if (word + step_words >= group_end) {
            end_group(group);
            ++group;
            group_end = min(group_end + gw, words);
          }
        }
      }
    }
  }
  mma::CopyAsyncWait<0>();  // the ring's last (empty) groups
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int t = token(nt);
    const bool writer = g % kRpo == 0 && (kAb == 8 ? t4 == 0 : (t4 & 1) == 0) && t < m;
    if (nt < tiles && writer) {
      const double sa = p.a_scales[t];
      const int64_t o_lo = ob + ol_lo, o_hi = ob + ol_hi;
      if (o_lo < w.n) p.y[t * w.n + o_lo] = __double2float_rn(__dmul_rn(sa, out_lo[nt]));
      if (o_hi < w.n) p.y[t * w.n + o_hi] = __double2float_rn(__dmul_rn(sa, out_hi[nt]));
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

// n8 tiles of activation plane columns of m tokens (m·ab / 8, rounded up).
int DecodeTiles(int64_t m, int ab) { return static_cast<int>((m * ab + 7) / 8); }

// Whether the decode kernel takes the GEMM: m <= kAbqDecodeTokens, k-groups of whole k128 steps (or
// one group), and its shared memory within kDecodeMaxShared (s_w and z of every k-group stay
// there: at most ~400 groups at W2 m = 1).
static_assert(kAbqDecodeTokens <= kTileTokens, "the decode kernel takes one token tile");
bool DecodeApplies(const AbqDeviceWeights& w, int64_t m, int ab) {
  return m <= kAbqDecodeTokens && (w.n_groups == 1 || w.group_words % 4 == 0) &&
         DecodeSharedBytes(w.weight_bits, DecodeTiles(m, ab), w.n_groups, static_cast<int>(m)) <=
             kDecodeMaxShared;
}

// The decode kernel with kTiles n-tiles (DecodeStages(kTiles) equals DecodeStages(p.tiles) for
// every p.tiles that LaunchBinaryDecode maps to kTiles). Its shared memory may exceed the 48 KiB
// default: the limit is raised to kDecodeMaxShared once per device.
template <int kWb, int kAb, int kTiles>
cudaError_t LaunchDecodeKernel(const DecodeParams& p, cudaStream_t stream) {
  static std::atomic<uint64_t> raised{0};
  const auto kernel = AbqBinaryDecodeKernel<kWb, kAb, kTiles>;
  const size_t shared = DecodeSharedBytes(kWb, p.tiles, p.w.n_groups, p.m);
  const cudaError_t err = RaiseSharedLimit(kernel, shared, kDecodeMaxShared, raised);
  if (err != cudaSuccess) return err;
  constexpr int kBlockOuts = kDecodeWarps * (16 / DecodeRowsPerOut(kWb));
  const dim3 grid(static_cast<unsigned>((p.w.n + kBlockOuts - 1) / kBlockOuts));
  return LaunchPdl(kernel, p, grid, kDecodeThreads, shared, stream);
}

template <int kWb, int kAb>
cudaError_t LaunchBinaryDecode(const GemmParams& p, cudaStream_t stream) {
  constexpr int kMaxTiles = kAbqDecodeTokens * kAb / 8;
  const DecodeParams d{
      p.w, p.a_planes, p.a_scales, p.a_sums, static_cast<int>(p.m), DecodeTiles(p.m, kAb),
      p.y, p.dot};
  if (d.tiles <= 1) return LaunchDecodeKernel<kWb, kAb, 1>(d, stream);
  if (d.tiles <= 4) return LaunchDecodeKernel<kWb, kAb, 4>(d, stream);
  return LaunchDecodeKernel<kWb, kAb, kMaxTiles>(d, stream);
}

template <int kWb, int kAb>
cudaError_t LaunchGemmFor(AbqMma mma, const GemmParams& p, cudaStream_t stream) {
  if (mma == AbqMma::kBinary && AbqGemvApplies(p.w, p.m, kAb)) {
    return LaunchAbqBinaryGemv(p.w, p.a_planes, p.a_scales, p.a_sums, p.m, kAb, p.y, p.dot, stream);
  }
  if ((mma == AbqMma::kBinary || mma == AbqMma::kBinaryRing) && DecodeApplies(p.w, p.m, kAb)) {
    return LaunchBinaryDecode<kWb, kAb>(p, stream);
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
