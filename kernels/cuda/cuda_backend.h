// The CUDA backend. Only kernels/cuda includes CUDA headers; this header does not.
//
// The driver library (libcuda) is never linked: on a machine without a GPU the runtime reports an
// error from cudaGetDeviceCount, CudaDeviceCount() returns 0 and GPU tests skip.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace qcal::kernels {

// Number of usable CUDA devices; 0 when the runtime reports an error (no driver, no device).
int CudaDeviceCount();

// The backend on device `index`. Errors when no such device exists.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options, int index);

}  // namespace qcal::kernels
