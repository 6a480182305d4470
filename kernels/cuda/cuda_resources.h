// RAII owners of the CUDA backend's handles and device memory, and the conversion of CUDA and
// cuBLAS error codes into absl::Status. Internal to kernels/cuda (this header includes CUDA
// headers; nothing outside kernels/cuda may include it).
//
// Device memory comes from a CachingAllocator: a caching pool per backend, because the engine
// allocates and frees activations for every op and cudaMalloc/cudaFree synchronize the device; a
// second pool caches pinned host memory for transfers.
// All work of one backend runs on one stream, so a block freed by one op and handed to the next is
// used in stream order and needs no event.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <cstddef>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/tensor.h"

namespace qcal::kernels::cuda {

// OK for cudaSuccess; otherwise kResourceExhausted for allocation failures and kInternal for the
// rest, with "<context>: <CUDA error name>: <description>".
absl::Status CudaStatus(cudaError_t error, const std::string& context);
// OK for CUBLAS_STATUS_SUCCESS; otherwise kResourceExhausted for CUBLAS_STATUS_ALLOC_FAILED and
// kInternal for the rest, naming `context` and the cuBLAS status.
absl::Status CublasStatus(cublasStatus_t status, const std::string& context);
// OK for CUSOLVER_STATUS_SUCCESS; otherwise kResourceExhausted for CUSOLVER_STATUS_ALLOC_FAILED and
// kInternal for the rest, naming `context` and the cuSOLVER status code.
absl::Status CusolverStatus(cusolverStatus_t status, const std::string& context);

// Makes `device` current on the calling thread (a no-op when it already is).
absl::Status UseDevice(int device);

// A non-blocking stream on the current device; destroyed with the object.
class CudaStream {
 public:
  static absl::StatusOr<CudaStream> Create();
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream();

  cudaStream_t get() const { return stream_; }

 private:
  explicit CudaStream(cudaStream_t stream) : stream_(stream) {}
  cudaStream_t stream_ = nullptr;
};

// A cuBLAS handle bound to one stream, with the default math mode (no TF32: fp32 GEMMs are true
// fp32) and atomics disallowed (results are bit-identical run to run for a fixed configuration).
class CublasHandle {
 public:
  static absl::StatusOr<CublasHandle> Create(cudaStream_t stream);
  CublasHandle(CublasHandle&& other) noexcept;
  CublasHandle& operator=(CublasHandle&& other) noexcept;
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  ~CublasHandle();

  cublasHandle_t get() const { return handle_; }
  // cuBLAS library version as "major.minor.patch".
  std::string Version() const;

 private:
  explicit CublasHandle(cublasHandle_t handle) : handle_(handle) {}
  cublasHandle_t handle_ = nullptr;
};

// A cuSOLVER dense handle bound to one stream, in deterministic mode (results bit-identical run to
// run for a fixed configuration).
class CusolverHandle {
 public:
  static absl::StatusOr<CusolverHandle> Create(cudaStream_t stream);
  CusolverHandle(CusolverHandle&& other) noexcept;
  CusolverHandle& operator=(CusolverHandle&& other) noexcept;
  CusolverHandle(const CusolverHandle&) = delete;
  CusolverHandle& operator=(const CusolverHandle&) = delete;
  ~CusolverHandle();

  cusolverDnHandle_t get() const { return handle_; }

 private:
  explicit CusolverHandle(cusolverDnHandle_t handle) : handle_(handle) {}
  cusolverDnHandle_t handle_ = nullptr;
};

// Where a CachingAllocator's blocks live.
enum class MemoryKind {
  kDevice,      // cudaMalloc: tensors of Device::kCuda
  kPinnedHost,  // cudaHostAlloc (page-locked): tensors of Device::kHost that transfer at bus speed
};

// A caching pool of device or pinned host memory on one device. Blocks are rounded up (powers of
// two up to 1 MiB, then multiples of 2 MiB) and reused by size class; they go back to the pool
// when the last Tensor viewing them is destroyed, and to the driver when the pool is destroyed or
// an allocation fails (then the allocation is retried once). Thread-safe: a host thread may release
// a pinned block while the backend's thread allocates. Create it with std::make_shared: storages
// hold a reference, so the pool outlives every block it handed out. Device blocks freed by one op
// and handed to the next are used in stream order (one stream per backend) and need no event;
// pinned blocks are only handed out after the copies that used them (synchronous, or waited for:
// Backend::CopyToHostAsync's destination lives until its wait returns).
class CachingAllocator : public std::enable_shared_from_this<CachingAllocator> {
 public:
  CachingAllocator(int device, MemoryKind kind) : device_(device), kind_(kind) {}
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;
  ~CachingAllocator();

  // Uninitialised memory of at least `bytes` bytes. The device must be current.
  // kResourceExhausted (naming the size and, for device memory, the device's free memory) when
  // the memory is exhausted.
  absl::StatusOr<std::shared_ptr<Storage>> Allocate(size_t bytes);

  // Bytes (rounded to size classes) handed out and not yet returned.
  size_t bytes_in_use() const;
  // Bytes held in the pool's free lists (reusable without cudaMalloc).
  size_t bytes_cached() const;
  // The most bytes_in_use() has been since creation or the last ResetPeak().
  size_t peak_bytes_in_use() const;
  void ResetPeak();

 private:
  class Block;
  static size_t RoundUp(size_t bytes);
  cudaError_t Malloc(void** ptr, size_t bytes) const;
  Device StorageDevice() const;
  void Return(void* ptr, size_t size_class);
  // Frees every cached block (cudaFree or cudaFreeHost).
  void ReleaseCached();

  const int device_;
  const MemoryKind kind_;
  mutable absl::Mutex mu_;
  std::multimap<size_t, void*> free_ ABSL_GUARDED_BY(mu_);  // size class -> block
  size_t in_use_ ABSL_GUARDED_BY(mu_) = 0;
  size_t cached_ ABSL_GUARDED_BY(mu_) = 0;
  size_t peak_in_use_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace qcal::kernels::cuda
