#include "kernels/cuda/cuda_resources.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::kernels::cuda {

absl::Status CudaStatus(cudaError_t error, const std::string& context) {
  if (error == cudaSuccess) return absl::OkStatus();
  std::string message =
      absl::StrCat(context, ": ", cudaGetErrorName(error), ": ", cudaGetErrorString(error));
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status CublasStatus(cublasStatus_t status, const std::string& context) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  std::string message = absl::StrCat(context, ": cuBLAS ", cublasGetStatusName(status), ": ",
                                     cublasGetStatusString(status));
  if (status == CUBLAS_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status CusolverStatus(cusolverStatus_t status, const std::string& context) {
  if (status == CUSOLVER_STATUS_SUCCESS) return absl::OkStatus();
  std::string message = absl::StrCat(context, ": cuSOLVER status ", static_cast<int>(status));
  if (status == CUSOLVER_STATUS_ALLOC_FAILED) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

absl::Status UseDevice(int device) {
  int current = -1;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaGetDevice(&current), "cudaGetDevice"));
  if (current == device) return absl::OkStatus();
  return CudaStatus(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")"));
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  cudaStream_t stream = nullptr;
  QCAL_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                  "creating a CUDA stream"));
  return CudaStream(stream);
}

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

CudaStream::~CudaStream() {
  if (stream_) cudaStreamDestroy(stream_);
}

absl::StatusOr<CublasHandle> CublasHandle::Create(cudaStream_t stream) {
  cublasHandle_t handle = nullptr;
  QCAL_RETURN_IF_ERROR(CublasStatus(cublasCreate(&handle), "creating a cuBLAS handle"));
  CublasHandle owner(handle);
  QCAL_RETURN_IF_ERROR(CublasStatus(cublasSetStream(handle, stream), "cublasSetStream"));
  QCAL_RETURN_IF_ERROR(
      CublasStatus(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH), "cublasSetMathMode"));
  QCAL_RETURN_IF_ERROR(CublasStatus(cublasSetAtomicsMode(handle, CUBLAS_ATOMICS_NOT_ALLOWED),
                                    "cublasSetAtomicsMode"));
  QCAL_RETURN_IF_ERROR(
      CublasStatus(cublasSetPointerMode(handle, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode"));
  return owner;
}

CublasHandle::CublasHandle(CublasHandle&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)) {}

CublasHandle& CublasHandle::operator=(CublasHandle&& other) noexcept {
  if (this != &other) {
    if (handle_) cublasDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

CublasHandle::~CublasHandle() {
  if (handle_) cublasDestroy(handle_);
}

std::string CublasHandle::Version() const {
  int version = 0;
  if (cublasGetVersion(handle_, &version) != CUBLAS_STATUS_SUCCESS) return "unknown";
  return absl::StrCat(version / 10000, ".", (version % 10000) / 100, ".", version % 100);
}

absl::StatusOr<CusolverHandle> CusolverHandle::Create(cudaStream_t stream) {
  cusolverDnHandle_t handle = nullptr;
  QCAL_RETURN_IF_ERROR(CusolverStatus(cusolverDnCreate(&handle), "creating a cuSOLVER handle"));
  CusolverHandle owner(handle);
  QCAL_RETURN_IF_ERROR(CusolverStatus(cusolverDnSetStream(handle, stream), "cusolverDnSetStream"));
  QCAL_RETURN_IF_ERROR(
      CusolverStatus(cusolverDnSetDeterministicMode(handle, CUSOLVER_DETERMINISTIC_RESULTS),
                     "cusolverDnSetDeterministicMode"));
  return owner;
}

CusolverHandle::CusolverHandle(CusolverHandle&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)) {}

CusolverHandle& CusolverHandle::operator=(CusolverHandle&& other) noexcept {
  if (this != &other) {
    if (handle_) cusolverDnDestroy(handle_);
    handle_ = std::exchange(other.handle_, nullptr);
  }
  return *this;
}

CusolverHandle::~CusolverHandle() {
  if (handle_) cusolverDnDestroy(handle_);
}

// A pool block viewed as Tensor storage; returns itself to the pool when the last view goes.
class CachingAllocator::Block final : public Storage {
 public:
  Block(void* data, size_t bytes, size_t size_class, std::shared_ptr<CachingAllocator> pool,
        Device device)
      : Storage(data, bytes, device), size_class_(size_class), pool_(std::move(pool)) {}
  ~Block() override { pool_->Return(data(), size_class_); }

 private:
  size_t size_class_;
  std::shared_ptr<CachingAllocator> pool_;
};

CachingAllocator::~CachingAllocator() { ReleaseCached(); }

cudaError_t CachingAllocator::Malloc(void** ptr, size_t bytes) const {
  return kind_ == MemoryKind::kDevice ? cudaMalloc(ptr, bytes)
                                      : cudaHostAlloc(ptr, bytes, cudaHostAllocDefault);
}

Device CachingAllocator::StorageDevice() const {
  return kind_ == MemoryKind::kDevice ? Device::kCuda : Device::kHost;
}

size_t CachingAllocator::RoundUp(size_t bytes) {
  constexpr size_t kMinBlock = 512, kSmall = size_t{1} << 20, kLargeStep = size_t{2} << 20;
  if (bytes <= kMinBlock) return kMinBlock;
  if (bytes <= kSmall) {
    size_t size = kMinBlock;
    while (size < bytes) size <<= 1;
    return size;
  }
  return (bytes + kLargeStep - 1) / kLargeStep * kLargeStep;
}

absl::StatusOr<std::shared_ptr<Storage>> CachingAllocator::Allocate(size_t bytes) {
  const size_t size_class = RoundUp(bytes);
  {
    absl::MutexLock lock(&mu_);
    auto it = free_.find(size_class);
    if (it != free_.end()) {
      void* ptr = it->second;
      free_.erase(it);
      in_use_ += size_class;
      peak_in_use_ = std::max(peak_in_use_, in_use_);
      cached_ -= size_class;
      return std::make_shared<Block>(ptr, bytes, size_class, shared_from_this(), StorageDevice());
    }
  }
  void* ptr = nullptr;
  cudaError_t error = Malloc(&ptr, size_class);
  if (error == cudaErrorMemoryAllocation) {
    // Not sticky: clear it, hand the cached blocks back to the driver and try once more.
    cudaGetLastError();
    ReleaseCached();
    error = Malloc(&ptr, size_class);
  }
  if (error != cudaSuccess) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    const std::string what =
        kind_ == MemoryKind::kDevice
            ? absl::StrCat("allocating ", bytes, " bytes on CUDA device ", device_, " (",
                           free_bytes, " of ", total_bytes, " bytes free, ", bytes_in_use(),
                           " in use by qcal)")
            : absl::StrCat("allocating ", bytes, " bytes of pinned host memory (", bytes_in_use(),
                           " in use by qcal)");
    if (error == cudaErrorMemoryAllocation) {
      return absl::ResourceExhaustedError(absl::StrCat(
          kind_ == MemoryKind::kDevice ? "CUDA out of memory " : "out of pinned memory ", what));
    }
    return CudaStatus(error, what);
  }
  absl::MutexLock lock(&mu_);
  in_use_ += size_class;
  peak_in_use_ = std::max(peak_in_use_, in_use_);
  return std::make_shared<Block>(ptr, bytes, size_class, shared_from_this(), StorageDevice());
}

void CachingAllocator::Return(void* ptr, size_t size_class) {
  absl::MutexLock lock(&mu_);
  free_.emplace(size_class, ptr);
  in_use_ -= size_class;
  cached_ += size_class;
}

void CachingAllocator::ReleaseCached() {
  absl::MutexLock lock(&mu_);
  // cudaFree and cudaFreeHost wait for the device, so work still queued on a freed block
  // finishes first.
  for (const auto& [size_class, ptr] : free_) {
    if (kind_ == MemoryKind::kDevice) {
      cudaFree(ptr);
    } else {
      cudaFreeHost(ptr);
    }
  }
  free_.clear();
  cached_ = 0;
}

size_t CachingAllocator::bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return in_use_;
}

size_t CachingAllocator::bytes_cached() const {
  absl::MutexLock lock(&mu_);
  return cached_;
}

size_t CachingAllocator::peak_bytes_in_use() const {
  absl::MutexLock lock(&mu_);
  return peak_in_use_;
}

void CachingAllocator::ResetPeak() {
  absl::MutexLock lock(&mu_);
  peak_in_use_ = in_use_;
}

}  // namespace qcal::kernels::cuda
