// The b1 decode kernel of the ABQ GEMM (m <= kAbqDecodeTokens tokens; launcher and applicability
// in abq_b1.cuh, dispatch in abq_gemm.cu, spec kernels/cpu/abq_ref.h). Built with -fmad=false; the
// epilogue spells its arithmetic with __dadd_rn / __dmul_rn / __double2float_rn, so it performs
// AbqEpilogue's operations and no others. Fragment layouts: abq_gemm.cu's header comment.
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// The kernel.
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

// n8 tiles of activation plane columns of m tokens (m·ab / 8, rounded up).
int DecodeTiles(int64_t m, int ab) { return static_cast<int>((m * ab + 7) / 8); }

// Whether the decode kernel takes the GEMM: m <= kAbqDecodeTokens, k-groups of whole k128 steps (or
// one group), and its shared memory within kDecodeMaxShared (s_w and z of every k-group stay
// there: at most ~400 groups at W2 m = 1).
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
cudaError_t LaunchBinaryDecode(const DecodeParams& d, cudaStream_t stream) {
  constexpr int kMaxTiles = kAbqDecodeTokens * kAb / 8;
  if (d.tiles <= 1) return LaunchDecodeKernel<kWb, kAb, 1>(d, stream);
  if (d.tiles <= 4) return LaunchDecodeKernel<kWb, kAb, 4>(d, stream);
  return LaunchDecodeKernel<kWb, kAb, kMaxTiles>(d, stream);
}

template <int kAb>
cudaError_t LaunchBinaryDecodeAb(const DecodeParams& d, cudaStream_t stream) {
  switch (d.w.weight_bits) {
    case 2:
      return LaunchBinaryDecode<2, kAb>(d, stream);
    case 3:
      return LaunchBinaryDecode<3, kAb>(d, stream);
    case 4:
      return LaunchBinaryDecode<4, kAb>(d, stream);
    case 8:
      return LaunchBinaryDecode<8, kAb>(d, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool AbqDecodeApplies(const AbqDeviceWeights& w, int64_t m, int ab) {
  return m >= 1 && (ab == 4 || ab == 8) && DecodeApplies(w, m, ab);
}

cudaError_t LaunchAbqBinaryDecode(const AbqDeviceWeights& w, const uint32_t* a_planes,
                                  const float* a_scales, const int32_t* a_sums, int64_t m, int ab,
                                  float* y, int32_t* dot, cudaStream_t stream) {
  if (!AbqDecodeApplies(w, m, ab)) return cudaErrorInvalidValue;
  const DecodeParams d{w, a_planes, a_scales, a_sums, static_cast<int>(m), DecodeTiles(m, ab),
                       y, dot};
  if (ab == 4) return LaunchBinaryDecodeAb<4>(d, stream);
  return LaunchBinaryDecodeAb<8>(d, stream);
}

}  // namespace qcal::kernels::cuda
