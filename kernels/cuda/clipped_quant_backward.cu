// Compiled with -fmad=false (kernels/cuda/CMakeLists.txt): the group fit and the STE sums are the
// CPU reference's separately rounded operations in its order.
#include <algorithm>

#include "kernels/cuda/clipped_quant.cuh"
#include "kernels/cuda/clipped_quant_backward.cuh"

namespace qcal::kernels::cuda {
namespace {

template <int kLanes, bool kWhole>
__global__ void ClippedFakeQuantBackwardKernel(ClipView layout, const float* w, const float* gamma,
                                               const float* beta, const float* d_w_hat,
                                               float* d_gamma, float* d_beta, float* d_w,
                                               int64_t total) {
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
    SteSums<float> sums;
    ClipGroupFit<float> f;
    if constexpr (kWhole) {
      // Group i's weights are w[i·g, (i + 1)·g); the lane's are every kLanes-th from its own.
      const int64_t at = i * g + lane;
      float v[kClipPerLane], dy[kClipPerLane];
#pragma unroll
      for (int e = 0; e < kClipPerLane; ++e) {
        v[e] = active ? w[at + e * kLanes] : 0.0f;
        dy[e] = active ? d_w_hat[at + e * kLanes] : 0.0f;
      }
      GroupRange<float, int> local;
      if (!layout.has_grid()) {
#pragma unroll
        for (int e = 0; e < kClipPerLane; ++e) AddToRange(v[e], lane + e * kLanes, local);
      }
      range = AtFirst(LaneGroupRange<kLanes>(local), first);
      f = FitClippedRange(range, layout, o, k, active ? gamma[i] : 0.0f, active ? beta[i] : 0.0f);
#pragma unroll
      for (int e = 0; e < kClipPerLane; ++e) {
        const float direct = AddSteTerms(v[e], dy[e], f, layout.spec, sums);
        if (d_w && active) d_w[at + e * kLanes] = direct;
      }
    } else {
      const float* row = w + o * layout.d_in;
      const float* dy = d_w_hat + o * layout.d_in;
      float* dw = d_w ? d_w + o * layout.d_in : nullptr;
      const int64_t end = active ? GroupEnd(layout, k) : 0;
      if (!layout.has_grid()) {
        for (int64_t pos = first + lane; pos < end; pos += kLanes) {
          AddToRange(row[layout.column(pos)], pos, range);
        }
      }
      range = LaneGroupRange<kLanes>(range);
      f = FitClippedRange(range, layout, o, k, active ? gamma[i] : 0.0f, active ? beta[i] : 0.0f);
      for (int64_t pos = first + lane; pos < end; pos += kLanes) {
        const int64_t j = layout.column(pos);
        const float direct = AddSteTerms(row[j], dy[j], f, layout.spec, sums);
        if (dw) dw[j] = direct;
      }
    }
    for (int h = kLanes / 2; h >= 1; h /= 2) {
      sums.gs += __shfl_xor_sync(0xffffffffu, sums.gs, h);
      sums.g_xmin += __shfl_xor_sync(0xffffffffu, sums.g_xmin, h);
    }
    if (!active) continue;
    const SteGrads<float> r = FinishSte(f, layout.spec, sums);
    if (lane == 0) {
      d_gamma[i] = r.d_gamma;
      d_beta[i] = r.d_beta;
    }
    if (d_w) {
      // The weights attaining the range belong to the lanes that wrote their direct gradients.
      float* dw = d_w + o * layout.d_in;
      if (range.hi_pos >= 0 && (range.hi_pos - first) % kLanes == lane) dw[f.argmax] += r.w_max;
      if (range.lo_pos >= 0 && (range.lo_pos - first) % kLanes == lane) dw[f.argmin] += r.w_min;
    }
  }
}

template <int kLanes>
cudaError_t Launch(const ClipView& layout, const float* w, const float* gamma, const float* beta,
                   const float* d_w_hat, float* d_gamma, float* d_beta, float* d_w, int64_t total,
                   cudaStream_t stream) {
  constexpr int64_t kPerBlock = kClipThreads / kLanes;
  const unsigned blocks =
      static_cast<unsigned>(std::min<int64_t>((total + kPerBlock - 1) / kPerBlock, 1 << 16));
  if (WholeLaneGroups(layout, kLanes)) {
    ClippedFakeQuantBackwardKernel<kLanes, true><<<blocks, kClipThreads, 0, stream>>>(
        layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total);
  } else {
    ClippedFakeQuantBackwardKernel<kLanes, false><<<blocks, kClipThreads, 0, stream>>>(
        layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchClippedFakeQuantBackward(const ClipView& layout, const float* w,
                                           const float* gamma, const float* beta,
                                           const float* d_w_hat, float* d_gamma, float* d_beta,
                                           float* d_w, cudaStream_t stream) {
  const int64_t total = layout.num_logits();
  if (total == 0) return cudaSuccess;
  switch (SteLanes(layout.group_size())) {
    case 1:
      return Launch<1>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
    case 2:
      return Launch<2>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
    case 4:
      return Launch<4>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
    case 8:
      return Launch<8>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
    case 16:
      return Launch<16>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
    default:
      return Launch<32>(layout, w, gamma, beta, d_w_hat, d_gamma, d_beta, d_w, total, stream);
  }
}

}  // namespace qcal::kernels::cuda
