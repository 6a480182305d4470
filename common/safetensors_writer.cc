#include "common/safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace qcal {
namespace {

struct TensorSlot {
  size_t shard = 0;
  uint64_t begin = 0;  // offsets in the shard's data section
  uint64_t end = 0;
};

struct ShardPlan {
  std::string file;    // name inside the directory
  std::string header;  // the bytes before the data section
};

// Writes all of `data` at the file's current position, retrying short writes and EINTR.
absl::Status WriteAll(int fd, const std::string& path, const void* data, size_t bytes) {
  const auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t n = ::write(fd, p, bytes);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::ResourceExhaustedError(
          absl::StrCat(path, ": write failed: ", std::strerror(errno)));
    }
    p += n;
    bytes -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

struct ShardedSafetensorsWriter::Impl {
  std::string dir;
  std::vector<PlannedTensor> plan;
  std::vector<TensorSlot> slots;  // parallel to plan
  std::vector<ShardPlan> shards;
  std::vector<std::string> shard_files;
  std::string index_file;
  std::string index_json;  // empty with one shard

  size_t next = 0;      // next plan entry to write
  int open_shard = -1;  // index of the shard `fd` belongs to
  int fd = -1;
  bool finished = false;
  absl::Status error;  // first IO error; every later call returns it

  std::string PathOf(const std::string& file) const {
    return (std::filesystem::path(dir) / file).string();
  }

  // fsyncs and closes the open shard, if any.
  absl::Status CloseShard() {
    if (fd < 0) return absl::OkStatus();
    const std::string path = PathOf(shards[open_shard].file);
    const int to_close = fd;
    fd = -1;
    if (::fsync(to_close) != 0) {
      const int err = errno;
      ::close(to_close);
      return absl::DataLossError(absl::StrCat(path, ": fsync failed: ", std::strerror(err)));
    }
    if (::close(to_close) != 0) {
      return absl::DataLossError(absl::StrCat(path, ": close failed: ", std::strerror(errno)));
    }
    return absl::OkStatus();
  }

  // Closes the open shard and opens shard `s`, writing its header.
  absl::Status OpenShard(size_t s) {
    QCAL_RETURN_IF_ERROR(CloseShard());
    const std::string path = PathOf(shards[s].file);
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::PermissionDeniedError(
          absl::StrCat(path, ": cannot write: ", std::strerror(errno)));
    }
    open_shard = static_cast<int>(s);
    return WriteAll(fd, path, shards[s].header.data(), shards[s].header.size());
  }

  // Checks that `name` is the plan's next tensor and that it takes `bytes` bytes.
  absl::Status CheckNext(const std::string& name, size_t bytes) const {
    if (finished) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, ": tensor \"", name, "\" written after Finish"));
    }
    if (next >= plan.size()) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": tensor \"", name, "\" written after all ", plan.size(), " planned tensors"));
    }
    const PlannedTensor& want = plan[next];
    const std::string file = PathOf(shards[slots[next].shard].file);
    if (name != want.name) {
      return absl::FailedPreconditionError(absl::StrCat(
          file, ": got tensor \"", name, "\" but the plan's next tensor is \"", want.name, "\""));
    }
    const uint64_t planned = slots[next].end - slots[next].begin;
    if (bytes != planned) {
      return absl::FailedPreconditionError(
          absl::StrCat(file, ": tensor \"", name, "\" has ", bytes, " bytes but the plan has ",
                       DTypeName(want.dtype), ShapeString(want.shape), " (", planned, " bytes)"));
    }
    return absl::OkStatus();
  }

  absl::Status WriteNext(const void* data, size_t bytes) {
    const TensorSlot& slot = slots[next];
    if (open_shard != static_cast<int>(slot.shard)) QCAL_RETURN_IF_ERROR(OpenShard(slot.shard));
    QCAL_RETURN_IF_ERROR(WriteAll(fd, PathOf(shards[slot.shard].file), data, bytes));
    ++next;
    return absl::OkStatus();
  }
};

absl::StatusOr<std::unique_ptr<ShardedSafetensorsWriter>> ShardedSafetensorsWriter::Create(
    const std::string& dir, std::vector<PlannedTensor> tensors, int64_t max_shard_bytes,
    const std::string& file_stem, const std::map<std::string, std::string>& metadata) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": output directory does not exist"));
  }
  if (file_stem.empty() || file_stem.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, ": file stem \"", file_stem, "\" is not a plain file name"));
  }
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  std::set<std::string> names;
  std::vector<uint64_t> sizes;
  for (const PlannedTensor& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, ": planned tensor name \"", t.name, "\" is not allowed"));
    }
    if (!names.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(dir, ": tensor \"", t.name, "\" is planned twice"));
    }
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0 || d > (int64_t{1} << 40) || (d != 0 && numel > (uint64_t{1} << 48) / d)) {
        return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor \"", t.name, "\" has shape ",
                                                       ShapeString(t.shape),
                                                       ", which is negative or too large"));
      }
      numel *= static_cast<uint64_t>(d);
    }
    sizes.push_back(numel * DTypeSize(t.dtype));
  }

  // Assign tensors to shards: a new shard starts when the next tensor would take a non-empty shard
  // past max_shard_bytes.
  std::vector<std::map<std::string, TensorInfo>> shard_infos(1);
  uint64_t shard_bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (max_shard_bytes > 0 && !shard_infos.back().empty() &&
        shard_bytes + sizes[i] > static_cast<uint64_t>(max_shard_bytes)) {
      shard_infos.emplace_back();
      shard_bytes = 0;
    }
    impl->slots.push_back({shard_infos.size() - 1, shard_bytes, shard_bytes + sizes[i]});
    shard_infos.back()[tensors[i].name] =
        TensorInfo{tensors[i].dtype, tensors[i].shape, shard_bytes, shard_bytes + sizes[i]};
    shard_bytes += sizes[i];
  }
  const size_t n = shard_infos.size();
  for (size_t s = 0; s < n; ++s) {
    std::string file;
    if (n == 1) {
      file = absl::StrCat(file_stem, ".safetensors");
    } else {
      char buf[32];
      std::snprintf(buf, sizeof(buf), "-%05zu-of-%05zu", s + 1, n);
      file = absl::StrCat(file_stem, buf, ".safetensors");
    }
    impl->shard_files.push_back(file);
    impl->shards.push_back({file, SafetensorsHeader(shard_infos[s], metadata)});
  }
  if (n > 1) {
    nlohmann::json weight_map = nlohmann::json::object();
    uint64_t total = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      weight_map[tensors[i].name] = impl->shard_files[impl->slots[i].shard];
      total += sizes[i];
    }
    // std::map-backed nlohmann::json sorts keys, as transformers' json.dumps(sort_keys=True) does.
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    impl->index_file = absl::StrCat(file_stem, ".safetensors.index.json");
    impl->index_json = index.dump(2) + "\n";
  }
  impl->plan = std::move(tensors);
  return std::unique_ptr<ShardedSafetensorsWriter>(new ShardedSafetensorsWriter(std::move(impl)));
}

ShardedSafetensorsWriter::ShardedSafetensorsWriter(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}

ShardedSafetensorsWriter::~ShardedSafetensorsWriter() {
  if (impl_->fd >= 0) ::close(impl_->fd);
}

absl::Status ShardedSafetensorsWriter::Write(const std::string& name, const Tensor& t) {
  if (!impl_->error.ok()) return impl_->error;
  if (!t.defined() || t.device() != Device::kHost) {
    return absl::InvalidArgumentError(
        absl::StrCat(impl_->dir, ": tensor \"", name, "\" is not a host tensor"));
  }
  if (impl_->next < impl_->plan.size() && !impl_->finished) {
    const PlannedTensor& want = impl_->plan[impl_->next];
    if (name == want.name && (t.dtype() != want.dtype || t.shape() != want.shape)) {
      return absl::FailedPreconditionError(
          absl::StrCat(impl_->PathOf(impl_->shards[impl_->slots[impl_->next].shard].file),
                       ": tensor \"", name, "\" is ", DTypeName(t.dtype()), ShapeString(t.shape()),
                       " but the plan has ", DTypeName(want.dtype), ShapeString(want.shape)));
    }
  }
  QCAL_RETURN_IF_ERROR(impl_->CheckNext(name, t.nbytes()));
  impl_->error = impl_->WriteNext(t.raw(), t.nbytes());
  return impl_->error;
}

absl::Status ShardedSafetensorsWriter::WriteBytes(const std::string& name, const void* data,
                                                  size_t bytes) {
  if (!impl_->error.ok()) return impl_->error;
  QCAL_RETURN_IF_ERROR(impl_->CheckNext(name, bytes));
  impl_->error = impl_->WriteNext(data, bytes);
  return impl_->error;
}

absl::Status ShardedSafetensorsWriter::Finish() {
  if (!impl_->error.ok()) return impl_->error;
  if (impl_->finished) {
    return absl::FailedPreconditionError(absl::StrCat(impl_->dir, ": Finish called twice"));
  }
  if (impl_->next < impl_->plan.size()) {
    return absl::FailedPreconditionError(
        absl::StrCat(impl_->dir, ": Finish after ", impl_->next, " of ", impl_->plan.size(),
                     " planned tensors; the next is \"", impl_->plan[impl_->next].name, "\""));
  }
  // An empty plan still gets its (header-only) file.
  if (impl_->open_shard < 0) impl_->error = impl_->OpenShard(0);
  if (impl_->error.ok()) impl_->error = impl_->CloseShard();
  if (impl_->error.ok() && !impl_->index_json.empty()) {
    impl_->error = WriteStringToFile(impl_->PathOf(impl_->index_file), impl_->index_json);
  }
  impl_->finished = impl_->error.ok();
  return impl_->error;
}

const std::vector<std::string>& ShardedSafetensorsWriter::shard_files() const {
  return impl_->shard_files;
}

}  // namespace qcal
