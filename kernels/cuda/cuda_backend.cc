// The CUDA backend: adapters that validate shapes and dtypes, run the launchers of the
// kernels/cuda/*.cu files or cuBLAS on the backend's stream, and turn every failure into an
// absl::Status. This file: construction and the factory, memory, transfers and copies,
// synchronization, profiling, and the checks that the cuda_backend_*.cc files share.
#include "kernels/cuda/cuda_backend.h"

#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cuda_backend_internal.h"
#include "kernels/cuda/fill.cuh"

namespace qcal::kernels {
namespace cuda_internal {

absl::Status ExpectDevice(const Tensor& t, DType dtype, const char* op, const char* what) {
  if (!t.defined()) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " is undefined"));
  }
  if (t.device() != Device::kCuda) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " ", t.DebugString(), " is a host tensor, expected CUDA"));
  }
  if (t.dtype() != dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", what, " is ", t.DebugString(), ", expected ", DTypeName(dtype)));
  }
  return absl::OkStatus();
}

absl::Status ExpectHostI32(const Tensor& t, const char* op, const char* what) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kI32) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", what, " must be a host I32 tensor"));
  }
  return absl::OkStatus();
}

absl::Status ExpectShape(const Tensor& t, const Shape& shape, const char* op, const char* what) {
  if (t.shape() != shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": ", what, " has shape ", ShapeString(t.shape()), ", expected ", ShapeString(shape)));
  }
  return absl::OkStatus();
}

absl::Status CheckIds(const Tensor& ids, int64_t limit, const char* op, const char* what) {
  const int32_t* p = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    if (p[i] < 0 || p[i] >= limit) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": ", what, " ", p[i], " at index ", i, " is outside [0, ", limit, ")"));
    }
  }
  return absl::OkStatus();
}

CudaBackend::CudaBackend(int device, ComputeDType dtype, int64_t memory_limit, std::string kind,
                         cuda::CudaStream stream, cuda::CublasHandle blas,
                         cuda::CusolverHandle solver)
    : device_(device),
      dtype_(dtype),
      memory_limit_(memory_limit),
      kind_(std::move(kind)),
      stream_(std::move(stream)),
      blas_(std::move(blas)),
      solver_(std::move(solver)),
      allocator_(std::make_shared<cuda::CachingAllocator>(device, cuda::MemoryKind::kDevice)),
      pinned_(std::make_shared<cuda::CachingAllocator>(device, cuda::MemoryKind::kPinnedHost)) {}

CudaBackend::~CudaBackend() {
  // Let queued work finish before the handle and stream go; errors have nowhere to go here.
  if (cuda::UseDevice(device_).ok()) {
    cudaStreamSynchronize(stream_.get());
    if (copy_stream_ != nullptr) cudaStreamSynchronize(copy_stream_->get());
  }
}

absl::StatusOr<Tensor> CudaBackend::Alloc(DType dtype, const Shape& shape) {
  QCAL_ASSIGN_OR_RETURN(Tensor t, Uninitialized(dtype, shape));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemsetAsync(t.raw(), 0, t.nbytes(), stream()), "Alloc: cudaMemsetAsync"));
  return t;
}

absl::StatusOr<Tensor> CudaBackend::AllocUninitialized(DType dtype, const Shape& shape) {
  return Uninitialized(dtype, shape);
}

absl::StatusOr<Tensor> CudaBackend::ToDevice(const Tensor& t) {
  if (!t.defined()) return absl::InvalidArgumentError("ToDevice: tensor is undefined");
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_ASSIGN_OR_RETURN(Tensor out, Uninitialized(t.dtype(), t.shape()));
  const cudaMemcpyKind kind =
      t.device() == Device::kHost ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(out.raw(), t.raw(), t.nbytes(), kind, stream()),
                                  absl::StrCat("ToDevice ", t.DebugString())));
  // The host buffer may be released as soon as we return.
  QCAL_RETURN_IF_ERROR(Synchronize());
  return out;
}

absl::StatusOr<Tensor> CudaBackend::ToHost(const Tensor& t) {
  if (!t.defined()) return absl::InvalidArgumentError("ToHost: tensor is undefined");
  if (t.device() == Device::kHost) return t.Clone();
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  Tensor out = Tensor::Zeros(t.dtype(), t.shape());
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(out.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost, stream()),
                 absl::StrCat("ToHost ", t.DebugString())));
  QCAL_RETURN_IF_ERROR(Synchronize());
  return out;
}

absl::Status CudaBackend::Synchronize() {
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cudaStreamSynchronize(stream()), "cudaStreamSynchronize");
}

absl::Status CudaBackend::Copy(const Tensor& src, Tensor& dst) {
  if (!src.defined() || !dst.defined() || src.dtype() != dst.dtype() ||
      src.numel() != dst.numel() ||
      (src.device() != Device::kCuda && dst.device() != Device::kCuda)) {
    return absl::InvalidArgumentError(
        absl::StrCat("Copy: ", src.defined() ? src.DebugString() : "undefined", " into ",
                     dst.defined() ? dst.DebugString() : "undefined",
                     " (same dtype and element count, at least one of them a CUDA tensor)"));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(), cudaMemcpyDefault, stream()),
                 absl::StrCat("Copy ", src.DebugString(), " into ", dst.DebugString())));
  // A host buffer may be read or released as soon as we return.
  if (src.device() == Device::kHost || dst.device() == Device::kHost) return Synchronize();
  return absl::OkStatus();
}

namespace {

// A copy on the backend's copy stream: the event that marks it done, and the device source, held
// until the copy is done (the allocator hands memory out in the compute stream's order, which the
// copy stream does not follow). Destroying it waits for the copy.
struct CopyInFlight {
  int device = 0;
  cudaEvent_t done = nullptr;
  Tensor src;
  absl::Status Wait() {
    QCAL_RETURN_IF_ERROR(cuda::UseDevice(device));
    return CudaStatus(cudaEventSynchronize(done), "CopyToHostAsync: waiting for the copy");
  }
  ~CopyInFlight() {
    if (done == nullptr) return;
    (void)cuda::UseDevice(device);
    (void)cudaEventSynchronize(done);
    (void)cudaEventDestroy(done);
  }
};

}  // namespace

absl::StatusOr<std::function<absl::Status()>> CudaBackend::CopyToHostAsync(const Tensor& src,
                                                                           Tensor& dst) {
  if (!src.defined() || !dst.defined() || src.dtype() != dst.dtype() ||
      src.numel() != dst.numel() || src.device() != Device::kCuda ||
      dst.device() != Device::kHost) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHostAsync: ", src.defined() ? src.DebugString() : "undefined", " into ",
                     dst.defined() ? dst.DebugString() : "undefined",
                     " (a CUDA tensor into a host tensor of the same dtype and element count)"));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  if (copy_stream_ == nullptr) {
    QCAL_ASSIGN_OR_RETURN(cuda::CudaStream created, cuda::CudaStream::Create());
    copy_stream_ = std::make_unique<cuda::CudaStream>(std::move(created));
  }
  auto copy = std::make_shared<CopyInFlight>();
  copy->device = device_;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&copy->done, cudaEventDisableTiming),
                                  "CopyToHostAsync: event"));
  copy->src = src;
  cudaEvent_t ready = nullptr;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming),
                                  "CopyToHostAsync: event"));
  cudaError_t error = cudaEventRecord(ready, stream());
  if (error == cudaSuccess) error = cudaStreamWaitEvent(copy_stream_->get(), ready, 0);
  (void)cudaEventDestroy(ready);  // released once the wait above is satisfied
  QCAL_RETURN_IF_ERROR(CudaStatus(error, "CopyToHostAsync: ordering after the compute stream"));
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(dst.raw(), src.raw(), src.nbytes(),
                                                  cudaMemcpyDeviceToHost, copy_stream_->get()),
                                  absl::StrCat("CopyToHostAsync ", src.DebugString())));
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaEventRecord(copy->done, copy_stream_->get()), "CopyToHostAsync: event"));
  return std::function<absl::Status()>([copy]() { return copy->Wait(); });
}

int64_t CudaBackend::AvailableMemory() {
  if (!cuda::UseDevice(device_).ok()) return 0;
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  int64_t available = static_cast<int64_t>(free_bytes + allocator_->bytes_cached());
  if (memory_limit_ > 0) {
    available = std::min(
        available,
        std::max<int64_t>(0, memory_limit_ - static_cast<int64_t>(allocator_->bytes_in_use())));
  }
  return available;
}

absl::StatusOr<Backend*> CudaBackend::SideBackend() {
  if (side_ == nullptr) {
    BackendOptions options;
    options.compute_dtype = dtype_;
    options.memory_limit_bytes = memory_limit_;
    QCAL_ASSIGN_OR_RETURN(side_, CreateCudaBackend(options, device_));
  }
  return side_.get();
}

absl::StatusOr<Tensor> CudaBackend::AllocHost(DType dtype, const Shape& shape) {
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat("AllocHost: bad shape ", ShapeString(shape)));
    }
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  QCAL_ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage,
                        pinned_->Allocate(NumElements(shape) * DTypeSize(dtype)));
  return Tensor(std::move(storage), 0, dtype, shape);
}

absl::Status CudaBackend::FillUniform(Tensor& t, uint64_t seed, float lo, float hi) {
  QCAL_RETURN_IF_ERROR(ExpectDevice(t, DType::kF32, "FillUniform", "t"));
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  return CudaStatus(cuda::LaunchFillUniform(t.data<float>(), t.numel(), seed, lo, hi, stream()),
                    "FillUniform kernel");
}

void CudaBackend::ProfilerRange(bool start) {
  if (!cuda::UseDevice(device_).ok()) return;
  if (start) {
    (void)cudaProfilerStart();
  } else {
    (void)cudaDeviceSynchronize();
    (void)cudaProfilerStop();
  }
}

absl::StatusOr<Tensor> CudaBackend::Uninitialized(DType dtype, const Shape& shape) {
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(absl::StrCat("Alloc: bad shape ", ShapeString(shape)));
    }
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(device_));
  const size_t bytes = NumElements(shape) * DTypeSize(dtype);
  QCAL_ASSIGN_OR_RETURN(std::shared_ptr<Storage> storage, allocator_->Allocate(bytes));
  return Tensor(std::move(storage), 0, dtype, shape);
}

}  // namespace cuda_internal

using cuda::CudaStatus;
using cuda_internal::CudaBackend;

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const BackendOptions& options,
                                                           int index) {
  const int count = CudaDeviceCount();
  if (count == 0) return absl::FailedPreconditionError("no CUDA device is available");
  if (index < 0 || index >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", index, " does not exist (", count, " present)"));
  }
  QCAL_RETURN_IF_ERROR(cuda::UseDevice(index));
  cudaDeviceProp prop;
  QCAL_RETURN_IF_ERROR(
      CudaStatus(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties"));
  QCAL_ASSIGN_OR_RETURN(cuda::CudaStream stream, cuda::CudaStream::Create());
  QCAL_ASSIGN_OR_RETURN(cuda::CublasHandle blas, cuda::CublasHandle::Create(stream.get()));
  QCAL_ASSIGN_OR_RETURN(cuda::CusolverHandle solver, cuda::CusolverHandle::Create(stream.get()));
  int solver_version = 0;
  QCAL_RETURN_IF_ERROR(
      cuda::CusolverStatus(cusolverGetVersion(&solver_version), "cusolverGetVersion"));
  std::string kind = absl::StrCat("cuda/", prop.name, "/sm_", prop.major, prop.minor, "/cublas-",
                                  blas.Version(), "/cusolver-", solver_version);
  return std::make_unique<CudaBackend>(index, options.compute_dtype, options.memory_limit_bytes,
                                       std::move(kind), std::move(stream), std::move(blas),
                                       std::move(solver));
}

}  // namespace qcal::kernels
