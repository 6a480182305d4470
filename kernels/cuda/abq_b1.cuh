// Pieces shared by the ABQ kernels' files (abq_gemm.cu, abq_gemv.cu, abq_gemv_fused.cu,
// abq_dp4a.cu): the b1 AND + popcount mma.sync products, the bulk copies (TMA) completing on an
// mbarrier, the plane weights of activation planes, the launch with programmatic stream
// serialization, a warp's sum of an output's epilogue products, and the GEMV launcher that
// abq_gemm.cu's dispatch calls. Internal to kernels/cuda: the public launchers are
// abq_gemm.cuh's.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "kernels/abq_fused_plan.h"
#include "kernels/abq_ops.h"
#include "kernels/cuda/abq_gemm.cuh"
#include "kernels/cuda/device_info.cuh"
#include "kernels/cuda/mma_sync.cuh"

namespace qcal::kernels::cuda {

// c += popc(A AND B) over k = 256 (a0..a3, b0, b1) or k = 128 (a0, a1, b0): fragment layouts in
// abq_gemm.cu's header comment.
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

// c = popc(A AND B) over k = 128 with a zero accumulator (no register zeroing before it).
__device__ __forceinline__ void MmaB1K128Zero(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  asm("mma.sync.aligned.m16n8k128.row.col.s32.b1.b1.s32.and.popc {%0, %1, %2, %3}, {%4, %5}, "
      "{%6}, {%7, %7, %7, %7};\n"
      : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(0));
}

// The 1-D bulk copy (TMA) global -> shared, completing on an mbarrier: the copies bypass the
// SM's load path (an ncu profile of cp.async copies of the same bytes showed the kernel at 1.3
// TB/s with every copy in flight from the start, bound by the outstanding misses an SM tracks).
__device__ __forceinline__ void BarInit(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(mma::SharedAddress(bar))
               : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void BarArriveExpect(uint64_t* bar, uint32_t bytes) {
  asm volatile(
      "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mma::SharedAddress(bar)),
      "r"(bytes)
      : "memory");
}
__device__ __forceinline__ void BulkCopy(void* dst, const void* src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::
          "r"(mma::SharedAddress(dst)),
      "l"(src), "r"(bytes), "r"(mma::SharedAddress(bar))
      : "memory");
}
__device__ __forceinline__ void BarWait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n}\n" ::"r"(mma::SharedAddress(bar)),
      "r"(parity)
      : "memory");
}

// 4 bytes global -> shared without a register (completed by cp.async.wait_all); src_bytes 0 fills
// zeros.
__device__ __forceinline__ void CopyAsync4(void* dst, const void* src, int src_bytes = 4) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes)
               : "memory");
}

// sgn_i·2^i modulo 2^32: the top activation plane carries the two's complement sign.
template <int kAb>
__device__ __forceinline__ uint32_t ActPlaneWeight(int i) {
  return i == kAb - 1 ? 0u - (1u << i) : 1u << i;
}

// A lane's part of a k-group's dot from the counts c of one b1 mma whose A rows g and g + 8 are
// weight planes 2q and 2q + 1 of one output and whose B columns 2·t4 and 2·t4 + 1 carry activation
// plane weights wt0 and wt1 (ActPlaneWeight): the counts times their plane weights, modulo 2^32.
__device__ __forceinline__ uint32_t PlanePairDot(const int (&c)[4], int q, uint32_t wt0,
                                                 uint32_t wt1) {
  const uint32_t lo = static_cast<uint32_t>(c[0]) * wt0 + static_cast<uint32_t>(c[1]) * wt1;
  const uint32_t hi = static_cast<uint32_t>(c[2]) * wt0 + static_cast<uint32_t>(c[3]) * wt1;
  return (lo << (2 * q)) + (hi << (2 * q + 1));
}

// A kernel launched with programmatic stream serialization: it may start while the prologue
// before it on the stream runs (fetching its weights), which hides most of a launch's latency;
// griddepcontrol.wait orders its reads of the activations after the prologue.
template <typename Kernel, typename Params>
cudaError_t LaunchPdl(Kernel kernel, const Params& p, dim3 grid, int threads, size_t shared,
                      cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p);
}

// Whether `w` is consistent: sizes that fit the kernels' int indices, words = ceil(k / 32), and
// n_groups = ceil(words / group_words).
inline bool AbqWeightsOk(const AbqDeviceWeights& w) {
  return w.n >= 1 && w.k >= 1 && w.n <= 0x7fffffff && w.words == (w.k + 31) / 32 &&
         w.group_words >= 1 && w.n_groups == (w.words + w.group_words - 1) / w.group_words;
}

// Raises `kernel`'s dynamic shared memory limit to `limit` the first time a launch on the current
// device needs more than the default 48 KiB (bit d of `raised`: done on device d < 64; a race
// only repeats the call).
template <typename Kernel>
cudaError_t RaiseSharedLimit(Kernel kernel, size_t bytes, size_t limit,
                             std::atomic<uint64_t>& raised) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if ((raised.load(std::memory_order_relaxed) & bit) == 0 || bit == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(limit));
    if (err != cudaSuccess) return err;
    raised.fetch_or(bit, std::memory_order_relaxed);
  }
  return cudaSuccess;
}

// Whether the b1 GEMV kernel takes an m-token GEMM of `w` with ab-bit activations: 1 <= m <=
// kAbqGemvTokens (abq_ops.h: m·ab activation plane columns in at most four n8 tiles), k-groups
// of whole k128 steps (group_words % 4 == 0) or one group, and its shared memory (the warps'
// stages, and per k-group the block's sums and c_G per token and output, s_w, z, Σa)
// within 96 KiB.
bool AbqGemvApplies(const AbqDeviceWeights& w, int64_t m, int ab);

// y and dot (when not null) as LaunchAbqGemm's for m tokens of ab-bit activation planes, s_a and
// Σa (AbqDeviceActivations' layouts), by the b1 GEMV kernel; cudaErrorInvalidValue where
// AbqGemvApplies is false or for unsupported bit widths.
cudaError_t LaunchAbqBinaryGemv(const AbqDeviceWeights& w, const uint32_t* a_planes,
                                const float* a_scales, const int32_t* a_sums, int64_t m, int ab,
                                float* y, int32_t* dot, cudaStream_t stream);

// Whether the b1 decode kernel (abq_decode.cu) takes an m-token GEMM of `w` with ab-bit
// activations: m <= kAbqDecodeTokens, k-groups of whole k128 steps (or one group), and its shared
// memory (the ring of stages, and s_w, z and Σa of every k-group) within its bound.
bool AbqDecodeApplies(const AbqDeviceWeights& w, int64_t m, int ab);

// y and dot (when not null) as LaunchAbqGemm's, by the b1 decode kernel; cudaErrorInvalidValue
// where AbqDecodeApplies is false.
cudaError_t LaunchAbqBinaryDecode(const AbqDeviceWeights& w, const uint32_t* a_planes,
                                  const float* a_scales, const int32_t* a_sums, int64_t m, int ab,
                                  float* y, int32_t* dot, cudaStream_t stream);

// AbqEpilogue's S = Σ_G p_G for one output, from its products p_G = c_G·s_w (fp64, `prods`, in
// group order), by a whole warp: where every addition is exact (abq_fused::OrderFree; `exact` is
// false in a lane that saw an inexact product) the lanes' sums and a butterfly, which give the
// chain's bits; otherwise lane 0 runs the chain in group order. The sum is lane 0's.
__device__ inline double WarpProductSum(const double* prods, int n_groups, bool exact) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  double part = 0.0, abs_sum = 0.0;
  int emin = INT_MAX;
  for (int g = lane; g < n_groups; g += 32) {
    const double prod = prods[g];
    if (prod != 0.0) {
      const int e = abq_fused::LsbExponent(prod);
      if (e == INT32_MIN) exact = false;
      emin = min(emin, e);
    }
    part = __dadd_rn(part, prod);
    abs_sum = __dadd_rn(abs_sum, fabs(prod));
  }
  exact = __all_sync(kAll, exact);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    part = __dadd_rn(part, __shfl_xor_sync(kAll, part, off));
    abs_sum = __dadd_rn(abs_sum, __shfl_xor_sync(kAll, abs_sum, off));
    emin = min(emin, __shfl_xor_sync(kAll, emin, off));
  }
  const bool order_free = __shfl_sync(kAll, abq_fused::OrderFree(exact, emin, abs_sum), 0);
  if (lane != 0 || order_free) return part;
  double sum = 0.0;
  for (int g = 0; g < n_groups; ++g) sum = __dadd_rn(sum, prods[g]);
  return sum;
}

}  // namespace qcal::kernels::cuda
