#include "services/common/input_paths.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"

namespace qcal::service {

ScopedFd& ScopedFd::operator=(ScopedFd&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) close(fd_);
    fd_ = other.release();
  }
  return *this;
}

ScopedFd::~ScopedFd() {
  if (fd_ >= 0) close(fd_);
}

std::string ScopedFd::ProcPath() const { return absl::StrCat("/proc/self/fd/", fd_); }

namespace {

absl::Status PathError(const std::string& what, const std::string& rel, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(what, " \"", rel, "\" ", why));
}

// The real path of an open descriptor.
absl::StatusOr<std::string> RealPathOf(int fd) {
  char buf[PATH_MAX];
  const std::string proc = absl::StrCat("/proc/self/fd/", fd);
  const ssize_t n = readlink(proc.c_str(), buf, sizeof(buf) - 1);
  if (n < 0)
    return absl::InternalError(absl::StrCat("readlink ", proc, ": ", std::strerror(errno)));
  return std::string(buf, static_cast<size_t>(n));
}

// Reads a whole file through its descriptor.
absl::StatusOr<std::string> ReadFd(int fd, const std::string& name) {
  std::string out;
  char buf[65536];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": read failed: ", std::strerror(errno)));
    }
    if (n == 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

absl::StatusOr<InputRoot> InputRoot::Open(const std::string& dir) {
  const int fd = open(dir.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("input root \"", dir, "\" cannot be opened: ", std::strerror(errno)));
  }
  InputRoot root;
  root.fd_ = std::make_shared<ScopedFd>(fd);
  root.path_ = dir;
  QCAL_ASSIGN_OR_RETURN(root.real_path_, RealPathOf(fd));
  return root;
}

absl::StatusOr<ScopedFd> InputRoot::OpenBeneath(const std::string& rel, int flags,
                                                const std::string& what) const {
  if (rel.empty()) return absl::InvalidArgumentError(absl::StrCat(what, " is empty"));
  if (rel[0] == '/')
    return PathError(what, rel, "is absolute; paths are relative to the input root");
  if (rel.find('\0') != std::string::npos) return PathError(what, rel, "contains a NUL byte");
  for (absl::string_view part : absl::StrSplit(rel, '/')) {
    if (part == "..") return PathError(what, rel, "contains \"..\"");
  }
  open_how how;
  std::memset(&how, 0, sizeof(how));
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  int fd = static_cast<int>(syscall(SYS_openat2, fd_->get(), rel.c_str(), &how, sizeof(how)));
  const bool no_openat2 = fd < 0 && errno == ENOSYS;
  if (no_openat2) {
    // Kernels before 5.6: open normally, then check where the descriptor really points.
    fd = openat(fd_->get(), rel.c_str(), flags | O_CLOEXEC);
  }
  if (fd < 0) {
    const int err = errno;
    if (err == EXDEV) return PathError(what, rel, "resolves outside the input root");
    if (err == ENOENT) return PathError(what, rel, "does not exist under the input root");
    if (err == ENOTDIR && (flags & O_DIRECTORY)) return PathError(what, rel, "is not a directory");
    if (err == ELOOP) return PathError(what, rel, "has too many levels of symbolic links");
    return PathError(what, rel, absl::StrCat("cannot be opened: ", std::strerror(err)));
  }
  ScopedFd owned(fd);
  if (no_openat2) {
    QCAL_ASSIGN_OR_RETURN(std::string real, RealPathOf(fd));
    if (real != real_path_ && real.rfind(real_path_ + "/", 0) != 0) {
      return PathError(what, rel, "resolves outside the input root");
    }
  }
  return owned;
}

absl::StatusOr<ScopedFd> InputRoot::OpenFile(const std::string& rel,
                                             const std::string& what) const {
  QCAL_ASSIGN_OR_RETURN(ScopedFd fd, OpenBeneath(rel, O_RDONLY, what));
  struct stat st;
  if (fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return PathError(what, rel, "is not a regular file");
  }
  return fd;
}

absl::StatusOr<ModelFacts> ValidateJobInputs(const InputRoot& root, const v1::JobSpec& spec) {
  const std::string& model = spec.model();
  QCAL_ASSIGN_OR_RETURN(ScopedFd dir_fd,
                        root.OpenBeneath(model, O_RDONLY | O_DIRECTORY, "spec.model"));
  auto file_in_model = [&](const std::string& name) { return absl::StrCat(model, "/", name); };

  ModelFacts facts;
  {
    const std::string rel = file_in_model("config.json");
    QCAL_ASSIGN_OR_RETURN(ScopedFd fd, root.OpenFile(rel, "model file"));
    QCAL_ASSIGN_OR_RETURN(std::string text, ReadFd(fd.get(), rel));
    absl::StatusOr<ModelConfig> config = ParseModelConfig(text, rel);
    if (!config.ok()) return absl::InvalidArgumentError(config.status().message());
    facts.config = *config;
    facts.num_blocks = config->num_layers;
  }

  // The directory's entries, read through a duplicate of the checked descriptor.
  const int list_fd = fcntl(dir_fd.get(), F_DUPFD_CLOEXEC, 0);
  DIR* d = list_fd >= 0 ? fdopendir(list_fd) : nullptr;
  if (d == nullptr) {
    if (list_fd >= 0) close(list_fd);
    return absl::InvalidArgumentError(absl::StrCat("spec.model \"", model, "\" cannot be listed"));
  }
  bool has_index = false;
  while (dirent* e = readdir(d)) {
    const std::string name = e->d_name;
    if (EndsWith(name, ".safetensors")) facts.shards.push_back(name);
    if (name == "model.safetensors.index.json") has_index = true;
  }
  closedir(d);
  std::sort(facts.shards.begin(), facts.shards.end());
  if (facts.shards.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("spec.model \"", model, "\" has no *.safetensors file"));
  }
  for (const std::string& shard : facts.shards) {
    const std::string rel = file_in_model(shard);
    QCAL_ASSIGN_OR_RETURN(ScopedFd fd, root.OpenFile(rel, "model file"));
    // The header is validated through the checked descriptor; messages name the relative path.
    const std::string proc = fd.ProcPath();
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::Open(proc);
    if (!file.ok()) {
      return absl::InvalidArgumentError(
          absl::StrReplaceAll(file.status().message(), {{proc, rel}}));
    }
  }
  if (has_index) {
    const std::string rel = file_in_model("model.safetensors.index.json");
    QCAL_ASSIGN_OR_RETURN(ScopedFd fd, root.OpenFile(rel, "model file"));
    QCAL_ASSIGN_OR_RETURN(std::string text, ReadFd(fd.get(), rel));
    const nlohmann::json index = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (index.is_discarded() || !index.is_object() || !index.contains("weight_map") ||
        !index["weight_map"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(rel, ": not an index (no \"weight_map\" object)"));
    }
    const std::set<std::string> present(facts.shards.begin(), facts.shards.end());
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      if (!file.is_string() || present.count(file.get<std::string>()) == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(rel, ": tensor \"", tensor, "\" maps to a missing shard ", file.dump()));
      }
    }
  }
  // The tokenizer: tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece).
  {
    absl::StatusOr<ScopedFd> json = root.OpenFile(file_in_model("tokenizer.json"), "model file");
    if (!json.ok()) {
      absl::StatusOr<ScopedFd> model =
          root.OpenFile(file_in_model("tokenizer.model"), "model file");
      if (!model.ok()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "spec.model \"", spec.model(), "\" has no tokenizer: neither tokenizer.json (",
            json.status().message(), ") nor tokenizer.model (", model.status().message(), ")"));
      }
    }
  }
  QCAL_RETURN_IF_ERROR(root.OpenFile(spec.calib(), "spec.calib").status());
  if (spec.has_eval_text()) {
    QCAL_RETURN_IF_ERROR(root.OpenFile(spec.eval_text(), "spec.eval_text").status());
  }
  return facts;
}

}  // namespace qcal::service
