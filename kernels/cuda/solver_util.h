// Small helpers shared by the CUDA solver adapters (cuda_quant.cc, cuda_low_rank.cc): argument
// checks, synchronous downloads, the first non-finite element of a matrix as the CPU words it, and
// RAII for cusolverDnParams_t. Internal to kernels/cuda.
#pragma once

#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <climits>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "common/tensor.h"
#include "kernels/cuda/cuda_quant.h"
#include "kernels/cuda/cuda_resources.h"

namespace qcal::kernels::cuda {

// InvalidArgument naming `op` and `what` unless t is a non-empty CUDA F32 matrix whose dimensions
// fit an int (cuSOLVER's and cuBLAS's index type).
inline absl::Status ExpectMatrix(const Tensor& t, const char* op, const char* what) {
  if (!t.defined() || t.device() != Device::kCuda || t.dtype() != DType::kF32 || t.rank() != 2 ||
      t.dim(0) <= 0 || t.dim(1) <= 0 || t.dim(0) > INT_MAX || t.dim(1) > INT_MAX) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " is ",
                                                   t.defined() ? t.DebugString() : "undefined",
                                                   ", expected a non-empty CUDA F32 matrix"));
  }
  return absl::OkStatus();
}

inline absl::Status Sync(const QuantContext& ctx, const char* what) {
  return CudaStatus(cudaStreamSynchronize(ctx.stream), what);
}

// `count` elements of device memory `src`, copied to the host once the stream reaches them.
template <typename T>
absl::StatusOr<std::vector<T>> Download(const QuantContext& ctx, const void* src, int64_t count,
                                        const char* what) {
  std::vector<T> out(static_cast<size_t>(count));
  if (count == 0) return out;
  QCAL_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(out.data(), src, count * sizeof(T), cudaMemcpyDeviceToHost, ctx.stream),
      what));
  QCAL_RETURN_IF_ERROR(Sync(ctx, what));
  return out;
}

// A new device tensor of `dtype` [src.size()] holding the host vector `src` (elements of T);
// returns once it is there.
template <typename T>
absl::StatusOr<Tensor> Upload(const QuantContext& ctx, const std::vector<T>& src, DType dtype) {
  QCAL_ASSIGN_OR_RETURN(Tensor t, ctx.alloc(dtype, {static_cast<int64_t>(src.size())}));
  if (src.empty()) return t;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(t.raw(), src.data(), src.size() * sizeof(T),
                                                  cudaMemcpyHostToDevice, ctx.stream),
                                  "uploading solver indices"));
  QCAL_RETURN_IF_ERROR(Sync(ctx, "uploading solver indices"));
  return t;
}

// InvalidArgument naming `what`[r, c] and its value for the first non-finite element of the
// row-major x (`cols` columns) that `launch(first)` reports (a kernel writing the smallest flat
// index into *first, left at ~0 when there is none), as the CPU reference words it.
template <typename Launch>
absl::Status CheckFinite(const QuantContext& ctx, const float* x, int64_t cols, const char* what,
                         Launch launch) {
  QCAL_ASSIGN_OR_RETURN(Tensor first, ctx.alloc(DType::kU8, {8}));
  auto* first_p = static_cast<unsigned long long*>(first.raw());
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemsetAsync(first_p, 0xff, 8, ctx.stream), what));
  QCAL_RETURN_IF_ERROR(CudaStatus(launch(first_p), what));
  QCAL_ASSIGN_OR_RETURN(auto index, Download<unsigned long long>(ctx, first_p, 1, what));
  if (index[0] == ~0ull) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(auto value, Download<float>(ctx, x + index[0], 1, what));
  return absl::InvalidArgumentError(absl::StrCat(
      what, "[", static_cast<int64_t>(index[0]) / cols, ", ", static_cast<int64_t>(index[0]) % cols,
      "] is ", static_cast<double>(value[0]), " (not finite)"));
}

// CheckFinite over the whole row-major matrix x, or its upper triangle (j >= i) when upper_only.
absl::Status CheckFiniteMatrix(const QuantContext& ctx, const Tensor& x, bool upper_only,
                               const char* what);

// RAII for cusolverDnParams_t.
class SolverParams {
 public:
  SolverParams() = default;
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
  ~SolverParams() {
    if (params_) cusolverDnDestroyParams(params_);
  }
  absl::Status Create() {
    return CusolverStatus(cusolverDnCreateParams(&params_), "cusolverDnCreateParams");
  }
  cusolverDnParams_t get() const { return params_; }

 private:
  cusolverDnParams_t params_ = nullptr;
};

}  // namespace qcal::kernels::cuda
