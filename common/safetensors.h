// Safetensors reading (single file or sharded, by pread) and writing (sorted tensor order).
//
// Reading validates everything a malformed or hostile file could get wrong before any tensor is
// touched: the header length against the file size and a 100 MiB cap, the JSON itself, every
// entry's dtype, shape and offsets, that offsets lie inside the data section and that the byte
// count matches dtype × shape. Errors name the file and the tensor at fault.
//
// Tensors are read with pread, not a memory map (DESIGN section 2): a file truncated, deleted or
// replaced while a job runs must fail that read with an error naming the file, not kill the
// process with SIGBUS. Open reads only the header and records the file's identity; every tensor
// read first stats the path again and compares.
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

// One .safetensors file: its validated header, and tensors read on demand.
//
// Thread safety: the accessors and reads (Get, ReadInto) are const and may be called from several
// threads at once (each read is a stat and a pread on a descriptor opened once), as long as the
// object outlives them.
class SafetensorsFile {
 public:
  // Opens `path` and reads and validates its header (not the data). The descriptor stays open, so
  // reads need no further path lookups other than the identity check.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  // Parses an in-memory safetensors byte string (copied); `name` is used in error messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(const std::string& bytes,
                                                                    const std::string& name);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool Has(const std::string& name) const { return tensors_.count(name) != 0; }
  // The tensor in its stored dtype, as a host tensor that owns its memory (for FromBytes it shares
  // the in-memory copy). Callers must treat it as read-only. NotFound for an unknown name;
  // DataLoss, naming the file, when the file changed since Open (see ReadInto).
  absl::StatusOr<Tensor> Get(const std::string& name) const;
  // Reads the stored bytes of tensor `name` into `dst`, which holds `bytes` bytes: exactly the
  // tensor's size (InvalidArgument otherwise). Before reading, the path is stat'ed again and its
  // device, inode, size and modification time are compared with those recorded by Open; a change,
  // a vanished path or a short read is DataLoss "<path>: the file changed while it was being read
  // (...)". Thread-safe.
  absl::Status ReadInto(const std::string& name, void* dst, size_t bytes) const;

 private:
  // What identifies the file's contents as they were at Open.
  struct Identity {
    uint64_t dev = 0;
    uint64_t ino = 0;
    uint64_t size = 0;
    int64_t mtime_sec = 0;
    int64_t mtime_nsec = 0;
  };

  SafetensorsFile() = default;
  // Validates `header_len` bytes of header JSON for a data section of `data_size` bytes and fills
  // tensors_/metadata_.
  absl::Status Parse(const char* header, uint64_t header_len, uint64_t data_size);
  // OK when the path still names the file recorded by Open, unchanged.
  absl::Status CheckIdentity() const;

  std::string path_;
  int fd_ = -1;                         // -1 for FromBytes
  Identity identity_;                   // of fd_, at Open
  std::shared_ptr<Storage> in_memory_;  // FromBytes: the whole file
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
  // Stored dtype, an owning host tensor (treat as read-only); see SafetensorsFile::Get.
  absl::StatusOr<Tensor> Get(const std::string& name) const;
  // Reads the stored bytes of `name` into `dst` (exactly `bytes` bytes); see
  // SafetensorsFile::ReadInto. Thread-safe as long as the reader outlives the call.
  absl::Status ReadInto(const std::string& name, void* dst, size_t bytes) const;
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
