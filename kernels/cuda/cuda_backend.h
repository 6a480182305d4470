// The CUDA backend. Only kernels/cuda includes CUDA headers; this header does not.
//
// Every Backend op runs on the GPU: cuBLAS GEMMs for Linear and AccumulateGram (fp32 compute is
// true fp32, never TF32; bf16 compute rounds operands to bf16 and accumulates in fp32), and own
// kernels for the rest (kernels/cuda/*.cu, each with its launcher header). The solver ops
// (GptqFactorize, GptqSolve, QuantizeRtn, OutputError; CholeskyWhitening and ReconstructError)
// run cuSOLVER, cuBLAS and own kernels (cuda_quant.cc; cuda_low_rank.cc). All work of one backend
// is queued on one stream in call order; ToHost, Synchronize and copies touching host memory wait
// for it. Device tensors come from a caching pool and go back to it when their last view is
// destroyed. Results are bit-identical run to run on the same GPU model and library versions (no
// atomics; reductions in a fixed order). CUDA failures (out of memory, a failed launch) come back
// as absl::Status: kResourceExhausted for memory, kInternal for the rest. Not thread-safe: one
// thread drives a backend at a time.
//
// The driver library (libcuda) is never linked: on a machine without a GPU the runtime reports an
// error from cudaGetDeviceCount, CudaDeviceCount() returns 0 and GPU tests skip.
//
// The implementation: the class in cuda_backend_internal.h, its members by room in cuda_backend.cc
// (construction, memory, transfers), cuda_backend_forward.cc, cuda_backend_attention.cc,
// cuda_backend_train.cc and cuda_backend_quant.cc.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace qcal::kernels {

// Number of usable CUDA devices; 0 when the runtime reports an error (no driver, no device).
int CudaDeviceCount();

// The backend on device `index`, with options.compute_dtype (options.threads is unused: host
// threads play no part in the results). Errors when no such device exists or CUDA cannot start.
// DeviceKind() is "cuda/<GPU name>/sm_<major><minor>/cublas-<version>/cusolver-<version>".
// options.memory_limit_bytes bounds AvailableMemory().
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options,
                                                           int index);

}  // namespace qcal::kernels
