// The one-token ABQ layer on the CUDA cores: weight codes unpacked by masks in place, dp4a against
// the int8 activation codes, made by a kernel of a few blocks launched just before (launchers in
// abq_gemm.cuh; spec kernels/cpu/abq_ref.h). Its integer sums are AbqIntegerGemm's and its outputs
// AbqGemm(AbqQuantizeActivations(x), w)'s bit for bit (cuda_abq_test's Dp4aKernelEqualsReference).
// Built with -fmad=false; the epilogue spells its arithmetic with __dadd_rn / __dmul_rn /
// __double2float_rn, so it performs AbqEpilogue's operations and no others.
//
// Why a third kernel: at m = 1 the layer is its weights' bytes (W2 4096 × 11008: 11.3 MB, 2.4 µs
// at 4.8 TB/s), and the b1 kernels reach 22–45% of that bandwidth (docs/BENCHMARKS.md,
// 2026-12-05): their weights go through shared memory in mma fragment order and the GEMV's path a
// warp is long. Here every lane loads its weights straight into registers in 16-byte coalesced
// pieces, and the layer's first bytes are requested before anything else (an L2 prefetch), so
// that the memory system holds as many bytes in flight as it can; the arithmetic (a byte mask and a
// dp4a per four weights) is meant to stay below the memory time. This is not the b1 path of the
// paper: it is the comparison the issue asks for beside it ("unpack to int8"), on dp4a rather than
// the IMMA, and it is reported as its own row ("dp4a") and chosen only by name
// (CudaAbqLinear::B1Kernel::kDp4a).
//
// Layouts:
//   - Units (made once from the planes by LaunchAbqRepackDigits): a row's K columns are units of
//     128, U = ceil(K / 128), in unit blocks of 32 (a step: one unit a lane). A code takes sb bits:
//     2 (W2), 4 (W3, the balanced grid, W4) or 8 (W8), so a unit is sb pieces of 16 bytes, and row
//     o is [ceil(U / 32)][sb][32 lanes] pieces: one 512-byte coalesced load a piece of a step.
//     Word q of a unit holds, at sb = 2, column 16q + 4j + b at bits [8b + 2j, 8b + 2j + 2); at
//     sb = 4, column 8q + b in byte b's low nibble and 8q + 4 + b in its high one; at sb = 8,
//     column 4q + b in byte b. So `word & mask` (0x03030303 << 2j; 0x0f0f0f0f, 0xf0f0f0f0; none)
//     leaves four codes in place, one a byte, times 4^j or 16, against four consecutive
//     activation bytes: one mask and one dp4a per four weights at every width, and the sum of
//     one mask's dp4a shifted right by 2j or 4 at the end (exact: a multiple of it).
//   - Activation codes in shared memory, one byte each in column order, zero past K: piece q of
//     unit u (columns 128u + 16q .. + 15) at piece 8u + (q ^ (u & 7)), so that the 8 lanes of a
//     quarter warp, reading piece q of 8 consecutive units, hit 32 distinct banks.
//
// Shape of the kernel:
//   - One block an SM (beside an activation kernel, on the SMs its blocks leave free): 32 warps
//     of up to 64 registers at W2 and sb = 4, 16 of up to 128 at W8 (GemvShapeOf). A warp a row
//     at a time: warp v of the grid takes rows v, v + warps, ...; its steps are its rows' unit
//     blocks in order. Each lane keeps a ring of the next few steps' pieces in registers (2 steps
//     at W2, 1 at sb = 4, 2 at W8) with their meta words, fills the whole ring before
//     griddepcontrol.wait (after the codes where it codes the token itself, below; programmatic
//     launch: the activation kernel before it may still run, and it lets this kernel start before
//     it has itself waited for the kernels before it, which may still be writing x but must not
//     write the weights), and refills a slot with the step a ring ahead as soon as the slot's
//     arithmetic has read it. Before its ring, each warp asks the bulk copy engine to prefetch its
//     first rows into L2 (cp.async.bulk.prefetch, up to kPrefetchBytes of the layer in all), so
//     that the layer's first bytes stream at once.
//   - Where x is at most a code word a GEMV thread (K <= 4096 at W2, W3 and W4), every GEMV block
//     codes the token itself after griddepcontrol.wait (one word a thread, the maximum by a block
//     reduction, the same codes, Σa and s_a as below), then fills its ring: no activation kernel,
//     and the GEMV on every SM. Otherwise the token's codes come from the activation kernel
//     (AbqDp4aActivationsKernel, the stream's previous launch; one block at K <= 4096 or per
//     channel, else up to kActBlocks, each coding a slice of whole k-groups after the maximum over
//     all of x): the maximum over x by a block reduction, s_a = max / qmax, the codes as
//     AbqQuantizeActivations (IEEE division, RoundHalfEven, the clamp that maps NaN to −qmax), Σa
//     per k-group (integer atomics: exact in any order), into a scratch buffer. It triggers this
//     kernel's launch first thing, so the weights stream while it runs; after griddepcontrol.wait
//     every block copies the codes and Σa into shared memory.
//   - A lane's unit gives the integer dots of its two 64-column halves (int32, wrapping:
//     AbqIntegerGemm's sums modulo 2^32, exact within ValidateAbqShape's bounds). A k-group is
//     half a unit (g64), one unit, or 2^s units of consecutive lanes of one step (g = 128·2^s up to
//     2048: s shuffles); the lane that holds a group's dot forms c_G = dot − z·Σa and c_G·s_w in
//     fp64 (exact with fp16 scales), adds it into its partial sum and keeps it in the warp's
//     shared products. At the row's end, where every addition of the products is exact
//     (abq_fused::OrderFree) the lanes' sums and a butterfly give AbqEpilogue's chain's bits;
//     otherwise lane 0 runs the chain in group order. One group (per channel): the lanes' dots,
//     a warp reduction, lane 0's epilogue. y = float(s_a·S), one lane.
// History (docs/BENCHMARKS.md): the first form of this kernel (2026-12-05/06) held 2-bit digits
// of every code (two dp4a a weight at W4, four at W8) in chunks of 64 columns spread over a
// warp's lanes, so every k-group's dot took shuffles and a trip through shared memory, and the
// products were formed after the row's chunks: profiled at 1,542 warp instructions a warp-row for
// W2A8 at K = 11,008 (216 of them the dp4a arithmetic), an issue-bound kernel after the weights'
// stream. Here a lane owns whole units, so its groups' dots and products stay in its registers.
// s_w and z come as one word each from `meta_rows` ([n][n_groups], z << 16 | the fp16 bits of
// s_w) where every scale is an fp16 value, else from `scales` and `zeros` ([n_groups][n]).
// Applies to m = 1, activation bits 4 and 8, weight bits 2, 3, 4 and 8, K a multiple of 64, one
// k-group or groups of 64·2^i columns up to 2048, and shared memory within kMaxShared
// (AbqDp4aGemvApplies).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>

#include "kernels/abq_fused_plan.h"
#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
// The activation kernel's blocks at most: few, as the GEMV runs on the SMs they leave free.
constexpr int kActBlocks = 4;
// float4s of x a thread of the activation kernel holds from its one pass over x: K up to 32,768
// in registers, the rest loaded again for the coding.
constexpr int kXLoads = 8;
// The activation kernel's block.
constexpr int kWarps = 32;
constexpr int kThreads = kWarps * 32;
// The GEMV's shape for a store width (below): warps a block (one block an SM) and steps in a
// lane's ring (registers: ring · pieces · 4 words). W2 and sb = 4 at 32 warps of up to 64
// registers (rings of 2 and 1 steps: 4 pieces a lane in flight), W8 at 16 warps of up to 128
// (2 steps, 16 pieces; at 32 warps one step spilled). With the L2 prefetch below, 32 warps beat
// 16 (rings of 6 and 4) at W2 everywhere and at sb = 4 but for 8192 × 28672 (+5% and, in a second
// call, +5 to +11%); two blocks an SM (the next layer's GEMV starting beside this one) lost
// (docs/BENCHMARKS.md, 2026-12-06).
struct GemvShape {
  int warps, ring;
};
__host__ __device__ constexpr GemvShape GemvShapeOf(int sb) {
  return sb == 2 ? GemvShape{32, 2} : sb == 4 ? GemvShape{32, 1} : GemvShape{16, 2};
}
// Bytes of a layer's weights the GEMV prefetches into L2 at its start (its warps' first rows); the
// rest streams through the rings. The whole layer where it passes about half the L2 (50 MB)
// evicts what it brought in before its use (W8A8 8192 × 28672: +26%, docs/BENCHMARKS.md).
constexpr int64_t kPrefetchBytes = int64_t{24} << 20;
constexpr size_t kMaxShared = 200 * 1024;

// Bits a code takes in the unit layout: 2 (W2), 4 (W3, the balanced grid and W4) or 8; a unit of
// 128 columns is then that many 16-byte pieces.
__host__ __device__ constexpr int StoreBitsOf(int wb) { return wb <= 2 ? 2 : wb <= 4 ? 4 : 8; }

struct Dp4aParams {
  AbqDeviceWeights w;
  const float* x;
  float* y;
  int32_t* dot;
  // The token's codes (K bytes, column order), Σa per k-group and s_a, written by the activation
  // kernel (AbqDp4aActivationsKernel) and read by the GEMV after griddepcontrol.wait.
  uint32_t* act_codes;
  int32_t* act_sums;
  float* act_scale;
  int64_t prefetch_rows;  // rows [0, prefetch_rows) go into L2 at the GEMV's start
  int chunks;             // K / 64
  int group_chunks;       // chunks a k-group (L, a power of two), 0 for one group
  int group_shift;        // log2(L)
  int act_blocks;         // blocks of the activation kernel
  int act_slice;          // code words (float4s of x) a block of it codes: whole k-groups
  float act_qmax;         // 2^(activation bits − 1) − 1
  bool self_code;         // the GEMV codes the token itself (AbqDp4aGemvKernel's kSelf)
  int units;              // ceil(K / 128)
  int unit_blocks;        // ceil(units / 32): a row's steps
  int group_mode;  // 0: one group; 1: two groups a unit (g64); 2: a group of 2^unit_shift units
  int unit_shift;
};

// The GEMV's shared memory: the token's codes [units·128] bytes (swizzled pieces, zero past K),
// Σa [n_groups], then per warp its row's k-group products [n_groups] (fp64).
struct UnitLayout {
  size_t sums_off = 0, prod_off = 0, bytes = 0;
};
__host__ __device__ inline UnitLayout UnitLayoutOf(int units, int n_groups, int warps) {
  UnitLayout l;
  l.sums_off = static_cast<size_t>(units) * 128;
  l.prod_off = (l.sums_off + 4 * static_cast<size_t>(n_groups) + 15) / 16 * 16;
  l.bytes = l.prod_off + 8 * static_cast<size_t>(n_groups) * warps;
  return l;
}

__device__ __forceinline__ int32_t Quantize(float x, float s_a, float qmax) {
  if (s_a == 0.0f) return 0;
  return static_cast<int32_t>(fminf(fmaxf(RoundHalfEven(x / s_a), -qmax), qmax));
}

// The code word of four consecutive activations v (columns 4u .. 4u + 3: one code a byte, in
// column order) as AbqQuantizeActivations codes them, and their sum in `sum`.
__device__ __forceinline__ uint32_t CodeWord(float4 v, float s_a, float qmax, int32_t& sum) {
  const int32_t c0 = Quantize(v.x, s_a, qmax), c1 = Quantize(v.y, s_a, qmax);
  const int32_t c2 = Quantize(v.z, s_a, qmax), c3 = Quantize(v.w, s_a, qmax);
  const uint32_t word =
      (static_cast<uint32_t>(c0) & 0xffu) | ((static_cast<uint32_t>(c1) & 0xffu) << 8) |
      ((static_cast<uint32_t>(c2) & 0xffu) << 16) | (static_cast<uint32_t>(c3) << 24);
  sum = c0 + c1 + c2 + c3;
  return word;
}

// The token's activation codes, once for the layer, by p.act_blocks blocks (kActBlocks at most,
// few enough to stay resident beside the GEMV's one block an SM): every block takes the maximum
// over all of x by a block reduction (the same value in every block, no exchange), s_a = max /
// qmax, and codes its slice of p.act_slice code words (whole k-groups) as AbqQuantizeActivations
// (IEEE division, RoundHalfEven, the clamp that maps NaN to −qmax) into act_codes in column order,
// four a word, with Σa of its k-groups (integer atomics: exact in any order). Per channel (one
// k-group), or where x is at most a code word a thread (K <= 4096), one block codes everything.
// Several blocks hold x in registers from their one pass over it. It lets the GEMV launch at once
// (griddepcontrol.launch_dependents), so that the GEMV's weights stream while it runs, and waits
// for the kernel before it (which may write x) before reading x.
template <int kAb>
__global__ void __launch_bounds__(kThreads) AbqDp4aActivationsKernel(Dp4aParams p) {
  constexpr float kQmax = static_cast<float>((1 << (kAb - 1)) - 1);
  extern __shared__ __align__(16) unsigned char dp4a_smem[];
  __shared__ float scratch[32];
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  const int n_groups = p.w.n_groups, L = p.group_chunks;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int32_t* s_sums = reinterpret_cast<int32_t*>(dp4a_smem);
  for (int i = threadIdx.x; i < n_groups; i += kThreads) s_sums[i] = 0;
  const float4* x4 = reinterpret_cast<const float4*>(p.x);
  const int quads = p.chunks * 16;  // float4s of x, one code word each
  const int u0 = blockIdx.x * p.act_slice, u1 = min(quads, u0 + p.act_slice);
  // With several blocks, all of x in one pass, every load issued before any use (one memory
  // latency), starting at this block's slice: thread t's load h is code word u0 + t + h·kThreads
  // (wrapping past the end), so that its words of the slice stay in registers for the coding.
  // One block loads x again for the coding instead (measured faster at K = 4096 than holding it,
  // docs/BENCHMARKS.md 2026-12-06, not understood).
  const bool hold = p.act_blocks > 1;
  float4 held[kXLoads];
  float amax = 0.0f;
  if (hold) {
#pragma unroll
    for (int h = 0; h < kXLoads; ++h) {
      const int i = static_cast<int>(threadIdx.x) + h * kThreads;
      const int u = u0 + i < quads ? u0 + i : u0 + i - quads;
      held[h] = i < quads ? x4[u] : float4{0.0f, 0.0f, 0.0f, 0.0f};
    }
#pragma unroll
    for (int h = 0; h < kXLoads; ++h) {
      const float4 v = held[h];
      amax = fmaxf(fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
    }
  }
  for (int i = threadIdx.x + (hold ? kXLoads * kThreads : 0); i < quads; i += kThreads) {
    const float4 v = x4[u0 + i < quads ? u0 + i : u0 + i - quads];
    amax = fmaxf(fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
  }
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);  // ends with a barrier: s_sums zeroed
  const float s_a = amax / kQmax;
  // Code word base + lane (base warp-uniform: the shuffles take the whole warp) from v, and add
  // its k-group's Σa.
  auto code = [&](int base, float4 v) {
    const int u = base + lane;  // code word u: columns 4u .. 4u + 3
    int32_t sum = 0;
    if (u < u1) p.act_codes[u] = CodeWord(v, s_a, kQmax, sum);
    // 32 code words are 128 columns (two chunks): one k-group unless L = 1 (halves).
    const int top = L == 1 ? 8 : 16;
    for (int off = top; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    if (u < u1 && (lane == 0 || (L == 1 && lane == 16))) {
      atomicAdd(&s_sums[L == 0 ? 0 : (u >> 4) >> p.group_shift], sum);
    }
  };
  if (hold) {
#pragma unroll
    for (int h = 0; h < kXLoads; ++h) {
      const int base = u0 + warp * 32 + h * kThreads;
      if (base < u1) code(base, held[h]);
    }
  }
  for (int base = u0 + warp * 32 + (hold ? kXLoads * kThreads : 0); base < u1; base += kThreads) {
    code(base, base + lane < u1 ? x4[base + lane] : float4{0.0f, 0.0f, 0.0f, 0.0f});
  }
  __syncthreads();
  // This block's k-groups (its slice holds whole ones; all of them with one group).
  const int g0 = L == 0 ? 0 : (u0 >> 4) >> p.group_shift;
  const int g1 = L == 0 ? n_groups : (((u1 - 1) >> 4) >> p.group_shift) + 1;
  for (int i = g0 + threadIdx.x; i < g1; i += kThreads) p.act_sums[i] = s_sums[i];
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.act_scale = s_a;
}

// acc + Σ_b a_b·b_b over the four bytes, a's unsigned and b's signed (dp4a.u32.s32).
__device__ __forceinline__ int Dp4aUs(uint32_t a, uint32_t b, int acc) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(acc));
  return d;
}

__device__ __forceinline__ uint32_t WordOf(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// A unit's integer dots over its two halves (columns [0, 64) and [64, 128) of the unit): its
// weight codes `wp` (kSB pieces of 16 bytes, the unit layout) against the activation codes
// act(q), q = 0..7 (16 bytes each: columns 16q .. 16q + 15 of the unit). Every sum is exact
// (|half| <= 64·255·127).
template <int kSB, typename Act>
__device__ __forceinline__ void UnitDots(const uint4 (&wp)[kSB], Act act, int32_t& lo,
                                         int32_t& hi) {
  if constexpr (kSB == 2) {
    // Word q (0..7) holds columns 16q + 4j + b at bits [8b + 2j, 8b + 2j + 2): masked in place
    // (digit j of every byte times 4^j, an unsigned byte), against activation word j of piece q;
    // one accumulator a j, so acc_j >> 2j is the sum a shift of every word would give.
    int acc[2][4] = {};
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const uint4 a = act(q);
      const uint32_t word = WordOf(wp[q / 4], q % 4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[q / 4][j] = Dp4aUs(word & (0x03030303u << (2 * j)), WordOf(a, j), acc[q / 4][j]);
      }
    }
    lo = acc[0][0] + (acc[0][1] >> 2) + (acc[0][2] >> 4) + (acc[0][3] >> 6);
    hi = acc[1][0] + (acc[1][1] >> 2) + (acc[1][2] >> 4) + (acc[1][3] >> 6);
  } else if constexpr (kSB == 4) {
    // Word q (0..15): byte b's low nibble is column 8q + b, its high nibble column 8q + 4 + b
    // (masked in place: times 16).
    int acc[2][2] = {};
#pragma unroll
    for (int q2 = 0; q2 < 8; ++q2) {
      const uint4 a = act(q2);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int q = 2 * q2 + h;
        const uint32_t word = WordOf(wp[q / 4], q % 4);
        acc[q2 / 4][0] = Dp4aUs(word & 0x0f0f0f0fu, WordOf(a, 2 * h), acc[q2 / 4][0]);
        acc[q2 / 4][1] = Dp4aUs(word & 0xf0f0f0f0u, WordOf(a, 2 * h + 1), acc[q2 / 4][1]);
      }
    }
    lo = acc[0][0] + (acc[0][1] >> 4);
    hi = acc[1][0] + (acc[1][1] >> 4);
  } else {
    // Word q (0..31): byte b is column 4q + b.
    int acc[2][2] = {};
#pragma unroll
    for (int q4 = 0; q4 < 8; ++q4) {
      const uint4 a = act(q4);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        acc[q4 / 4][j & 1] = Dp4aUs(WordOf(wp[q4], j), WordOf(a, j), acc[q4 / 4][j & 1]);
      }
    }
    lo = acc[0][0] + acc[0][1];
    hi = acc[1][0] + acc[1][1];
  }
}

// kMode: 0 one k-group (per channel), 1 two groups a unit (g64), 2 a group of 2^unit_shift units.
// kSelf: the block codes the token itself (at most a code word a thread; no activation kernel).
template <int kSB, int kMode, bool kSelf>
__global__ void __launch_bounds__(GemvShapeOf(kSB).warps * 32, 1) AbqDp4aGemvKernel(Dp4aParams p) {
  constexpr int kGemvWarps = GemvShapeOf(kSB).warps, kGemvThreads = kGemvWarps * 32;
  constexpr int kRing = GemvShapeOf(kSB).ring;
  constexpr int kStep = kSB * 32;  // pieces of a step
  extern __shared__ __align__(16) unsigned char dp4a_smem[];
  const AbqDeviceWeights& w = p.w;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int units = p.units, unit_blocks = p.unit_blocks, n_groups = w.n_groups;
  const int lshift = p.unit_shift;
  const int64_t n = w.n;
  const bool meta = w.meta_rows != nullptr;
  const UnitLayout sl = UnitLayoutOf(units, n_groups, kGemvWarps);
  uint4* s_act = reinterpret_cast<uint4*>(dp4a_smem);
  int32_t* s_sums = reinterpret_cast<int32_t*>(dp4a_smem + sl.sums_off);
  double* s_prod = reinterpret_cast<double*>(dp4a_smem + sl.prod_off) + warp * n_groups;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kGemvWarps;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;

  // A step is one unit block (32 units, one a lane) of one row; the warp's steps are its rows
  // first, first + stride, ..., each unit_blocks steps. The ring holds the next kRing steps'
  // weights (and meta words): a slot is refilled with the step kRing ahead as soon as its
  // arithmetic has read it. The load cursor: row lo, unit block lub, its pieces at src and the
  // row's meta words at msrc.
  uint4 ring[kRing][kSB];
  uint2 ring_meta[kRing];
  int64_t lo = first;
  int lub = 0;
  const uint4* src = reinterpret_cast<const uint4*>(w.digits) + first * unit_blocks * kStep + lane;
  const int64_t row_skip = (stride - 1) * unit_blocks * kStep;  // past the other warps' rows
  const unsigned int* msrc = meta ? w.meta_rows + first * n_groups : nullptr;
  auto load = [&](uint4(&dst)[kSB], uint2& m) {
    const int u = lub * 32 + lane;
    m = uint2{0, 0};
    if (lo < n && u < units) {
#pragma unroll
      for (int i = 0; i < kSB; ++i) dst[i] = __ldcs(src + i * 32);
      if (kMode != 0 && meta) {
        if (kMode == 1) {
          m.x = __ldcs(msrc + 2 * u);
          if (2 * u + 1 < n_groups) m.y = __ldcs(msrc + 2 * u + 1);
        } else {
          m.x = __ldcs(msrc + (u >> lshift));
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kSB; ++i) dst[i] = uint4{0, 0, 0, 0};
    }
    src += kStep;
    if (++lub == unit_blocks) {
      lub = 0;
      lo += stride;
      src += row_skip;
      if (meta) msrc += stride * n_groups;
    }
  };

  // 1. Before anything that depends on the kernels before this one: the warp's first rows into L2
  // by the bulk copy engine (lane 0: a row's steps but the last; lane 1 + i: piece i of the last
  // step's units, none of its padding), so that those bytes are all requested at once, where the
  // rings alone keep 4 to 16 pieces a lane in flight; then the first kRing steps.
  if (lane < kSB + 1) {
    const uint4* base = reinterpret_cast<const uint4*>(w.digits);
    const int last = units - 32 * (unit_blocks - 1);  // units of the last step
    for (int64_t o = first; o < p.prefetch_rows; o += stride) {
      const uint4* row = base + o * unit_blocks * kStep;
      const uint4* at = lane == 0 ? row : row + (unit_blocks - 1) * kStep + (lane - 1) * 32;
      const uint32_t bytes = lane == 0 ? static_cast<uint32_t>(unit_blocks - 1) * kStep * 16
                                       : static_cast<uint32_t>(last) * 16;
      if (bytes > 0) {
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(at), "r"(bytes) : "memory");
      }
    }
  }
  if constexpr (!kSelf) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) load(ring[s], ring_meta[s]);
  }
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  double s_a64;
  if constexpr (kSelf) {
    // 2. The token's codes, made by this block from x as AbqDp4aActivationsKernel makes them (the
    // same maximum, s_a, codes and Σa, bit for bit), one code word a thread: the maximum over x
    // by a block reduction, then code word t (columns 4t .. 4t + 3) into word t & 3 of piece
    // 8·u + (q ^ (u & 7)) of unit u = t / 32 (q = (t / 4) % 8), zero past K, and Σa per k-group
    // by shared atomics; then the ring, so that x's loads are not queued behind the weights'.
    __shared__ float red[32];
    const int quads = p.chunks * 16;
    const int tid = static_cast<int>(threadIdx.x);
    for (int i = tid; i < n_groups; i += kGemvThreads) s_sums[i] = 0;
    const float4 v =
        tid < quads ? reinterpret_cast<const float4*>(p.x)[tid] : float4{0.0f, 0.0f, 0.0f, 0.0f};
    float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
    amax = BlockReduce(amax, MaxOp(), 0.0f, red);  // ends with a barrier: s_sums zeroed
    const float s_a = amax / p.act_qmax;
    s_a64 = static_cast<double>(s_a);
    int32_t sum = 0;
    uint32_t word = 0;
    if (tid < quads) word = CodeWord(v, s_a, p.act_qmax, sum);
    if (tid < units * 32) {
      const int u = tid >> 5, q = lane >> 2;
      reinterpret_cast<uint32_t*>(s_act)[4 * (8 * u + (q ^ (u & 7))) + (lane & 3)] = word;
    }
    // 32 code words are 128 columns (two chunks): one k-group unless L = 1 (halves).
    const int L = p.group_chunks;
    for (int off = L == 1 ? 8 : 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    if (tid < quads && (lane == 0 || (L == 1 && lane == 16))) {
      atomicAdd(&s_sums[L == 0 ? 0 : (tid >> 4) >> p.group_shift], sum);
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < kRing; ++s) load(ring[s], ring_meta[s]);
  } else {
    // 2. The token's codes and Σa from the activation kernel, into shared memory: piece q of unit u
    // (columns 128u + 16q ..) at 8u + (q ^ (u & 7)), so that the 8 lanes of a quarter warp, reading
    // piece q of 8 consecutive units, hit 32 distinct banks; zero past K.
    const uint4* codes = reinterpret_cast<const uint4*>(p.act_codes);
    const int code_pieces = static_cast<int>(w.k / 16);
    for (int j = threadIdx.x; j < units * 8; j += kGemvThreads) {
      const int u = j >> 3, q = j & 7;
      s_act[8 * u + (q ^ (u & 7))] = j < code_pieces ? __ldcg(codes + j) : uint4{0, 0, 0, 0};
    }
    for (int i = threadIdx.x; i < n_groups; i += kGemvThreads) s_sums[i] = __ldcg(p.act_sums + i);
    s_a64 = static_cast<double>(__ldcg(p.act_scale));
    __syncthreads();
  }

  // 3. The steps. Per row: the k-groups' products c_G·s_w (c_G = dot − z·Σa, fp64), each formed
  // by the lane that holds its dot, added into the lane's partial sum and kept in s_prod for the
  // chain; at the row's end a butterfly where every addition is exact (abq_fused::OrderFree),
  // else lane 0 runs AbqEpilogue's chain in group order. With fp16 scales (meta words) a product
  // is exact (|c_G| < 2^31 times 11 significant bits) and a multiple of 2^(E − 25) for the
  // scale's exponent field E (at least 1): that bound stands in for its lowest set bit (a lower
  // emin only makes OrderFree stricter).
  uint32_t row_dot = 0;  // one group: the lane's part of the row's dot
  double part = 0.0, abs_sum = 0.0;
  int emin = INT_MAX;
  bool exact = true;
  auto product = [&](int64_t o, int g, uint32_t dot, uint32_t word) {
    uint32_t z;
    double scale;
    if (meta) {
      z = word >> 16;
      scale = static_cast<double>(
          __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))));
    } else {
      z = static_cast<uint32_t>(w.zeros[g * n + o]);
      scale = static_cast<double>(w.scales[g * n + o]);
    }
    if (p.dot != nullptr) p.dot[o * n_groups + g] = static_cast<int32_t>(dot);
    const double c =
        static_cast<double>(static_cast<int32_t>(dot - z * static_cast<uint32_t>(s_sums[g])));
    const double prod = __dmul_rn(c, scale);
    if (meta) {
      emin = min(emin, max(static_cast<int>((word >> 10) & 31u), 1) - 25);
    } else {
      if (__fma_rn(c, scale, -prod) != 0.0) exact = false;
      if (prod != 0.0) {
        const int e = abq_fused::LsbExponent(prod);
        if (e == INT32_MIN) exact = false;
        emin = min(emin, e);
      }
    }
    part = __dadd_rn(part, prod);
    abs_sum = __dadd_rn(abs_sum, fabs(prod));
    s_prod[g] = prod;
  };
  auto finish_row = [&](int64_t o) {
    if constexpr (kMode == 0) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) row_dot += __shfl_xor_sync(kFull, row_dot, off);
      if (lane == 0) {
        uint32_t z;
        double scale;
        if (meta) {
          const uint32_t word = w.meta_rows[o];
          z = word >> 16;
          scale = static_cast<double>(
              __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))));
        } else {
          z = static_cast<uint32_t>(w.zeros[o]);
          scale = static_cast<double>(w.scales[o]);
        }
        if (p.dot != nullptr) p.dot[o] = static_cast<int32_t>(row_dot);
        const double c = static_cast<double>(
            static_cast<int32_t>(row_dot - z * static_cast<uint32_t>(s_sums[0])));
        const double sum = __dadd_rn(0.0, __dmul_rn(c, scale));
        p.y[o] = __double2float_rn(__dmul_rn(s_a64, sum));
      }
      row_dot = 0;
    } else {
      exact = __all_sync(kFull, exact);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        part = __dadd_rn(part, __shfl_xor_sync(kFull, part, off));
        abs_sum = __dadd_rn(abs_sum, __shfl_xor_sync(kFull, abs_sum, off));
        emin = min(emin, __shfl_xor_sync(kFull, emin, off));
      }
      __syncwarp();  // the row's products in s_prod
      if (lane == 0) {
        double sum = part;
        if (!abq_fused::OrderFree(exact, emin, abs_sum)) {
          sum = 0.0;
          for (int g = 0; g < n_groups; ++g) sum = __dadd_rn(sum, s_prod[g]);
        }
        p.y[o] = __double2float_rn(__dmul_rn(s_a64, sum));
      }
      __syncwarp();  // lane 0 is done with s_prod before the next row's products
      part = 0.0;
      abs_sum = 0.0;
      emin = INT_MAX;
      exact = true;
    }
  };

  int64_t co = first;  // the step computed next: row co, unit block cub
  int cub = 0;
  while (co < n) {
#pragma unroll
    for (int s = 0; s < kRing; ++s) {
      if (co >= n) break;  // warp-uniform
      const int u = cub * 32 + lane;
      int32_t dlo = 0, dhi = 0;
      if (u < units) {
        const uint4* au = s_act + 8 * u;
        const int swz = u & 7;
        UnitDots<kSB>(
            ring[s], [&](int q) { return au[q ^ swz]; }, dlo, dhi);
      }
      const uint2 m = ring_meta[s];
      load(ring[s], ring_meta[s]);  // the step kRing ahead
      if constexpr (kMode == 0) {
        row_dot += static_cast<uint32_t>(dlo) + static_cast<uint32_t>(dhi);
      } else if constexpr (kMode == 1) {  // g64: two groups a unit
        if (u < units) {
          product(co, 2 * u, static_cast<uint32_t>(dlo), m.x);
          if (2 * u + 1 < n_groups) product(co, 2 * u + 1, static_cast<uint32_t>(dhi), m.y);
        }
      } else {  // a group of 2^lshift units: consecutive lanes of one step
        uint32_t v = static_cast<uint32_t>(dlo) + static_cast<uint32_t>(dhi);
        for (int off = 1; off < (1 << lshift); off <<= 1) v += __shfl_xor_sync(kFull, v, off);
        if (u < units && (lane & ((1 << lshift) - 1)) == 0) product(co, u >> lshift, v, m.x);
      }
      if (++cub == unit_blocks) {
        finish_row(co);
        cub = 0;
        co += stride;
      }
    }
  }
}

// One thread a word of the unit layout: word e of piece pc of unit 32·ub + l of row o (index
// ((o·unit_blocks + ub)·sb + pc)·128 + 4l + e), from the wb planes; 0 past K and past the units.
__global__ void RepackUnitsKernel(const uint32_t* planes, int64_t n, int wb, int words, int64_t k,
                                  int units, int unit_blocks, int sb, uint32_t* out) {
  const int64_t per_row = static_cast<int64_t>(unit_blocks) * sb * 128;
  const int64_t total = n * per_row;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / per_row;
    const int r = static_cast<int>(t % per_row);
    const int e = r % 4, l = (r / 4) % 32, pc = (r / 128) % sb, ub = r / (128 * sb);
    const int u = 32 * ub + l, wi = 4 * pc + e;  // word wi of unit u
    uint32_t word = 0;
    if (u < units) {
      const int per_word = 32 / sb;
      for (int i = 0; i < per_word; ++i) {
        int c = 0, shift = 0;  // column within the unit, bit offset within the word
        if (sb == 2) {         // i = 4j + b: column 16wi + 4j + b at bits 8b + 2j
          c = 16 * wi + i;
          shift = 8 * (i & 3) + 2 * (i >> 2);
        } else if (sb == 4) {  // i = 4h + b: column 8wi + 4h + b at bits 8b + 4h
          c = 8 * wi + i;
          shift = 8 * (i & 3) + 4 * (i >> 2);
        } else {  // column 4wi + b at bits 8b
          c = 4 * wi + i;
          shift = 8 * i;
        }
        const int64_t col = 128 * static_cast<int64_t>(u) + c;
        if (col >= k) continue;
        uint32_t code = 0;
        for (int j = 0; j < wb; ++j) {
          const uint32_t plane_word = planes[(o * wb + j) * words + col / 32];
          code |= ((plane_word >> (col % 32)) & 1u) << j;
        }
        word |= code << shift;
      }
    }
    out[t] = word;
  }
}

using Dp4aKernel = void (*)(Dp4aParams);

template <int kSB, bool kSelf>
Dp4aKernel KernelForMode(int mode) {
  return mode == 0   ? AbqDp4aGemvKernel<kSB, 0, kSelf>
         : mode == 1 ? AbqDp4aGemvKernel<kSB, 1, kSelf>
                     : AbqDp4aGemvKernel<kSB, 2, kSelf>;
}
// The GEMV for weight bits wb, activation bits ab, k-group mode (Dp4aParams::group_mode) and
// whether it codes the token itself (Dp4aParams::self_code; never at W8, which has 16 warps).
Dp4aKernel KernelFor(int wb, int ab, int mode, bool self) {
  if ((wb != 2 && wb != 3 && wb != 4 && wb != 8) || (ab != 4 && ab != 8)) return nullptr;
  switch (StoreBitsOf(wb)) {
    case 2:
      return self ? KernelForMode<2, true>(mode) : KernelForMode<2, false>(mode);
    case 4:
      return self ? KernelForMode<4, true>(mode) : KernelForMode<4, false>(mode);
    default:
      return self ? nullptr : KernelForMode<8, false>(mode);
  }
}
Dp4aKernel ActivationsKernelFor(int ab) {
  return ab == 4 ? AbqDp4aActivationsKernel<4> : AbqDp4aActivationsKernel<8>;
}

// Chunks a k-group (L), 0 for one group; -1 where the grouping does not fit the kernel.
int GroupChunks(const AbqDeviceWeights& w) {
  if (w.n_groups == 1) return 0;
  if (w.group_words % 2 != 0) return -1;
  const int l = w.group_words / 2;
  return l <= 32 && (l & (l - 1)) == 0 ? l : -1;
}

int UnitsOf(int64_t k) { return static_cast<int>((k + 127) / 128); }

// The launch: the activation kernel's slices and the GEMV's grid (a warp a row, one block of
// kGemvWarps an SM, on the SMs the activation kernel's blocks leave free where the rows fill them).
struct Plan {
  Dp4aParams p;
  size_t bytes = 0;
  int blocks = 0;
};
bool PlanOf(const AbqDeviceWeights& w, int ab, Plan& plan) {
  if (!AbqWeightsOk(w) || w.k % 64 != 0 || KernelFor(w.weight_bits, ab, 0, false) == nullptr)
    return false;
  const int l = GroupChunks(w);
  const int sms = SmCount();
  if (l < 0 || sms <= 0) return false;
  const int chunks = static_cast<int>(w.k / 64), units = UnitsOf(w.k);
  const int warps = GemvShapeOf(StoreBitsOf(w.weight_bits)).warps;
  const size_t bytes = UnitLayoutOf(units, w.n_groups, warps).bytes;
  if (bytes > kMaxShared) return false;
  plan.p.w = w;
  plan.p.chunks = chunks;
  plan.p.group_chunks = l;
  // The activation kernel's slices: whole k-groups, whole warps' 32 code words.
  const int quads = chunks * 16;
  plan.p.act_blocks = 1;
  plan.p.act_slice = quads;
  if (l > 0) {
    const int grain = std::max(32, 16 * l);
    // One block where x is at most a code word a thread (K <= 4096), else up to kActBlocks:
    // measured, docs/BENCHMARKS.md 2026-12-06.
    const int blocks = quads <= kThreads ? 1 : std::min(kActBlocks, (quads + grain - 1) / grain);
    plan.p.act_slice = ((quads + blocks - 1) / blocks + grain - 1) / grain * grain;
    plan.p.act_blocks = (quads + plan.p.act_slice - 1) / plan.p.act_slice;
  }
  plan.p.act_qmax = static_cast<float>((1 << (ab - 1)) - 1);
  // Where x is at most a code word a GEMV thread (K <= 4096 at W2, W3 and W4), every GEMV block
  // codes it: measured faster than the activation kernel there, slower at K = 11,008 and at W8
  // (16 warps: two words a thread), docs/BENCHMARKS.md 2026-12-06.
  plan.p.self_code = StoreBitsOf(w.weight_bits) < 8 && quads <= 32 * warps;
  plan.p.group_shift = 0;
  while (l > 0 && (1 << plan.p.group_shift) < l) ++plan.p.group_shift;
  plan.p.units = units;
  plan.p.unit_blocks = (units + 31) / 32;
  // Units a k-group: g64 is two groups a unit, g = 128·2^s a group of 2^s units.
  plan.p.group_mode = l == 0 ? 0 : l == 1 ? 1 : 2;
  plan.p.unit_shift = l > 1 ? plan.p.group_shift - 1 : 0;
  plan.bytes = bytes;
  const int64_t wanted = (w.n + warps - 1) / warps;
  const int free_sms = plan.p.self_code || sms <= plan.p.act_blocks ? sms : sms - plan.p.act_blocks;
  plan.blocks = static_cast<int>(std::min<int64_t>(wanted, free_sms));
  const int64_t row_bytes = int64_t{plan.p.unit_blocks} * StoreBitsOf(w.weight_bits) * 512;
  plan.p.prefetch_rows = std::min<int64_t>(w.n, kPrefetchBytes / row_bytes);
  return true;
}

}  // namespace

int64_t AbqDigitWords(const AbqDeviceWeights& w) {
  const int64_t unit_blocks = (UnitsOf(w.k) + 31) / 32;
  return w.n * unit_blocks * StoreBitsOf(w.weight_bits) * 128;
}

cudaError_t LaunchAbqRepackDigits(const AbqDeviceWeights& w, uint32_t* digits,
                                  cudaStream_t stream) {
  if (!AbqWeightsOk(w) || w.k % 64 != 0 || KernelFor(w.weight_bits, 8, 0, false) == nullptr ||
      digits == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = AbqDigitWords(w);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  const int units = UnitsOf(w.k);
  RepackUnitsKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      w.planes, w.n, w.weight_bits, w.words, w.k, units, (units + 31) / 32,
      StoreBitsOf(w.weight_bits), digits);
  return cudaGetLastError();
}

bool AbqDp4aGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab) {
  Plan plan;
  return m == 1 && PlanOf(w, ab, plan);
}

int64_t AbqDp4aScratchBytes(const AbqDeviceWeights& w) {
  return (w.k + 4 * w.n_groups + 4 + 15) / 16 * 16;
}

cudaError_t LaunchAbqDp4aGemv(const float* x, const AbqDeviceWeights& w, int ab, float* y,
                              int32_t* dot, void* scratch, cudaStream_t stream) {
  Plan plan;
  if (!PlanOf(w, ab, plan) || w.digits == nullptr || reinterpret_cast<uintptr_t>(x) % 16 != 0 ||
      scratch == nullptr || reinterpret_cast<uintptr_t>(scratch) % 16 != 0) {
    return cudaErrorInvalidValue;
  }
  static std::atomic<uint64_t> raised[18];  // [self][store bits 2, 4, 8][group mode]
  const Dp4aKernel kernel = KernelFor(w.weight_bits, ab, plan.p.group_mode, plan.p.self_code);
  plan.p.x = x;
  plan.p.y = y;
  plan.p.dot = dot;
  auto* bytes = static_cast<unsigned char*>(scratch);
  plan.p.act_codes = reinterpret_cast<uint32_t*>(bytes);
  plan.p.act_sums = reinterpret_cast<int32_t*>(bytes + w.k);
  plan.p.act_scale = reinterpret_cast<float*>(bytes + w.k + 4 * w.n_groups);
  const int sb = StoreBitsOf(w.weight_bits);
  const int si = sb == 2 ? 0 : sb == 4 ? 1 : 2;
  cudaError_t err = RaiseSharedLimit(kernel, plan.bytes, kMaxShared,
                                     raised[9 * plan.p.self_code + 3 * si + plan.p.group_mode]);
  if (err != cudaSuccess) return err;
  // The activations first (a few blocks; Σa in their shared memory), then the GEMV, which starts as
  // soon as the activation kernel does and streams its weights meanwhile.
  if (!plan.p.self_code) {
    err =
        LaunchPdl(ActivationsKernelFor(ab), plan.p, dim3(static_cast<unsigned>(plan.p.act_blocks)),
                  kThreads, sizeof(int32_t) * static_cast<size_t>(w.n_groups), stream);
    if (err != cudaSuccess) return err;
  }
  return LaunchPdl(kernel, plan.p, dim3(static_cast<unsigned>(plan.blocks)),
                   32 * GemvShapeOf(sb).warps, plan.bytes, stream);
}

}  // namespace qcal::kernels::cuda
