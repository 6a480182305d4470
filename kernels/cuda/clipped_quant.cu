// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the group fit and rounding are the CPU
// reference's separately rounded operations.
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/clipped_quant.cuh"

namespace qcal::kernels::cuda {
namespace {

__device__ inline void Store(float* p, float v) { *p = v; }
__device__ inline void Store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// kClipPerLane values to 16-byte-aligned p, with 16-byte stores.
__device__ inline void StoreLane(float* p, const float* v) {
#pragma unroll
  for (int e = 0; e < kClipPerLane; e += 4) {
    *reinterpret_cast<float4*>(p + e) = make_float4(v[e], v[e + 1], v[e + 2], v[e + 3]);
  }
}
__device__ inline void StoreLane(__nv_bfloat16* p, const float* v) {
#pragma unroll
  for (int e = 0; e < kClipPerLane; e += 8) {
    __align__(16) __nv_bfloat16 h[8];
#pragma unroll
    for (int x = 0; x < 8; ++x) h[x] = __float2bfloat16_rn(v[e + x]);
    *reinterpret_cast<uint4*>(p + e) = *reinterpret_cast<const uint4*>(h);
  }
}

// kWhole: every group whole (d_in a multiple of g), no permutation, and g = kClipPerLane·kLanes
// (SteLanes gives that for every power of two g from 16 to 512): a lane's weights are loaded into
// registers first, so that their loads are in flight together.
template <int kLanes, bool kWhole, typename Out>
__global__ void ClippedFakeQuantKernel(ClipView layout, const float* w, const float* gamma,
                                       const float* beta, Out* w_hat, int64_t total) {
  constexpr int kPerBlock = kClipThreads / kLanes;
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int64_t n_groups = layout.n_groups(), g = layout.group_size();
  // The loop's bounds are the same for the whole block, so every lane reaches the shuffles.
  for (int64_t i0 = int64_t{blockIdx.x} * kPerBlock; i0 < total;
       i0 += int64_t{gridDim.x} * kPerBlock) {
    const int64_t i = i0 + static_cast<int64_t>(threadIdx.x) / kLanes;
    const bool active = i < total;
    const int64_t o = active ? i / n_groups : 0, k = active ? i % n_groups : 0;
    const int64_t first = k * g;
    GroupRange<float> range;
    if constexpr (kWhole) {
      // Group i's weights are w[i·g, (i + 1)·g); the lane's are the kClipPerLane from
      // lane·kClipPerLane.
      const int64_t at = i * g + lane * kClipPerLane;
      float v[kClipPerLane];
      LoadLane(w, at, active, v);
      GroupRange<float, int> local;
      if (!layout.has_grid()) {
#pragma unroll
        for (int e = 0; e < kClipPerLane; ++e) AddToRange(v[e], lane * kClipPerLane + e, local);
      }
      range = AtFirst(LaneGroupRange<kLanes>(local), first);
      if (!active) continue;
      const ClipGroupFit<float> f = FitClippedRange(range, layout, o, k, gamma[i], beta[i]);
#pragma unroll
      for (int e = 0; e < kClipPerLane; ++e) {
        v[e] = Dequantize<float>(QuantizeCode(v[e], f.p, layout.spec), f.p, layout.spec);
      }
      StoreLane(w_hat + at, v);
    } else {
      const float* row = w + o * layout.d_in;
      const int64_t chunk = ClipChunk(g);
      const int64_t begin = first + lane * chunk;
      const int64_t end = active ? min(GroupEnd(layout, k), begin + chunk) : 0;
      if (!layout.has_grid()) {
        for (int64_t pos = begin; pos < end; ++pos) AddToRange(row[layout.column(pos)], pos, range);
      }
      range = LaneGroupRange<kLanes>(range);
      if (!active) continue;
      const ClipGroupFit<float> f = FitClippedRange(range, layout, o, k, gamma[i], beta[i]);
      Out* out = w_hat + o * layout.d_in;
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t j = layout.column(pos);
        Store(out + j, Dequantize<float>(QuantizeCode(row[j], f.p, layout.spec), f.p, layout.spec));
      }
    }
  }
}

template <int kLanes, typename Out>
cudaError_t Launch(const ClipView& layout, const float* w, const float* gamma, const float* beta,
                   Out* w_hat, int64_t total, cudaStream_t stream) {
  constexpr int64_t kPerBlock = kClipThreads / kLanes;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kPerBlock - 1) / kPerBlock, 1 << 16));
  if (WholeLaneGroups(layout, kLanes)) {
    ClippedFakeQuantKernel<kLanes, true, Out>
        <<<blocks, kClipThreads, 0, stream>>>(layout, w, gamma, beta, w_hat, total);
  } else {
    ClippedFakeQuantKernel<kLanes, false, Out>
        <<<blocks, kClipThreads, 0, stream>>>(layout, w, gamma, beta, w_hat, total);
  }
  return cudaGetLastError();
}

template <typename Out>
cudaError_t LaunchFor(const ClipView& layout, const float* w, const float* gamma, const float* beta,
                      Out* w_hat, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  switch (SteLanes(layout.group_size())) {
    case 1:
      return Launch<1>(layout, w, gamma, beta, w_hat, total, stream);
    case 2:
      return Launch<2>(layout, w, gamma, beta, w_hat, total, stream);
    case 4:
      return Launch<4>(layout, w, gamma, beta, w_hat, total, stream);
    case 8:
      return Launch<8>(layout, w, gamma, beta, w_hat, total, stream);
    case 16:
      return Launch<16>(layout, w, gamma, beta, w_hat, total, stream);
    default:
      return Launch<32>(layout, w, gamma, beta, w_hat, total, stream);
  }
}

}  // namespace

cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream) {
  return LaunchFor(layout, w, gamma, beta, w_hat, stream);
}

cudaError_t LaunchClippedFakeQuantBf16(const ClipView& layout, const float* w, const float* gamma,
                                       const float* beta, __nv_bfloat16* w_hat,
                                       cudaStream_t stream) {
  return LaunchFor(layout, w, gamma, beta, w_hat, stream);
}

}  // namespace qcal::kernels::cuda
