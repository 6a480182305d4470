#include "kernels/backend.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/hash_random.h"
#if QCAL_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace qcal::kernels {

absl::Status BackendOptions::Validate() const {
  if (threads < 0) return absl::InvalidArgumentError("threads must be >= 0");
  if (memory_limit_bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("memory_limit_bytes must be >= 0, got ", memory_limit_bytes));
  }
  if (device != "cpu" && device != "cuda" && !absl::StartsWith(device, "cuda:")) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown device \"", device, "\" (expected cpu, cuda or cuda:N)"));
  }
  return absl::OkStatus();
}

absl::Status Backend::FillUniform(Tensor& t, uint64_t seed, float lo, float hi) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat("FillUniform: ", t.defined() ? t.DebugString() : "undefined tensor",
                     " is not a host F32 tensor"));
  }
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i)
    p[i] = HashUniform(seed, static_cast<uint64_t>(i), lo, hi);
  return absl::OkStatus();
}

absl::Status Backend::CheckAbqLinearOperands(const PreparedAbqLinear& w, const Tensor& x,
                                             const Tensor* bias, const Tensor& y) {
  auto f32 = [](const Tensor& t) { return t.defined() && t.dtype() == DType::kF32; };
  if (!f32(x) || !f32(y) || x.rank() != 2 || x.dim(1) != w.k() ||
      y.shape() != Shape{x.dim(0), w.n()}) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: x ", x.defined() ? x.DebugString() : "undefined", " and y ",
                     y.defined() ? y.DebugString() : "undefined", " do not fit a [", w.n(), ", ",
                     w.k(), "] linear (F32 [m, ", w.k(), "] in, [m, ", w.n(), "] out)"));
  }
  if (bias != nullptr && (!f32(*bias) || bias->shape() != Shape{w.n()})) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: bias ", bias->defined() ? bias->DebugString() : "undefined",
                     " is not F32 [", w.n(), "]"));
  }
  if (x.dim(0) > kAbqMaxTokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("AbqLinear: ", x.dim(0), " tokens in one call, at most ", kAbqMaxTokens));
  }
  return absl::OkStatus();
}

bool CudaAvailable() {
#if QCAL_HAVE_CUDA
  return CudaDeviceCount() > 0;
#else
  return false;
#endif
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (options.device == "cpu") return CreateCpuBackend(options);
  int index = 0;
  if (absl::StartsWith(options.device, "cuda:") &&
      !absl::SimpleAtoi(options.device.substr(5), &index)) {
    return absl::InvalidArgumentError(absl::StrCat("bad device \"", options.device, "\""));
  }
#if QCAL_HAVE_CUDA
  return CreateCudaBackend(options, index);
#else
  return absl::FailedPreconditionError(
      absl::StrCat("device \"", options.device, "\" requested but qcal was built without CUDA"));
#endif
}

}  // namespace qcal::kernels
