// The one-token ABQ layer on the CUDA cores: weight codes as 2-bit digits, dp4a against the int8
// activation codes, made by a kernel of a few blocks launched just before (launchers in
// abq_gemm.cuh; spec kernels/cpu/abq_ref.h). Its integer sums are AbqIntegerGemm's and its outputs
// AbqGemm(AbqQuantizeActivations(x), w)'s bit for bit (cuda_abq_test's Dp4aKernelEqualsReference).
// Built with -fmad=false; the epilogue spells its arithmetic with __dadd_rn / __dmul_rn /
// __double2float_rn, so it performs AbqEpilogue's operations and no others.
//
// Why a third kernel: at m = 1 the layer is its weights' bytes (W2 4096 × 11008: 11.3 MB, 2.4 µs
// at 4.8 TB/s), and the b1 kernels reach 22–45% of that bandwidth (docs/BENCHMARKS.md,
// 2026-12-05): their weights go through shared memory in mma fragment order and the GEMV's path a
// warp is long. Here every lane loads its weights straight into registers in 16-byte coalesced
// pieces, before anything else, so that the memory system holds as many bytes in flight as it
// can; the arithmetic (a byte mask and a dp4a per four weights) is meant to stay below the memory
// time. This is not the b1 path of the paper: it is the comparison the issue
// asks for beside it ("unpack to int8"), on dp4a rather than the IMMA, and it is reported as its
// own row ("dp4a") and chosen only by name (CudaAbqLinear::B1Kernel::kDp4a).
//
// Layouts:
//   - Digits (made once from the planes by LaunchAbqRepackDigits): a code q of wb bits is
//     Σ_d 4^d·q_d with D = ceil(wb / 2) digits q_d = (q >> 2d) & 3. Row o's digit d is K / 64
//     chunks of 16 bytes, [n][D][K / 64]; chunk c covers columns [64c, 64c + 64) as four 32-bit
//     words q = 0..3, and word q holds column 64c + 16q + 4j + b at bits [8b + 2j, 8b + 2j + 2):
//     (word >> 2j) & 0x03030303 are the digits of columns 64c + 16q + 4j + (0..3), one a byte,
//     which dp4a multiplies by the four activation bytes of those columns.
//   - Activation codes in shared memory, one byte each, [K] in 16-byte pieces: piece (c, q) holds
//     columns 64c + 16q + (0..15) and is stored at piece 4c + (q ^ ((c >> 1) & 3)), so that the 8
//     lanes of a quarter warp, reading pieces q of 8 consecutive chunks, hit 32 distinct banks.
//
// Shape of the kernel:
//   - One block an SM, 32 warps (64 registers a thread). Work goes by row sets: R consecutive rows
//     that a warp loads at once, R as large as the grid's warps need and 6 pieces of 16 bytes a
//     lane allow (11,008 rows of K = 4096 at W2: 3), or one row in rounds of slots where a row
//     needs more pieces than that (a slot: 32 chunks, one a lane). Warp v of the grid takes sets
//     v, v + warps, ...
//   - A set's first round is loaded before griddepcontrol.wait (programmatic launch: the
//     activation kernel before it may still be running, and it lets this kernel start before it
//     has itself waited for the kernels before it, which may still be writing x but must not write
//     the weights),
//     with the set's s_w and z words copied into the warp's shared memory (cp.async); the next
//     set's before this set's epilogue. Where a row takes several rounds, the rounds after the
//     first go to shared memory by cp.async at the same time, as many whole rounds as fit
//     (kMaxShared), so that they do not wait for the first round's arithmetic (W4 at K = 11008:
//     3 slots in registers, 3 staged).
//   - The token's codes come from the activation kernel (AbqDp4aActivationsKernel, the stream's
//     previous launch; one block at K <= 4096 or per channel, else up to kActBlocks, each coding a
//     slice of whole k-groups after the maximum over all of x): the maximum over x by a block
//     reduction, s_a = max / qmax, the
//     codes as AbqQuantizeActivations (IEEE division, RoundHalfEven, the clamp that maps NaN to
//     −qmax), Σa per k-group (integer atomics: exact in any order), into a scratch buffer. It
//     triggers this kernel's launch first thing, so the weights stream while it runs; after
//     griddepcontrol.wait every block copies the codes (K bytes) and Σa into shared memory.
//   - A chunk's dot is Σ_d 4^d·Σ dp4a (int32, wrapping: AbqIntegerGemm's sums modulo 2^32, exact
//     within ValidateAbqShape's bounds). k-groups of L = g / 64 chunks (g = 64·2^i up to
//     2048) are L consecutive lanes of one slot: L − 1 shuffles give the group's dot, which its
//     first lane stores; after the set's pieces every lane forms c_G = dot − z·Σa and c_G·s_w in
//     fp64 for groups lane, lane + 32, ... into the warp's shared products. One group (per
//     channel): a warp reduction a slot, added into the row's dot by lane 0.
//   - The epilogue, a warp a row, as abq_gemv_fused.cu's: where every addition of the products is
//     exact (abq_fused::OrderFree) the lanes' sums and a butterfly give AbqEpilogue's chain's
//     bits; otherwise lane 0 runs the chain in group order. y = float(s_a·S), one lane.
// Measured before this layer's rework (H100, docs/BENCHMARKS.md 2026-12-05): faster than the b1
// layer but at W2A8 and W4A8 on 4096 × 11008, and far from the bandwidth everywhere. Profiled (ncu,
// H100, 2026-12-06) when every block quantized the token itself: 10.3 M warp instructions for W2A8
// 4096 × 11008, the SMs' issue slots 51% busy: the per-block quantization 26% of them, index
// arithmetic with runtime divisions in the loads and the chunk loop another large share, the dp4a
// arithmetic itself about 11%. Hence the activation kernel, the stepped (rs / ns, rs % ns), the
// masked digits and the groups' fp64 products formed once a set by every lane rather than a piece
// by a few (docs/BENCHMARKS.md 2026-12-06: W2A8 15.5 → 12.1 µs, W4A8 18.5 → 16.7); then the
// activation kernel over up to 4 blocks holding x where K > 4096 (W2A8 12.0 → 11.0, W4A8 16.3 →
// 14.9; 8192 × 28672 W2A8 41.8 → 36.2). Where the GEMV takes every SM (plan.blocks == SM count,
// e.g. 8192 × 28672), some of its blocks cannot start until the activation kernel's blocks have
// left their SMs (a GEMV block needs a whole register file); not measured apart.
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
// The activation kernel's blocks at most: few, as the GEMV takes one block an SM (128 SMs of a
// 4096-row layer, leaving 4 of an H100's 132 beside it).
constexpr int kActBlocks = 4;
// float4s of x a thread of the activation kernel holds from its one pass over x: K up to 32,768
// in registers, the rest loaded again for the coding.
constexpr int kXLoads = 8;
constexpr int kWarps = 32;
constexpr int kThreads = kWarps * 32;
// 16-byte weight pieces a lane holds at once (rows × slots × digits): 6, or 4 at four digits (64
// registers a thread, a few of them spilled).
constexpr int kPieces = 6;
__host__ __device__ constexpr int PiecesFor(int digits) { return kPieces / digits * digits; }
constexpr size_t kMaxShared = 200 * 1024;

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
  int chunks;        // K / 64
  int group_chunks;  // chunks a k-group (L, a power of two), 0 for one group
  int group_shift;   // log2(L)
  int act_blocks;    // blocks of the activation kernel
  int act_slice;     // code words (float4s of x) a block of it codes: whole k-groups
  int rows;          // R: rows a warp loads at once (a row set)
  int slots;         // 32-chunk slots a round: all of a row's when R > 1
  // Slots after a row's first round that come through shared memory (cp.async, issued with the
  // first round; R = 1 only, a multiple of a round or all the rest), so that they are in flight
  // together with the first round instead of being loaded after its arithmetic.
  int stage_slots;
};

// The shared-memory offsets: activation codes [K] bytes, Σa [n_groups], then per warp its row
// set's dots (one group) or meta words, group dots and products (grouped), and its staged
// rounds (stage_slots · digits · 32 pieces of 16 bytes).
struct SharedLayout {
  size_t sums_off = 0, chan_off = 0, meta_off = 0, gdot_off = 0, prod_off = 0, stage_off = 0;
  size_t bytes = 0;
};
__host__ __device__ inline SharedLayout LayoutOf(int chunks, int n_groups, bool grouped, int rows,
                                                 int digits, int stage_slots) {
  SharedLayout l;
  const size_t per_set = static_cast<size_t>(rows) * n_groups;
  l.sums_off = static_cast<size_t>(chunks) * 64;
  l.chan_off = (l.sums_off + 4 * static_cast<size_t>(n_groups) + 15) / 16 * 16;
  l.meta_off = l.chan_off + 4 * static_cast<size_t>(kWarps) * rows;
  l.gdot_off = l.meta_off + (grouped ? 4 * kWarps * per_set : 0);
  l.prod_off = (l.gdot_off + (grouped ? 4 * kWarps * per_set : 0) + 15) / 16 * 16;
  l.stage_off = l.prod_off + (grouped ? 8 * kWarps * per_set : 0);
  l.bytes = l.stage_off + static_cast<size_t>(kWarps) * stage_slots * digits * 32 * 16;
  return l;
}

// Digits a code of wb bits: 1, 2 (W3, W4) or 4.
__host__ __device__ inline int DigitsOf(int wb) { return (wb + 1) / 2; }
// Whether the kernel of kD digits stages the rounds after a row's first in shared memory.
__host__ __device__ constexpr bool StagesRounds(int digits) { return digits == 2; }

__device__ __forceinline__ int32_t Quantize(float x, float s_a, float qmax) {
  if (s_a == 0.0f) return 0;
  return static_cast<int32_t>(fminf(fmaxf(RoundHalfEven(x / s_a), -qmax), qmax));
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
    if (u < u1) {
      const int32_t c0 = Quantize(v.x, s_a, kQmax), c1 = Quantize(v.y, s_a, kQmax);
      const int32_t c2 = Quantize(v.z, s_a, kQmax), c3 = Quantize(v.w, s_a, kQmax);
      p.act_codes[u] =
          (static_cast<uint32_t>(c0) & 0xffu) | ((static_cast<uint32_t>(c1) & 0xffu) << 8) |
          ((static_cast<uint32_t>(c2) & 0xffu) << 16) | (static_cast<uint32_t>(c3) << 24);
      sum = c0 + c1 + c2 + c3;
    }
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

template <int kD>
__global__ void __launch_bounds__(kThreads, 1) AbqDp4aGemvKernel(Dp4aParams p) {
  extern __shared__ __align__(16) unsigned char dp4a_smem[];
  const AbqDeviceWeights& w = p.w;
  const int chunks = p.chunks, n_groups = w.n_groups, L = p.group_chunks, R = p.rows;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool grouped = L > 0, meta = w.meta_rows != nullptr;
  // Staged rounds only in the two-digit kernel (W3, W4): measured, they cost the one- and
  // four-digit kernels more (registers, spills) than they saved (docs/BENCHMARKS.md, 2026-12-06).
  const int stage_slots = StagesRounds(kD) ? p.stage_slots : 0;
  const SharedLayout sl = LayoutOf(chunks, n_groups, grouped, R, kD, stage_slots);
  const uint4* s_act = reinterpret_cast<const uint4*>(dp4a_smem);
  int32_t* s_sums = reinterpret_cast<int32_t*>(dp4a_smem + sl.sums_off);
  uint32_t* s_chan = reinterpret_cast<uint32_t*>(dp4a_smem + sl.chan_off) + warp * R;
  uint32_t* s_meta = reinterpret_cast<uint32_t*>(dp4a_smem + sl.meta_off) + warp * R * n_groups;
  uint32_t* s_gdot = reinterpret_cast<uint32_t*>(dp4a_smem + sl.gdot_off) + warp * R * n_groups;
  double* s_prod = reinterpret_cast<double*>(dp4a_smem + sl.prod_off) + warp * R * n_groups;
  uint4* s_stage =
      reinterpret_cast<uint4*>(dp4a_smem + sl.stage_off) + warp * stage_slots * kD * 32;
  const uint4* digits = reinterpret_cast<const uint4*>(w.digits);
  const int64_t sets = (w.n + R - 1) / R;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int total_slots = (chunks + 31) / 32;

  // Piece i of a round (rows r, slots s, digits d; i = (r·ns + s)·kD + d) of row set t: chunk
  // 32·(s0 + s) + lane of digit d of row t·R + r.
  constexpr int kP = PiecesFor(kD);
  uint4 piece[kP];
  auto load = [&](int64_t t, int s0, int ns) {
    const int64_t o0 = t * R;
    int r = 0, sl_ = 0;  // (rs / ns, rs % ns), stepped rather than divided
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int d = i % kD;
      if (i > 0 && d == 0 && ++sl_ == ns) {
        sl_ = 0;
        ++r;
      }
      const int ci = 32 * (s0 + sl_) + lane;
      const int64_t o = o0 + r;
      piece[i] = r < R && o < w.n && ci < chunks ? __ldcs(digits + (o * kD + d) * chunks + ci)
                                                 : uint4{0, 0, 0, 0};
    }
  };
  // The set's s_w and z words into shared memory (cp.async, completed before the arithmetic).
  auto load_meta = [&](int64_t t) {
    if (!grouped || !meta) return;
    const int64_t o0 = t * R;
    const int count = static_cast<int>(w.n - o0 < R ? w.n - o0 : R) * n_groups;
    for (int i = lane; i < count; i += 32) CopyAsync4(s_meta + i, w.meta_rows + o0 * n_groups + i);
    mma::CopyAsyncCommit();
  };
  const int round_slots = R > 1 ? total_slots : min(p.slots, total_slots);
  // Row t's staged slots (R = 1): slot round_slots + sr, digit d at s_stage[(sr·kD + d)·32 + lane].
  auto stage = [&](int64_t t) {
    if constexpr (StagesRounds(kD)) {
      if (stage_slots == 0) return;
      for (int sr = 0; sr < stage_slots; ++sr) {
        const int ci = 32 * (round_slots + sr) + lane;
#pragma unroll
        for (int d = 0; d < kD; ++d) {
          const uint4* src = digits + (t * kD + d) * chunks + min(ci, chunks - 1);
          mma::CopyAsync16(s_stage + (sr * kD + d) * 32 + lane, src, ci < chunks ? 16 : 0);
        }
      }
      mma::CopyAsyncCommit();
    }
  };
  // A staged round into the registers (R = 1: pieces past the round's ns slots are unused).
  auto load_staged = [&](int s0, int ns) {
    int sl_ = 0;
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int d = i % kD;
      if (i > 0 && d == 0) ++sl_;
      const int sr = s0 + sl_ - round_slots;
      piece[i] = sl_ < ns ? s_stage[(sr * kD + d) * 32 + lane] : uint4{0, 0, 0, 0};
    }
  };

  // 1. Before anything that depends on the kernel before this one: the first set's first round.
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (first < sets) {
    load(first, 0, round_slots);
    load_meta(first);
    stage(first);
  }
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  // 2. The token's codes and Σa from the activation kernel, into shared memory (code piece (c, q)
  // at 4c + (q ^ ((c >> 1) & 3))).
  uint4* act_pieces = reinterpret_cast<uint4*>(dp4a_smem);
  const uint4* codes = reinterpret_cast<const uint4*>(p.act_codes);
  for (int j = threadIdx.x; j < chunks * 4; j += kThreads) {
    const int c = j >> 2, q = j & 3;
    act_pieces[4 * c + (q ^ ((c >> 1) & 3))] = codes[j];
  }
  for (int i = threadIdx.x; i < n_groups; i += kThreads) s_sums[i] = p.act_sums[i];
  const float s_a = *p.act_scale;
  __syncthreads();

  // 3. The row sets.
  const double s_a64 = static_cast<double>(s_a);
  for (int64_t t = first; t < sets; t += warps) {
    const int64_t o0 = t * R;
    const int rows = static_cast<int>(w.n - o0 < R ? w.n - o0 : R);
    if (lane < R) s_chan[lane] = 0;
    bool inexact = false;
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncwarp();  // the set's meta words and zeroed dots
    for (int s0 = 0; s0 < total_slots; s0 += round_slots) {
      const int ns = min(round_slots, total_slots - s0);
      if (StagesRounds(kD) && s0 > 0 && s0 < round_slots + stage_slots) {
        load_staged(s0, ns);
      } else if (s0 > 0) {
        load(t, s0, ns);
      }
      int r = 0, si = -1;  // (rs / ns, rs % ns) of piece i0 = rs·kD, stepped
#pragma unroll
      for (int i0 = 0; i0 < kP; i0 += kD) {
        if (++si == ns) {
          si = 0;
          ++r;
        }
        if (r >= rows) break;  // warp-uniform
        const int ci = 32 * (s0 + si) + lane;
        uint32_t v = 0;
        if (ci < chunks) {
          const int swz = (ci >> 1) & 3;
          uint4 a[4];
#pragma unroll
          for (int q = 0; q < 4; ++q) a[q] = s_act[4 * ci + (q ^ swz)];
#pragma unroll
          for (int d = 0; d < kD; ++d) {
            const uint4 pc = piece[i0 + d];
            const uint32_t words[4] = {pc.x, pc.y, pc.z, pc.w};
            // Digit j of every byte masked in place (its value times 4^j, up to 192: an unsigned
            // byte), one accumulator a j: acc_j = 4^j·Σ digit·a exactly (|Σ| <= 16·3·128, far
            // from overflow), so acc_j >> 2j is the sum that a shift of every word would give,
            // with one instruction fewer a dp4a.
            int acc[4] = {0, 0, 0, 0};
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const uint32_t act[4] = {a[q].x, a[q].y, a[q].z, a[q].w};
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                acc[j] = Dp4aUs(words[q] & (0x03030303u << (2 * j)), act[j], acc[j]);
              }
            }
            const int sum = acc[0] + (acc[1] >> 2) + (acc[2] >> 4) + (acc[3] >> 6);
            v += static_cast<uint32_t>(sum) << (2 * d);
          }
        }
        if (!grouped) {
          for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
          if (lane == 0) s_chan[r] += v;
          continue;
        }
        for (int off = 1; off < L; off <<= 1) v += __shfl_xor_sync(kFull, v, off);
        if (ci < chunks && (lane & (L - 1)) == 0) s_gdot[r * n_groups + (ci >> p.group_shift)] = v;
      }
    }
    // The groups' products, every lane a group (a group's L <= 32 chunks lie within one slot of a
    // piece, so its dot is complete): c_G = dot − z·Σa and c_G·s_w in fp64, before the next set's
    // meta words arrive.
    if (grouped) {
      __syncwarp();  // the set's group dots
      for (int r = 0; r < rows; ++r) {
        const int64_t o = o0 + r;
        for (int g = lane; g < n_groups; g += 32) {
          const uint32_t v = s_gdot[r * n_groups + g];
          double scale;
          uint32_t z;
          if (meta) {
            const uint32_t word = s_meta[r * n_groups + g];
            z = word >> 16;
            scale = static_cast<double>(
                __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))));
          } else {
            z = static_cast<uint32_t>(w.zeros[g * w.n + o]);
            scale = static_cast<double>(w.scales[g * w.n + o]);
          }
          if (p.dot != nullptr) p.dot[o * n_groups + g] = static_cast<int32_t>(v);
          const double c =
              static_cast<double>(static_cast<int32_t>(v - z * static_cast<uint32_t>(s_sums[g])));
          const double prod = __dmul_rn(c, scale);
          if (__fma_rn(c, scale, -prod) != 0.0) inexact = true;
          s_prod[r * n_groups + g] = prod;
        }
      }
    }
    // The next set's first round now, so that it streams during this set's epilogue.
    __syncwarp();  // every lane is done with this set's meta words
    if (t + warps < sets) {
      load(t + warps, 0, round_slots);
      load_meta(t + warps);
      stage(t + warps);
    }
    if (!grouped) {
      if (lane < rows) {
        const int64_t o = o0 + lane;
        const uint32_t dot = s_chan[lane];
        double scale;
        uint32_t z;
        if (meta) {
          const uint32_t word = w.meta_rows[o];
          z = word >> 16;
          scale = static_cast<double>(
              __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))));
        } else {
          z = static_cast<uint32_t>(w.zeros[o]);
          scale = static_cast<double>(w.scales[o]);
        }
        if (p.dot != nullptr) p.dot[o] = static_cast<int32_t>(dot);
        const double c =
            static_cast<double>(static_cast<int32_t>(dot - z * static_cast<uint32_t>(s_sums[0])));
        const double sum = __dadd_rn(0.0, __dmul_rn(c, scale));
        p.y[o] = __double2float_rn(__dmul_rn(s_a64, sum));
      }
      __syncwarp();
      continue;
    }
    const bool all_exact = __all_sync(kFull, !inexact);
    for (int r = 0; r < rows; ++r) {
      const double* prods = s_prod + r * n_groups;
      const double sum = WarpProductSum(prods, n_groups, all_exact);
      if (lane == 0) p.y[o0 + r] = __double2float_rn(__dmul_rn(s_a64, sum));
    }
    __syncwarp();  // lane 0 is done with the products before the next set writes them
  }
}

// One thread a digit word: word q of chunk ci of digit d of row o, from planes 2d and 2d + 1.
__global__ void RepackDigitsKernel(const uint32_t* planes, int64_t n, int wb, int words, int chunks,
                                   uint32_t* digits) {
  const int nd = DigitsOf(wb);
  const int64_t total = n * nd * chunks * 4;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int q = static_cast<int>(t % 4);
    const int ci = static_cast<int>((t / 4) % chunks);
    const int d = static_cast<int>((t / (4 * chunks)) % nd);
    const int64_t o = t / (4 * static_cast<int64_t>(chunks) * nd);
    const int k0 = 64 * ci + 16 * q;  // 16 columns within one plane word
    const uint32_t* row = planes + o * wb * static_cast<int64_t>(words) + k0 / 32;
    const int shift = k0 % 32;
    const uint32_t lo = 2 * d < wb ? row[(2 * d) * static_cast<int64_t>(words)] >> shift : 0u;
    const uint32_t hi =
        2 * d + 1 < wb ? row[(2 * d + 1) * static_cast<int64_t>(words)] >> shift : 0u;
    uint32_t out = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t digit = ((lo >> i) & 1u) | (((hi >> i) & 1u) << 1);
      out |= digit << (8 * (i & 3) + 2 * (i >> 2));
    }
    digits[t] = out;
  }
}

using Dp4aKernel = void (*)(Dp4aParams);

Dp4aKernel KernelFor(int wb, int ab) {
  if ((wb != 2 && wb != 3 && wb != 4 && wb != 8) || (ab != 4 && ab != 8)) return nullptr;
  switch (DigitsOf(wb)) {
    case 1:
      return AbqDp4aGemvKernel<1>;
    case 2:
      return AbqDp4aGemvKernel<2>;
    case 4:
      return AbqDp4aGemvKernel<4>;
    default:
      return nullptr;
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

// The launch: rows a warp loads at once (as many as the grid's warps need, within kPieces
// pieces a lane) or, for rows longer than kPieces pieces a lane, one row in rounds of slots.
struct Plan {
  Dp4aParams p;
  size_t bytes = 0;
  int blocks = 0;
};
bool PlanOf(const AbqDeviceWeights& w, int ab, Plan& plan) {
  if (!AbqWeightsOk(w) || w.k % 64 != 0 || KernelFor(w.weight_bits, ab) == nullptr) return false;
  const int l = GroupChunks(w);
  const int sms = SmCount();
  if (l < 0 || sms <= 0) return false;
  const int chunks = static_cast<int>(w.k / 64), nd = DigitsOf(w.weight_bits);
  const int total_slots = (chunks + 31) / 32;
  const int pieces = PiecesFor(nd);
  int rows = 1, slots = pieces / nd;
  if (total_slots * nd <= pieces) {
    const int64_t needed = (w.n + static_cast<int64_t>(sms) * kWarps - 1) / (sms * kWarps);
    rows = static_cast<int>(std::clamp<int64_t>(needed, 1, pieces / (total_slots * nd)));
    slots = total_slots;
  }
  size_t bytes = LayoutOf(chunks, w.n_groups, l > 0, rows, nd, 0).bytes;
  if (bytes > kMaxShared && rows > 1) {
    rows = 1;
    bytes = LayoutOf(chunks, w.n_groups, l > 0, rows, nd, 0).bytes;
  }
  if (bytes > kMaxShared) return false;
  // The rounds after the first through shared memory, as many as fit: whole rounds, or all the
  // rest.
  int stage = 0;
  if (StagesRounds(nd) && rows == 1 && total_slots > slots) {
    const size_t per_slot = static_cast<size_t>(kWarps) * nd * 32 * 16;
    const int rest = total_slots - slots;
    stage = std::min<int>(rest, static_cast<int>((kMaxShared - bytes) / per_slot));
    if (stage < rest) stage = stage / slots * slots;
    bytes = LayoutOf(chunks, w.n_groups, l > 0, rows, nd, stage).bytes;
  }
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
  plan.p.group_shift = 0;
  while (l > 0 && (1 << plan.p.group_shift) < l) ++plan.p.group_shift;
  plan.p.rows = rows;
  plan.p.slots = slots;
  plan.p.stage_slots = stage;
  plan.bytes = bytes;
  const int64_t sets = (w.n + rows - 1) / rows;
  plan.blocks = static_cast<int>(std::min<int64_t>((sets + kWarps - 1) / kWarps, sms));
  return true;
}

}  // namespace

int64_t AbqDigitWords(const AbqDeviceWeights& w) {
  return w.n * DigitsOf(w.weight_bits) * (w.k / 64) * 4;
}

cudaError_t LaunchAbqRepackDigits(const AbqDeviceWeights& w, uint32_t* digits,
                                  cudaStream_t stream) {
  if (!AbqWeightsOk(w) || w.k % 64 != 0 || KernelFor(w.weight_bits, 8) == nullptr ||
      digits == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = AbqDigitWords(w);
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  RepackDigitsKernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      w.planes, w.n, w.weight_bits, w.words, static_cast<int>(w.k / 64), digits);
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
  static std::atomic<uint64_t> raised[3];  // [digits 1, 2, 4]
  const Dp4aKernel kernel = KernelFor(w.weight_bits, ab);
  plan.p.x = x;
  plan.p.y = y;
  plan.p.dot = dot;
  auto* bytes = static_cast<unsigned char*>(scratch);
  plan.p.act_codes = reinterpret_cast<uint32_t*>(bytes);
  plan.p.act_sums = reinterpret_cast<int32_t*>(bytes + w.k);
  plan.p.act_scale = reinterpret_cast<float*>(bytes + w.k + 4 * w.n_groups);
  const int nd = DigitsOf(w.weight_bits);
  const int di = nd == 1 ? 0 : nd == 2 ? 1 : 2;
  cudaError_t err = RaiseSharedLimit(kernel, plan.bytes, kMaxShared, raised[di]);
  if (err != cudaSuccess) return err;
  // The activations first (a few blocks; Σa in their shared memory), then the GEMV, which starts as
  // soon as the activation kernel does and streams its weights meanwhile.
  err = LaunchPdl(ActivationsKernelFor(ab), plan.p, dim3(static_cast<unsigned>(plan.p.act_blocks)),
                  kThreads, sizeof(int32_t) * static_cast<size_t>(w.n_groups), stream);
  if (err != cudaSuccess) return err;
  return LaunchPdl(kernel, plan.p, dim3(static_cast<unsigned>(plan.blocks)), kThreads, plan.bytes,
                   stream);
}

}  // namespace qcal::kernels::cuda
