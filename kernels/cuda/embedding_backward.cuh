// Launcher of the CUDA embedding backward (spec: ref::EmbeddingBackward, kernels/cpu/ref_grad.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// dtable[id] += dout[r] for every row r whose token is id, in row order, without atomics: the
// host groups the rows by token (EmbeddingBackwardPlan) and one thread per (token, column) adds
// the token's rows in order to the table's value, so every element is summed exactly as the
// sequential reference sums it, run after run.
//
// `plan` (device I32) is [tokens | starts | rows]: `tokens` the distinct ids (count of them),
// `starts` count + 1 offsets into `rows`, `rows` the row indices grouped by token, ascending
// within a token.
cudaError_t LaunchEmbeddingBackward(const int32_t* plan, int64_t count, const float* dout,
                                    int64_t width, float* dtable, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
