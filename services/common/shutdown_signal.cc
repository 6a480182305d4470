#include "services/common/shutdown_signal.h"

#include <signal.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>

namespace qcal::service {
namespace {

int g_event_fd = -1;
std::atomic<int> g_signal{0};

void OnSignal(int sig) {
  // Async-signal-safe: an atomic store and a write(2).
  g_signal.store(sig);
  const uint64_t one = 1;
  const ssize_t n = write(g_event_fd, &one, sizeof(one));
  (void)n;
}

}  // namespace

ShutdownSignal& ShutdownSignal::Install() {
  static ShutdownSignal* instance = [] {
    g_event_fd = eventfd(0, EFD_CLOEXEC);
    struct sigaction sa = {};
    sa.sa_handler = OnSignal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    return new ShutdownSignal();
  }();
  return *instance;
}

int ShutdownSignal::Wait() {
  uint64_t value = 0;
  while (read(g_event_fd, &value, sizeof(value)) < 0 && errno == EINTR) {
  }
  return g_signal.load();
}

void ShutdownSignal::Wake() {
  const uint64_t one = 1;
  const ssize_t n = write(g_event_fd, &one, sizeof(one));
  (void)n;
}

}  // namespace qcal::service
