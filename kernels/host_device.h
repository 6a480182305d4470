// QCAL_HOST_DEVICE: marks the functions of the headers that host and CUDA code both compile
// (kernels/quant_grid.h, kernels/train_math.h, kernels/small_svd.h) as __host__ __device__ under
// nvcc, and as nothing elsewhere.
#pragma once

#if defined(__CUDACC__)
#define QCAL_HOST_DEVICE __host__ __device__
#else
#define QCAL_HOST_DEVICE
#endif
