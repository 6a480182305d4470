// Streaming safetensors writing: a checkpoint written tensor by tensor, never held in memory, into
// one `model.safetensors` or HF-style shards `model-{i:05d}-of-{N:05d}.safetensors` (1-based) with
// `model.safetensors.index.json` (DESIGN section 5, "Shards").
//
// Every tensor's name, dtype and shape is planned up front, so each shard's header is computed
// before any data: the header lists tensors in sorted name order (as WriteSafetensors does), and
// the data section holds them in plan order (the order Write is called in), contiguous, so readers
// that check offsets accept the file. A new shard starts when adding the next planned tensor would
// take the current shard's data past `max_shard_bytes` (a tensor larger than that gets a shard of
// its own). With one shard the file is `model.safetensors` and no index is written.
// The output is a function of the plan and the bytes written: no timestamps, no paths.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor.h"

namespace qcal {

struct PlannedTensor {
  std::string name;
  DType dtype = DType::kF32;
  Shape shape;
};

class ShardedSafetensorsWriter {
 public:
  // Plans the shards of `tensors` (in write order; names unique) under `dir` (must exist).
  // `file_stem` is "model" for checkpoints ("model.safetensors", "model-00001-of-00003...",
  // "model.safetensors.index.json"). `metadata` goes into every shard's `__metadata__`.
  // max_shard_bytes <= 0 means one shard. Creates no file yet.
  static absl::StatusOr<std::unique_ptr<ShardedSafetensorsWriter>> Create(
      const std::string& dir, std::vector<PlannedTensor> tensors, int64_t max_shard_bytes,
      const std::string& file_stem = "model",
      const std::map<std::string, std::string>& metadata = {});
  ~ShardedSafetensorsWriter();

  // Writes the next planned tensor: `t` is a host tensor whose name, dtype and shape must match
  // the plan's next entry (FailedPrecondition otherwise, naming both). Opens the next shard (and
  // writes its header) when the plan moves on to it.
  absl::Status Write(const std::string& name, const Tensor& t);
  // The same from raw bytes (exactly dtype × shape bytes).
  absl::Status WriteBytes(const std::string& name, const void* data, size_t bytes);
  // After the last tensor: closes (and fsyncs) the last shard and writes the index when there is
  // more than one shard. FailedPrecondition if planned tensors were not written.
  absl::Status Finish();

  // The shard file names, in order (known from Create on).
  const std::vector<std::string>& shard_files() const;

 private:
  struct Impl;
  explicit ShardedSafetensorsWriter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal
