// The b1 GEMV kernel of the ABQ GEMM (m <= kAbqGemvTokens tokens; launcher and applicability in
// abq_b1.cuh, spec kernels/cpu/abq_ref.h). Built with -fmad=false; the epilogue spells its
// arithmetic with __dadd_rn / __dmul_rn / __double2float_rn, so it performs AbqEpilogue's
// operations and no others.
//
// At decode sizes the GEMM is the weights' bytes (14 MB with scales and zero points for a W2
// 4096 × 11008 layer, 2.9 µs at 4.8 TB/s), so the kernel is shaped for memory parallelism,
// coalesced copies and few instructions a weight:
//   - A block owns 8 outputs over all of K; its 4 warps split K into equal ranges of k128 steps
//     (grid: ceil(n / 8) blocks; at n = 4096, 512 blocks, 4 an SM in one wave).
//   - A warp copies its range's plane rows into its own shared-memory stage, the first stage
//     before griddepcontrol.wait, so that the weights stream while the activation prologue runs:
//     one 1-D bulk copy (TMA, completing on the warp's mbarrier) a row when plane rows are
//     16-byte aligned (words % 4 == 0), else 4-byte cp.async copies. The stage holds kStage steps
//     (24 at W2, m = 1) of the block's 8·wb plane rows, plane-major with a row stride that is an
//     odd multiple of 4 words, so that the fragment reads below hit 32 banks.
//   - mma.m16n8k128 b1 AND + popcount with A row g = plane 2q of output g and row g + 8 = plane
//     2q + 1 of the same output (W3's fourth plane is zero), B column g = an activation plane
//     (loaded into registers): a lane's four counts all belong to one output and one token, so a
//     k-group's dot is the counts times their plane weights, added over the lane quad (ab = 8) or
//     lane pair (ab = 4) holding the token's planes by one or two shuffles.
//   - The dot goes to shared memory: stored once when every k-group is one k128 step (group size
//     128: a warp owns whole groups), else added with a shared-memory atomic when a group ends in
//     a warp's range (integers: the order of the warps' additions does not matter).
//   - After a barrier, the block's threads form every c_G = dot − z·Σa, and one thread per
//     (token, output) runs AbqEpilogue's chain over the groups in order: S = S + c_G·s_w in fp64,
//     y = float(s_a·S). Every output is written by one thread: results are bit-identical to the
//     reference and run to run.
// Integer sums wrap in uint32 (ValidateAbqShape keeps the true values below 2^31).
// How it got here (ncu, 4096 × 11008 W2A8, m = 1; docs/BENCHMARKS.md): weights loaded straight
// into registers (4 lanes × 4 bytes of 8 rows a load) with a shuffle reduction and integer
// division per group ran 1,900 instructions a warp (47% of the issue slots) in 18.5 µs; without
// the divisions and with one-step groups stored once, 770 (11 µs); staging and 4 warps a block,
// 630. What is left (about 2 TB/s marginal, 2.5 µs fixed over an empty launch) is not yet
// broken down.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvOuts = 8;  // outputs a block (the mma's row pairs)
constexpr size_t kGemvMaxShared = 96 * 1024;
// Blocks an SM at one n-tile (64 registers a thread); more n-tiles need up to 128 registers.
constexpr int kGemvBlocksPerSm = 8;

struct GemvParams {
  AbqDeviceWeights w;
  const uint32_t* a_planes;
  const float* a_scales;
  const int32_t* a_sums;
  int m;
  int steps;        // k128 steps: ceil(words / 4)
  int group_steps;  // steps per k-group (all of them when there is one group)
  int warp_steps;   // steps per warp: ceil(steps / kGemvWarps)
  float* y;
  int32_t* dot;
};

// A warp's stage: kStage steps of 8·wb plane rows (about 6 KB; its activation words, kStage per
// n-tile, are registers), with a row stride of kStride words (an odd multiple of 4).
constexpr int GemvStage(int wb, int tiles) {
  return std::clamp(std::min(384 / (8 * wb), 32 / tiles), 2, 24);
}
constexpr int GemvStride(int wb, int tiles) {
  return 4 * GemvStage(wb, tiles) + (GemvStage(wb, tiles) % 2 == 0 ? 4 : 8);
}
size_t GemvStageWords(int wb, int tiles) {
  return static_cast<size_t>(8 * wb) * GemvStride(wb, tiles);
}

// Shared bytes: the warps' stages, dot and c_G [m][n_groups][8], s_w and z [n_groups][8],
// Σa [m][n_groups].
size_t GemvSharedBytes(int n_groups, int64_t m, int wb, int tiles) {
  return 4 * (kGemvWarps * GemvStageWords(wb, tiles) +
              static_cast<size_t>(n_groups) *
                  (static_cast<size_t>(m) * (2 * kGemvOuts + 1) + 2 * kGemvOuts));
}

// The kernel's n8 tiles of activation plane columns for m tokens: 1, 2 or 4.
int GemvTiles(int64_t m, int ab) {
  const int64_t tiles = (m * ab + 7) / 8;
  return tiles <= 1 ? 1 : tiles <= 2 ? 2 : 4;
}

// kStepGroups: every k-group is one k128 step (group size 128, or K <= 128), so that a warp owns
// whole groups and stores each group's dot once, without atomics or zeroing.
template <int kWb, int kAb, int kTiles, bool kStepGroups>
__global__ void __launch_bounds__(kGemvThreads,
                                  kTiles == 1 ? kGemvBlocksPerSm : kGemvBlocksPerSm / 2)
    AbqBinaryGemvKernel(GemvParams p) {
  constexpr int kPairs = (kWb + 1) / 2;
  constexpr int kRows = 8 * kWb;
  constexpr int kStage = GemvStage(kWb, kTiles);
  constexpr int kStride = GemvStride(kWb, kTiles);
  extern __shared__ __align__(16) uint32_t gemv_smem[];
  const AbqDeviceWeights& w = p.w;
  const int n_groups = w.n_groups, m = p.m, words = w.words;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t4 = lane & 3;
  uint32_t* stage = gemv_smem + warp * kRows * kStride;  // [plane j][output ol][kStride]
  int32_t* s_dot = reinterpret_cast<int32_t*>(gemv_smem + kGemvWarps * kRows * kStride);
  int32_t* s_c = s_dot + m * n_groups * kGemvOuts;
  float* s_scales = reinterpret_cast<float*>(s_c + m * n_groups * kGemvOuts);
  int32_t* s_zeros = reinterpret_cast<int32_t*>(s_scales + n_groups * kGemvOuts);
  int32_t* s_sums = s_zeros + n_groups * kGemvOuts;  // [m][n_groups]
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kGemvOuts;
  const int s_begin = warp * p.warp_steps, s_end = min(s_begin + p.warp_steps, p.steps);

  // Copies steps [sb, sb + nst) of the block's plane rows into the warp's stage (row r = plane
  // r / 8 of output o0 + r % 8): a bulk copy a row when plane rows are 16-byte aligned (words % 4
  // == 0), else chunk c is row c / kStage, step sb + c % kStage, four 4-byte copies within the
  // row (rows past the last output and words past the row's end zero-filled).
  const uint32_t* block_rows = w.planes + o0 * kWb * static_cast<int64_t>(words);
  __shared__ uint64_t stage_bar[kGemvWarps];
  uint64_t* bar = stage_bar + warp;
  uint32_t bar_parity = 0;
  const bool bulk = words % 4 == 0;  // 16-byte aligned plane rows: one bulk copy a row
  if (bulk && lane == 0) BarInit(bar);
  __syncwarp();
  auto copy_stage = [&](int sb, int nst) {
    if (bulk) {
      // Lane 0 announces the bytes, then lane r copies row r (rows of outputs past n are not
      // copied: their sums go to slots nobody reads).
      const int rows_in = static_cast<int>(w.n - o0 < kGemvOuts ? w.n - o0 : kGemvOuts) * kWb;
      if (lane == 0) BarArriveExpect(bar, static_cast<uint32_t>(rows_in * nst * 16));
      __syncwarp();
      for (int r = lane; r < kRows; r += 32) {
        const int ol = r % kGemvOuts, j = r / kGemvOuts;
        if (o0 + ol < w.n) {
          BulkCopy(stage + r * kStride,
                   block_rows + (ol * kWb + j) * static_cast<int64_t>(words) + 4 * sb,
                   static_cast<uint32_t>(nst * 16), bar);
        }
      }
      return;
    }
    for (int c = lane; c < kRows * kStage; c += 32) {
      const int r = c / kStage, i = c % kStage;
      if (i >= nst) continue;
      const int ol = r % kGemvOuts, j = r / kGemvOuts;
      const bool in = o0 + ol < w.n;
      const uint32_t* src =
          block_rows + (ol * kWb + j) * static_cast<int64_t>(words) + 4 * (sb + i);
      uint32_t* dst = stage + r * kStride + 4 * i;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool ok = in && 4 * (sb + i) + e < words;
        CopyAsync4(dst + e, ok ? src + e : w.planes, ok ? 4 : 0);
      }
    }
    mma::CopyAsyncCommit();
  };
  // Waits for the stage's copies (and, the first time, the block's cp.async copies of s_w, z and
  // Σa) and makes them visible to the warp.
  auto wait_stage = [&]() {
    if (bulk) {
      BarWait(bar, bar_parity);
      bar_parity ^= 1;
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    __syncwarp();
  };

  // Before the prologue is known to be done: s_w, z and the first stage's weights. A k-group's
  // 8 scales (and zero points) are 32 contiguous bytes: two 16-byte copies when n % 4 == 0 (then
  // every block's outputs start 16-byte aligned), else eight 4-byte ones.
  if (w.n % 4 == 0) {
    for (int i = threadIdx.x; i < n_groups * 2; i += kGemvThreads) {
      const int64_t o = o0 + 4 * (i & 1), gi = static_cast<int64_t>(i >> 1) * w.n + o;
      const bool in = o < w.n;
      mma::CopyAsync16(s_scales + 4 * i, in ? w.scales + gi : w.scales, in ? 16 : 0);
      mma::CopyAsync16(s_zeros + 4 * i, in ? w.zeros + gi : w.zeros, in ? 16 : 0);
    }
  } else {
    for (int i = threadIdx.x; i < n_groups * kGemvOuts; i += kGemvThreads) {
      const int64_t o = o0 + (i & (kGemvOuts - 1)), gi = static_cast<int64_t>(i >> 3) * w.n + o;
      const bool in = o < w.n;
      CopyAsync4(s_scales + i, in ? w.scales + gi : w.scales, in ? 4 : 0);
      CopyAsync4(s_zeros + i, in ? w.zeros + gi : w.zeros, in ? 4 : 0);
    }
  }
  if (!kStepGroups) {
    for (int i = threadIdx.x; i < m * n_groups * kGemvOuts; i += kGemvThreads) s_dot[i] = 0;
  }
  if (s_begin < s_end) copy_stage(s_begin, min(kStage, s_end - s_begin));
  // Launched programmatically after the prologue (LaunchPdl): everything below may read its
  // outputs. A no-op for an ordinary launch.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  for (int i = threadIdx.x; i < m * n_groups; i += kGemvThreads) {
    CopyAsync4(s_sums + i, p.a_sums + i, 4);
  }
  mma::CopyAsyncCommit();

  // Column g of n-tile nt: token tok, activation plane g % kAb; its word 4·s + t4 is
  // bp[nt][4·s] (null past the last token; tile 0 of ab = 8 is token 0, always present).
  const uint32_t* bp[kTiles];
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
    const int tok = kAb == 8 ? nt : 2 * nt + g / 4;
    bp[nt] =
        tok < m ? p.a_planes + (static_cast<int64_t>(tok) * kAb + g % kAb) * words + t4 : nullptr;
  }
  const uint32_t wt0 = ActPlaneWeight<kAb>((2 * t4) % kAb);
  const uint32_t wt1 = ActPlaneWeight<kAb>((2 * t4 + 1) % kAb);
  // The lane's token in the C fragment (columns 2·t4, 2·t4 + 1), and whether it holds the
  // reduced dot of its quad (ab = 8) or lane pair (ab = 4).
  auto c_tok = [&](int nt) { return kAb == 8 ? nt : 2 * nt + (t4 >> 1); };
  const bool writer = kAb == 8 ? t4 == 0 : (t4 & 1) == 0;
  auto part = [&](const int(&c)[4], int q) { return PlanePairDot(c, q, wt0, wt1); };
  auto reduce = [&](uint32_t v) {
    v += __shfl_xor_sync(kFull, v, 1);
    if (kAb == 8) v += __shfl_xor_sync(kFull, v, 2);
    return v;
  };
  // The stage's fragment words: lane (g, t4) reads word 4·i + t4 of rows (2q)·8 + g and
  // (2q + 1)·8 + g.
  const uint32_t* frag = stage + g * kStride + t4;

  int acc[kPairs][kTiles][4] = {};
  // The general path's k-group and the step after which the warp next adds its sums (the
  // group's last step, or the warp's): one division per warp.
  int group = s_begin / p.group_steps;
  int flush_after = min((group + 1) * p.group_steps, s_end) - 1;
  __syncthreads();  // s_dot zeroed before any warp adds to it
  for (int sb = s_begin; sb < s_end; sb += kStage) {
    const int nst = min(kStage, s_end - sb);
    if (sb != s_begin) {
      __syncwarp();  // every lane is done with the previous stage
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // before the async writes
      copy_stage(sb, nst);
    }
    uint32_t b[kStage][kTiles];
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
#pragma unroll
      for (int nt = 0; nt < kTiles; ++nt) {
        const bool ok =
            ((kAb == 8 && nt == 0) || bp[nt] != nullptr) && i < nst && 4 * (sb + i) + t4 < words;
        b[i][nt] = ok ? __ldg(bp[nt] + 4 * (sb + i)) : 0u;
      }
    }
    wait_stage();
#pragma unroll
    for (int i = 0; i < kStage; ++i) {
      if (i >= nst) break;  // warp-uniform
      const int s = sb + i;
      uint32_t a[kPairs][2];
#pragma unroll
      for (int q = 0; q < kPairs; ++q) {
        a[q][0] = frag[(2 * q) * kGemvOuts * kStride + 4 * i];
        a[q][1] = 2 * q + 1 < kWb ? frag[(2 * q + 1) * kGemvOuts * kStride + 4 * i] : 0u;
      }
      if constexpr (kStepGroups) {
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
          uint32_t v = 0;
#pragma unroll
          for (int q = 0; q < kPairs; ++q) {
            int c[4];
            MmaB1K128Zero(c, a[q][0], a[q][1], b[i][nt]);
            v += part(c, q);
          }
          v = reduce(v);
          const int t = c_tok(nt);
          if (writer && t < m) s_dot[(t * n_groups + s) * kGemvOuts + g] = static_cast<int32_t>(v);
        }
      } else {
#pragma unroll
        for (int q = 0; q < kPairs; ++q) {
#pragma unroll
          for (int nt = 0; nt < kTiles; ++nt) MmaB1K128(acc[q][nt], a[q][0], a[q][1], b[i][nt]);
        }
        if (s == flush_after) {  // warp-uniform: the group (or the warp's range) ends
#pragma unroll
          for (int nt = 0; nt < kTiles; ++nt) {
            uint32_t v = 0;
#pragma unroll
            for (int q = 0; q < kPairs; ++q) {
              v += part(acc[q][nt], q);
              acc[q][nt][0] = acc[q][nt][1] = acc[q][nt][2] = acc[q][nt][3] = 0;
            }
            v = reduce(v);
            const int t = c_tok(nt);
            if (writer && t < m) {
              atomicAdd(reinterpret_cast<unsigned*>(s_dot) + (t * n_groups + group) * kGemvOuts + g,
                        v);
            }
          }
          ++group;
          flush_after = min(flush_after + p.group_steps, s_end - 1);
        }
      }
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();

  // The epilogue. Every thread first forms c_G = dot − z·Σa for its share of the block's (token,
  // group, output) sums, then one thread per (token, output) runs the fp64 chain over the groups
  // in order: only the chain is sequential.
  {
    const int ol = threadIdx.x % kGemvOuts;
    const bool in = o0 + ol < w.n;
    for (int t = 0; t < m; ++t) {
      for (int gr = threadIdx.x / kGemvOuts; gr < n_groups; gr += kGemvThreads / kGemvOuts) {
        const int i = (t * n_groups + gr) * kGemvOuts + ol;
        const uint32_t d = static_cast<uint32_t>(s_dot[i]);
        const int32_t c =
            static_cast<int32_t>(d - static_cast<uint32_t>(s_zeros[gr * kGemvOuts + ol]) *
                                         static_cast<uint32_t>(s_sums[t * n_groups + gr]));
        if (p.dot != nullptr && in) {
          p.dot[(static_cast<int64_t>(t) * w.n + o0 + ol) * n_groups + gr] =
              static_cast<int32_t>(d);
        }
        s_c[i] = c;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x < m * kGemvOuts) {
    const int t = threadIdx.x / kGemvOuts, ol = threadIdx.x % kGemvOuts;
    const int64_t o = o0 + ol;
    if (o < w.n) {
      const int32_t* cs = s_c + t * n_groups * kGemvOuts + ol;
      const float* ss = s_scales + ol;
      double out = 0.0;
#pragma unroll 8
      for (int gr = 0; gr < n_groups; ++gr) {
        out = __dadd_rn(out, __dmul_rn(static_cast<double>(cs[gr * kGemvOuts]),
                                       static_cast<double>(ss[gr * kGemvOuts])));
      }
      p.y[static_cast<int64_t>(t) * w.n + o] =
          __double2float_rn(__dmul_rn(static_cast<double>(p.a_scales[t]), out));
    }
  }
}

template <int kWb, int kAb, int kTiles, bool kStepGroups>
cudaError_t LaunchGemv(const GemvParams& p, cudaStream_t stream) {
  static std::atomic<uint64_t> raised{0};
  const auto kernel = AbqBinaryGemvKernel<kWb, kAb, kTiles, kStepGroups>;
  const size_t shared = GemvSharedBytes(p.w.n_groups, p.m, kWb, kTiles);
  const cudaError_t err = RaiseSharedLimit(kernel, shared, kGemvMaxShared, raised);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((p.w.n + kGemvOuts - 1) / kGemvOuts));
  return LaunchPdl(kernel, p, grid, kGemvThreads, shared, stream);
}

// The fewest n8 tiles that hold m·ab activation plane columns (1, 2 or 4), and whether the
// k-groups are single steps.
template <int kWb, int kAb>
cudaError_t LaunchGemvTiles(const GemvParams& p, cudaStream_t stream) {
  const int tiles = GemvTiles(p.m, kAb);
  if (p.group_steps == 1) {
    if (tiles <= 1) return LaunchGemv<kWb, kAb, 1, true>(p, stream);
    if (tiles <= 2) return LaunchGemv<kWb, kAb, 2, true>(p, stream);
    return LaunchGemv<kWb, kAb, 4, true>(p, stream);
  }
  if (tiles <= 1) return LaunchGemv<kWb, kAb, 1, false>(p, stream);
  if (tiles <= 2) return LaunchGemv<kWb, kAb, 2, false>(p, stream);
  return LaunchGemv<kWb, kAb, 4, false>(p, stream);
}

template <int kAb>
cudaError_t LaunchGemvAb(const GemvParams& p, cudaStream_t stream) {
  switch (p.w.weight_bits) {
    case 2:
      return LaunchGemvTiles<2, kAb>(p, stream);
    case 3:
      return LaunchGemvTiles<3, kAb>(p, stream);
    case 4:
      return LaunchGemvTiles<4, kAb>(p, stream);
    case 8:
      return LaunchGemvTiles<8, kAb>(p, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool AbqGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab) {
  return m >= 1 && m <= kAbqGemvTokens && (ab == 4 || ab == 8) && w.n_groups >= 1 &&
         (w.n_groups == 1 || w.group_words % 4 == 0) &&
         GemvSharedBytes(w.n_groups, m, w.weight_bits, GemvTiles(m, ab)) <= kGemvMaxShared;
}

cudaError_t LaunchAbqBinaryGemv(const AbqDeviceWeights& w, const uint32_t* a_planes,
                                const float* a_scales, const int32_t* a_sums, int64_t m, int ab,
                                float* y, int32_t* dot, cudaStream_t stream) {
  if (!AbqGemvApplies(w, m, ab) || w.words < 1) return cudaErrorInvalidValue;
  GemvParams p{};
  p.w = w;
  p.a_planes = a_planes;
  p.a_scales = a_scales;
  p.a_sums = a_sums;
  p.m = static_cast<int>(m);
  p.steps = (w.words + 3) / 4;
  p.group_steps = w.n_groups == 1 ? p.steps : w.group_words / 4;
  p.warp_steps = (p.steps + kGemvWarps - 1) / kGemvWarps;
  p.y = y;
  p.dot = dot;
  if (ab == 4) return LaunchGemvAb<4>(p, stream);
  if (ab == 8) return LaunchGemvAb<8>(p, stream);
  return cudaErrorInvalidValue;
}

}  // namespace qcal::kernels::cuda
