// Row-major GEMM and SYRK over cuBLAS, for the ops built on matrix products (Linear,
// AccumulateGram, the GPTQ updates, the output errors). Internal to kernels/cuda.
//
// cuBLAS is column-major; a row-major matrix is its transpose seen column-major, so every helper
// here swaps operands instead of copying. fp32 operands use CUBLAS_COMPUTE_32F under the handle's
// default math mode: true fp32, never TF32. bf16 operands multiply exactly and accumulate in fp32.
#pragma once

#include <cublas_v2.h>

#include <cstdint>

#include "absl/status/status.h"
#include "common/dtype.h"

namespace qcal::kernels::cuda {

// c[m,n] = alpha * op(a) · op(b) + beta * c, all row-major with row strides lda, ldb, ldc;
// op(a) is [m,k] (a stored [m,k], or [k,m] with trans_a), op(b) is [k,n] (b stored [k,n], or
// [n,k] with trans_b). a and b are both `operands` (kF32 or kBF16); c is fp32. With beta == 0, c
// is not read. k == 0 is not allowed (cuBLAS leaves c unscaled); callers handle it.
absl::Status Gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
                  int64_t k, float alpha, const void* a, int64_t lda, const void* b, int64_t ldb,
                  DType operands, float beta, float* c, int64_t ldc);

// `batch` independent products of Gemm's shape: item i reads a + i·stride_a and b + i·stride_b
// and writes c + i·stride_c (strides in elements). c is `c_type` (kF32, or kBF16 with the fp32
// result rounded to nearest even; bf16 c needs bf16 operands).
absl::Status GemmStridedBatched(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m,
                                int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
                                int64_t stride_a, const void* b, int64_t ldb, int64_t stride_b,
                                DType operands, float beta, void* c, int64_t ldc, int64_t stride_c,
                                DType c_type, int64_t batch);

// The same for fp32 operands on the TF32 tensor cores (operands rounded to TF32 by the hardware,
// fp32 accumulation): for callers that pass values already rounded to TF32 (OutputError).
absl::Status GemmTf32(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
                      int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float beta, float* c, int64_t ldc);

// c[m,n] = alpha · a[m,k] · b[k,n] + beta · c for fp32 row-major operands (no transposes) on the
// TF32 tensor cores at about fp32 accuracy: each operand split as hi + lo (split_tf32.cuh) and
// lo_a·hi_b + hi_a·lo_b + hi_a·hi_b summed as one TF32 product of depth 3k from the scratch copies
// a3 [m, 3k] and b3 [3k, n] (callers give at least m·3k and 3k·n floats). Only lo_a·lo_b (about
// 2^-22 of a product) is dropped; the tensor cores' fp32 accumulation does the rest. Three times
// a TF32 product's work; as GPTQ's lazy updates it took the 7B job's column-loop stage from 2.37
// to 2.10 s against SIMT fp32 GEMMs (H100; docs/BENCHMARKS.md, thirty-second session).
// Deterministic like every cuBLAS product here.
absl::Status GemmSplitTf32(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, float alpha,
                           const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc, float* a3, float* b3);

// c[m,n] = a[m,k] · b[n,k]ᵀ in fp64 (row-major, packed: strides k, k and n), for the activation-
// quantized linear's exact sums. k == 0 is not allowed, as for Gemm.
absl::Status GemmF64NT(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, const double* a,
                       const double* b, double* c);

// The lower triangle (row-major, diagonal included) of h[k,k] = xᵀx + h for a row-major fp32
// x [n,k]; the strict upper triangle is not touched.
absl::Status SyrkLowerF32(cublasHandle_t handle, const float* x, int64_t n, int64_t k, float* h);

// Column-major fp32 triangular product, out of place: c[m,n] = alpha · L · b (left) or
// alpha · b · L (right) for the lower triangle L of the column-major l (m × m or n × n).
absl::Status TrmmLowerF32(cublasHandle_t handle, bool right, int64_t m, int64_t n, float alpha,
                          const float* l, int64_t ldl, const float* b, int64_t ldb, float* c,
                          int64_t ldc);

}  // namespace qcal::kernels::cuda
