// Launcher of the clipped fake quantizer's STE backward (spec: ref::ClippedFakeQuantBackward in
// kernels/cpu/train_ref.h; rules: kernels/train_math.h). Returns the launch's cudaError_t; the
// backend validates shapes first.
#pragma once

#include <cuda_runtime.h>

#include "kernels/train_math.h"

namespace qcal::kernels::cuda {

// d_gamma, d_beta [d_out, n_groups] and, when d_w is not null, d_w [d_out, d_in] (all
// overwritten) = ClippedFakeQuantBackwardGroup for every row o and group k, for dŵ = d_w_hat.
// The lane layout of clipped_quant.cuh: each of a group's SteLanes(g) lanes adds the STE terms
// of its positions in order into its partial sums, and a butterfly over the lanes adds the
// partials in the pairwise tree of train_math.h (compiled without fused multiply-add):
// bit-identical to ref::ClippedFakeQuantBackward<float>. Outputs must not alias inputs.
cudaError_t LaunchClippedFakeQuantBackward(const ClipView& layout, const float* w,
                                           const float* gamma, const float* beta,
                                           const float* d_w_hat, float* d_gamma, float* d_beta,
                                           float* d_w, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
