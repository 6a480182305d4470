// Launchers of the per-token activation fake-quantization kernel (spec: ref::ActQuant) and of the
// activation-quantized linear's kernels around its fp64 GEMM (spec: ref::ActQuantLinear). Each
// returns the launch's cudaError_t and runs on `stream`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// out = per-row dynamic symmetric fake-quantization of x [rows, width] to `bits` (2..8),
// bit-identical to ref::ActQuant (fp32, IEEE division, no fused multiply-add). out may alias x.
cudaError_t LaunchActQuant(const float* x, int64_t rows, int64_t width, int bits, float* out,
                           cudaStream_t stream);
// The same values rounded to bf16 (to nearest even, as LaunchF32ToBf16) in the same pass: the GEMM
// operand of a bf16 ActQuantLinear. Row r goes to out + r·ld (ld >= width; columns past width are
// left as they are), so the operand may be the left part of a wider one.
cudaError_t LaunchActQuantBf16(const float* x, int64_t rows, int64_t width, int bits,
                               __nv_bfloat16* out, int64_t ld, cudaStream_t stream);

// ActQuantLinear's three steps in fp32 compute (spec: ref::ActQuantLinear):
// - codes[r, j] (exact integers as fp64) and scales[r] of ActQuant's factorization
//   (ref::ActQuantCodes), bit-identical to it;
// - `w` (fp32, or bf16 when `bf16`) widened to fp64, n elements;
// - y[t, o] = fl32(fl64(scales[t]·sums[t, o])), then fl32(· + bias[o]) when bias is non-null,
//   stored or (with `accumulate`) added to y in fp32; sums fp64 [m, n].
cudaError_t LaunchActQuantCodes(const float* x, int64_t rows, int64_t width, int bits,
                                double* codes, float* scales, cudaStream_t stream);
cudaError_t LaunchWidenToF64(const void* w, bool bf16, int64_t n, double* out, cudaStream_t stream);
cudaError_t LaunchActQuantScaleRows(const double* sums, const float* scales, const float* bias,
                                    int64_t m, int64_t n, bool accumulate, float* y,
                                    cudaStream_t stream);

}  // namespace qcal::kernels::cuda
