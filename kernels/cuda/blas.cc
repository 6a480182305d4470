#include "kernels/cuda/blas.h"

#include <climits>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_resources.h"
#include "kernels/cuda/split_tf32.cuh"

namespace qcal::kernels::cuda {
namespace {

// cuBLAS's classic API takes int dimensions.
absl::Status CheckDims(const char* what, std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) {
    if (d < 0 || d > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": dimension ", d, " is outside cuBLAS's int range"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Gemm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
                  int64_t k, float alpha, const void* a, int64_t lda, const void* b, int64_t ldb,
                  DType operands, float beta, float* c, int64_t ldc) {
  QCAL_RETURN_IF_ERROR(CheckDims("GEMM", {m, n, k, lda, ldb, ldc}));
  if (operands != DType::kF32 && operands != DType::kBF16) {
    return absl::InvalidArgumentError(
        absl::StrCat("GEMM: unsupported operand type ", DTypeName(operands)));
  }
  const cudaDataType_t type = operands == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ, and the column-major view of a
  // row-major B is Bᵀ: hence B first, with the same transpose flags.
  return CublasStatus(
      cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b, type,
                   static_cast<int>(ldb), a, type, static_cast<int>(lda), &beta, c, CUDA_R_32F,
                   static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("cublasGemmEx ", m, "x", n, "x", k, " ", DTypeName(operands)));
}

absl::Status GemmStridedBatched(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m,
                                int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
                                int64_t stride_a, const void* b, int64_t ldb, int64_t stride_b,
                                DType operands, float beta, void* c, int64_t ldc, int64_t stride_c,
                                DType c_type, int64_t batch) {
  QCAL_RETURN_IF_ERROR(CheckDims("batched GEMM", {m, n, k, lda, ldb, ldc, batch}));
  if ((operands != DType::kF32 && operands != DType::kBF16) ||
      (c_type != DType::kF32 && !(c_type == DType::kBF16 && operands == DType::kBF16))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batched GEMM: unsupported types ", DTypeName(operands), " into ", DTypeName(c_type)));
  }
  const cudaDataType_t type = operands == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  const cudaDataType_t ctype = c_type == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
  // Row-major as column-major transposes, as in Gemm: B first.
  return CublasStatus(
      cublasGemmStridedBatchedEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                                 trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(n),
                                 static_cast<int>(m), static_cast<int>(k), &alpha, b, type,
                                 static_cast<int>(ldb), stride_b, a, type, static_cast<int>(lda),
                                 stride_a, &beta, c, ctype, static_cast<int>(ldc), stride_c,
                                 static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("cublasGemmStridedBatchedEx ", batch, " x ", m, "x", n, "x", k, " ",
                   DTypeName(operands)));
}

absl::Status GemmF64NT(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, const double* a,
                       const double* b, double* c) {
  QCAL_RETURN_IF_ERROR(CheckDims("fp64 GEMM", {m, n, k}));
  const double one = 1.0, zero = 0.0;
  // Row-major C = A·Bᵀ is column-major Cᵀ = B·Aᵀ: B (column-major [k,n], transposed) first.
  return CublasStatus(
      cublasDgemm(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                  static_cast<int>(k), &one, b, static_cast<int>(k), a, static_cast<int>(k), &zero,
                  c, static_cast<int>(n)),
      absl::StrCat("cublasDgemm ", m, "x", n, "x", k));
}

absl::Status GemmTf32(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n,
                      int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                      int64_t ldb, float beta, float* c, int64_t ldc) {
  QCAL_RETURN_IF_ERROR(CheckDims("TF32 GEMM", {m, n, k, lda, ldb, ldc}));
  return CublasStatus(
      cublasGemmEx(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
                   static_cast<int>(n), static_cast<int>(m), static_cast<int>(k), &alpha, b,
                   CUDA_R_32F, static_cast<int>(ldb), a, CUDA_R_32F, static_cast<int>(lda), &beta,
                   c, CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F_FAST_TF32,
                   CUBLAS_GEMM_DEFAULT),
      absl::StrCat("cublasGemmEx ", m, "x", n, "x", k, " TF32"));
}

absl::Status GemmSplitTf32(cublasHandle_t handle, int64_t m, int64_t n, int64_t k, float alpha,
                           const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                           float* c, int64_t ldc, float* a3, float* b3) {
  QCAL_RETURN_IF_ERROR(CheckDims("split TF32 GEMM", {m, n, 3 * k, lda, ldb, ldc}));
  cudaStream_t stream = nullptr;
  QCAL_RETURN_IF_ERROR(CublasStatus(cublasGetStream(handle, &stream), "cublasGetStream"));
  // a3 = [lo | hi | hi] side by side, b3 = [hi; lo; hi] stacked.
  QCAL_RETURN_IF_ERROR(CudaStatus(LaunchSplitTf32(a, m, k, lda, a3, 3 * k, k, 0, stream),
                                  "split TF32 GEMM: splitting a"));
  QCAL_RETURN_IF_ERROR(CudaStatus(LaunchSplitTf32(b, k, n, ldb, b3, n, k * n, 1, stream),
                                  "split TF32 GEMM: splitting b"));
  return GemmTf32(handle, false, false, m, n, 3 * k, alpha, a3, 3 * k, b3, n, beta, c, ldc);
}

absl::Status SyrkLowerF32(cublasHandle_t handle, const float* x, int64_t n, int64_t k, float* h) {
  QCAL_RETURN_IF_ERROR(CheckDims("SYRK", {n, k}));
  const float one = 1.0f;
  // Column-major, x is xᵀ [k,n] and the row-major lower triangle of h is its upper triangle.
  return CublasStatus(
      cublasSsyrk(handle, CUBLAS_FILL_MODE_UPPER, CUBLAS_OP_N, static_cast<int>(k),
                  static_cast<int>(n), &one, x, static_cast<int>(k), &one, h, static_cast<int>(k)),
      absl::StrCat("cublasSsyrk n=", n, " k=", k));
}

absl::Status TrmmLowerF32(cublasHandle_t handle, bool right, int64_t m, int64_t n, float alpha,
                          const float* l, int64_t ldl, const float* b, int64_t ldb, float* c,
                          int64_t ldc) {
  QCAL_RETURN_IF_ERROR(CheckDims("TRMM", {m, n, ldl, ldb, ldc}));
  return CublasStatus(
      cublasStrmm(handle, right ? CUBLAS_SIDE_RIGHT : CUBLAS_SIDE_LEFT, CUBLAS_FILL_MODE_LOWER,
                  CUBLAS_OP_N, CUBLAS_DIAG_NON_UNIT, static_cast<int>(m), static_cast<int>(n),
                  &alpha, l, static_cast<int>(ldl), b, static_cast<int>(ldb), c,
                  static_cast<int>(ldc)),
      absl::StrCat("cublasStrmm ", m, "x", n));
}

}  // namespace qcal::kernels::cuda
