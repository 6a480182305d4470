// What launchers ask of the current device. Included by kernels/cuda files only.
#pragma once

#include <cuda_runtime.h>

namespace qcal::kernels::cuda {

// Multiprocessors of the current device (0 on error).
inline int SmCount() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 0;
  }
  return sms;
}

}  // namespace qcal::kernels::cuda
