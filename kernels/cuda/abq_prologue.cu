// The ABQ activation prologue (launcher and contract in abq_gemm.cuh; spec
// kernels/cpu/abq_ref.h, AbqQuantizeActivations): per-token quantization of x packed into
// activation planes, with s_a and Σa per k-group, bit for bit the reference's.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/abq_b1.cuh"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/block_reduce.cuh"
#include "kernels/quant_grid.h"

namespace qcal::kernels::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPrologueThreads = 1024;             //
constexpr int kMaxPrologueGroups = 48 * 1024 / 4;  // Σa per group in shared memory
constexpr int kProloguePartsMax = 16;              // blocks a token at most
constexpr int kProloguePartThreads = 512;          // threads of a block when there are parts
constexpr int kProloguePartWords = 16;             // words a part at least

// Blocks (token, part): grid.x walks the tokens, grid.y the parts of a token's k-groups (one part
// when there are many tokens; up to kProloguePartsMax at decode sizes, so that a single token is
// not one SM's work). Every block computes its token's maximum over all of K (exact in any order;
// each block reads the row, 44 KB at K = 11008, from L2), then quantizes and packs the words of
// its part's whole k-groups and writes their Σa. The codes are ref AbqQuantizeActivations' (IEEE
// division, RoundHalfEven, clamp that maps NaN to −qmax). Each warp packs whole words: lane l
// holds column 32·word + l, and a ballot per plane gives that plane's word with column l at bit
// l. Σa per group is an integer sum (shared-memory atomics: exact in any order). The loops are
// unrolled so that each thread has several loads in flight (the maximum with float4 loads when
// the row is 16-byte aligned: fmaxf ignores NaN in any order).
template <int kAb, int kThreads>
__global__ void __launch_bounds__(kThreads)
    AbqPrologueKernel(const float* x, int64_t k, int words, int group_words, int n_groups,
                      int part_groups, uint32_t* planes, float* scales, int32_t* sums) {
  extern __shared__ int32_t group_sums[];
  __shared__ float scratch[32];
  // The GEMM that follows may start now (it waits for this grid's completion before it reads the
  // activations: griddepcontrol.wait).
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
  constexpr float kQmax = static_cast<float>((1 << (kAb - 1)) - 1);
  const int64_t t = blockIdx.x;
  const int g_begin = blockIdx.y * part_groups, g_end = min(g_begin + part_groups, n_groups);
  const int w_begin = g_begin * group_words, w_end = min(g_end * group_words, words);
  const float* xr = x + t * k;
  float amax = 0.0f;
  if (k % 4 == 0 && reinterpret_cast<uintptr_t>(xr) % 16 == 0) {  // float4 loads
    const float4* x4 = reinterpret_cast<const float4*>(xr);
#pragma unroll 8
    for (int64_t c = threadIdx.x; c < k / 4; c += kThreads) {
      const float4 v = x4[c];
      amax = fmaxf(fmaxf(amax, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
    }
  } else {
#pragma unroll 4
    for (int64_t c = threadIdx.x; c < k; c += kThreads) amax = fmaxf(amax, fabsf(xr[c]));
  }
  amax = BlockReduce(amax, MaxOp(), 0.0f, scratch);
  const float s = amax / kQmax;
  if (threadIdx.x == 0 && blockIdx.y == 0) scales[t] = s;
  for (int gr = threadIdx.x; gr < g_end - g_begin; gr += kThreads) group_sums[gr] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint32_t* tp = planes + t * kAb * static_cast<int64_t>(words);
#pragma unroll 4
  for (int word = w_begin + warp; word < w_end; word += kThreads / 32) {
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
    if (lane == 0) atomicAdd(&group_sums[word / group_words - g_begin], word_sum);
  }
  __syncthreads();
  for (int gr = threadIdx.x; gr < g_end - g_begin; gr += kThreads) {
    sums[t * n_groups + g_begin + gr] = group_sums[gr];
  }
}

}  // namespace

cudaError_t LaunchAbqPrologue(const float* x, const AbqDeviceWeights& w,
                              const AbqDeviceActivations& a, cudaStream_t stream) {
  if (!AbqWeightsOk(w) || a.m < 1 || a.m > 0x7fffffff || w.n_groups > kMaxPrologueGroups) {
    return cudaErrorInvalidValue;
  }
  // Parts of a token's groups: one when the tokens fill the GPU, else up to kProloguePartsMax of
  // at least kProloguePartWords words each.
  int parts = 1;
  if (a.m < kProloguePartsMax) {
    const int by_words = std::max(1, w.words / kProloguePartWords);
    parts = std::min({kProloguePartsMax, w.n_groups, by_words});
  }
  const int part_groups = (w.n_groups + parts - 1) / parts;
  parts = (w.n_groups + part_groups - 1) / part_groups;
  const size_t shared = static_cast<size_t>(part_groups) * sizeof(int32_t);
  const dim3 blocks(static_cast<unsigned>(a.m), static_cast<unsigned>(parts));
  // A token's parts are smaller blocks, so that the GEMM's blocks fit beside them (PDL).
  const auto launch = [&](auto kernel, int threads) {
    kernel<<<blocks, threads, shared, stream>>>(x, w.k, w.words, w.group_words, w.n_groups,
                                                part_groups, a.planes, a.scales, a.sums);
  };
  if (a.act_bits == 4) {
    parts > 1 ? launch(AbqPrologueKernel<4, kProloguePartThreads>, kProloguePartThreads)
              : launch(AbqPrologueKernel<4, kPrologueThreads>, kPrologueThreads);
  } else if (a.act_bits == 8) {
    parts > 1 ? launch(AbqPrologueKernel<8, kProloguePartThreads>, kProloguePartThreads)
              : launch(AbqPrologueKernel<8, kPrologueThreads>, kPrologueThreads);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace qcal::kernels::cuda
