// A worker's scratch directory (services/worker/scratch.h): a SIGKILLed worker's directory, with
// what it staged, is removed by the next worker to start on the same parent; a live worker's
// (another process, or another ScratchSpace of this process) is not; hidden directories of a
// start-up cut short go once they are a minute old; a worker that ends removes its own.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>

#include "common/files.h"
#include "gtest/gtest.h"
#include "services/worker/scratch.h"
#include "tests/support/test_paths.h"

namespace qcal::worker {
namespace {

namespace fs = std::filesystem;

// Forks a child that creates a ScratchSpace under `parent`, stages a file in it, writes its path
// to a pipe and waits to be killed; returns the child's pid and the path.
std::pair<pid_t, std::string> StartOwner(const std::string& parent) {
  int fds[2];
  EXPECT_EQ(pipe(fds), 0);
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    auto s = ScratchSpace::Create(parent);
    if (!s.ok()) _exit(2);
    if (!WriteStringToFile((*s)->path() + "/block-00000.artifacts", "staged").ok()) _exit(3);
    const std::string path = (*s)->path() + "\n";
    if (write(fds[1], path.data(), path.size()) != static_cast<ssize_t>(path.size())) _exit(4);
    for (;;) pause();
  }
  close(fds[1]);
  std::string path;
  char c;
  while (read(fds[0], &c, 1) == 1 && c != '\n') path.push_back(c);
  close(fds[0]);
  return {pid, path};
}

TEST(WorkerScratchTest, ADeadWorkersDirectoryIsReclaimedALiveOnesIsNot) {
  const std::string parent = testing::MakeTempDir("worker_scratch_test");
  auto mine = ScratchSpace::Create(parent);
  ASSERT_TRUE(mine.ok()) << mine.status();
  EXPECT_EQ(fs::path((*mine)->path()).parent_path(), fs::path(parent));
  auto [live_pid, live_path] = StartOwner(parent);
  auto [dead_pid, dead_path] = StartOwner(parent);
  ASSERT_FALSE(live_path.empty());
  ASSERT_FALSE(dead_path.empty());
  ASSERT_TRUE(fs::exists(dead_path + "/block-00000.artifacts"));
  // Nobody is dead yet: nothing to reclaim.
  EXPECT_EQ(ReclaimScratch(parent), 0);
  kill(dead_pid, SIGKILL);
  waitpid(dead_pid, nullptr, 0);
  EXPECT_EQ(ReclaimScratch(parent), 1);
  EXPECT_FALSE(fs::exists(dead_path));
  EXPECT_TRUE(fs::exists(live_path + "/block-00000.artifacts"));
  EXPECT_TRUE(fs::exists((*mine)->path()));
  // The next worker to start reclaims the other one's once it is dead.
  kill(live_pid, SIGKILL);
  waitpid(live_pid, nullptr, 0);
  auto next = ScratchSpace::Create(parent);
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_FALSE(fs::exists(live_path));
  EXPECT_TRUE(fs::exists((*mine)->path()));
  // Ending removes one's own.
  const std::string next_path = (*next)->path();
  next->reset();
  EXPECT_FALSE(fs::exists(next_path));
  mine->reset();
  EXPECT_TRUE(fs::is_empty(parent));
  fs::remove_all(parent);
}

TEST(WorkerScratchTest, HiddenAndLocklessDirectories) {
  const std::string parent = testing::MakeTempDir("worker_scratch_test");
  const fs::path fresh = fs::path(parent) / ".qcal-worker-fresh1";
  const fs::path stale = fs::path(parent) / ".qcal-worker-stale1";
  const fs::path lockless = fs::path(parent) / "qcal-worker-nolock";
  const fs::path other = fs::path(parent) / "qcal-job-unrelated";
  for (const fs::path& d : {fresh, stale, lockless, other}) fs::create_directories(d);
  fs::last_write_time(stale, fs::file_time_type::clock::now() - std::chrono::minutes(2));
  EXPECT_EQ(ReclaimScratch(parent), 2);
  EXPECT_TRUE(fs::exists(fresh));
  EXPECT_FALSE(fs::exists(stale));
  EXPECT_FALSE(fs::exists(lockless));
  EXPECT_TRUE(fs::exists(other));  // not a worker's: left alone
  fs::remove_all(parent);
}

}  // namespace
}  // namespace qcal::worker
