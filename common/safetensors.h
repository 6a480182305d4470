// Safetensors reading (memory-mapped, single file or sharded) and writing (sorted tensor order).
//
// Reading validates everything a malformed or hostile file could get wrong before any tensor is
// touched: the header length against the file size and a 100 MiB cap, the JSON itself, every
// entry's dtype, shape and offsets, that offsets lie inside the data section and that the byte
// count matches dtype × shape. Errors name the file and the tensor at fault.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"

namespace qcal {

// Largest header accepted, in bytes. Real checkpoints have headers of a few hundred KiB.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

struct TensorInfo {
  DType dtype;
  Shape shape;
  uint64_t begin = 0;  // byte offsets in the data section
  uint64_t end = 0;
};

// One memory-mapped .safetensors file. Tensors returned by Get alias the mapping (read-only).
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory safetensors byte string (copied); `name` is used in error messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(const std::string& bytes,
                                                                    const std::string& name);

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return tensors_.count(name) != 0; }
  // A read-only view of the tensor in its stored dtype.
  absl::StatusOr<Tensor> Get(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  // Validates the header of `storage_` (the whole file) and fills tensors_/metadata_.
  absl::Status Parse();
  std::string path_;
  std::shared_ptr<Storage> mapping_;
  uint64_t data_offset_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a Hugging Face checkpoint directory: `model.safetensors`, or the shards listed by
// `model.safetensors.index.json`.
class CheckpointReader {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(const std::string& dir);

  bool Has(const std::string& name) const { return index_.count(name) != 0; }
  std::vector<std::string> Names() const;
  absl::StatusOr<TensorInfo> Info(const std::string& name) const;
  // Stored dtype, read-only view.
  absl::StatusOr<Tensor> Get(const std::string& name) const;
  // A fresh fp32 host copy, checking the shape when `expected` is non-empty. Errors name the file.
  absl::StatusOr<Tensor> GetF32(const std::string& name, const Shape& expected = {}) const;
  // The file holding `name`, relative to the directory.
  absl::StatusOr<std::string> FileOf(const std::string& name) const;

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> index_;  // tensor name -> files_ index
};

// The header of a safetensors file: the 8-byte little-endian header length followed by the JSON
// header, padded with spaces to a multiple of 8 bytes. The JSON lists `metadata` first (as
// `__metadata__`, omitted when empty), then `tensors` in sorted name order with their dtype, shape
// and data offsets as given (they need not be in name order; readers check only that they lie in
// the data section). Shared by WriteSafetensors and ShardedSafetensorsWriter.
std::string SafetensorsHeader(const std::map<std::string, TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata);

// The safetensors bytes of `tensors` (host tensors), sorted by name; see WriteSafetensors.
absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, Tensor>& tensors,
    const std::map<std::string, std::string>& metadata = {});

// Writes `tensors` (host tensors, any dtype) to `path`, in sorted name order, with an optional
// `__metadata__` map. The header is padded with spaces to a multiple of 8 bytes.
absl::Status WriteSafetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace qcal
