// Launcher of the clipped fake quantizer's forward (spec: ref::ClippedFakeQuant in
// kernels/cpu/train_ref.h; rules: kernels/train_math.h). Returns the launch's cudaError_t; the
// backend validates shapes first.
#pragma once

#include <cuda_runtime.h>

#include "kernels/train_math.h"

namespace qcal::kernels::cuda {

// w_hat [d_out, d_in] = ClippedFakeQuantGroup for every row o and group k of w [d_out, d_in], with
// gamma, beta [d_out, n_groups]; the layout's pointers are device memory. One thread per (o, k)
// runs the reference's own code (compiled without fused multiply-add): bit-identical to
// ref::ClippedFakeQuant<float>. w_hat may alias w: a thread reads and writes only its group's
// columns.
cudaError_t LaunchClippedFakeQuant(const ClipView& layout, const float* w, const float* gamma,
                                   const float* beta, float* w_hat, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
