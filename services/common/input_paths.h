// Confinement of the paths a job names (DESIGN section 7, "Paths"): model, calibration and
// evaluation paths are relative to an input root; absolute paths, ".." components and symlinks
// that resolve outside the root are refused. Resolution uses openat2(RESOLVE_BENEATH) on a file
// descriptor of the root (on kernels without openat2, the opened descriptor's real path is
// checked against the root's), and every later read goes through the opened descriptor, so a
// path cannot be swapped between the check and the use.
//
// ValidateJobInputs is what SubmitJob checks before accepting a job (and what a worker checks
// again before running it): the model directory's config.json parses, every *.safetensors header
// is well formed with offsets inside its file, the index names only present shards, the
// tokenizer (tokenizer.json or tokenizer.model), calibration and evaluation files exist.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "qcal/v1/types.pb.h"

namespace qcal::service {

// An owned file descriptor, closed on destruction. Movable, not copyable.
class ScopedFd {
 public:
  ScopedFd() = default;
  explicit ScopedFd(int fd) : fd_(fd) {}
  ScopedFd(ScopedFd&& other) noexcept : fd_(other.release()) {}
  ScopedFd& operator=(ScopedFd&& other) noexcept;
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd();

  int get() const { return fd_; }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }
  // "/proc/self/fd/N": a path that opens the same file as this descriptor.
  std::string ProcPath() const;

 private:
  int fd_ = -1;
};

// A directory that user paths are confined to. Holds a descriptor of it.
class InputRoot {
 public:
  // The directory must exist. Errors name it.
  static absl::StatusOr<InputRoot> Open(const std::string& dir);

  const std::string& path() const { return path_; }

  // Opens `rel` beneath the root with open(2) `flags` (O_CLOEXEC is added). `what` names the field
  // in errors ("spec.model"). INVALID_ARGUMENT: empty, absolute, a ".." component, resolving
  // outside the root, missing, or (with O_DIRECTORY) not a directory.
  absl::StatusOr<ScopedFd> OpenBeneath(const std::string& rel, int flags,
                                       const std::string& what) const;
  // The same for a regular file opened read-only; INVALID_ARGUMENT when it is not a regular file.
  absl::StatusOr<ScopedFd> OpenFile(const std::string& rel, const std::string& what) const;

 private:
  std::string path_;
  std::string real_path_;
  std::shared_ptr<ScopedFd> fd_;
};

// What submit validation learned about the model.
struct ModelFacts {
  ModelConfig config;
  int num_blocks = 0;
  // Names of the *.safetensors files, sorted.
  std::vector<std::string> shards;
};

// Checks the model, calibration and evaluation inputs of a normalized spec under `root`.
// INVALID_ARGUMENT names the path relative to the root and what is wrong with it.
absl::StatusOr<ModelFacts> ValidateJobInputs(const InputRoot& root, const v1::JobSpec& spec);

}  // namespace qcal::service
