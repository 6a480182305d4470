#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_backend.h"

namespace qcal::kernels {

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options, int index) {
  const int count = CudaDeviceCount();
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is available");
  if (index < 0 || index >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", index, " does not exist (", count, " present)"));
  }
  return absl::UnimplementedError("the CUDA backend's ops are not built in this version");
}

}  // namespace qcal::kernels
