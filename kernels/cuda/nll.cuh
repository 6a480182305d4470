// Launcher of the CUDA negative log-likelihood kernel (spec: ref::Nll).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// nll[r] = logsumexp(logits[r]) - logits[r, targets[r]] for a row-major logits [rows, vocab] and
// device targets in [0, vocab). The maximum is exact, the sum of exponentials is taken in double
// (log-softmax in double, like the reference), the result is rounded to fp32.
cudaError_t LaunchNll(const float* logits, int64_t rows, int64_t vocab, const int32_t* targets,
                      float* nll, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
