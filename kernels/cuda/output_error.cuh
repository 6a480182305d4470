// Launchers of the kernels of the GPU layer output error ||(W - W^) X^T||_F = sqrt(trace(E G Eᵀ))
// (spec: engine::OutputError in services/engine/quant/quantized_linear.h). The adapter
// (cuda_quant.cc) forms S = ĒᵀĒ on column panels (only S's lower triangle: about half the work of
// E·G) as one TF32 tensor-core product of Ē, E rounded to TF32 (to nearest: unbiased; 1e-5 to
// 2e-4 relative on the trace, a report figure; cuda_quant_test bounds it at 5e-4), then trace(Ē G
// Ēᵀ) = sum over i, j of S_ij G_ij with G read from its upper triangle, summed in double. (Until
// 2026-12-05 S was three TF32 products of a split E = hi + lo, about fp32 accuracy at three times
// the work: docs/BENCHMARKS.md.)
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// e = w - w_hat (w_hat may be null: e = w) in fp32, rounded to TF32 (to nearest, ties away).
cudaError_t LaunchRoundTf32(const float* w, const float* w_hat, int64_t count, float* e,
                            cudaStream_t stream);

// e = w - w_hat (w_hat may be null: e = w) in fp32, rounded to bf16 (to nearest even), e a
// __nv_bfloat16 array: the report-only figure's operand (ReportOutputError).
cudaError_t LaunchRoundBf16(const float* w, const float* w_hat, int64_t count, void* e,
                            cudaStream_t stream);

// For one panel of rows [r0, r1) of S, given st = Sᵀ restricted to the panel (row-major
// [r1, r1 - r0]: st[j*(r1-r0) + (i-r0)] = S[i][j] for j < r1): partial[j] += sum over
// i in [max(j, r0), r1) of (i == j ? 1 : 2) * st[j][i-r0] * g[j*n + i] in double for every j < r1,
// each row j summed in a fixed order by one block (run to run identical).
cudaError_t LaunchWeightedPanelTrace(const float* st, int64_t r0, int64_t r1, const float* g,
                                     int64_t n, double* partial, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
