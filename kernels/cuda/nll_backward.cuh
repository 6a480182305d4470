// Launcher of the CUDA log-softmax NLL backward (spec: ref::NllBackward, kernels/cpu/ref_grad.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// dlogits[r] = scale·(softmax(logits[r]) − onehot(targets[r])) for a row-major logits [rows,
// vocab] and device targets in [−1, vocab); a row whose target is −1 gets zeros. One block per
// row: the maximum is exact, the sum of exponentials and each probability in double (as
// LaunchNll); dlogits may alias logits.
cudaError_t LaunchNllBackward(const float* logits, int64_t rows, int64_t vocab,
                              const int32_t* targets, float scale, float* dlogits,
                              cudaStream_t stream);

}  // namespace qcal::kernels::cuda
