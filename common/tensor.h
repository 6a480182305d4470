// Tensor: a typed, shaped view of a contiguous row-major buffer in host or device memory.
//
// Copies of a Tensor alias the same storage (like a shared_ptr); use Clone() for a deep copy.
// Storage is owned through a shared pointer to a Storage object, so views into a memory-mapped
// file keep the mapping alive, and device buffers are released by the backend that allocated them.
// Not thread-safe for concurrent mutation of the same storage.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/dtype.h"
#include "common/status.h"

namespace qcal {

enum class Device : uint8_t { kHost, kCuda };

using Shape = std::vector<int64_t>;

std::string ShapeString(const Shape& shape);
int64_t NumElements(const Shape& shape);

// A contiguous block of memory. Subclasses release it (free, munmap, cudaFree) in their destructor.
class Storage {
 public:
  virtual ~Storage() = default;
  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }

 protected:
  Storage(void* data, size_t bytes, Device device) : data_(data), bytes_(bytes), device_(device) {}

 private:
  void* data_;
  size_t bytes_;
  Device device_;
};

// 64-byte aligned, zero-initialised host memory.
std::shared_ptr<Storage> AllocateHost(size_t bytes);
// Zeroed host memory from an anonymous mapping of its own, unmapped when freed. For large tensors
// that live for a while and then go (a streamed block's weights, tensors read from a checkpoint):
// AllocateHost keeps freed memory in the heap for reuse by same-sized scratch tensors, where
// weights of changing sizes would fragment it and grow the resident set block after block.
std::shared_ptr<Storage> AllocateHostPages(size_t bytes);

class Tensor {
 public:
  Tensor() = default;
  Tensor(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape);

  // A zero-filled host tensor.
  static Tensor Zeros(DType dtype, Shape shape);
  // The same in its own pages (AllocateHostPages).
  static Tensor ZerosMapped(DType dtype, Shape shape);
  // A host fp32 tensor holding `values` (size must match the shape).
  static Tensor FromVector(const std::vector<float>& values, Shape shape);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kHost; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i < 0 ? shape_.size() + i : i]; }
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return NumElements(shape_); }
  size_t nbytes() const { return numel() * DTypeSize(dtype_); }

  void* raw() const { return static_cast<char*>(storage_->data()) + offset_; }
  template <typename T>
  T* data() const {
    return static_cast<T*>(raw());
  }

  // Same storage, new shape with the same element count.
  Tensor Reshape(Shape shape) const;
  // Rows [begin, end) of the leading dimension, sharing storage.
  Tensor Rows(int64_t begin, int64_t end) const;
  // Deep host copy.
  Tensor Clone() const;
  // Host copy converted to fp32 (from F32, F16, BF16, F64). Host tensors only.
  absl::StatusOr<Tensor> ToF32() const;
  // Host copy converted from fp32 to `dtype` (F32, F16, BF16) with round-to-nearest-even.
  absl::StatusOr<Tensor> ConvertTo(DType dtype) const;

  std::string DebugString() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  DType dtype_ = DType::kF32;
  Shape shape_;
};

}  // namespace qcal
