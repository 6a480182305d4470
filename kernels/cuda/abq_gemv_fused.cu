// The fused b1 GEMV of one token (launcher and applicability in abq_gemm.cuh; spec
// kernels/cpu/abq_ref.h): the activation prologue and the integer GEMV with its epilogue in one
// launch, meant to give AbqGemm(AbqQuantizeActivations(x), w) bit for bit (cuda_abq_test's
// FusedKernelEqualsReference checks; written and compiled 2026-12-05, when no GPU was lent, so
// that test has not run yet; abq_fused_plan_test replays its cuts on the CPU). Built with
// -fmad=false; the epilogue spells its arithmetic with __dadd_rn / __dmul_rn / __double2float_rn.
//
// Why: at decode sizes the two-launch layer (prologue, then the GEMV kernel of abq_gemv.cu) is two
// dependent kernels, and the GEMV's reads of the activations wait for the whole prologue grid
// (docs/BENCHMARKS.md, 2026-12-05: 4.2 µs of prologue and 11 µs of GEMV overlap by 2 µs, against
// 2.6 µs for the W2A8 4096 × 11008 weights at 4.8 TB/s). Here every block starts its weights'
// copies first and quantizes the token meanwhile, so the prologue hides behind the weights.
//
// Shape of the kernel (its cuts and shared-memory layout are kernels/abq_fused_plan.h, which the
// CPU test abq_fused_plan_test replays against the reference):
//   - Blocks of 16 warps own T tiles of 8 outputs (NB = 8·T outputs; T chosen at launch so that
//     the grid is about one block per SM) and form clusters of 8 blocks.
//   - The prologue is split across the cluster: block rank r takes the maximum |x| over its eighth
//     of K, the cluster barrier publishes the eight partial maxima (distributed shared memory),
//     every block forms the same s_a = max / qmax, then rank r quantizes its eighth of the words
//     (ref AbqQuantizeActivations' codes: IEEE division, RoundHalfEven, the clamp that maps NaN to
//     −qmax), packs them with one ballot per plane, and stores every plane word and its k-groups'
//     Σa (integer atomics: exact in any order) into all eight blocks' shared memory. A second
//     cluster barrier makes them visible. Blocks past the last output take part in the prologue
//     and the barriers only.
//   - The GEMV: a block's work is T·steps units (tile, k128 step), split into 16 equal contiguous
//     ranges, one a warp. A warp bulk-copies (TMA, completing on its mbarrier) the plane rows of
//     its units into its own shared memory, before the prologue: all of them when they fit, else
//     through two slots that it refills as it goes. Rows are stored plane-major (row j·8 + ol:
//     plane j of the tile's output ol) with a stride of an odd multiple of 4 words, so that the
//     mma's A fragments hit 32 banks; the activation planes likewise.
//   - mma.m16n8k128 b1 AND + popcount as in abq_gemv.cu: A row g = plane 2q of output g, row
//     g + 8 = plane 2q + 1; B column g = activation plane g (zero for g >= ab). A k-group's dot is
//     the lane's counts times their plane weights, added over the lane quad by two shuffles; it is
//     stored once when every k-group is one step, else accumulated over the group's steps and
//     added with a shared-memory atomic where a group or a warp's range ends.
//   - The epilogue, a warp an output: the products c_G·s_w (c_G = dot − z·Σa, int32 wrapping)
//     in fp64 and their sum in group order as AbqEpilogue's chain; where every addition of them
//     is exact (abq_fused::OrderFree) the lanes' sums and a butterfly give the same bits faster,
//     else lane 0 runs the chain. y = float(s_a·S), written by one lane: bit-identical run to run.
// The weights' scales and zero points are copied into shared memory (cp.async) at the start too,
// as one 4-byte word each (AbqDeviceWeights::meta) where every scale is an fp16 value.
// Applies to m = 1, activation bits 4 and 8, K a multiple of 128 (16-byte plane rows), k-groups
// of whole k128 steps (or one group), and shapes whose per-block shared memory fits (the launcher
// computes it): AbqFusedGemvApplies.
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "kernels/abq_fused_plan.h"
#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/cuda/mma_sync.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

namespace cg = cooperative_groups;
using abq_fused::kCluster;
using abq_fused::kMaxShared;
using abq_fused::kMaxSlots;
using abq_fused::kTileOuts;
using abq_fused::kWarps;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kThreads = abq_fused::kThreads;

struct FusedParams {
  AbqDeviceWeights w;
  const float* x;
  float* y;
  int32_t* dot;
  abq_fused::Layout l;
  int steps;        // k128 steps: words / 4
  int group_steps;  // steps a k-group (all of them when there is one group)
};

abq_fused::LayerShape ShapeOf(const AbqDeviceWeights& w, int ab) {
  abq_fused::LayerShape s;
  s.n = w.n;
  s.k = w.k;
  s.words = w.words;
  s.group_words = w.group_words;
  s.n_groups = w.n_groups;
  s.wb = w.weight_bits;
  s.ab = ab;
  s.meta = w.meta != nullptr;
  return s;
}

template <int kWb, int kAb, bool kStepGroups>
__global__ void __launch_bounds__(kThreads, 1) AbqFusedGemvKernel(FusedParams p) {
  constexpr int kPairs = (kWb + 1) / 2;
  constexpr int kRows = kTileOuts * kWb;
  constexpr float kQmax = static_cast<float>((1 << (kAb - 1)) - 1);
  extern __shared__ __align__(16) unsigned char fused_smem[];
  __shared__ uint64_t bars[kWarps][kMaxSlots];
  __shared__ float scratch[32];
  __shared__ float part_max;

  const AbqDeviceWeights& w = p.w;
  const abq_fused::Layout& l = p.l;
  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int n_groups = w.n_groups, words = w.words, steps = p.steps;
  const int nb = kTileOuts * l.tiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * nb;
  const int tiles = abq_fused::BlockTiles(l, w.n, blockIdx.x);  // 0 past the last output

  uint32_t* s_act = reinterpret_cast<uint32_t*>(fused_smem + l.act_off);   // [ab][pstride]
  int32_t* s_dot = reinterpret_cast<int32_t*>(fused_smem + l.dot_off);     // [n_groups][nb]
  float* s_scales = reinterpret_cast<float*>(fused_smem + l.scale_off);    // [n_groups][nb]
  int32_t* s_zeros = reinterpret_cast<int32_t*>(fused_smem + l.zero_off);  // [n_groups][nb]
  int32_t* s_sums = reinterpret_cast<int32_t*>(fused_smem + l.sum_off);    // [n_groups]
  int32_t* s_gpart = reinterpret_cast<int32_t*>(fused_smem + l.gpart_off);
  uint32_t* stages = reinterpret_cast<uint32_t*>(fused_smem + l.stage_off);

  // The warp's units [u0, u1): unit u is tile u / steps, step u % steps.
  const abq_fused::Range units = abq_fused::WarpUnits(tiles * steps, warp);
  const int u0 = static_cast<int>(units.begin), u1 = static_cast<int>(units.end);
  const int slot_words = kRows * l.stride;
  uint32_t* my_stage = stages + static_cast<size_t>(warp) * l.slots * slot_words;
  if (lane == 0) {
    for (int s = 0; s < l.slots; ++s) BarInit(&bars[warp][s]);
  }
  __syncwarp();

  // Copies units [ub, ub + cnt) into slot `slot`: for each run of units within one tile, a bulk
  // copy a plane row. Rows of outputs past n are not copied: the mma reads whatever the slot
  // held there (uninitialized the first time, which an initcheck would report), and their sums go
  // to slots nobody reads.
  auto fill = [&](int slot, int ub, int cnt) {
    uint32_t* dst = my_stage + slot * slot_words;
    uint32_t bytes = 0;
    for (int li = 0; li < cnt;) {
      const abq_fused::Segment seg = abq_fused::FillSegment(ub, cnt, li, steps);
      const int64_t outs = std::min<int64_t>(kTileOuts, w.n - (o0 + seg.tile * kTileOuts));
      bytes += static_cast<uint32_t>(outs * kWb * seg.len * 16);
      li += seg.len;
    }
    if (lane == 0) BarArriveExpect(&bars[warp][slot], bytes);
    __syncwarp();
    for (int li = 0; li < cnt;) {
      const abq_fused::Segment seg = abq_fused::FillSegment(ub, cnt, li, steps);
      const int64_t ot = o0 + seg.tile * kTileOuts;
      for (int r = lane; r < kRows; r += 32) {
        const int ol = r % kTileOuts, j = r / kTileOuts;
        if (ot + ol < w.n) {
          BulkCopy(dst + r * l.stride + 4 * seg.li,
                   w.planes + ((ot + ol) * kWb + j) * static_cast<int64_t>(words) + 4 * seg.step,
                   static_cast<uint32_t>(seg.len * 16), &bars[warp][slot]);
        }
      }
      li += seg.len;
    }
  };

  // 1. Before anything that depends on the previous kernel: the weights' first slots, and the
  // block's scales and zero points (cp.async; n % 4 == 0 gives 16-byte pieces).
  int next_fill = u0;
  for (int s = 0; s < l.slots && next_fill < u1; ++s) {
    const int cnt = min(l.slot_steps, u1 - next_fill);
    fill(s, next_fill, cnt);
    next_fill += cnt;
  }
  // With w.meta, s_scales holds its words (z << 16 | fp16 s_w) and s_zeros stays unused.
  const bool meta = w.meta != nullptr;
  if (tiles > 0) {
    const int outs = static_cast<int>(std::min<int64_t>(nb, w.n - o0));
    if (w.n % 4 == 0) {
      const int quads = outs / 4;  // outs is a multiple of 4 when n is
      for (int i = threadIdx.x; i < n_groups * quads; i += kThreads) {
        const int gr = i / quads, q = i % quads;
        const int64_t gi = static_cast<int64_t>(gr) * w.n + o0 + 4 * q;
        if (meta) {
          mma::CopyAsync16(s_scales + gr * nb + 4 * q, w.meta + gi, 16);
        } else {
          mma::CopyAsync16(s_scales + gr * nb + 4 * q, w.scales + gi, 16);
          mma::CopyAsync16(s_zeros + gr * nb + 4 * q, w.zeros + gi, 16);
        }
      }
    } else {
      for (int i = threadIdx.x; i < n_groups * outs; i += kThreads) {
        const int gr = i / outs, o = i % outs;
        const int64_t gi = static_cast<int64_t>(gr) * w.n + o0 + o;
        if (meta) {
          CopyAsync4(s_scales + gr * nb + o, w.meta + gi, 4);
        } else {
          CopyAsync4(s_scales + gr * nb + o, w.scales + gi, 4);
          CopyAsync4(s_zeros + gr * nb + o, w.zeros + gi, 4);
        }
      }
    }
  }
  mma::CopyAsyncCommit();
  // Launched programmatically: the kernel after it may start once every block is here (it waits
  // for this grid's completion before it reads what this one writes), and the kernel before it
  // may still be writing x.
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  // 2. The prologue's maximum: rank r's part of K (float4 loads; K is a multiple of 128).
  const abq_fused::Range cols = abq_fused::RankShare(w.k / 4, rank);  // float4s
  const float4* x4 = reinterpret_cast<const float4*>(p.x);
  float amax = 0.0f;
#pragma unroll 4
  for (int64_t c = cols.begin + threadIdx.x; c < cols.end; c += kThreads) {
    const float4 v = x4[c];
    amax = fmaxf(fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
  }
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);
  if (threadIdx.x == 0) part_max = amax;
  for (int i = threadIdx.x; i < n_groups; i += kThreads) s_sums[i] = 0;
  for (int i = threadIdx.x; i < l.gpart; i += kThreads) s_gpart[i] = 0;
  if (!kStepGroups) {
    for (int i = threadIdx.x; i < n_groups * nb; i += kThreads) s_dot[i] = 0;
  }
  cluster.sync();  // the partial maxima, and every block's Σa zeroed

  // 3. s_a from the eight partial maxima (exact in any order), then rank r's words.
  float cmax = lane < kCluster ? *cluster.map_shared_rank(&part_max, lane) : 0.0f;
#pragma unroll
  for (int off = 4; off > 0; off >>= 1) cmax = fmaxf(cmax, __shfl_xor_sync(kFull, cmax, off));
  const float s_a = __shfl_sync(kFull, cmax, 0) / kQmax;
  const abq_fused::Range share = abq_fused::RankShare(words, rank);
  const int w_begin = static_cast<int>(share.begin), w_end = static_cast<int>(share.end);
  const int g_first = w_begin / w.group_words;
  // Lane l stores plane l % ab into ranks l / ab, l / ab + 32 / ab, ...
  const int my_plane = lane % kAb;
  constexpr int kRanksPerLane = (kCluster + 32 / kAb - 1) / (32 / kAb);
  uint32_t* remote_act[kRanksPerLane];
#pragma unroll
  for (int i = 0; i < kRanksPerLane; ++i) {
    const int r = lane / kAb + i * (32 / kAb);
    remote_act[i] = r < kCluster ? cluster.map_shared_rank(s_act, r) : nullptr;
  }
  for (int word = w_begin + warp; word < w_end; word += kWarps) {
    const int64_t c = static_cast<int64_t>(word) * 32 + lane;  // < K: K is whole words
    int32_t v = 0;
    if (s_a != 0.0f) {
      v = static_cast<int32_t>(fminf(fmaxf(RoundHalfEven(p.x[c] / s_a), -kQmax), kQmax));
    }
    const uint32_t twos = static_cast<uint32_t>(v);
    uint32_t mine = 0;
#pragma unroll
    for (int i = 0; i < kAb; ++i) {
      const uint32_t bits = __ballot_sync(kFull, (twos >> i) & 1u);
      if (i == my_plane) mine = bits;
    }
#pragma unroll
    for (int i = 0; i < kRanksPerLane; ++i) {
      if (remote_act[i] != nullptr) remote_act[i][my_plane * l.pstride + word] = mine;
    }
    const int32_t word_sum = __reduce_add_sync(kFull, v);
    if (lane == 0) atomicAdd(&s_gpart[word / w.group_words - g_first], word_sum);
  }
  __syncthreads();
  if (w_begin < w_end) {
    const int groups = (w_end - 1) / w.group_words - g_first + 1;
    for (int i = threadIdx.x; i < groups * kCluster; i += kThreads) {
      const int gi = i / kCluster, r = i % kCluster;
      atomicAdd(cluster.map_shared_rank(s_sums + g_first + gi, r), s_gpart[gi]);
    }
  }
  cluster.sync();  // every plane word and Σa in every block

  // 4. The GEMV over the warp's units.
  const uint32_t wt0 = ActPlaneWeight<kAb>((2 * t4) % kAb);
  const uint32_t wt1 = ActPlaneWeight<kAb>((2 * t4 + 1) % kAb);
  auto part = [&](const int(&c)[4], int q) { return PlanePairDot(c, q, wt0, wt1); };
  // Lanes t4 >= 2 at ab = 4 hold zero columns: adding them changes nothing.
  auto reduce = [&](uint32_t v) {
    v += __shfl_xor_sync(kFull, v, 1);
    return v + __shfl_xor_sync(kFull, v, 2);
  };
  const uint32_t* bcol = g < kAb ? s_act + g * l.pstride + t4 : nullptr;
  int acc[kPairs][4] = {};
  uint32_t parity = 0;  // bit s: the phase slot s's barrier completes next
  int slot = 0;
  for (int ub = u0; ub < u1; ub += l.slot_steps) {
    const int cnt = min(l.slot_steps, u1 - ub);
    BarWait(&bars[warp][slot], (parity >> slot) & 1u);
    parity ^= 1u << slot;
    const uint32_t* frag = my_stage + slot * slot_words + g * l.stride + t4;
    int tile = ub / steps, step = ub % steps;
    // The general path's position in its k-group and the group (one division a slot).
    [[maybe_unused]] int gpos = kStepGroups ? 0 : step % p.group_steps;
    [[maybe_unused]] int grp = kStepGroups ? 0 : step / p.group_steps;
    for (int li = 0; li < cnt; ++li) {
      const uint32_t b = bcol != nullptr ? bcol[4 * step] : 0u;
      uint32_t a[kPairs][2];
#pragma unroll
      for (int q = 0; q < kPairs; ++q) {
        a[q][0] = frag[(2 * q) * kTileOuts * l.stride + 4 * li];
        a[q][1] = 2 * q + 1 < kWb ? frag[(2 * q + 1) * kTileOuts * l.stride + 4 * li] : 0u;
      }
      const int out = tile * kTileOuts + g;
      if constexpr (kStepGroups) {
        uint32_t v = 0;
#pragma unroll
        for (int q = 0; q < kPairs; ++q) {
          int c[4];
          MmaB1K128Zero(c, a[q][0], a[q][1], b);
          v += part(c, q);
        }
        v = reduce(v);
        if (t4 == 0) s_dot[step * nb + out] = static_cast<int32_t>(v);
      } else {
#pragma unroll
        for (int q = 0; q < kPairs; ++q) MmaB1K128(acc[q], a[q][0], a[q][1], b);
        // Flush where the group (the last one may be short), the tile's K or the warp's range
        // ends (warp-uniform).
        const bool group_end = ++gpos == p.group_steps || step + 1 == steps;
        if (group_end || ub + li + 1 == u1) {
          uint32_t v = 0;
#pragma unroll
          for (int q = 0; q < kPairs; ++q) {
            v += part(acc[q], q);
            acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0;
          }
          v = reduce(v);
          if (t4 == 0) atomicAdd(reinterpret_cast<unsigned*>(s_dot) + grp * nb + out, v);
        }
        if (group_end) {
          gpos = 0;
          ++grp;
        }
      }
      if (++step == steps) {
        step = 0;
        ++tile;
        grp = 0;
      }
    }
    if (next_fill < u1) {  // refill this slot (ring mode)
      __syncwarp();        // every lane is done with it
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      const int fc = min(l.slot_steps, u1 - next_fill);
      fill(slot, next_fill, fc);
      next_fill += fc;
    }
    if (l.slots == 2) slot ^= 1;
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();  // every dot, scale and zero point in
  if (tiles == 0) return;

  // 5. The epilogue. First every thread forms products for its share of the block's (group,
  // output) pairs: c_G = dot − z·Σa (int32, wrapping) and c_G·s_w in fp64, stored output-major
  // (the stages are free now), an inexact product flagging its output. Then a warp an output sums
  // them in group order, AbqEpilogue's chain: where the products allow any order
  // (abq_fused::OrderFree: every addition exact) the lanes add their groups and a butterfly adds
  // the lanes, which gives the chain's bits; otherwise lane 0 runs the chain.
  const int outs = static_cast<int>(std::min<int64_t>(nb, w.n - o0));
  double* s_prod = reinterpret_cast<double*>(fused_smem + l.stage_off);  // [nb][prod_stride]
  int* s_inexact = reinterpret_cast<int*>(fused_smem + l.flag_off);      // [nb]
  for (int i = threadIdx.x; i < nb; i += kThreads) s_inexact[i] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < n_groups * nb; i += kThreads) {
    const int gr = i / nb, ol = i % nb;
    if (ol >= outs) continue;
    const uint32_t d = static_cast<uint32_t>(s_dot[i]);
    uint32_t z;
    double scale;
    if (meta) {
      const uint32_t word = reinterpret_cast<const uint32_t*>(s_scales)[i];
      z = word >> 16;
      scale = static_cast<double>(
          __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu))));
    } else {
      z = static_cast<uint32_t>(s_zeros[i]);
      scale = static_cast<double>(s_scales[i]);
    }
    if (p.dot != nullptr) p.dot[(o0 + ol) * n_groups + gr] = static_cast<int32_t>(d);
    const double c =
        static_cast<double>(static_cast<int32_t>(d - z * static_cast<uint32_t>(s_sums[gr])));
    const double prod = __dmul_rn(c, scale);
    if (__fma_rn(c, scale, -prod) != 0.0) s_inexact[ol] = 1;  // any writer: the same value
    s_prod[ol * l.prod_stride + gr] = prod;
  }
  __syncthreads();
  for (int ol = warp; ol < outs; ol += kWarps) {
    const double* prods = s_prod + ol * l.prod_stride;
    const double sum = WarpProductSum(prods, n_groups, s_inexact[ol] == 0);
    if (lane == 0) p.y[o0 + ol] = __double2float_rn(__dmul_rn(static_cast<double>(s_a), sum));
  }
}

using FusedKernel = void (*)(FusedParams);

// The kernel for (weight planes, activation planes, one-step k-groups); null for other widths.
template <int kAb>
FusedKernel KernelForAb(int wb, bool step_groups) {
  switch (wb) {
    case 2:
      return step_groups ? AbqFusedGemvKernel<2, kAb, true> : AbqFusedGemvKernel<2, kAb, false>;
    case 3:
      return step_groups ? AbqFusedGemvKernel<3, kAb, true> : AbqFusedGemvKernel<3, kAb, false>;
    case 4:
      return step_groups ? AbqFusedGemvKernel<4, kAb, true> : AbqFusedGemvKernel<4, kAb, false>;
    case 8:
      return step_groups ? AbqFusedGemvKernel<8, kAb, true> : AbqFusedGemvKernel<8, kAb, false>;
    default:
      return nullptr;
  }
}
FusedKernel KernelFor(int wb, int ab, bool step_groups) {
  if (ab == 4) return KernelForAb<4>(wb, step_groups);
  if (ab == 8) return KernelForAb<8>(wb, step_groups);
  return nullptr;
}

// The launch configuration: grid, 512 threads, `bytes` of dynamic shared memory, clusters of 8,
// programmatic stream serialization.
struct LaunchConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[2];
  LaunchConfig(int grid, size_t bytes, cudaStream_t stream) {
    config.gridDim = dim3(static_cast<unsigned>(grid));
    config.blockDim = dim3(kThreads);
    config.dynamicSmemBytes = bytes;
    config.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = kCluster;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    attr[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[1].val.programmaticStreamSerializationAllowed = 1;
    config.attrs = attr;
    config.numAttrs = 2;
  }
};

// Per (device, kernel): whether its shared memory limit was raised to kMaxShared, and how many
// clusters of it fit on the device at once for a given dynamic shared memory size
// (cudaOccupancyMaxActiveClusters), so that launches ask the runtime once.
struct KernelFacts {
  bool raised = false;
  std::map<size_t, int> clusters;
};

// The clusters of `kernel` with `bytes` of dynamic shared memory that fit at once on the current
// device (0 when none does, or on error).
int MaxActiveClusters(FusedKernel kernel, size_t bytes) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  static auto* mu = new std::mutex();
  static auto* facts = new std::map<std::pair<int, FusedKernel>, KernelFacts>();
  std::lock_guard<std::mutex> lock(*mu);
  KernelFacts& f = (*facts)[{device, kernel}];
  if (!f.raised) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(kMaxShared)) != cudaSuccess) {
      return 0;
    }
    f.raised = true;
  }
  auto it = f.clusters.find(bytes);
  if (it != f.clusters.end()) return it->second;
  LaunchConfig lc(kCluster, bytes, nullptr);
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &lc.config) != cudaSuccess) clusters = 0;
  f.clusters[bytes] = clusters;
  return clusters;
}

// The plan for one token of `w` with ab-bit activations on the current device, and its kernel;
// bytes == 0 where the fused kernel does not apply: m != 1, a shape the plan refuses, operands
// not 16-byte aligned, or no cluster of its blocks fits on the device. The grid targets one
// block a multiprocessor, or as many blocks as fit at once when that is fewer (a GPC whose
// multiprocessors do not divide into clusters of 8 leaves some idle).
abq_fused::Layout PlanOn(const AbqDeviceWeights& w, int64_t m, int ab, FusedKernel* kernel) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (m != 1 || !AbqWeightsOk(w) || !aligned(w.planes) ||
      (w.meta != nullptr ? !aligned(w.meta) : !aligned(w.scales) || !aligned(w.zeros))) {
    return abq_fused::Layout{};
  }
  const abq_fused::LayerShape shape = ShapeOf(w, ab);
  const int group_steps = w.n_groups == 1 ? w.words / 4 : w.group_words / 4;
  *kernel = KernelFor(w.weight_bits, ab, group_steps == 1);
  if (*kernel == nullptr) return abq_fused::Layout{};
  abq_fused::Layout l = abq_fused::ChooseLayout(shape, SmCount());
  if (l.bytes == 0) return l;
  const int clusters = MaxActiveClusters(*kernel, l.bytes);
  if (clusters == 0) return abq_fused::Layout{};
  if (clusters * kCluster < l.grid) {
    const abq_fused::Layout fewer = abq_fused::ChooseLayout(shape, clusters * kCluster);
    if (fewer.bytes > 0 && MaxActiveClusters(*kernel, fewer.bytes) > 0) l = fewer;
  }
  return l;
}

}  // namespace

bool AbqFusedGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab) {
  FusedKernel kernel = nullptr;
  return PlanOn(w, m, ab, &kernel).bytes > 0;
}

cudaError_t LaunchAbqFusedGemv(const float* x, const AbqDeviceWeights& w, int ab, float* y,
                               int32_t* dot, cudaStream_t stream) {
  FusedParams p{};
  FusedKernel kernel = nullptr;
  p.l = PlanOn(w, 1, ab, &kernel);
  if (p.l.bytes == 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return cudaErrorInvalidValue;
  p.w = w;
  p.x = x;
  p.y = y;
  p.dot = dot;
  p.steps = w.words / 4;
  p.group_steps = w.n_groups == 1 ? p.steps : w.group_words / 4;
  LaunchConfig lc(p.l.grid, p.l.bytes, stream);
  return cudaLaunchKernelEx(&lc.config, kernel, p);
}

}  // namespace qcal::kernels::cuda
