// The CUDA backend's weight-quantization ops (Backend::GptqFactorize, GptqSolve, QuantizeRtn,
// OutputError; contracts in kernels/backend.h, data in kernels/quant_ops.h): adapters that
// validate, run cuSOLVER, cuBLAS and the launchers of gptq.cuh and output_error.cuh on the
// backend's stream, and return absl::Status. Internal to kernels/cuda.
//
// Host round trips: the Hessian's diagonal (dead columns, act-order and the damping mean are
// decided on the host, as on the CPU), the factorization's info word per attempt, and one small
// failure record per solve; everything of size d_out x d_in or n x n stays on the device.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <functional>

#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "kernels/quant_ops.h"

namespace qcal::kernels::cuda {

// What the ops need of the backend: its device, stream, library handles (bound to the stream) and
// a source of uninitialised device tensors (the backend's pool).
struct QuantContext {
  int device = 0;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  std::function<absl::StatusOr<Tensor>(DType, const Shape&)> alloc;
};

absl::StatusOr<GptqFactor> GptqFactorize(const QuantContext& ctx, const Tensor& h,
                                         const GptqSolveOptions& options);
absl::StatusOr<QuantizedTensors> GptqSolve(const QuantContext& ctx, const Tensor& w,
                                           const GptqFactor& factor, const QuantSpec& spec,
                                           int block_size, bool record_pre_round);
absl::StatusOr<QuantizedTensors> QuantizeRtn(const QuantContext& ctx, const Tensor& w,
                                             const QuantSpec& spec);
// products: kF32 (E rounded to TF32, TF32 tensor cores: OutputError) or kBF16 (E rounded to bf16,
// bf16 tensor cores, about half the time: ReportOutputError).
absl::StatusOr<double> OutputError(const QuantContext& ctx, const Tensor& w, const Tensor& w_hat,
                                   const Tensor& gram, DType products);

}  // namespace qcal::kernels::cuda
