#include "common/tensor.h"

#include <malloc.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qcal {
namespace {

class HostStorage final : public Storage {
 public:
  HostStorage(void* data, size_t bytes) : Storage(data, bytes, Device::kHost) {}
  ~HostStorage() override { std::free(data()); }
};

// Pages of an anonymous mapping of their own, returned to the system when freed.
class MappedHostStorage final : public Storage {
 public:
  MappedHostStorage(void* data, size_t bytes, size_t mapped)
      : Storage(data, bytes, Device::kHost), mapped_(mapped) {}
  ~MappedHostStorage() override { munmap(data(), mapped_); }

 private:
  size_t mapped_;
};

}  // namespace

std::shared_ptr<Storage> AllocateHostPages(size_t bytes) {
  const size_t mapped = std::max<size_t>(bytes, 1);
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  QCAL_CHECK(p != MAP_FAILED);
  return std::make_shared<MappedHostStorage>(p, bytes, mapped);
}

std::string ShapeString(const Shape& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Activation and scratch tensors of a few MiB are allocated and freed for every op. By default
// glibc serves those with mmap and returns them with munmap, so each one costs page faults on first
// touch: that was a third of a CPU quantization's time, in the kernel. Keep them in the heap
// instead (mmap only above 1 GiB) and don't trim freed memory eagerly. Threads (block readers,
// spills, per-linear conversions, and in `qcal quantize` the in-process coordinator's gRPC and
// RocksDB threads) would each get an arena of their own that keeps what it freed: with a 1 GiB trim
// threshold the resident set then grows block after block. Two arenas bound that; allocations are
// per op, not per element, so the lock is not contended. Set before main(), so that no thread
// has made an arena of its own yet.
struct HostAllocatorSetup {
  HostAllocatorSetup() {
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    mallopt(M_ARENA_MAX, 2);
  }
};
const HostAllocatorSetup host_allocator_setup;

std::shared_ptr<Storage> AllocateHost(size_t bytes) {
  size_t rounded = ((bytes + 63) / 64) * 64;
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(64, rounded);
  QCAL_CHECK(p != nullptr);
  std::memset(p, 0, rounded);
  return std::make_shared<HostStorage>(p, bytes);
}

Tensor::Tensor(std::shared_ptr<Storage> storage, size_t offset, DType dtype, Shape shape)
    : storage_(std::move(storage)), offset_(offset), dtype_(dtype), shape_(std::move(shape)) {
  QCAL_CHECK(offset_ + nbytes() <= storage_->bytes());
}

Tensor Tensor::Zeros(DType dtype, Shape shape) {
  size_t bytes = NumElements(shape) * DTypeSize(dtype);
  return Tensor(AllocateHost(bytes), 0, dtype, std::move(shape));
}

Tensor Tensor::ZerosMapped(DType dtype, Shape shape) {
  size_t bytes = NumElements(shape) * DTypeSize(dtype);
  return Tensor(AllocateHostPages(bytes), 0, dtype, std::move(shape));
}

Tensor Tensor::FromVector(const std::vector<float>& values, Shape shape) {
  QCAL_CHECK(static_cast<int64_t>(values.size()) == NumElements(shape));
  Tensor t = Zeros(DType::kF32, std::move(shape));
  std::memcpy(t.raw(), values.data(), values.size() * sizeof(float));
  return t;
}

Tensor Tensor::Reshape(Shape shape) const {
  QCAL_CHECK(NumElements(shape) == numel());
  return Tensor(storage_, offset_, dtype_, std::move(shape));
}

Tensor Tensor::Rows(int64_t begin, int64_t end) const {
  QCAL_CHECK(rank() >= 1 && begin >= 0 && begin <= end && end <= shape_[0]);
  Shape s = shape_;
  s[0] = end - begin;
  int64_t row_elems = shape_[0] == 0 ? 0 : numel() / shape_[0];
  return Tensor(storage_, offset_ + begin * row_elems * DTypeSize(dtype_), dtype_, std::move(s));
}

Tensor Tensor::Clone() const {
  QCAL_CHECK(device() == Device::kHost);
  Tensor t = Zeros(dtype_, shape_);
  std::memcpy(t.raw(), raw(), nbytes());
  return t;
}

absl::StatusOr<Tensor> Tensor::ToF32() const {
  if (device() != Device::kHost) return absl::InvalidArgumentError("ToF32 needs a host tensor");
  Tensor out = Zeros(DType::kF32, shape_);
  float* dst = out.data<float>();
  const int64_t n = numel();
  switch (dtype_) {
    case DType::kF32:
      std::memcpy(dst, raw(), n * 4);
      break;
    case DType::kF16: {
      const uint16_t* src = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = HalfToFloat(src[i]);
      break;
    }
    case DType::kBF16: {
      const uint16_t* src = data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = Bf16ToFloat(src[i]);
      break;
    }
    case DType::kF64: {
      const double* src = data<double>();
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot convert ", DTypeName(dtype_), " to F32"));
  }
  return out;
}

absl::StatusOr<Tensor> Tensor::ConvertTo(DType dtype) const {
  if (dtype_ != DType::kF32 || device() != Device::kHost) {
    return absl::InvalidArgumentError("ConvertTo needs a host F32 tensor");
  }
  const float* src = data<float>();
  const int64_t n = numel();
  Tensor out = Zeros(dtype, shape_);
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out.raw(), src, n * 4);
      break;
    case DType::kF16: {
      uint16_t* dst = out.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = FloatToHalf(src[i]);
      break;
    }
    case DType::kBF16: {
      uint16_t* dst = out.data<uint16_t>();
      for (int64_t i = 0; i < n; ++i) dst[i] = FloatToBf16(src[i]);
      break;
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat("cannot convert F32 to ", DTypeName(dtype)));
  }
  return out;
}

std::string Tensor::DebugString() const {
  return absl::StrCat(DTypeName(dtype_), ShapeString(shape_));
}

}  // namespace qcal
