// Launcher of the clipped fake quantizer's forward (spec: ref::ClippedFakeQuant in
// kernels/cpu/train_ref.h; rules: kernels/train_math.h), and the lane layout it shares with the
// STE backward (clipped_quant_backward.cu). Returns the launch's cudaError_t; the backend
// validates shapes first.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/train_math.h"

namespace qcal::kernels::cuda {

// The lane layout of both clipped kernels: a group (o, k) is worked on by kLanes =
// SteLanes(g) consecutive threads of a warp (train_math.h); a warp holds 32 / kLanes consecutive
// groups, so that for whole groups its loads cover contiguous memory. The STE backward's lane l
// takes the group's positions p ≡ l (mod kLanes), the order of its sums (train_math.h); the
// forward, which sums nothing, gives lane l the consecutive positions [l·E, (l + 1)·E), E =
// ClipChunk(g), for 16-byte loads and stores (measured on the H200 at the 7B shape: the forward
// 0.91 → 0.64 ms a step with them, the backward 0.77 → 0.96 ms, so it keeps the interleaved
// positions).
QCAL_HOST_DEVICE inline int64_t ClipChunk(int64_t g) {
  const int lanes = SteLanes(g);
  return (g + lanes - 1) / lanes;
}
constexpr int kClipThreads = 256;

// With every group whole, no permutation and g = kClipPerLane·kLanes, each lane holds exactly
// kClipPerLane weights of its group, loaded into registers at once (the kernels' fast path).
constexpr int kClipPerLane = 16;
inline bool WholeLaneGroups(const ClipView& layout, int lanes) {
  const int64_t g = layout.group_size();
  return layout.perm == nullptr && layout.d_in % g == 0 && g == int64_t{kClipPerLane} * lanes;
}

#ifdef __CUDACC__
// The group range over a group's kLanes lanes: each lane's AddToRange over its positions, then
// MergeRanges by a butterfly inside the group's lanes (symmetric, so every lane gets the range a
// scan in position order gives). Every lane of the warp must call it.
template <int kLanes, typename Pos>
__device__ inline GroupRange<float, Pos> LaneGroupRange(GroupRange<float, Pos> r) {
  for (int h = kLanes / 2; h >= 1; h /= 2) {
    GroupRange<float, Pos> other;
    other.lo = __shfl_xor_sync(0xffffffffu, r.lo, h);
    other.hi = __shfl_xor_sync(0xffffffffu, r.hi, h);
    other.lo_pos = __shfl_xor_sync(0xffffffffu, r.lo_pos, h);
    other.hi_pos = __shfl_xor_sync(0xffffffffu, r.hi_pos, h);
    r = MergeRanges(r, other);
  }
  return r;
}

// v = the kClipPerLane floats at p + at (16-byte aligned), or zeros for an inactive lane.
__device__ inline void LoadLane(const float* p, int64_t at, bool active, float* v) {
#pragma unroll
  for (int e = 0; e < kClipPerLane; e += 4) {
    const float4 x = active ? *reinterpret_cast<const float4*>(p + at + e) : float4{0, 0, 0, 0};
    v[e] = x.x;
    v[e + 1] = x.y;
    v[e + 2] = x.z;
    v[e + 3] = x.w;
  }
}

// The range of positions `first` + p from one over the group's positions p (32-bit, kept in
// registers by the kernels' fast path).
__device__ inline GroupRange<float> AtFirst(const GroupRange<float, int>& r, int64_t first) {
  GroupRange<float> out;
  out.lo = r.lo;
  out.hi = r.hi;
  out.lo_pos = r.lo_pos >= 0 ? first + r.lo_pos : -1;
  out.hi_pos = r.hi_pos >= 0 ? first + r.hi_pos : -1;
  return out;
}
#endif  // __CUDACC__

// w_hat [d_out, d_in] = ClippedFakeQuantGroup for every row o and group k of w [d_out, d_in], with
// gamma, beta [d_out, n_groups]; the layout's pointers are device memory. The group's lanes scan
// its range together (exact: min and max do not depend on the order), each then fits the group
// with the reference's code (compiled without fused multiply-add) and quantizes its positions:
// bit-identical to ref::ClippedFakeQuant<float>. w_hat may alias w (a group's lanes read all its
// weights before the butterfly, and write only their own positions after it).
cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream);
// The same with ŵ rounded to bf16 (nearest even, as the GEMMs' operand conversion rounds): for a
// caller whose only use of ŵ is as a bf16 GEMM operand.
cudaError_t LaunchClippedFakeQuantBf16(const ClipView& layout, const float* w, const float* gamma,
                                       const float* beta, __nv_bfloat16* w_hat,
                                       cudaStream_t stream);

}  // namespace qcal::kernels::cuda
