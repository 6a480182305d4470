#include "services/worker/scratch.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace qcal::worker {
namespace fs = std::filesystem;

namespace {

constexpr char kPrefix[] = "qcal-worker-";
constexpr char kLockName[] = "lock";

bool StartsWith(const std::string& s, const std::string& prefix) { return s.rfind(prefix, 0) == 0; }

}  // namespace

int ReclaimScratch(const std::string& parent) {
  int removed = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(parent, ec)) {
    const std::string name = e.path().filename().string();
    if (!e.is_directory(ec)) continue;
    if (StartsWith(name, absl::StrCat(".", kPrefix))) {
      // Hidden: being set up, or left by a crash while it was. Only an old one is abandoned.
      const auto age = fs::file_time_type::clock::now() - fs::last_write_time(e.path(), ec);
      if (!ec && age > std::chrono::minutes(1)) {
        fs::remove_all(e.path(), ec);
        ++removed;
      }
      continue;
    }
    if (!StartsWith(name, kPrefix)) continue;
    const std::string lock = (e.path() / kLockName).string();
    const int fd = open(lock.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) != 0) {
      close(fd);  // held: its worker lives
      continue;
    }
    // The lock was free (or is missing): its owner is gone. Remove the directory while holding
    // the lock, so that a second sweeper skips it.
    fs::remove_all(e.path(), ec);
    if (fd >= 0) close(fd);
    if (ec) {
      spdlog::warn("worker: cannot remove the dead worker's scratch {}: {}", e.path().string(),
                   ec.message());
      continue;
    }
    ++removed;
  }
  return removed;
}

absl::StatusOr<std::unique_ptr<ScratchSpace>> ScratchSpace::Create(const std::string& parent) {
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("scratch dir ", parent, ": cannot create: ", ec.message()));
  }
  const int reclaimed = ReclaimScratch(parent);
  if (reclaimed > 0) {
    spdlog::info("worker: removed {} scratch directories of dead workers under {}", reclaimed,
                 parent);
  }
  std::string hidden = (fs::path(parent) / absl::StrCat(".", kPrefix, "XXXXXX")).string();
  if (mkdtemp(hidden.data()) == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "scratch dir ", parent, ": cannot create a directory: ", std::strerror(errno)));
  }
  auto s = std::unique_ptr<ScratchSpace>(new ScratchSpace());
  const std::string lock = (fs::path(hidden) / kLockName).string();
  s->lock_fd_ = open(lock.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (s->lock_fd_ < 0 || flock(s->lock_fd_, LOCK_EX | LOCK_NB) != 0) {
    const std::string why = std::strerror(errno);
    fs::remove_all(hidden, ec);
    return absl::UnavailableError(absl::StrCat(lock, ": cannot lock: ", why));
  }
  const fs::path visible = fs::path(parent) / fs::path(hidden).filename().string().substr(1);
  fs::rename(hidden, visible, ec);
  if (ec) {
    fs::remove_all(hidden, ec);
    return absl::UnavailableError(
        absl::StrCat(visible.string(), ": cannot rename into place: ", ec.message()));
  }
  s->path_ = visible.string();
  return s;
}

ScratchSpace::~ScratchSpace() {
  std::error_code ec;
  if (!path_.empty()) fs::remove_all(path_, ec);
  if (lock_fd_ >= 0) close(lock_fd_);
}

}  // namespace qcal::worker
