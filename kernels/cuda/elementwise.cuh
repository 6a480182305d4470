// Launchers of the CUDA backend's elementwise and layout kernels: SiluMul, Add, bias broadcasts,
// fp32 <-> bf16 conversion, column concatenation and the mirroring that keeps a Gram matrix
// symmetric. Each returns the launch's cudaError_t and knows nothing of tensors or absl; the
// backend validates shapes first. All run on `stream`, asynchronously; n == 0 launches nothing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qcal::kernels::cuda {

// out[i] = silu(gate[i]) * up[i]; out may alias gate or up.
cudaError_t LaunchSiluMul(const float* gate, const float* up, float* out, int64_t n,
                          cudaStream_t stream);
// The same, each fp32 result rounded to bf16 as LaunchF32ToBf16 rounds it.
cudaError_t LaunchSiluMul(const float* gate, const float* up, __nv_bfloat16* out, int64_t n,
                          cudaStream_t stream);
// y[i] += x[i].
cudaError_t LaunchAdd(const float* x, float* y, int64_t n, cudaStream_t stream);
// y[r, c] = row[c] for a row-major y [rows, cols].
cudaError_t LaunchBroadcastRows(const float* row, float* y, int64_t rows, int64_t cols,
                                cudaStream_t stream);
// y[r, c] += row[c] for a row-major y [rows, cols].
cudaError_t LaunchAddRowVector(const float* row, float* y, int64_t rows, int64_t cols,
                               cudaStream_t stream);
// y[i] = x[i] rounded to bf16, to nearest with ties to even (as qcal::FloatToBf16).
cudaError_t LaunchF32ToBf16(const float* x, __nv_bfloat16* y, int64_t n, cudaStream_t stream);
// y[i] = x[i] (exact).
cudaError_t LaunchBf16ToF32(const __nv_bfloat16* x, float* y, int64_t n, cudaStream_t stream);
// out [rows, ca + cb] = [a | b] for the row-major a [rows, ca] and b [rows, cb]; each element
// converted to out's type (fp32 to bf16 as LaunchF32ToBf16 rounds, bf16 to fp32 exactly).
// Instantiated for every combination of float and __nv_bfloat16.
template <typename A, typename B, typename T>
cudaError_t LaunchConcatColumns(const A* a, int64_t ca, const B* b, int64_t cb, T* out,
                                int64_t rows, cudaStream_t stream);
// out[r * ld + j] = src[r * cols + j] for r < rows and j < cols, converted to out's type as
// LaunchConcatColumns converts. Instantiated for every combination of float and __nv_bfloat16.
template <typename S, typename T>
cudaError_t LaunchWriteColumns(const S* src, int64_t cols, T* out, int64_t ld, int64_t rows,
                               cudaStream_t stream);
// h[r, c] = h[c, r] for every c > r of a row-major h [k, k]: the lower triangle is copied onto
// the upper one, so h becomes exactly symmetric.
cudaError_t LaunchMirrorLowerToUpper(float* h, int64_t k, cudaStream_t stream);
// y[i, j] += x[i, j] for j <= i, both row-major k x k; y's strict upper triangle is not touched.
cudaError_t LaunchAddLower(const float* x, float* y, int64_t k, cudaStream_t stream);

}  // namespace qcal::kernels::cuda
