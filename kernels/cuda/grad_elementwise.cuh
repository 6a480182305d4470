// Launchers of the gradient pass's elementwise and per-row kernels (specs: ref::SiluMulBackward,
// ref::ScaleRowsByNorm, ref::AccumulateSquares in kernels/cpu/ref_grad.h), and the scaling that
// Gemm needs when its inner dimension is empty. Each returns the launch's cudaError_t; the backend
// validates shapes first. n == 0 (or rows == 0) launches nothing.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// For out = silu(gate)·up: dgate[i] = dout[i]·up[i]·silu'(gate[i]), dup[i] = dout[i]·silu(gate[i]),
// silu'(g) = σ(g)·(1 + g·(1 − σ(g))). Each element reads its inputs before it writes, so dgate and
// dup may alias any input.
cudaError_t LaunchSiluMulBackward(const float* gate, const float* up, const float* dout,
                                  float* dgate, float* dup, int64_t n, cudaStream_t stream);
// x[r, :] *= ‖g[r, :]‖₂ for row-major g [rows, width_g] and x [rows, width_x]. One block per row:
// the squares are summed in fp32 (per thread, then a fixed butterfly), the root taken in fp32.
cudaError_t LaunchScaleRowsByNorm(const float* g, int64_t rows, int64_t width_g, float* x,
                                  int64_t width_x, cudaStream_t stream);
// out[r, :] = x[r, :]·‖g[r, :]‖₂ (the same norm and product), out fp32 or, with `bf16_out`, the
// product rounded to bf16 (nearest even). x is not modified.
cudaError_t LaunchScaleRowsByNormInto(const float* g, int64_t rows, int64_t width_g, const float* x,
                                      int64_t width_x, void* out, bool bf16_out,
                                      cudaStream_t stream);
// f[i] += g[i]·g[i], the product rounded before the sum (no fused multiply-add, as on the host).
cudaError_t LaunchAccumulateSquares(const float* g, float* f, int64_t n, cudaStream_t stream);
// x[i] *= alpha.
cudaError_t LaunchScale(float* x, int64_t n, float alpha, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
