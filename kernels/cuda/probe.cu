// Device discovery. Kept separate from the ops so that every binary can ask cheaply.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_backend.h"

namespace qcal::kernels {

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error from a missing driver
    return 0;
  }
  return count;
}

}  // namespace qcal::kernels
